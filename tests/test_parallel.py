"""Memory Parallel (msa_cli/parallel): a bank sharded over two gloo ranks that torchrun starts, as a user starts
them, must answer as one bank built from the same files does: the same search hits and scores, the same sources and
greedy answers, the same eval figures. Both sides compute in float32 on one thread per process: in bf16 (or with
other thread counts) stage 1's arithmetic differs with what a document is packed beside, in the third decimal of
a score, whatever the sharding."""

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import AS_A_USER, msa, msa_env
from msa_cli.memory import lexical, shards
from msa_cli.parallel.route import _stats

SAMPLES = Path(__file__).resolve().parent.parent / "sample_corpora"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
QUESTIONS = ["How do I create a virtual environment?", "What is the Python programming language named after?",
             "sort a list of tuples by the second item"]


def torchrun(env: dict, ranks: int, *args: str, prefix: tuple = (), **kw) -> subprocess.CompletedProcess:
    """conftest.msa's twin: `msa ARGS...` as `ranks` ranks of one torchrun job (behind `prefix`, e.g. setpriv)."""
    kw.setdefault("timeout", 600)
    return subprocess.run([*prefix, *TORCHRUN, str(ranks), "-m", "msa_cli", *args], capture_output=True, text=True,
                          env=env, **kw)


def exact(env: dict) -> dict:
    return {**env, "MSA_DTYPE": "float32", "OMP_NUM_THREADS": "1", "MSA_MODEL": "default"}


# --- the parts, in this process --------------------------------------------------------------------------------

def test_a_file_always_goes_to_the_same_shard_and_the_shards_share_the_files():
    sources = [f"/docs/file-{i}.txt" for i in range(1000)]
    owners = [shards.owner(s, 4) for s in sources]
    assert owners == [shards.owner(s, 4) for s in sources]
    assert min(np.bincount(owners)) > 200          # about a quarter each
    # sha256, not Python's salted hash: the same in every process and release, or a re-ingest would move files
    assert [shards.owner(f"/docs/{c}.txt", 5) for c in "abcdefgh"] == [1, 1, 0, 0, 2, 4, 0, 4]


def test_bm25_from_summed_shard_statistics_is_the_whole_bank_index():
    rng = np.random.default_rng(0)
    words = "alpha beta gamma delta the of epsilon zeta eta theta iota kappa lambda mu".split()
    texts = [" ".join(rng.choice(words, rng.integers(0, 30))) for _ in range(60)]
    whole = lexical.LexicalIndex.build(texts, list(range(60)))
    parts = [lexical.TermCounts(texts[:25]), lexical.TermCounts(texts[25:])]
    query = "alpha alpha zeta unknown the mu"
    q = parts[0].words(query)
    df = sum(p.frequencies(q) for p in parts)
    length = sum(p.lengths.sum() for p in parts)
    sharded = torch.cat([p.scores(q, df, 60, length / 60) for p in parts])
    torch.testing.assert_close(sharded, whole.scores(query), rtol=1e-6, atol=1e-6)
    assert not torch.equal(parts[1].scores(q, parts[1].frequencies(q), 35, parts[1].lengths.mean()),
                           whole.scores(query)[25:])   # the shard's own statistics would not do


def test_the_fusion_statistics_from_sums_are_the_banks():
    s = torch.randn(1000) * 0.3 + 2.0
    mean, std = _stats(s.numel(), float(s.double().sum()), float((s.double() ** 2).sum()))
    assert (mean, std) == pytest.approx(lexical.stats(s), rel=1e-5)
    assert _stats(1, 2.0, 4.0) == lexical.stats(torch.tensor([2.0]))


# --- two ranks against one bank, on the default model ------------------------------------------------------------

@pytest.fixture(scope="module")
def banks(tmp_path_factory):
    """The sample corpus as one bank and as a bank sharded over two ranks, and the environment that made them."""
    root = tmp_path_factory.mktemp("parallel")
    corpus = root / "corpus"
    shutil.copytree(SAMPLES, corpus)
    env = exact(msa_env(root / "home"))
    one, sharded = root / "one", root / "sharded"
    r = msa(env, "ingest", str(corpus), "--bank", str(one))
    assert r.returncode == 0, r.stderr
    r = torchrun(env, 2, "ingest", str(corpus), "--bank", str(sharded))
    assert r.returncode == 0, r.stderr
    return env, corpus, one, sharded


