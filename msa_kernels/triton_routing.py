"""The Triton kernel of MSA stage 2 routing and its launcher (formulas and reference: routing.py).

One kernel serves both aggregates; the constexpr MEAN picks what the scoring loop writes:
  "max":  each program reduces its [T, BLOCK_N] scores to one max per chunk and max-merges it into doc_score.
  "mean": each program max-merges every (document, token) score into a [n_docs, T] buffer; the launcher then
          takes the mean over tokens in torch.

Imported only when a Triton path is taken (routing.route_scores_triton): Triton is installed on Linux only.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _route_scores_kernel(
    qg_ptr,  # [T, D] fp32, contiguous; D = Hk * d
    keys_ptr,  # [N, Hk, d], any strides
    key_doc_ptr,  # [N] int32/int64
    out_ptr,  # fp32 pre-filled with -inf: doc_score [n_docs] ("max"), or [n_docs, T] contiguous ("mean")
    n_tokens,
    n_keys,
    dim,
    flat_dim,  # D
    stride_kn,
    stride_kh,
    stride_kd,
    MEAN: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # int64 key offsets: N * Hk * d passes 2**31 elements for large banks.
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_keys
    offs_t = tl.arange(0, BLOCK_T)
    offs_j = tl.arange(0, BLOCK_D)  # position in the flattened (head, dim) axis
    # int64 as well: the [n_docs, T] buffer of "mean" can pass 2**31 elements.
    doc = tl.load(key_doc_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)

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
        if MEAN:
            # Chunks of one document (in this program or another) meet in the same cell; padding tokens
            # and keys are masked out, so they never touch the buffer.
            tokens = (t0 + offs_t).to(tl.int64)
            tl.atomic_max(
                out_ptr + doc[None, :] * n_tokens + tokens[:, None],
                scores,
                mask=mask_t[:, None] & mask_n[None, :],
            )
        else:
            scores = tl.where(mask_t[:, None], scores, float("-inf"))
            chunk_score = tl.maximum(chunk_score, tl.max(scores, axis=0))

    if not MEAN:
        # fp32 atomic_max is supported (Triton lowers it to a signed int max / unsigned int min pair),
        # so keys of one document in different programs merge without a [N] buffer.
        tl.atomic_max(out_ptr + doc, chunk_score, mask=mask_n)


def launch(qg, keys, key_doc, doc_score, *, aggregate="max") -> None:
    """Fused Triton scoring into doc_score [n_docs] fp32 (max-merged for "max", overwritten for "mean"):
    qg [T, Hk*d] the folded query (routing._fold_query_heads), keys [N, Hk, d], key_doc [N], all on the GPU
    (or under the interpreter)."""
    n_keys, n_key_heads, dim = keys.shape
    n_tokens = qg.shape[0]
    flat_dim = n_key_heads * dim
    mean = aggregate == "mean"
    if mean:
        out = torch.full((doc_score.shape[0], n_tokens), float("-inf"), dtype=torch.float32, device=keys.device)
    else:
        out = doc_score
    block_n = 64
    grid = (triton.cdiv(n_keys, block_n),)
    _route_scores_kernel[grid](
        qg,
        keys,
        key_doc,
        out,
        n_tokens,
        n_keys,
        dim,
        flat_dim,
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        MEAN=mean,
        BLOCK_T=16,  # tl.dot needs every dimension >= 16
        BLOCK_N=block_n,
        BLOCK_D=min(max(triton.next_power_of_2(flat_dim), 16), 128),
    )
    if mean:
        # A document without keys keeps its row of -inf, whose mean stays -inf.
        torch.mean(out, dim=1, out=doc_score)
