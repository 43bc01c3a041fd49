"""Stage 2 over a whole bank: the router's scores of the live documents (every key scanned, or for a large bank
through the coarse keys: memory/coarse.py), fused with BM25 for learned routers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import settings as defaults
from . import coarse, lexical
from .bank import Bank, Document
from .router import Router


@dataclass
class Hit:
    document: Document
    score: float          # the ranking score: the router's, fused with BM25's for learned routers
    router: float = 0.0   # the router's own score (cosine: MSA's max over question tokens and keys)
    bm25: float = 0.0     # BM25's score for the routed text, in rare-word matches (lexical.rare_word)


def two_steps(router: Router, segments) -> bool:
    """Whether to route through the coarse keys (memory/coarse.py) rather than scan every key: on a CPU, for a
    bank of more than settings.EXACT_SCAN_KEYS keys, with a router scoring cosines (an MSA checkpoint's is
    scanned whole, as the paper does on its GPUs)."""
    return (router.device.type == "cpu" and router.spec.kind != "msa"
            and sum(seg.keys.shape[0] for seg in segments) > defaults.EXACT_SCAN_KEYS)


def search(bank: Bank, router: Router, q: Tensor, text: str, k: int, fuse: bool = True) -> list[Hit]:
    """The k documents for routing query q (Router.query of `text`), best first: MSA's router score, fused with
    BM25 over the same documents when the router is learned (`fuse=False` gives the router alone; see
    lexical.fused). Each hit also carries both raw scores, which say how relevant it is whatever the bank's size
    (qa.interleave)."""
    segments = bank.routing_segments()
    index = bank.lexical()
    every_bm25 = index.scores(text)                       # [N live documents], index.doc_ids order
    router_stats = None
    if two_steps(router, segments):
        doc_ids, scores, router_stats = coarse.two_step_scores(router, q, segments, every_bm25, index.doc_ids)
    else:
        doc_ids, scores = router.scores(q, segments)
    if not doc_ids.numel():
        return []
    bm25 = every_bm25[torch.searchsorted(index.doc_ids, doc_ids)]
    ranking = scores
    if fuse and router.spec.kind == "learned" and defaults.FUSION_WEIGHT > 0:
        ranking = lexical.fused(scores, bm25, defaults.FUSION_WEIGHT, router_stats, lexical.stats(every_bm25))
    best = torch.topk(ranking, min(k, ranking.shape[0])).indices
    rare = index.rare_word()
    return [Hit(bank.document(int(doc_ids[i])), float(ranking[i]), float(scores[i]), float(bm25[i]) / rare)
            for i in best]