def test_sharded_ingest_splits_the_files_and_reports_them_all_once(banks):
    env, corpus, one, sharded = banks
    assert sorted(p.name for p in sharded.iterdir()) == ["shard-0-of-2", "shard-1-of-2"]
    sources = {}
    for rank in (0, 1):
        r = msa(env, "status", "--json", "--bank", str(sharded / f"shard-{rank}-of-2"))
        assert r.returncode == 0, r.stderr
        sources[rank] = json.loads(r.stdout)["files"]
    whole = json.loads(msa(env, "status", "--json", "--bank", str(one)).stdout)
    assert sources[0] + sources[1] == whole["files"] and min(sources.values()) > 0


def test_search_over_two_ranks_is_the_single_banks(banks):
    env, _, one, sharded = banks
    owners = set()
    for question in QUESTIONS:
        single = msa(env, "search", question, "-k", "8", "--json", "--bank", str(one))
        parallel = torchrun(env, 2, "search", question, "-k", "8", "--json", "--bank", str(sharded))
        assert single.returncode == 0 and parallel.returncode == 0, parallel.stderr
        a = [json.loads(line) for line in single.stdout.splitlines()]
        b = [json.loads(line) for line in parallel.stdout.splitlines()]
        assert [(h["path"], h["line_start"], h["page"]) for h in a] == \
            [(h["path"], h["line_start"], h["page"]) for h in b]
        assert [h["score"] for h in b] == pytest.approx([h["score"] for h in a], abs=2e-4)
        owners |= {shards.shard_of(h["doc_id"]) for h in b}
    assert owners == {0, 1}   # both ranks' documents were found


def test_ask_over_two_ranks_cites_the_same_sources_and_answers_the_same(banks):
    env, _, one, sharded = banks
    stdin = "\n".join(QUESTIONS[:2]) + "\n"
    single = msa(env, "ask", "-", "--json", "--max-tokens", "40", "--bank", str(one), input=stdin)
    parallel = torchrun(env, 2, "ask", "-", "--json", "--max-tokens", "40", "--bank", str(sharded), input=stdin)
    assert single.returncode == 0 and parallel.returncode == 0, parallel.stderr
    a = [json.loads(line) for line in single.stdout.splitlines()]
    b = [json.loads(line) for line in parallel.stdout.splitlines()]
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        assert y["answer"] == x["answer"] and not x["abstained"]
        assert [(s["path"], s["line_start"], s["page"]) for s in y["sources"]] == \
            [(s["path"], s["line_start"], s["page"]) for s in x["sources"]]
        assert [e["text"] for e in y["evidence"]] == [e["text"] for e in x["evidence"]]


def test_eval_over_two_ranks_measures_what_one_bank_does(banks, tmp_path):
    env, corpus, _, _ = banks
    qa = tmp_path / "set"
    (qa / "corpus").mkdir(parents=True)
    rows = [json.loads(line) for line in (SAMPLES / "questions.jsonl").read_text().splitlines() if line.strip()]
    for path in {f for r in rows for f in r["gold_files"]}:
        shutil.copy(SAMPLES / path, qa / "corpus" / Path(path).name)
    (qa / "questions.jsonl").write_text("".join(json.dumps(
        {"id": r["id"], "question": r["question"], "answers": r["answers"],
         "gold_docs": [Path(f).stem for f in r["gold_files"]]}) + "\n" for r in rows[:4]))
    args = ["eval", str(qa), "--json", "--max-tokens", "16", "--baseline", "bm25"]
    single = msa(env, *args, "--bank", str(tmp_path / "one"))
    parallel = torchrun(env, 2, *args, "--bank", str(tmp_path / "sharded"))
    assert single.returncode == 0 and parallel.returncode == 0, parallel.stderr
    a, b = json.loads(single.stdout), json.loads(parallel.stdout)
    assert b["bank"]["documents"] == a["bank"]["documents"]
    assert set(b) == set(a) and {"msa", "msa-learned", "bm25"} <= set(a)
    for system in ("msa", "msa-learned", "bm25"):
        figures = {key for key in a[system] if "ms" not in key and "seconds" not in key}   # all but timings
        assert {"recall@5", "mrr"} <= figures and (system == "msa-learned" or "exact_match" in figures)
        assert {key: b[system][key] for key in figures} == pytest.approx({key: a[system][key] for key in figures})
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == ["shard-0-of-2", "shard-1-of-2"]


# --- keeping a sharded bank, and what goes wrong -----------------------------------------------------------------

