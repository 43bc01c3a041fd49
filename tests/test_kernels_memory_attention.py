"""Router-layer memory attention: Triton kernel (interpreted on CPU) vs torch reference vs dense softmax."""

import importlib

import pytest
import torch
import torch.nn.functional as F

from msa_kernels.memory_attention import memory_attention_torch, memory_attention_triton

# Not `from msa_kernels import memory_attention`: the package re-exports the function of that name.
attention_module = importlib.import_module("msa_kernels.memory_attention")


def make_inputs(n_queries, n_local, n_selected, n_query_heads, n_kv_heads, dim, *, dtype, pool=50, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    q = randn(n_queries, n_query_heads, dim)
    k_local, v_local = randn(n_local, n_kv_heads, dim), randn(n_local, n_kv_heads, dim)
    k_mem, v_mem = randn(pool, n_kv_heads, dim), randn(pool, n_kv_heads, dim)
    mem_index = torch.randint(0, max(pool, 1), (n_selected,), generator=gen)  # unsorted, repeats allowed
    return q, k_local, v_local, k_mem, v_mem, mem_index


def dense_attention(q, k_local, v_local, k_mem, v_mem, mem_index, scale):
    """One query and one head at a time, in float64, over exactly the keys it may see."""
    n_queries, n_query_heads, _ = q.shape
    n_local, n_kv_heads, _ = k_local.shape
    out = torch.empty(q.shape, dtype=torch.float64)
    for i in range(n_queries):
        last_visible = n_local - n_queries + i
        for h in range(n_query_heads):
            kv = h // (n_query_heads // n_kv_heads)
            keys = torch.cat([k_mem[mem_index, kv], k_local[: last_visible + 1, kv]]).double()
            values = torch.cat([v_mem[mem_index, kv], v_local[: last_visible + 1, kv]]).double()
            weights = torch.softmax(keys @ q[i, h].double() * scale, dim=0)
            out[i, h] = weights @ values
    return out


CASES = [
    # (Tq, Tl, S, Hq, Hk, d, dtype)
    pytest.param(1, 9, 37, 9, 3, 64, torch.float32, id="decode-S37-gqa3"),
    pytest.param(5, 9, 37, 8, 2, 64, torch.float32, id="Tq5-Tl9-S37-gqa4"),
    pytest.param(5, 9, 0, 4, 4, 32, torch.float32, id="Tq5-Tl9-S0-gqa1-d32"),
    pytest.param(20, 41, 3, 8, 2, 64, torch.float32, id="Tq20-Tl41-S3-multiblock"),
    pytest.param(7, 12, 40, 9, 3, 64, torch.bfloat16, id="Tq7-Tl12-S40-gqa3-bf16"),
]
TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.mark.parametrize("n_queries, n_local, n_selected, hq, hk, dim, dtype", CASES)
def test_reference_matches_dense_softmax(n_queries, n_local, n_selected, hq, hk, dim, dtype):
    inputs = make_inputs(n_queries, n_local, n_selected, hq, hk, dim, dtype=dtype)
    got = memory_attention_torch(*inputs)
    assert got.dtype == dtype and got.shape == (n_queries, hq, dim)
    expected = dense_attention(*inputs, scale=dim**-0.5)
    torch.testing.assert_close(got.double(), expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("n_queries, n_local, n_selected, hq, hk, dim, dtype", CASES)
def test_triton_kernel_matches_reference(n_queries, n_local, n_selected, hq, hk, dim, dtype):
    inputs = make_inputs(n_queries, n_local, n_selected, hq, hk, dim, dtype=dtype)
    got = memory_attention_triton(*inputs)
    assert got.dtype == dtype and got.shape == (n_queries, hq, dim)
    torch.testing.assert_close(got, memory_attention_torch(*inputs), **TOLERANCE[dtype])


@pytest.mark.parametrize("impl", [memory_attention_torch, memory_attention_triton])
def test_kernel_empty_selection_is_plain_causal_attention(impl):
    q, k_local, v_local, _, _, mem_index = make_inputs(7, 7, 0, 8, 2, 64, dtype=torch.float32, pool=0)
    empty_pool = torch.empty(0, 2, 64)  # Nc = 0
    got = impl(q, k_local, v_local, empty_pool, empty_pool, mem_index)
    expected = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        k_local.repeat_interleave(4, dim=1).transpose(0, 1),
        v_local.repeat_interleave(4, dim=1).transpose(0, 1),
        is_causal=True,  # top-left aligned, the same as bottom-right when Tq == Tl
    ).transpose(0, 1)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)


def test_triton_kernel_strided_pool_and_custom_scale():
    q, k_local, v_local, k_mem, v_mem, mem_index = make_inputs(3, 6, 10, 8, 2, 64, dtype=torch.float32)
    # A pool stored as [Nc, 2 (k|v), Hk, d], read through strided views as a bank would be.
    bank = torch.stack([k_mem, v_mem], dim=1)
    got = memory_attention_triton(q, k_local, v_local, bank[:, 0], bank[:, 1], mem_index, scale=0.3)
    expected = memory_attention_torch(q, k_local, v_local, k_mem, v_mem, mem_index, scale=0.3)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)


def test_kernel_dispatch_follows_device_and_env(monkeypatch):
    monkeypatch.setattr(attention_module, "memory_attention_triton", lambda *args, **kwargs: "triton")
    monkeypatch.setattr(attention_module, "memory_attention_torch", lambda *args, **kwargs: "torch")
    inputs = make_inputs(1, 2, 1, 8, 2, 64, dtype=torch.float32)
    monkeypatch.delenv("MSA_KERNELS", raising=False)
    assert attention_module.memory_attention(*inputs) == "torch"
    monkeypatch.setenv("MSA_KERNELS", "triton")
    assert attention_module.memory_attention(*inputs) == "triton"
