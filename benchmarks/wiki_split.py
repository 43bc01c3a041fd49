"""The 2wiki corpus in two fixed halves: one the router trains on, one that only ever appears as distractors.

A distractor the router was trained on flatters it: the scaling banks would then measure recall over text it
has already learnt to tell apart. The halves go by the first byte of each file name's sha256 (even: training,
odd: distractors), so they are the same on every machine and do not depend on the files' order.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def in_training_half(path: Path) -> bool:
    return hashlib.sha256(path.name.encode()).digest()[0] % 2 == 0


def training_half(corpus: Path) -> list[Path]:
    """2wiki paragraphs the router may train on (inverse-cloze pairs, distillation), in name order."""
    return [f for f in sorted(corpus.iterdir()) if in_training_half(f)]


def distractor_half(corpus: Path) -> list[Path]:
    """2wiki paragraphs the router never sees in training: the scaling banks' filler, in name order."""
    return [f for f in sorted(corpus.iterdir()) if not in_training_half(f)]