@pytest.fixture
def tiny_sharded(tiny_env, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(SAMPLES / "python", corpus)
    bank = tmp_path / "bank"
    env = {**tiny_env, "OMP_NUM_THREADS": "1"}
    r = torchrun(env, 2, "ingest", str(corpus), "--bank", str(bank))
    assert r.returncode == 0, r.stderr
    return env, corpus, bank


def test_reingest_prune_and_forget_work_per_shard(tiny_sharded):
    env, corpus, bank = tiny_sharded
    r = torchrun(env, 2, "ingest", str(corpus), "--bank", str(bank))
    assert r.returncode == 0 and "ingested 0 files" in r.stderr and "unchanged 7" in r.stderr, r.stderr
    (corpus / "tutorial" / "venv.rst").write_text("Changed: virtual environments live in .venv folders.\n")
    (corpus / "howto" / "sorting.rst").unlink()
    r = torchrun(env, 2, "ingest", str(corpus), "--bank", str(bank))
    assert "ingested 1 files" in r.stderr and "unchanged 5; removed 1" in r.stderr, r.stderr
    r = msa(env, "forget", str(corpus / "tutorial"), "--bank", str(bank))   # every shard on this machine
    assert r.returncode == 0 and "forgot 4 files" in r.stderr, r.stderr
    r = torchrun(env, 2, "search", "virtual environments", "--json", "--bank", str(bank))
    assert r.returncode == 0, r.stderr
    assert not [h for h in map(json.loads, r.stdout.splitlines()) if "/tutorial/" in h["path"]]


def test_a_folder_no_rank_can_list_keeps_its_documents_on_every_shard_and_is_reported_once(tiny_sharded):
    env, corpus, bank = tiny_sharded
    before = json.loads(msa(env, "status", "--json", "--bank", str(bank)).stdout)
    (corpus / "tutorial").chmod(0)
    try:   # as a user, not root: root lists any folder
        r = torchrun(env, 2, "ingest", str(corpus), "--bank", str(bank), prefix=AS_A_USER)
    finally:
        (corpus / "tutorial").chmod(0o755)
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("msa: warning:")]
    assert len(warnings) == 1 and "tutorial: folder cannot be listed" in warnings[0], r.stderr
    assert warnings[0].endswith("; what the bank holds from it stays")   # no shard can count the others' documents
    assert "removed 0" in r.stderr
    after = json.loads(msa(env, "status", "--json", "--bank", str(bank)).stdout)
    assert (after["files"], after["documents"]) == (before["files"], before["documents"])


def test_one_process_commands_on_a_sharded_bank_say_how_to_run_them(tiny_sharded):
    env, corpus, bank = tiny_sharded
    for args in (["ingest", str(corpus)], ["ask", "anything"], ["search", "anything"]):
        r = msa(env, *args, "--bank", str(bank))
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.count("\n") == 1 and "torchrun --nproc-per-node 2 -m msa_cli" in r.stderr
    r = torchrun(env, 1, "search", "anything", "--bank", str(bank))   # the shards are not one rank's
    assert r.returncode != 0 and "sharded over 2 ranks, and this job has 1" in r.stderr
    r = torchrun({**env, "MSA_PARALLEL_TIMEOUT": "soon"}, 2, "search", "anything", "--bank", str(bank))
    assert r.returncode != 0 and "msa: error: MSA_PARALLEL_TIMEOUT must be seconds above 0, not 'soon'" in r.stderr


def test_status_of_a_sharded_bank_adds_up_its_shards_with_or_without_torchrun(tiny_sharded):
    env, corpus, bank = tiny_sharded
    shard = [json.loads(msa(env, "status", "--json", "--bank", str(bank / f"shard-{r}-of-2")).stdout) for r in (0, 1)]
    plain = msa(env, "status", "--json", "--bank", str(bank))
    ranks = torchrun(env, 2, "status", "--json", "--bank", str(bank))
    assert plain.returncode == 0 and ranks.returncode == 0, plain.stderr + ranks.stderr
    assert plain.stdout == ranks.stdout and ranks.stdout.count("\n") == 1   # printed once, by rank 0
    info = json.loads(plain.stdout)
    for key in ("files", "documents", "tokens", "segments"):
        assert info[key] == shard[0][key] + shard[1][key] > shard[0][key]
    assert (info["shards"], info["shards_read"], info["files"]) == (2, 2, 7)
    text = msa(env, "status", "--bank", str(bank)).stdout
    assert "(2 of 2 shards)" in text and "files        7" in text


def test_a_rank_that_dies_is_one_clear_error_on_rank_0(tiny_sharded):
    env, _, bank = tiny_sharded
    r = torchrun({**env, "MSA_CRASH_AT": "parallel:route"}, 2, "search", "anything", "--bank", str(bank),
                 timeout=120)
    assert r.returncode != 0
    ours = [line for line in r.stderr.splitlines() if line.startswith("msa: ")]
    # Rank 0 hears of it from its collective, or from torchrun's SIGTERM to every rank, whichever comes first.
    assert len(ours) == 1 and ours[0].startswith("msa: error: rank 0 of 2"), r.stderr
    assert "a rank stopped" in ours[0] or "stopped by a signal (torchrun stops every rank" in ours[0], r.stderr


