"""Crash points for the fault-injection tests: `MSA_CRASH_AT=NAME` makes the process kill itself (SIGKILL, as
`kill -9` would) when it reaches the point NAME, and `MSA_HANG_AT=NAME` makes it stop there for good (a rank that
went silent). Only tests set the variables; unset, a crash point costs two dictionary lookups."""

from __future__ import annotations

import os
import signal
import time


def crash_point(name: str) -> None:
    if os.environ.get("MSA_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
    while os.environ.get("MSA_HANG_AT") == name:
        time.sleep(60)
