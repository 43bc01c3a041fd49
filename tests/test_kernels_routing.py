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
    monkeypatch.setattr(routing, "route_scores_triton", lambda *args, aggregate: ("triton", aggregate))
    monkeypatch.setattr(routing, "route_scores_torch", lambda *args, aggregate: ("torch", aggregate))
    inputs = make_inputs(2, 3, 9, 3, 64, 2, dtype=torch.float32, shuffled=False)
    monkeypatch.delenv("MSA_KERNELS", raising=False)
    assert routing.route_scores(*inputs) == ("torch", "max")
    monkeypatch.setenv("MSA_KERNELS", "triton")
    assert routing.route_scores(*inputs) == ("triton", "max")
    assert routing.route_scores(*inputs, aggregate="mean") == ("triton", "mean")


# --- aggregate="mean": mean over routing tokens of the max over a document's chunks (late interaction) ---


def naive_mean_doc_scores(q, keys, key_doc, n_docs):
    """The late-interaction formula as written: dense [T, N] cosines in fp64, max per (token, doc), mean over T."""
    group = q.shape[1] // keys.shape[1]
    per_head = torch.einsum("thd,chd->tch", q.double(), keys.double().repeat_interleave(group, dim=1))
    scores = per_head.mean(dim=2)  # [T, N]
    doc_score = torch.full((n_docs,), float("-inf"), dtype=torch.float64)
    for doc in range(n_docs):
        owned = key_doc == doc
        if owned.any():
            doc_score[doc] = scores[:, owned].amax(dim=1).mean()
    return doc_score.float()


def uneven_docs_inputs(n_tokens, n_keys, *, dtype, seed=0):
    """Doc 0 owns one key, doc 1 none, doc 2 two, doc 3 the rest, doc 4 one; keys in shuffled order."""
    q, keys, _, _ = make_inputs(n_tokens, n_keys, 8, 2, 32, 5, dtype=dtype, shuffled=False, seed=seed)
    key_doc = torch.tensor([0, 2, 2, 4] + [3] * (n_keys - 4))
    key_doc = key_doc[torch.randperm(n_keys, generator=torch.Generator().manual_seed(seed))]
    return q, keys, key_doc.to(torch.int32), 5


MEAN_CASES = [
    # (T, N, dtype): T not a multiple of BLOCK_T (16) and N not a multiple of BLOCK_N (64) where it counts.
    pytest.param(1, 5, torch.float32, id="T1-N5"),
    pytest.param(7, 37, torch.bfloat16, id="T7-N37-bf16"),
    pytest.param(17, 130, torch.float32, id="T17-N130"),
    pytest.param(33, 70, torch.bfloat16, id="T33-N70-bf16"),
]


