"""The native router's keys and queries, checked against the formulas written out directly."""

import json

import torch
import torch.nn.functional as F

from msa_kernels.routing import route_scores_torch
from msa_cli.memory.mode import ROUTER_DIR
from msa_cli.memory.router import Router, RouterSpec, load_spec, save_spec


def spec(**kw):
    return RouterSpec(heads=((1, 0), (1, 2), (3, 4)), group=3, **kw)  # query heads 0 and 2 share KV head 0


def test_key_heads_are_stored_once_per_kv_head():
    assert spec().key_heads == [(1, 0), (3, 1)]


def test_keys_pool_granularity_tokens_skip_the_sink_and_centre_then_normalise():
    torch.manual_seed(0)
    k = {1: torch.randn(12, 2, 8), 3: torch.randn(12, 2, 8)}
    token_doc = torch.tensor([0] * 7 + [1] * 5)
    mean_key = torch.randn(2, 8)
    router = Router(spec(granularity=4, mean_key=mean_key, mean_query=torch.zeros(3, 8)))
    keys, counts = router.keys(k, token_doc, 2)
    assert counts == [2, 1]                                   # doc 0: tokens 1-4, 5-6; doc 1: tokens 8-11
    for row, (a, b) in enumerate([(1, 5), (5, 7), (8, 12)]):
        for r, (layer, kv) in enumerate([(1, 0), (3, 1)]):
            expected = F.normalize(k[layer][a:b, kv].mean(0) - mean_key[r], dim=-1)
            torch.testing.assert_close(keys[row, r], expected)


def test_folded_query_scores_are_the_mean_over_routing_heads_of_cosines():
    torch.manual_seed(1)
    q = {1: torch.randn(5, 6, 8), 3: torch.randn(5, 6, 8)}
    keys = F.normalize(torch.randn(9, 2, 8), dim=-1)            # 9 keys over the 2 stored key heads
    key_doc = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3])
    router = Router(spec())
    got = route_scores_torch(router.query(q), keys, key_doc, 4)
    heads = [(1, 0, 0), (1, 2, 0), (3, 4, 1)]                   # (layer, query head, stored key head)
    cos = torch.stack([F.normalize(q[layer][:, h], dim=-1) @ keys[:, r].T for layer, h, r in heads]).mean(0)
    chunk = cos.max(0).values                                   # max over routing tokens
    expected = torch.stack([chunk[key_doc == d].max() for d in range(4)])
    torch.testing.assert_close(got, expected)


def test_a_saved_router_loads_with_the_same_id(tmp_path):
    s = spec(granularity=8, mean_key=torch.randn(2, 8), mean_query=torch.randn(3, 8))
    save_spec(s, tmp_path / "r.safetensors", about={"made": "test"})
    loaded = load_spec(tmp_path / "r.safetensors")
    assert loaded.id == s.id and loaded.heads == s.heads and loaded.granularity == 8
    assert spec(granularity=16).id != spec(granularity=8).id


def test_a_router_file_carries_its_relevance_threshold_apart_from_its_id(tmp_path):
    plain = spec(proj={1: (torch.randn(2, 8, 16), torch.randn(1, 8, 16))})
    calibrated = RouterSpec(**{**plain.__dict__, "relevant": 0.25})
    assert calibrated.id == plain.id             # the same keys: the threshold is a judgement about them
    save_spec(calibrated, tmp_path / "r.safetensors", about={})
    save_spec(plain, tmp_path / "p.safetensors", about={})
    assert load_spec(tmp_path / "r.safetensors").relevant == 0.25
    assert load_spec(tmp_path / "p.safetensors").relevant is None


def test_the_shipped_learned_router_carries_its_calibrated_threshold():
    """A router's threshold ships in its file (not in settings), so a retrained router cannot inherit another's:
    every shipped learned router must carry the one benchmarks/abstention.py calibrated for it."""
    shipped = sorted(ROUTER_DIR.glob("*-learned.safetensors"))
    assert shipped
    for path in shipped:
        relevant = load_spec(path).relevant
        assert relevant is not None and 0 < relevant < 1, f"{path.name} has no calibrated relevance threshold"
        assert json.loads(path.with_suffix(".json").read_text())["relevant"] == relevant
