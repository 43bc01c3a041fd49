"""MSA stage 2 routing: score every memory chunk against the routing query, aggregate per document.

    s[t, c] = mean over query heads h of <q[t, h], keys[c, h // G]>     (routing token t, chunk c)

and one of two aggregates over the routing tokens t and a document's chunks c:

    "max"  (MSA's Eq. 2):   doc_score[doc] = max over c of doc of ( max over t of s[t, c] )
    "mean" (late interaction, as ColBERT's MaxSim):
                            doc_score[doc] = mean over t of ( max over c of doc of s[t, c] )

"max" is what MSA checkpoints are trained with, so it is the default. "mean" lets every routing token vote
for the document that matches it best, instead of one token deciding alone; it ranks better for a router
trained with it. Either way a document with no keys scores -inf.

q and keys arrive L2-normalised per head, so each dot product is a cosine. The mean over the G query
heads that share a key head is folded into q first (exact: the dot product is linear), which turns
the scoring into one matmul [T, Hk*d] x [Hk*d, N]. Neither implementation ever holds [T, N] at once;
"mean" keeps a [n_docs, T] running max instead of [n_docs].

The torch reference is here; the Triton kernel is in triton_routing.py, imported only when a Triton path is
taken (GPU tensors, or MSA_KERNELS=triton), so this module imports without Triton (macOS has none).
"""

import os

import torch

AGGREGATES = ("max", "mean")


def _check_aggregate(aggregate: str) -> None:
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, not {aggregate!r}")


def _fold_query_heads(q: torch.Tensor, n_key_heads: int) -> torch.Tensor:
    """q [T, Hq, d] -> qg [T, Hk*d] fp32, with qg[t, hk] = sum over the G query heads of group hk / Hq."""
    n_tokens, n_query_heads, dim = q.shape
    if n_query_heads % n_key_heads:
        raise ValueError(f"query heads ({n_query_heads}) must be a multiple of key heads ({n_key_heads})")
    group = n_query_heads // n_key_heads
    qg = q.float().reshape(n_tokens, n_key_heads, group, dim).sum(dim=2) / n_query_heads
    return qg.reshape(n_tokens, n_key_heads * dim)


def scan_tile(n_tokens: int) -> int:
    """Keys per tile: a power of two whose [tile, T] fp32 scores take at most 8 MiB, within 4,096-32,768.
    Measured on this 2-core CPU (BENCHMARKS.md, "100M tokens"): scores that stay in cache make the per-document
    maxima 2.2x faster at 170 routing tokens than a fixed 65,536-key tile, and 1.35x at 12."""
    fits = (8 << 20) // (4 * max(n_tokens, 1))
    return min(32768, max(4096, 1 << (fits.bit_length() - 1)))


def route_scores_torch(q, keys, key_doc, n_docs, *, aggregate="max", tile=None) -> torch.Tensor:
    """Reference on any device. q [T, Hq, d], keys [N, Hk, d], key_doc [N] -> doc_score [n_docs] fp32.

    Streams over `tile` keys at a time (default: scan_tile(T)), so the extra memory is O(tile * (T + Hk*d))
    whatever N is (keys may be a memory-mapped bank far larger than RAM), plus O(n_docs * T) for
    aggregate="mean".
    """
    _check_aggregate(aggregate)
    n_keys, n_key_heads, dim = keys.shape
    doc_score = torch.full((n_docs,), float("-inf"), dtype=torch.float32, device=keys.device)
    if q.shape[0] == 0 or n_keys == 0:
        return doc_score
    qg = _fold_query_heads(q, n_key_heads).to(keys.device)  # [T, Hk*d]
    n_tokens = qg.shape[0]
    tile = tile or scan_tile(n_tokens)
    # Buffers reused across tiles: a fresh tens-of-MB tensor per tile costs page faults on CPU.
    key_buf = torch.empty(min(tile, n_keys), n_key_heads, dim, dtype=torch.float32, device=keys.device)
    score_buf = torch.empty(min(tile, n_keys), n_tokens, dtype=torch.float32, device=keys.device)
    if aggregate == "mean":
        doc_token = torch.full((n_docs, n_tokens), float("-inf"), dtype=torch.float32, device=keys.device)
    for start in range(0, n_keys, tile):
        n = min(tile, n_keys - start)
        key_tile = key_buf[:n].copy_(keys[start : start + n])  # [n, Hk, d] fp32
        scores = torch.matmul(key_tile.view(n, -1), qg.T, out=score_buf[:n])  # [n, T]
        tile_doc = key_doc[start : start + n].to(device=keys.device, dtype=torch.int64)
        if aggregate == "mean":
            # Max per (document, token) over this tile's chunks; the expanded index is a view, no copy.
            index = tile_doc[:, None].expand(n, n_tokens)
            doc_token.scatter_reduce_(0, index, scores, reduce="amax", include_self=True)
        else:
            chunk_score = scores.amax(dim=1)  # [n]: max over routing tokens
            doc_score.scatter_reduce_(0, tile_doc, chunk_score, reduce="amax", include_self=True)
    if aggregate == "mean":
        # A document without keys has a row of -inf, whose mean stays -inf.
        torch.mean(doc_token, dim=1, out=doc_score)
    return doc_score


def route_scores_triton(q, keys, key_doc, n_docs, *, aggregate="max") -> torch.Tensor:
    """Fused Triton scoring (triton_routing.py): q [T, Hq, d], keys [N, Hk, d], key_doc [N] -> doc_score [n_docs]
    fp32. Triton is imported here, on first use, not with this module: it is installed on Linux only."""
    _check_aggregate(aggregate)
    from . import triton_routing

    doc_score = torch.full((n_docs,), float("-inf"), dtype=torch.float32, device=keys.device)
    if q.shape[0] == 0 or keys.shape[0] == 0:
        return doc_score
    qg = _fold_query_heads(q, keys.shape[1]).to(keys.device).contiguous()  # [T, Hk*d]
    triton_routing.launch(qg, keys, key_doc.to(keys.device), doc_score, aggregate=aggregate)
    return doc_score


def use_triton(tensor: torch.Tensor) -> bool:
    """Triton on GPU tensors, or anywhere when MSA_KERNELS=triton (the interpreter, for tests)."""
    return tensor.is_cuda or os.environ.get("MSA_KERNELS") == "triton"


def route_scores(q, keys, key_doc, n_docs, aggregate="max") -> torch.Tensor:
    """doc_score [n_docs] fp32 for q [T, Hq, d] against keys [N, Hk, d] owned by documents key_doc [N];
    aggregate "max" (MSA's Eq. 2) or "mean" (late interaction), see the module docstring."""
    if use_triton(keys):
        return route_scores_triton(q, keys, key_doc, n_docs, aggregate=aggregate)
    return route_scores_torch(q, keys, key_doc, n_docs, aggregate=aggregate)
