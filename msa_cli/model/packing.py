"""Documents packed into one forward without padding, as stage 1 and router training run them.

Each document is encoded alone: positions restart at 0 (document-wise RoPE) and attention never crosses
documents, so what a document yields does not depend on what it was packed with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .backbone import causal_attention


@dataclass
class Pack:
    """Documents' tokens end to end: T tokens of n documents."""
    ids: Tensor          # (T,)
    token_doc: Tensor    # (T,) each token's document, 0..n-1
    positions: Tensor    # (T,) each token's place in its document
    lengths: Tensor      # (n,)

    @classmethod
    def of(cls, docs: list[list[int]]) -> "Pack":
        lengths = torch.tensor([len(d) for d in docs])
        token_doc = torch.repeat_interleave(torch.arange(len(docs)), lengths)
        return cls(torch.tensor([t for d in docs for t in d]), token_doc, rank_in_doc(token_doc), lengths)

    def attend(self, i: int, x: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Causal attention inside each document (Backbone.forward's `attend`): q [T, Hq, d], k/v [T, Hk, d]."""
        out = torch.empty_like(q)
        start = 0
        for end in torch.cumsum(self.lengths, 0).tolist():
            out[start:end] = causal_attention(q[start:end], k[start:end], v[start:end])
            start = end
        return out


def packs(lengths: list[int], pack_tokens: int) -> list[list[int]]:
    """Consecutive documents grouped so each forward holds at most pack_tokens (a longer document goes alone)."""
    out, current, size = [], [], 0
    for i, n in enumerate(lengths):
        if current and size + n > pack_tokens:
            out.append(current)
            current, size = [], 0
        current.append(i)
        size += n
    if current:
        out.append(current)
    return out


def rank_in_doc(token_doc: Tensor) -> Tensor:
    """Each token's index inside its document, for packed, contiguous documents."""
    starts = torch.ones_like(token_doc, dtype=torch.bool)
    starts[1:] = token_doc[1:] != token_doc[:-1]
    start_pos = torch.cummax(torch.where(starts, torch.arange(len(token_doc)), 0), 0).values
    return torch.arange(len(token_doc)) - start_pos
