"""Stage 2 over a sharded bank, which every rank runs at once on its own shard (MSA's Memory Parallel, digest §3.4):
the query comes from rank 0, each rank scores its shard and keeps its local top-k, and rank 0 merges the
candidates into the global top-k. The merged list is what one bank holding every shard's documents would return
(memory/search.py), because what the scores depend on bank-wide is summed over the ranks first:

- BM25's IDF and average length: each rank's document frequency of each query word, document count and total
  length (one all-reduce), so that a word rare in one shard but common in the bank weighs what it weighs in the bank;
- the z-score fusion's means and spreads of the router's and BM25's scores over all documents (one more, when the
  router's score is fused with BM25's).

A rank whose shard is too big to scan whole on a CPU routes through its coarse keys (memory/coarse.py), as one
bank does; its share of the router's statistics then comes from its sample, and the result is the coarse search's
approximation, not an exact equal. An MSA checkpoint routes per router layer: `select` merges each layer's top-k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .. import settings as defaults
from ..engine import Engine
from ..memory import coarse, lexical
from ..memory.search import Hit, two_steps
from .group import Group


@dataclass
class LocalShard:
    """What a rank routes over: its engine (model, shard, router) and its shard's BM25 statistics."""

    engine: Engine
    counts: lexical.TermCounts
    doc_ids: Tensor            # [n] the shard's live documents, ascending: the rows of counts

    @classmethod
    def of(cls, engine: Engine) -> "LocalShard":
        docs = engine.bank.documents()
        return cls(engine, lexical.TermCounts([d.text for d in docs]),
                   torch.tensor([d.doc_id for d in docs], dtype=torch.long))


def route(group: Group, shard: LocalShard, q: Tensor, text: str, k: int, fuse: bool) -> list[Hit] | None:
    """The k documents of the whole bank for routing query q (of `text`), best first, on rank 0 (None elsewhere)."""
    bank, router = shard.engine.bank, shard.engine.router
    n_local = shard.doc_ids.numel()
    words = shard.counts.words(text)
    n, length, *df = group.sum([n_local, float(shard.counts.lengths.sum()), *shard.counts.frequencies(words)])
    every_bm25 = shard.counts.scores(words, np.array(df), int(n), length / n if n else 1.0)   # [n_local]
    segments = bank.routing_segments()
    if not n_local:
        doc_ids, scores, router_sums = torch.zeros(0, dtype=torch.long), torch.zeros(0), [0.0, 0.0, 0.0]
    elif two_steps(router, segments):
        doc_ids, scores, (mean, std) = coarse.two_step_scores(router, q, segments, every_bm25, shard.doc_ids)
        # the sample stands for all of the shard's documents
        router_sums = [n_local, n_local * mean, (n_local - 1) * std ** 2 + n_local * mean ** 2]
    else:
        doc_ids, scores = router.scores(q, segments)
        router_sums = _sums(scores)
    bm25 = every_bm25[torch.searchsorted(shard.doc_ids, doc_ids)]
    ranking = scores
    if fuse and router.spec.kind == "learned" and defaults.FUSION_WEIGHT > 0:
        totals = group.sum(router_sums + _sums(every_bm25))
        ranking = lexical.fused(scores, bm25, defaults.FUSION_WEIGHT, _stats(*totals[:3]), _stats(*totals[3:]))
    best = torch.topk(ranking, min(k, ranking.shape[0])).indices
    candidates = [(float(ranking[i]), float(scores[i]), float(bm25[i]), bank.document(int(doc_ids[i])))
                  for i in best]
    gathered = group.gather(candidates)
    if gathered is None:
        return None
    merged = sorted((c for part in gathered for c in part), key=lambda c: -c[0])[:k]
    rare = lexical.rare_word(int(n))
    return [Hit(doc, score, router_score, b / rare) for score, router_score, b, doc in merged]


def select(group: Group, shard: LocalShard, layer: int, x: Tensor, k: int) -> tuple[list[int], list[float]] | None:
    """An MSA checkpoint's choice in one router layer over the whole bank (Engine.select_ids on every shard,
    merged), on rank 0."""
    engine = shard.engine
    ids, scores = engine.select_ids(layer, x.to(engine.model.backbone.device), k) if shard.doc_ids.numel() \
        else ([], [])
    gathered = group.gather(list(zip(scores, ids)))
    if gathered is None:
        return None
    merged = sorted((c for part in gathered for c in part), key=lambda c: -c[0])[:k]
    return [doc_id for _, doc_id in merged], [score for score, _ in merged]


def _sums(s: Tensor) -> list[float]:
    s = s.double()
    return [float(s.numel()), float(s.sum()), float((s * s).sum())]


def _stats(n: float, total: float, squares: float) -> lexical.Stats:
    """(mean, standard deviation) from the count, sum and sum of squares, as lexical.stats gives them (the
    unbiased spread; (0, 0) below two documents)."""
    if n < 2:
        return 0.0, 0.0
    mean = total / n
    return mean, math.sqrt(max(squares - n * mean * mean, 0.0) / (n - 1))
