"""MSA stage 2 routing: score every memory chunk against the routing query, keep the best per document.

    chunk_score[c] = max over routing tokens t of ( mean over query heads h of <q[t, h], keys[c, h // G]> )
    doc_score[doc] = max over the chunks c of doc of chunk_score[c]

q and keys arrive L2-normalised per head, so each dot product is a cosine. The mean over the G query
heads that share a key head is folded into q first (exact: the dot product is linear), which turns
the scoring into one matmul [T, Hk*d] x [Hk*d, N]. Neither implementation ever holds [T, N] at once.
"""

import os

import torch
import triton
import triton.language as tl


def _fold_query_heads(q: torch.Tensor, n_key_heads: int) -> torch.Tensor:
    """q [T, Hq, d] -> qg [T, Hk*d] fp32, with qg[t, hk] = sum over the G query heads of group hk / Hq."""
    n_tokens, n_query_heads, dim = q.shape
    if n_query_heads % n_key_heads:
        raise ValueError(f"query heads ({n_query_heads}) must be a multiple of key heads ({n_key_heads})")
    group = n_query_heads // n_key_heads
    qg = q.float().reshape(n_tokens, n_key_heads, group, dim).sum(dim=2) / n_query_heads
    return qg.reshape(n_tokens, n_key_heads * dim)


def route_scores_torch(q, keys, key_doc, n_docs, *, tile=65536) -> torch.Tensor:
    """Reference on any device. q [T, Hq, d], keys [N, Hk, d], key_doc [N] -> doc_score [n_docs] fp32.

    Streams over `tile` keys at a time, so the extra memory is O(tile * (T + Hk*d)) whatever N is
    (keys may be a memory-mapped bank far larger than RAM).
    """
    n_keys, n_key_heads, dim = keys.shape
    doc_score = torch.full((n_docs,), float("-inf"), dtype=torch.float32, device=keys.device)
    if q.shape[0] == 0 or n_keys == 0:
        return doc_score
    qg = _fold_query_heads(q, n_key_heads).to(keys.device)  # [T, Hk*d]
    # Buffers reused across tiles: a fresh tens-of-MB tensor per tile costs page faults on CPU.
    key_buf = torch.empty(min(tile, n_keys), n_key_heads, dim, dtype=torch.float32, device=keys.device)
    score_buf = torch.empty(min(tile, n_keys), qg.shape[0], dtype=torch.float32, device=keys.device)
    for start in range(0, n_keys, tile):
        n = min(tile, n_keys - start)
        key_tile = key_buf[:n].copy_(keys[start : start + n])  # [n, Hk, d] fp32
        scores = torch.matmul(key_tile.view(n, -1), qg.T, out=score_buf[:n])  # [n, T]
        chunk_score = scores.amax(dim=1)  # [n]: max over routing tokens
        tile_doc = key_doc[start : start + n].to(device=keys.device, dtype=torch.int64)
        doc_score.scatter_reduce_(0, tile_doc, chunk_score, reduce="amax", include_self=True)
    return doc_score


@triton.jit
def _route_scores_kernel(
    qg_ptr,  # [T, D] fp32, contiguous; D = Hk * d
    keys_ptr,  # [N, Hk, d], any strides
    key_doc_ptr,  # [N] int32/int64
    doc_score_ptr,  # [n_docs] fp32, pre-filled with -inf
    n_tokens,
    n_keys,
    dim,
    flat_dim,  # D
    stride_kn,
    stride_kh,
    stride_kd,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # int64 key offsets: N * Hk * d passes 2**31 elements for large banks.
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_keys
    offs_t = tl.arange(0, BLOCK_T)
    offs_j = tl.arange(0, BLOCK_D)  # position in the flattened (head, dim) axis

    chunk_score = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    for t0 in range(0, n_tokens, BLOCK_T):
        mask_t = t0 + offs_t < n_tokens
        scores = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        # D = Hk*d is rarely a power of two (3 * 64 = 192), so walk it in masked slices.
        for j0 in range(0, flat_dim, BLOCK_D):
            j = j0 + offs_j
            mask_j = j < flat_dim
            q_tile = tl.load(
                qg_ptr + (t0 + offs_t)[:, None] * flat_dim + j[None, :],
                mask=mask_t[:, None] & mask_j[None, :],
                other=0.0,
            )  # [BLOCK_T, BLOCK_D]
            key_offs = (j // dim) * stride_kh + (j % dim) * stride_kd
            key_tile = tl.load(
                keys_ptr + key_offs[:, None] + offs_n[None, :] * stride_kn,
                mask=mask_j[:, None] & mask_n[None, :],
                other=0.0,
            ).to(tl.float32)  # [BLOCK_D, BLOCK_N], already transposed for the dot
            # IEEE fp32: TF32 would blur close cosines and change the ranking; the kernel is
            # bandwidth-bound on the keys anyway.
            scores += tl.dot(q_tile, key_tile, input_precision="ieee")
        scores = tl.where(mask_t[:, None], scores, float("-inf"))
        chunk_score = tl.maximum(chunk_score, tl.max(scores, axis=0))

    doc = tl.load(key_doc_ptr + offs_n, mask=mask_n, other=0)
    # fp32 atomic_max is supported (Triton lowers it to a signed int max / unsigned int min pair),
    # so keys of one document in different programs merge without a [N] buffer.
    tl.atomic_max(doc_score_ptr + doc, chunk_score, mask=mask_n)


def route_scores_triton(q, keys, key_doc, n_docs) -> torch.Tensor:
    """Fused Triton scoring: q [T, Hq, d], keys [N, Hk, d], key_doc [N] -> doc_score [n_docs] fp32."""
    n_keys, n_key_heads, dim = keys.shape
    doc_score = torch.full((n_docs,), float("-inf"), dtype=torch.float32, device=keys.device)
    n_tokens = q.shape[0]
    if n_tokens == 0 or n_keys == 0:
        return doc_score
    qg = _fold_query_heads(q, n_key_heads).to(keys.device).contiguous()  # [T, Hk*d]
    flat_dim = n_key_heads * dim
    block_n = 64
    grid = (triton.cdiv(n_keys, block_n),)
    _route_scores_kernel[grid](
        qg,
        keys,
        key_doc.to(keys.device),
        doc_score,
        n_tokens,
        n_keys,
        dim,
        flat_dim,
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        BLOCK_T=16,  # tl.dot needs every dimension >= 16
        BLOCK_N=block_n,
        BLOCK_D=min(max(triton.next_power_of_2(flat_dim), 16), 128),
    )
    return doc_score


def use_triton(tensor: torch.Tensor) -> bool:
    """Triton on GPU tensors, or anywhere when MSA_KERNELS=triton (the interpreter, for tests)."""
    return tensor.is_cuda or os.environ.get("MSA_KERNELS") == "triton"


def route_scores(q, keys, key_doc, n_docs) -> torch.Tensor:
    """doc_score [n_docs] fp32 for q [T, Hq, d] against keys [N, Hk, d] owned by documents key_doc [N]."""
    if use_triton(keys):
        return route_scores_triton(q, keys, key_doc, n_docs)
    return route_scores_torch(q, keys, key_doc, n_docs)
