"""Crash points for the fault-injection tests: `MSA_CRASH_AT=NAME` makes the process kill itself (SIGKILL, as
`kill -9` would) when it reaches the point NAME. Only tests set the variable; unset, a crash point costs one
dictionary lookup."""

from __future__ import annotations

import os
import signal


def crash_point(name: str) -> None:
    if os.environ.get("MSA_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
