"""Coarse routing keys: an index over the hot tier, for banks too large to scan whole on every question.

Each document's routing keys, in runs of GROUP consecutive keys, are averaged and renormalised into one coarse key
(every document with keys has at least one). Writers store them beside the keys, in each segment's coarse-key
file (docs/bank-format.md). A question
is then routed in two steps (memory/search.py): the router scores every document on its coarse keys, GROUP times
fewer than its keys, exactly as it scores keys; then the best CANDIDATES documents by that score, the best
CANDIDATES by BM25, and a fixed sample of SAMPLE documents are scored on their own keys. The ranking is over those
exact scores; the sample gives the mean and spread of the router's scores over the whole bank, which the fusion
with BM25 standardises by. A segment written before coarse keys existed has all its documents scored exactly.
How much of the exact top-k this finds is measured on a real bank (benchmarks/index_recall.py, BENCHMARKS.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from msa_kernels.routing import route_scores

from . import lexical

GROUP = 32          # keys per coarse key
CANDIDATES = 1024   # documents the coarse scores and BM25 each add
SAMPLE = 1024       # documents sampled for the router's score statistics


def coarse_keys(keys: Tensor, key_counts: list[int], group: int = GROUP) -> tuple[Tensor, list[int]]:
    """keys [K, Hr, d] grouped by document (key_counts each) -> (coarse [C, Hr, d] fp32 unit vectors, coarse
    keys per document): key j of a document goes into its coarse key j // group."""
    counts = torch.tensor(key_counts, dtype=torch.int64)
    n_coarse = (counts + group - 1) // group
    doc_of_key = torch.repeat_interleave(torch.arange(len(key_counts)), counts)
    rank = torch.arange(keys.shape[0]) - (torch.cumsum(counts, 0) - counts)[doc_of_key]
    coarse_of_key = (torch.cumsum(n_coarse, 0) - n_coarse)[doc_of_key] + rank // group
    sums = torch.zeros(int(n_coarse.sum()), *keys.shape[1:]).index_add_(0, coarse_of_key, keys.float())
    return F.normalize(sums, dim=-1), n_coarse.tolist()


def two_step_scores(router, q: Tensor, segments, bm25: Tensor, bm25_ids: Tensor) -> tuple[Tensor, Tensor,
                                                                                         lexical.Stats]:
    """The router's exact scores of the documents worth scoring (see the module docstring): (doc_ids [M],
    scores [M], (mean, std) of the router's scores over the bank, estimated on the sample). bm25 [N]: BM25's
    score of every live document, bm25_ids [N] their ids."""
    candidates, sample = CANDIDATES, SAMPLE
    coarse_ids, coarse, exact_rows = [], [], []
    for i, seg in enumerate(segments):
        if seg.coarse is None:   # written before coarse keys: every live document is scored on its keys
            exact_rows.append((i, seg.live.nonzero().flatten()))
            continue
        s = route_scores(q, seg.coarse, seg.coarse_doc, seg.doc_ids.shape[0], aggregate=router.spec.aggregate)
        coarse_ids.append(seg.doc_ids[seg.live])
        coarse.append(s[seg.live])
    chosen = [bm25_ids[torch.topk(bm25, min(candidates, bm25.shape[0])).indices]]
    if coarse:
        ids, scores = torch.cat(coarse_ids), torch.cat(coarse)
        chosen.append(ids[torch.topk(scores, min(candidates, ids.shape[0])).indices])
    drawn = bm25_ids[torch.randperm(bm25_ids.shape[0], generator=torch.Generator().manual_seed(0))[:sample]]
    wanted = torch.unique(torch.cat([*chosen, drawn]))
    starts = torch.tensor([seg.doc_ids[0] if seg.doc_ids.numel() else 0 for seg in segments])
    seg_of = torch.searchsorted(starts, wanted, right=True) - 1
    for i, seg in enumerate(segments):
        if seg.coarse is not None:
            rows = wanted[seg_of == i] - seg.doc_ids[0]
            exact_rows.append((i, rows[seg.live[rows]]))
    ids = torch.cat([segments[i].doc_ids[rows] for i, rows in exact_rows])
    scores = exact_scores(router, q, [(segments[i], rows) for i, rows in exact_rows])
    return ids, scores, lexical.stats(scores[torch.isin(ids, drawn)])


def exact_scores(router, q: Tensor, parts: list[tuple[object, Tensor]]) -> Tensor:
    """The router's scores of some rows of some segments on their own keys, in one scan of the gathered keys:
    parts is [(segment, rows)], each row's keys one range of the segment's key_doc."""
    keys, key_doc, n = [], [], 0
    for seg, rows in parts:
        lo = torch.searchsorted(seg.key_doc, rows.to(seg.key_doc.dtype))
        hi = torch.searchsorted(seg.key_doc, rows.to(seg.key_doc.dtype), right=True)
        counts = hi - lo
        starts = torch.cumsum(counts, 0) - counts
        keys.append(seg.keys[torch.repeat_interleave(lo - starts, counts) + torch.arange(int(counts.sum()))])
        key_doc.append(torch.repeat_interleave(torch.arange(n, n + rows.shape[0], dtype=torch.int32), counts))
        n += rows.shape[0]
    if not n:
        return torch.zeros(0)
    return route_scores(q, torch.cat(keys), torch.cat(key_doc), n, aggregate=router.spec.aggregate)
