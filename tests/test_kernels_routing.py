"""MSA routing scores: Triton kernel (interpreted on CPU) vs torch reference vs a naive formula."""

import pytest
import torch
import torch.nn.functional as F

from msa_kernels import routing
from msa_kernels.routing import route_scores_torch, route_scores_triton


def owning_docs(n_docs):
    return (n_docs + 1) // 2


def make_inputs(n_tokens, n_keys, n_query_heads, n_key_heads, dim, n_docs, *, dtype, shuffled, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(n_tokens, n_query_heads, dim, generator=gen), dim=-1).to(dtype)
    keys = F.normalize(torch.randn(n_keys, n_key_heads, dim, generator=gen), dim=-1).to(dtype)
    # Only the first half of the documents own keys, so the rest must come back -inf.
    key_doc = torch.randint(0, owning_docs(n_docs), (n_keys,), generator=gen).sort().values
    if shuffled:
        key_doc = key_doc[torch.randperm(n_keys, generator=gen)]
    return q, keys, key_doc.to(torch.int32), n_docs


def naive_doc_scores(q, keys, key_doc, n_docs):
    """The MSA formula as written: full [T, N, Hq] cosines, mean over heads, max over tokens, max per doc."""
    group = q.shape[1] // keys.shape[1]
    per_head = torch.einsum("thd,chd->tch", q.double(), keys.double().repeat_interleave(group, dim=1))
    chunk_score = per_head.mean(dim=2).amax(dim=0)  # [N]
    doc_score = torch.full((n_docs,), float("-inf"), dtype=torch.float64)
    for c, doc in enumerate(key_doc.tolist()):
        doc_score[doc] = max(doc_score[doc], chunk_score[c])
    return doc_score.float()


CASES = [
    # (T, N, Hq, Hk, d, n_docs, dtype, shuffled)
    pytest.param(1, 1, 9, 3, 64, 1, torch.float32, False, id="T1-N1-gqa3"),
    pytest.param(7, 37, 8, 2, 64, 20, torch.bfloat16, True, id="T7-N37-gqa4-bf16-unsorted"),
    pytest.param(7, 130, 4, 4, 32, 60, torch.float32, False, id="T7-N130-gqa1-d32"),
    pytest.param(17, 130, 9, 3, 64, 90, torch.bfloat16, True, id="T17-N130-gqa3-bf16-unsorted"),
]


@pytest.mark.parametrize("n_tokens, n_keys, hq, hk, dim, n_docs, dtype, shuffled", CASES)
def test_reference_matches_naive_formula(n_tokens, n_keys, hq, hk, dim, n_docs, dtype, shuffled):
    q, keys, key_doc, n_docs = make_inputs(
        n_tokens, n_keys, hq, hk, dim, n_docs, dtype=dtype, shuffled=shuffled
    )
    expected = naive_doc_scores(q, keys, key_doc, n_docs)
    torch.testing.assert_close(route_scores_torch(q, keys, key_doc, n_docs), expected, atol=1e-5, rtol=0)
    # Streaming in tiles smaller than N (and not dividing it) gives the same answer.
    streamed = route_scores_torch(q, keys, key_doc, n_docs, tile=16)
    torch.testing.assert_close(streamed, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n_tokens, n_keys, hq, hk, dim, n_docs, dtype, shuffled", CASES)
def test_triton_kernel_matches_reference(n_tokens, n_keys, hq, hk, dim, n_docs, dtype, shuffled):
    q, keys, key_doc, n_docs = make_inputs(
        n_tokens, n_keys, hq, hk, dim, n_docs, dtype=dtype, shuffled=shuffled
    )
    got = route_scores_triton(q, keys, key_doc, n_docs)
    assert got.dtype == torch.float32 and got.shape == (n_docs,)
    torch.testing.assert_close(got, route_scores_torch(q, keys, key_doc, n_docs), atol=1e-5, rtol=0)
    assert (got[owning_docs(n_docs) :] == float("-inf")).all()  # documents without keys


def test_triton_kernel_int64_doc_ids_and_strided_keys():
    q, keys, key_doc, n_docs = make_inputs(5, 70, 8, 2, 64, 30, dtype=torch.float32, shuffled=True)
    strided = torch.stack([keys, -keys], dim=1)[:, 0]  # [N, Hk, d] view with stride(0) = 2 * Hk * d
    got = route_scores_triton(q, strided, key_doc.long(), n_docs)
    torch.testing.assert_close(got, route_scores_torch(q, keys, key_doc, n_docs), atol=1e-5, rtol=0)


def test_triton_kernel_reads_one_layers_heads_out_of_a_multi_layer_key_tensor():
    # An MSA checkpoint's bank holds every router layer's key heads side by side; each layer routes on its own.
    q, keys, key_doc, n_docs = make_inputs(4, 50, 8, 2, 64, 12, dtype=torch.bfloat16, shuffled=False)
    stacked = torch.cat([torch.randn_like(keys), keys, torch.randn_like(keys)], dim=1)   # [N, 3 * Hk, d]
    got = route_scores_triton(q, stacked[:, 2:4], key_doc, n_docs)
    torch.testing.assert_close(got, route_scores_torch(q, keys, key_doc, n_docs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", [route_scores_torch, route_scores_triton])
@pytest.mark.parametrize("n_tokens, n_keys", [(0, 10), (3, 0)])
def test_kernel_empty_inputs_give_minus_inf(impl, n_tokens, n_keys):
    q, keys, key_doc, n_docs = make_inputs(n_tokens, n_keys, 9, 3, 64, 4, dtype=torch.float32, shuffled=False)
    assert torch.equal(impl(q, keys, key_doc, n_docs), torch.full((4,), float("-inf")))


def test_kernel_dispatch_follows_device_and_env(monkeypatch):
    monkeypatch.setattr(routing, "route_scores_triton", lambda *args: "triton")
    monkeypatch.setattr(routing, "route_scores_torch", lambda *args: "torch")
    inputs = make_inputs(2, 3, 9, 3, 64, 2, dtype=torch.float32, shuffled=False)
    monkeypatch.delenv("MSA_KERNELS", raising=False)
    assert routing.route_scores(*inputs) == "torch"
    monkeypatch.setenv("MSA_KERNELS", "triton")
    assert routing.route_scores(*inputs) == "triton"
