"""MSA stage 3 router-layer attention: queries attend to [selected memory chunks | local tokens].

Every query sees all selected pooled chunks (rows `mem_index` of a chunk pool) and, causally, the
local sequence, with the causal mask aligned bottom-right: query i of Tq sits at local position
Tl - Tq + i. The order of chunks in the prefix does not matter, so the chunks are read straight from
the pool through the index table instead of being copied into a concatenated KV.

The torch reference is here; the Triton kernel is in triton_memory_attention.py, imported only when a Triton
path is taken (GPU tensors, or MSA_KERNELS=triton), so this module imports without Triton (macOS has none).
"""

import torch

from .routing import use_triton


def _check_heads(q, k_local) -> int:
    n_query_heads, n_kv_heads = q.shape[1], k_local.shape[1]
    if n_query_heads % n_kv_heads:
        raise ValueError(f"query heads ({n_query_heads}) must be a multiple of kv heads ({n_kv_heads})")
    return n_query_heads // n_kv_heads


def memory_attention_torch(q, k_local, v_local, k_mem, v_mem, mem_index, *, scale=None) -> torch.Tensor:
    """Reference: explicit fp32 masked softmax over the materialised [k_mem[mem_index] | k_local].

    q [Tq, Hq, d]; k_local, v_local [Tl, Hk, d]; k_mem, v_mem [Nc, Hk, d]; mem_index [S] -> [Tq, Hq, d].
    """
    n_queries, _, dim = q.shape
    n_local = k_local.shape[0]
    group = _check_heads(q, k_local)
    scale = dim**-0.5 if scale is None else scale
    mem_index = mem_index.to(k_mem.device)
    k = torch.cat([k_mem[mem_index].to(k_local.device), k_local]).float()  # [S+Tl, Hk, d]
    v = torch.cat([v_mem[mem_index].to(v_local.device), v_local]).float()
    k = k.repeat_interleave(group, dim=1)  # [S+Tl, Hq, d]
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale  # [Hq, Tq, S+Tl]

    n_mem = mem_index.numel()
    query_pos = torch.arange(n_queries, device=q.device) + (n_local - n_queries)  # [Tq]
    key_pos = torch.arange(n_mem + n_local, device=q.device) - n_mem  # memory at < 0: always visible
    visible = key_pos[None, :] <= query_pos[:, None]  # [Tq, S+Tl]
    probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)


def memory_attention_triton(q, k_local, v_local, k_mem, v_mem, mem_index, *, scale=None) -> torch.Tensor:
    """Flash-attention style kernel (triton_memory_attention.py), shapes as memory_attention_torch. Triton is
    imported here, on first use, not with this module: it is installed on Linux only."""
    from . import triton_memory_attention

    n_queries, _, dim = q.shape
    if k_local.shape[0] < n_queries:
        raise ValueError(f"local length ({k_local.shape[0]}) must cover the {n_queries} query tokens")
    group = _check_heads(q, k_local)
    out = torch.empty_like(q)
    if n_queries:
        triton_memory_attention.launch(q, k_local, v_local, k_mem, v_mem, mem_index, out, group,
                                       dim**-0.5 if scale is None else scale)
    return out


def memory_attention(q, k_local, v_local, k_mem, v_mem, mem_index, *, scale=None) -> torch.Tensor:
    """Output [Tq, Hq, d] of q over [k_mem[mem_index] | causal k_local].

    Triton for GPU tensors or with MSA_KERNELS=triton, the torch reference otherwise.
    """
    if use_triton(q):
        return memory_attention_triton(q, k_local, v_local, k_mem, v_mem, mem_index, scale=scale)
    return memory_attention_torch(q, k_local, v_local, k_mem, v_mem, mem_index, scale=scale)