def test_the_sigterm_torchrun_stops_ranks_with_becomes_a_rank_failure(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = ("import os, signal, time\n"
            "from msa_cli.parallel.group import Group, RankFailed\n"
            "group = Group('cpu')\n"
            "try:\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(30)\n"
            "except RankFailed as e:\n"
            "    print(e.code, e)\n")
    env = {**msa_env(tmp_path), "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("9 rank 0 of 1: stopped by a signal"), r.stdout


def test_a_rank_that_goes_silent_times_out_into_one_clear_error(tiny_sharded):
    env, _, bank = tiny_sharded
    r = torchrun({**env, "MSA_HANG_AT": "parallel:route", "MSA_PARALLEL_TIMEOUT": "10"}, 2, "search", "anything",
                 "--bank", str(bank), timeout=120)
    assert r.returncode != 0
    ours = [line for line in r.stderr.splitlines() if line.startswith("msa: ")]
    assert ours and "did not answer within 10 s" in ours[0], r.stderr


def test_an_msa_checkpoint_routes_every_layer_over_both_shards(tmp_path):
    from tiny import save_tiny_msa_checkpoint

    checkpoint = save_tiny_msa_checkpoint(tmp_path / "ckpt")
    env = {**msa_env(tmp_path / "home", checkpoint), "OMP_NUM_THREADS": "1"}
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"fact-{i}.txt").write_text(f"Fact {i}: the code word number {i} is w{i * 7}.\n")
    r = torchrun(env, 2, "ingest", str(corpus), "--bank", str(tmp_path / "bank"))
    assert r.returncode == 0, r.stderr
    r = torchrun(env, 2, "ask", "What is code word number 3?", "--json", "--max-tokens", "8", "--no-abstain",
                 "--bank", str(tmp_path / "bank"))
    assert r.returncode == 0, r.stderr
    hops = json.loads(r.stdout)["hops"]
    chosen = [i for hop in hops for ids in hop["layers"].values() for i in ids]
    k = min(12, json.loads((checkpoint / "config.json").read_text())["msa_config"].get("top_k_docs", 16))
    assert all(len(ids) == k for hop in hops for ids in hop["layers"].values())   # the global top-k, each layer
    assert {shards.shard_of(i) for i in chosen} == {0, 1}


def test_serve_over_two_ranks_answers_from_both_shards_and_refuses_to_write(tiny_sharded):
    """`torchrun ... -m msa_cli serve`: rank 0 serves HTTP (the real openai client), every rank routes its shard,
    requests on many threads take turns at the ranks, a write is refused (403), and SIGTERM stops every rank."""
    import httpx2 as httpx
    import openai

    env, corpus, bank = tiny_sharded
    proc = subprocess.Popen([*TORCHRUN, "2", "-m", "msa_cli", "serve", "--port", "0", "--bank", str(bank),
                             "--allow", str(corpus)], env=env, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:   # the startup line names the port it took
            if found := re.search(r"(http://127\.0\.0\.1:\d+)/v1", line):
                url = found.group(1)
                break
        else:
            raise AssertionError("the server did not start")
        threading.Thread(target=proc.stderr.read, daemon=True).start()
        query = "virtual environments and sorting"
        expected = torchrun(env, 2, "search", query, "-k", "6", "--json", "--bank", str(bank))
        assert expected.returncode == 0, expected.stderr
        with ThreadPoolExecutor(4) as pool:   # searches and health checks at once, from the server's threads
            found = list(pool.map(lambda _: httpx.post(f"{url}/v1/search", json={"query": query, "top_k": 6},
                                                       timeout=120).json()["data"], range(4)))
            health = list(pool.map(lambda _: httpx.get(f"{url}/health", timeout=120).json(), range(4)))
        want = [json.loads(line) for line in expected.stdout.splitlines()]
        assert all([h["doc_id"] for h in f] == [h["doc_id"] for h in want] for f in found)
        assert {shards.shard_of(h["doc_id"]) for h in want} == {0, 1}
        documents = sum(json.loads(msa(env, "status", "--json", "--bank", str(bank / f"shard-{r}-of-2")).stdout)
                        ["documents"] for r in (0, 1))
        assert [h["documents"] for h in health] == [documents] * 4
        out = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0).chat.completions.create(
            model="msa", messages=[{"role": "user", "content": query}], max_tokens=6,
            extra_body={"top_k": 6, "abstain": False})
        assert out.model_extra["msa"]["sources"]
        refused = httpx.post(f"{url}/v1/ingest", json={"paths": [str(corpus)]}, timeout=60)
        assert refused.status_code == 403 and "sharded bank" in refused.text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=90)
