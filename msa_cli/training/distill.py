"""Distillation for router training: a teacher that already ranks well (all-MiniLM-L6-v2, model/embedder.py)
gives soft targets over each batch's candidates and its best non-positives as hard negatives.

1,350 labelled questions and a few thousand inverse-cloze pairs are little for a router; the teacher's scores
say, for every candidate, how related it is, not only which one is the answer. The teacher is used in training
only: routing at run time is the model's own.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..model.embedder import Embedder

TEACHER_TAU = 0.05   # the teacher's cosines are spread over ~0.3: sharpen them to about the student's range


@dataclass
class Teacher:
    queries: Tensor   # [Q, e] unit embeddings of the training queries
    pool: Tensor      # [P, e] of the pool's passages

    def logits(self, queries: list[int], docs: list[int]) -> Tensor:
        return self.queries[queries] @ self.pool[docs].T / TEACHER_TAU

    def negatives(self, positives: list[list[int]], depth: int, block: int = 1024) -> list[list[int]]:
        """Per query, the `depth` pool passages the teacher ranks highest that are not its positives."""
        out = []
        for start in range(0, len(positives), block):
            s = self.queries[start:start + block] @ self.pool.T
            for r, pos in enumerate(positives[start:start + block]):
                s[r, pos] = float("-inf")
            out += torch.topk(s, min(depth, s.shape[1] - 1), dim=1).indices.tolist()
        return out


def teacher_for(queries: list[str], pool: list[str], cache_dir: Path | None) -> Teacher:
    """The teacher's embeddings of the queries and the pool, from the cache when these texts were embedded before
    (embedding 6,000 passages takes minutes on two cores)."""
    h = hashlib.sha256(b"all-MiniLM-L6-v2")
    for t in [*queries, "\1", *pool]:
        h.update(t.encode() + b"\0")
    path = cache_dir / f"{h.hexdigest()[:24]}-teacher.safetensors" if cache_dir else None
    if path and path.is_file():
        t = load_file(path)
        return Teacher(t["queries"], t["pool"])
    embedder = Embedder()
    teacher = Teacher(embedder.embed(queries), embedder.embed(pool))
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"queries": teacher.queries, "pool": teacher.pool}, tmp)
        tmp.replace(path)
    return teacher


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """KL(teacher || student) over each row's candidates, averaged over rows."""
    return F.kl_div(F.log_softmax(student_logits, 1), F.log_softmax(teacher_logits, 1), log_target=True,
                    reduction="batchmean")
