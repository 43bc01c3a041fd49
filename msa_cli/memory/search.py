"""Stage 2 over a whole bank: the router's scan of every live document, fused with BM25 for learned routers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import settings as defaults
from . import lexical
from .bank import Bank, Document
from .router import Router


@dataclass
class Hit:
    document: Document
    score: float          # the ranking score: the router's, fused with BM25's for learned routers
    router: float = 0.0   # the router's own score (cosine: MSA's max over question tokens and keys)
    bm25: float = 0.0     # BM25's score for the routed text, in rare-word matches (lexical.rare_word)


def search(bank: Bank, router: Router, q: Tensor, text: str, k: int, fuse: bool = True) -> list[Hit]:
    """The k documents for routing query q (Router.query of `text`), best first: MSA's router score, fused with
    BM25 over the same documents when the router is learned (`fuse=False` gives the router alone; see
    lexical.fused). Each hit also carries both raw scores, which say how relevant it is whatever the bank's size
    (qa.interleave)."""
    doc_ids, scores = router.scores(q, bank.routing_segments())
    if not doc_ids.numel():
        return []
    index = bank.lexical()
    bm25 = index.scores(text)[torch.searchsorted(index.doc_ids, doc_ids)]
    ranking = scores
    if fuse and router.spec.kind == "learned" and defaults.FUSION_WEIGHT > 0:
        ranking = lexical.fused(scores, bm25, defaults.FUSION_WEIGHT)
    best = torch.topk(ranking, min(k, ranking.shape[0])).indices
    rare = index.rare_word()
    return [Hit(bank.document(int(doc_ids[i])), float(ranking[i]), float(scores[i]), float(bm25[i]) / rare)
            for i in best]