@pytest.mark.parametrize("n_tokens, n_keys, dtype", MEAN_CASES)
def test_mean_reference_matches_naive_formula(n_tokens, n_keys, dtype):
    q, keys, key_doc, n_docs = uneven_docs_inputs(n_tokens, n_keys, dtype=dtype)
    expected = naive_mean_doc_scores(q, keys, key_doc, n_docs)
    assert expected[1] == float("-inf") and torch.isfinite(expected[[0, 2, 3, 4]]).all()
    got = route_scores_torch(q, keys, key_doc, n_docs, aggregate="mean")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # Tiles smaller than N (and not dividing it) carry the running max per (document, token) across tiles.
    streamed = route_scores_torch(q, keys, key_doc, n_docs, aggregate="mean", tile=3)
    torch.testing.assert_close(streamed, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n_tokens, n_keys, dtype", MEAN_CASES)
def test_mean_triton_kernel_matches_reference(n_tokens, n_keys, dtype):
    q, keys, key_doc, n_docs = uneven_docs_inputs(n_tokens, n_keys, dtype=dtype)
    got = route_scores_triton(q, keys, key_doc, n_docs, aggregate="mean")
    assert got.dtype == torch.float32 and got.shape == (n_docs,)
    expected = route_scores_torch(q, keys, key_doc, n_docs, aggregate="mean")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert got[1] == float("-inf")


@pytest.mark.parametrize("n_tokens, n_keys, hq, hk, dim, n_docs, dtype, shuffled", CASES)
def test_mean_triton_kernel_matches_reference_on_shared_cases(n_tokens, n_keys, hq, hk, dim, n_docs, dtype, shuffled):
    q, keys, key_doc, n_docs = make_inputs(n_tokens, n_keys, hq, hk, dim, n_docs, dtype=dtype, shuffled=shuffled)
    got = route_scores_triton(q, keys, key_doc, n_docs, aggregate="mean")
    torch.testing.assert_close(got, naive_mean_doc_scores(q, keys, key_doc, n_docs), atol=1e-5, rtol=0)
    assert (got[owning_docs(n_docs) :] == float("-inf")).all()


def test_mean_through_the_dispatcher_with_msa_kernels_triton(monkeypatch):
    q, keys, key_doc, n_docs = uneven_docs_inputs(19, 70, dtype=torch.float32, seed=1)
    expected = naive_mean_doc_scores(q, keys, key_doc, n_docs)
    for env in ("", "triton"):  # torch reference, then the Triton kernel
        monkeypatch.setenv("MSA_KERNELS", env)
        got = routing.route_scores(q, keys, key_doc, n_docs, aggregate="mean")
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_mean_differs_from_max():
    # Two tokens, two docs: doc A matches token 0 perfectly and token 1 not at all; doc B matches both halfway.
    # "max" prefers A (1.0 > 0.7), "mean" prefers B (0.7 > 0.5): the aggregate is really switched.
    e0, e1 = torch.eye(2)
    half = F.normalize(e0 + e1, dim=0)
    q = torch.stack([e0, e1])[:, None, :]  # [T=2, H=1, d=2]
    keys = torch.stack([e0, half])[:, None, :]  # doc 0 = e0, doc 1 = (e0 + e1) / sqrt(2)
    key_doc = torch.tensor([0, 1])
    for impl in (route_scores_torch, route_scores_triton):
        torch.testing.assert_close(impl(q, keys, key_doc, 2), torch.tensor([1.0, 0.5**0.5]))
        torch.testing.assert_close(impl(q, keys, key_doc, 2, aggregate="mean"), torch.tensor([0.5, 0.5**0.5]))


@pytest.mark.parametrize("impl", [route_scores_torch, route_scores_triton, routing.route_scores])
@pytest.mark.parametrize("aggregate", ["sum", "MAX", None])
def test_unknown_aggregate_raises(impl, aggregate):
    q, keys, key_doc, n_docs = make_inputs(2, 3, 9, 3, 64, 2, dtype=torch.float32, shuffled=False)
    with pytest.raises(ValueError, match="aggregate"):
        impl(q, keys, key_doc, n_docs, aggregate=aggregate)


@pytest.mark.parametrize("impl", [route_scores_torch, route_scores_triton])
def test_max_is_the_default_bit_for_bit(impl):
    q, keys, key_doc, n_docs = make_inputs(17, 130, 9, 3, 64, 90, dtype=torch.bfloat16, shuffled=True)
    assert torch.equal(impl(q, keys, key_doc, n_docs, aggregate="max"), impl(q, keys, key_doc, n_docs))


@pytest.mark.parametrize("impl", [route_scores_torch, route_scores_triton])
@pytest.mark.parametrize("n_tokens, n_keys", [(0, 10), (3, 0)])
def test_mean_empty_inputs_give_minus_inf(impl, n_tokens, n_keys):
    q, keys, key_doc, n_docs = make_inputs(n_tokens, n_keys, 9, 3, 64, 4, dtype=torch.float32, shuffled=False)
    assert torch.equal(impl(q, keys, key_doc, n_docs, aggregate="mean"), torch.full((4,), float("-inf")))
