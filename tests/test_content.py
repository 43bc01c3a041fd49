"""`msa ingest --content kv|none` on a tiny model: a bank without the cold tier (the default for a plain model)
keeps the same routing keys and text, answers from text, refuses `--context pooled` with a one-line usage error,
and keeps its choice."""

import json

import pytest
from safetensors import safe_open

from conftest import msa
from msa_cli.memory.bank import Bank

FACTS = {"quokka": "The quokka is a small wallaby found on Rottnest Island near Perth.",
         "axolotl": "The axolotl is a salamander that keeps its gills and lives in lakes near Mexico City."}
QUESTION = "Where is the quokka found? quokka wallaby Rottnest"


@pytest.fixture(scope="module")
def banks(tiny_env, tmp_path_factory):
    docs = tmp_path_factory.mktemp("docs")
    for name, fact in FACTS.items():
        (docs / f"{name}.md").write_text(f"# The {name}\n\n" + f"{fact}\n\n" * 3)
    made = {}
    for content in ("kv", "none"):
        path = tmp_path_factory.mktemp("bank") / content
        r = msa(tiny_env, "ingest", str(docs), "--bank", str(path), "--content", content)
        assert r.returncode == 0, r.stderr
        made[content] = path
    return made


def segment_tensors(bank_path, pattern: str) -> dict:
    """The tensors of every segment's files matching `pattern`, by segment order and name."""
    out = {}
    for i, path in enumerate(sorted(bank_path.glob(f"segments/*/{pattern}"))):
        with safe_open(path, framework="pt") as f:
            out |= {(i, k): f.get_tensor(k) for k in f.keys()}
    return out


def test_a_bank_without_content_keeps_the_same_keys_and_text_and_no_pooled_kv(banks):
    with_kv, without = Bank.open(banks["kv"]), Bank.open(banks["none"])
    assert with_kv.settings["content_layers"] and without.settings["content_layers"] == []
    assert [d.text for d in with_kv.documents()] == [d.text for d in without.documents()]
    keys_kv, keys_none = segment_tensors(banks["kv"], "route.*"), segment_tensors(banks["none"], "route.*")
    assert keys_kv.keys() == keys_none.keys()
    for name in keys_kv:   # the forward stops earlier, but the router's layers compute the same keys
        assert keys_kv[name].equal(keys_none[name]), name
    assert keys_kv
    assert segment_tensors(banks["kv"], "content.*") and segment_tensors(banks["none"], "content.*") == {}
    kv_stats, none_stats = with_kv.stats(), without.stats()
    assert none_stats["chunks"] == 0 < kv_stats["chunks"]
    assert none_stats["bytes_on_disk"]["cold"] < kv_stats["bytes_on_disk"]["cold"] / 10


def test_a_bank_without_content_answers_from_text_and_refuses_pooled_reading(tiny_env, banks):
    r = msa(tiny_env, "ask", QUESTION, "--bank", str(banks["none"]), "--json", "--max-tokens", "4", "-k", "2")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["sources"]
    r = msa(tiny_env, "ask", QUESTION, "--bank", str(banks["none"]), "--context", "pooled", "--max-tokens", "4")
    assert r.returncode == 2, r.stderr
    assert "--content none" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = msa(tiny_env, "ask", QUESTION, "--bank", str(banks["kv"]), "--context", "pooled", "--max-tokens", "4")
    assert r.returncode == 0, r.stderr


def test_a_bank_keeps_its_content_choice(tiny_env, banks, tmp_path):
    (tmp_path / "more.md").write_text("The pangolin is covered in scales.\n")
    before = [d.doc_id for d in Bank.open(banks["none"]).documents()]
    r = msa(tiny_env, "ingest", str(tmp_path), "--bank", str(banks["none"]), "--content", "kv")
    assert r.returncode == 2 and "--content none" in r.stderr, r.stderr
    assert [d.doc_id for d in Bank.open(banks["none"]).documents()] == before   # nothing written
    r = msa(tiny_env, "ingest", str(tmp_path), "--bank", str(banks["none"]), "--no-prune")   # the bank's choice
    assert r.returncode == 0, r.stderr
    assert Bank.open(banks["none"]).settings["content_layers"] == []
    r = msa(tiny_env, "ingest", str(tmp_path), "--bank", str(tmp_path / "b"), "--content", "cold")
    assert r.returncode == 2 and "--content must be" in r.stderr


def test_a_new_bank_of_a_plain_model_keeps_no_content_by_default(tiny_env, tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("The pangolin is covered in scales.\n")
    r = msa(tiny_env, "ingest", str(tmp_path / "docs"), "--bank", str(tmp_path / "bank"))
    assert r.returncode == 0, r.stderr
    assert Bank.open(tmp_path / "bank").settings["content_layers"] == []
