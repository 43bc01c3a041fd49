"""The learned router: its training score, loss and negatives, inverse-cloze pairs, the passages training reads, and
that the router file scores exactly what was trained."""

import random

import pytest
import torch
import torch.nn.functional as F

from msa_kernels.routing import route_scores_torch
from conftest import failing_reader
from msa_cli.memory.router import Router, chunk_means, load_spec, save_spec
from msa_cli.training.pairs import Pairs, ict_pair, passages_in
from msa_cli.training.router import (Projections, Standardiser, bm25_negatives, decoupled_infonce, learned_spec,
                                     scores)
from msa_cli.training.states import States
from tiny import tiny_tokenizer


@pytest.mark.parametrize("aggregate", ["max", "mean"])
def test_training_score_is_the_routers_score(aggregate):
    """cosine per head, mean over heads, max over a document's keys, then max or mean over question tokens."""
    torch.manual_seed(0)
    q = F.normalize(torch.randn(7, 3, 8), dim=-1)              # two questions: 3 + 4 tokens
    k = F.normalize(torch.randn(9, 3, 8), dim=-1)              # three documents: 2 + 3 + 4 keys
    got = scores(q, torch.tensor([3, 4]), k, torch.tensor([2, 3, 4]), aggregate)
    key_doc = torch.repeat_interleave(torch.arange(3), torch.tensor([2, 3, 4]))
    for row, (a, b) in enumerate([(0, 3), (3, 7)]):
        torch.testing.assert_close(got[row], route_scores_torch(q[a:b], k, key_doc, 3, aggregate=aggregate))
    # Late interaction by hand for the first question and document: each token's best key, averaged.
    sim = (q[:3].flatten(1) @ k[:2].flatten(1).T) / 3
    by_hand = sim.amax(1).mean() if aggregate == "mean" else sim.amax()
    torch.testing.assert_close(got[0, 0], by_hand)


def test_decoupled_infonce_leaves_other_positives_out_of_each_denominator():
    s = torch.tensor([[0.9, 0.8, 0.1, 0.3]])
    positive = torch.tensor([[True, True, False, False]])
    l = s[0] / 0.1
    negatives = torch.logsumexp(l[2:], 0)
    expected = -0.5 * sum(l[p] - torch.logaddexp(l[p], negatives) for p in (0, 1))
    torch.testing.assert_close(decoupled_infonce(s, positive), expected)
    # A second positive scoring high does not lower the first positive's probability.
    alone = decoupled_infonce(s[:, [0, 2, 3]], positive[:, [0, 2, 3]])
    torch.testing.assert_close(alone, -(l[0] - torch.logaddexp(l[0], negatives)))


def test_ict_pair_takes_one_sentence_out_and_keeps_the_title():
    passage = ("Ada Lovelace\n\nAda Lovelace was an English mathematician and writer. She worked on Charles "
               "Babbage's proposed Analytical Engine. Her notes include the first published algorithm.")
    seen = set()
    for seed in range(20):
        query, rest = ict_pair(passage, random.Random(seed))
        assert query.endswith(".") and query not in rest and rest.startswith("Ada Lovelace\n\n")
        assert sorted((rest + " " + query).split()) == sorted(passage.split())
        seen.add(query)
    assert len(seen) == 3
    assert ict_pair("Title\n\nOnly one sentence here, long enough.", random.Random(0)) is None


@pytest.mark.parametrize("aggregate", ["max", "mean"])
def test_router_file_scores_what_was_trained(tmp_path, aggregate):
    """Standardisation folded into the saved projections and centring vectors gives the training scores, with
    the aggregate the router file records."""
    torch.manual_seed(1)
    hidden, g = 16, 2
    doc_tokens = torch.randn(11, hidden) * torch.linspace(0.1, 3, hidden) + 5 * torch.eye(hidden)[3]
    token_doc = torch.tensor([0] * 6 + [1] * 5)
    pooled, counts = chunk_means(doc_tokens, token_doc, 2, g)
    q_tokens = torch.randn(4, hidden) + 2
    q_raw, d_raw = States(q_tokens, torch.tensor([4])), States(pooled, torch.tensor(counts))
    st = Standardiser.fit(q_raw, d_raw)
    proj = Projections(hidden, heads=3, head_dim=8, generator=torch.Generator().manual_seed(0))
    qs, ds = st.apply(q_raw, True), st.apply(d_raw, False)
    trained = scores(proj.queries(qs.x), qs.counts, proj.keys(ds.x), ds.counts, aggregate)[0]

    save_spec(learned_spec({2: (proj, st)}, g, aggregate), tmp_path / "r.safetensors", about={})
    router = Router(load_spec(tmp_path / "r.safetensors"))
    assert router.spec.aggregate == aggregate
    x = {2: doc_tokens}
    keys, key_counts = router.keys({2: router.key_input(2, x[2], None)}, token_doc, 2)
    query = router.query({2: router.query_input(2, q_tokens, None)})
    key_doc = torch.repeat_interleave(torch.arange(2), torch.tensor(key_counts))
    torch.testing.assert_close(route_scores_torch(query, keys, key_doc, 2, aggregate=aggregate), trained,
                               atol=1e-5, rtol=1e-5)


def test_training_reads_a_folder_as_ingest_does_and_does_without_what_fails(tmp_path, monkeypatch):
    for name, text in [("a.txt", "Alpha notes."), ("b.md", "Beta notes."), ("c.bin", "\0\1"), ("sub/d.txt", "Delta.")]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    failing_reader(monkeypatch, "b.md", "a reader bug")
    assert passages_in(tmp_path, tiny_tokenizer(), 64) == ["Alpha notes.", "Delta."]


def test_bm25_negatives_are_the_best_bm25_matches_that_are_not_positives():
    pairs = Pairs()
    pairs.add("banana cherry date", ["banana cherry date"], labelled=False)
    for p in ("banana", "cherry date", "elder fig"):
        pairs.passage(p)
    assert bm25_negatives(pairs, depth=2) == [[2, 1]]
    assert bm25_negatives(pairs, depth=5) == [[2, 1, 3]]


def test_teacher_negatives_are_its_best_non_positives_and_the_loss_pulls_towards_its_ranking():
    from msa_cli.training.distill import Teacher, distillation_loss

    pool = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.5, 0.5], [0.0, 1.0]]), dim=-1)
    teacher = Teacher(queries=pool[:1].clone(), pool=pool)
    assert teacher.negatives([[0]], depth=2) == [[1, 2]]          # its positive (0) never comes back
    target = teacher.logits([0], [0, 1, 2, 3])
    assert float(distillation_loss(target + 3.0, target)) == pytest.approx(0.0, abs=1e-6)   # only the ranking counts
    reversed_order = target.flip(1)
    assert float(distillation_loss(reversed_order, target)) > 1.0
