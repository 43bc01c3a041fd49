"""The Triton kernel of MSA stage 3 router-layer attention and its launcher (reference: memory_attention.py).

Imported only when a Triton path is taken (memory_attention.memory_attention_triton): Triton is installed on
Linux only.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _online_softmax_step(q, k, v, valid, m_i, l_i, acc, scale):
    """Fold one key tile into the running (row max m_i, row sum l_i, unnormalised output acc).

    q [BM, BD] fp32; k, v [BN, BD]; valid [BM, BN] bool; m_i, l_i [BM] fp32; acc [BM, BD] fp32.
    """
    # Everything runs in fp32: Triton's interpreter does not support bf16 arithmetic (tl.dot
    # multiplies the raw bit patterns), and bf16 values are exact in the TF32 the GPU dots use.
    k = k.to(tl.float32)
    v = v.to(tl.float32)
    scores = tl.dot(q, tl.trans(k)) * scale
    scores = tl.where(valid, scores, float("-inf"))
    # The first tile shows every row a key (memory rows are visible to all, local key 0 to every
    # query), so m_new is finite from then on: later fully masked rows add exp(-inf) = 0, never NaN.
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p, v)
    return m_new, l_i, acc


@triton.jit
def _memory_attention_kernel(
    q_ptr, k_local_ptr, v_local_ptr, k_mem_ptr, v_mem_ptr, mem_index_ptr, out_ptr,
    n_queries, n_local, n_mem, dim, group, scale,
    stride_qt, stride_qh, stride_qd,
    stride_klt, stride_klh, stride_kld,
    stride_vlt, stride_vlh, stride_vld,
    stride_kmn, stride_kmh, stride_kmd,
    stride_vmn, stride_vmh, stride_vmd,
    stride_ot, stride_oh, stride_od,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1)
    kv_head = head // group

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < n_queries
    mask_d = offs_d < dim

    q = tl.load(
        q_ptr + offs_m[:, None] * stride_qt + head * stride_qh + offs_d[None, :] * stride_qd,
        mask=mask_m[:, None] & mask_d[None, :],
        other=0.0,
    ).to(tl.float32)  # [BM, BD]
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)

    # Selected memory chunks: gather pool rows through the index table, visible to every query.
    for s0 in range(0, n_mem, BLOCK_N):
        mask_s = s0 + offs_n < n_mem
        rows = tl.load(mem_index_ptr + s0 + offs_n, mask=mask_s, other=0).to(tl.int64)  # [BN]
        kv_mask = mask_s[:, None] & mask_d[None, :]
        k = tl.load(
            k_mem_ptr + rows[:, None] * stride_kmn + kv_head * stride_kmh + offs_d[None, :] * stride_kmd,
            mask=kv_mask,
            other=0.0,
        )
        v = tl.load(
            v_mem_ptr + rows[:, None] * stride_vmn + kv_head * stride_vmh + offs_d[None, :] * stride_vmd,
            mask=kv_mask,
            other=0.0,
        )
        m_i, l_i, acc = _online_softmax_step(q, k, v, mask_s[None, :], m_i, l_i, acc, scale)

    # Local tokens, causal and bottom-right aligned; stop at the block's last visible key.
    query_pos = offs_m + (n_local - n_queries)  # [BM]
    end = tl.minimum(n_local, start_m + BLOCK_M + (n_local - n_queries))
    for n0 in range(0, end, BLOCK_N):
        key_pos = n0 + offs_n  # [BN]
        mask_n = key_pos < n_local
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(
            k_local_ptr + key_pos[:, None] * stride_klt + kv_head * stride_klh + offs_d[None, :] * stride_kld,
            mask=kv_mask,
            other=0.0,
        )
        v = tl.load(
            v_local_ptr + key_pos[:, None] * stride_vlt + kv_head * stride_vlh + offs_d[None, :] * stride_vld,
            mask=kv_mask,
            other=0.0,
        )
        valid = mask_n[None, :] & (key_pos[None, :] <= query_pos[:, None])
        m_i, l_i, acc = _online_softmax_step(q, k, v, valid, m_i, l_i, acc, scale)

    out = acc / l_i[:, None]
    tl.store(
        out_ptr + offs_m[:, None] * stride_ot + head * stride_oh + offs_d[None, :] * stride_od,
        out.to(out_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_d[None, :],
    )


def launch(q, k_local, v_local, k_mem, v_mem, mem_index, out, group: int, scale: float) -> None:
    """Flash-attention style kernel into out [Tq, Hq, d], grid (query blocks, query heads); shapes as
    memory_attention.memory_attention_torch, checked there (group: query heads per KV head)."""
    n_queries, n_query_heads, dim = q.shape
    n_local = k_local.shape[0]
    if k_mem.device != q.device:
        # Triton reads device memory only (a memory-mapped bank is not): bring over just the S
        # selected rows, not the pool.
        mem_index = mem_index.to(k_mem.device)
        k_mem, v_mem = k_mem[mem_index].to(q.device), v_mem[mem_index].to(q.device)
        mem_index = torch.arange(mem_index.numel(), device=q.device)
    block_m, block_n = 16, 32  # tl.dot needs every dimension >= 16
    grid = (triton.cdiv(n_queries, block_m), n_query_heads)
    _memory_attention_kernel[grid](
        q, k_local, v_local, k_mem, v_mem, mem_index.to(q.device), out,
        n_queries, n_local, mem_index.numel(), dim, group, scale,
        *q.stride(), *k_local.stride(), *v_local.stride(),
        *k_mem.stride(), *v_mem.stride(), *out.stride(),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=max(triton.next_power_of_2(dim), 16),
    )
