"""The coarse keys of a large bank (memory/coarse.py): how they are made, that routing through them scores what it
scores exactly and ranks as the full scan does when every document is a candidate, and that a version-1 bank
(without them) is read as it is and upgraded in place by its next writer."""

import json

import pytest
import torch
import torch.nn.functional as F

from msa_cli import settings
from msa_kernels.routing import route_scores
from msa_cli.memory import coarse
from msa_cli.memory.bank import FORMAT_VERSION, Bank, NewDocument
from msa_cli.memory.router import Router, RouterSpec
from msa_cli.memory.search import search
from msa_cli.memory.verify import verify

HR, DR = 2, 8
WORDS = ["reef", "coral", "tide", "kelp", "gull", "sand", "wave", "shell", "crab", "dune", "storm", "harbour"]


def make_bank(path, n_docs=120, segments=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    bank = Bank.create(path, {"model": {"name": "toy"}, "pooling": 64, "content_layers": [], "dtype": "bfloat16",
                              "kv_heads": 1, "head_dim": 4, "router": {"id": "toy", "kind": "learned"}},
                       {0: (torch.zeros(2, 1, 4, dtype=torch.bfloat16), torch.zeros(2, 1, 4, dtype=torch.bfloat16))})
    per = n_docs // segments
    for s in range(segments):
        counts = [int(torch.randint(1, 90, (1,), generator=gen)) for _ in range(per)]
        docs = [NewDocument(source=f"f{s}-{i}.txt", span={"page": None, "line_start": 1, "line_end": 1},
                            content_hash=f"h{s}-{i}", n_tokens=c,
                            text=" ".join(WORDS[int(j)] for j in torch.randint(0, len(WORDS), (6,), generator=gen)))
                for i, c in enumerate(counts)]
        keys = F.normalize(torch.randn(sum(counts), HR, DR, generator=gen), dim=-1).bfloat16()
        with bank.lock():
            bank.append(docs, {}, [0] * per, keys, counts)
    return Bank.open(path)


def router() -> Router:
    return Router(RouterSpec(heads=tuple((0, h) for h in range(HR)), group=1, granularity=1, kind="learned",
                             aggregate="mean"))


def query(seed=1) -> torch.Tensor:
    return F.normalize(torch.randn(5, HR, DR, generator=torch.Generator().manual_seed(seed)), dim=-1)


def ranked(bank, monkeypatch, two_steps: bool, k=10):
    monkeypatch.setattr(settings, "EXACT_SCAN_KEYS", 0 if two_steps else 10**12)
    return [(h.document.doc_id, round(h.score, 4)) for h in search(bank, router(), query(), "reef coral storm", k)]


def test_coarse_keys_are_unit_means_of_runs_of_keys_within_each_document():
    keys = F.normalize(torch.randn(70 + 5, HR, DR), dim=-1)
    out, counts = coarse.coarse_keys(keys, [70, 5], group=32)
    assert counts == [3, 1] and out.shape == (4, HR, DR)
    for i, (a, b) in enumerate([(0, 32), (32, 64), (64, 70), (70, 75)]):
        torch.testing.assert_close(out[i], F.normalize(keys[a:b].mean(0), dim=-1))


def test_routing_through_coarse_keys_ranks_as_the_full_scan_when_every_document_is_a_candidate(tmp_path,
                                                                                                monkeypatch):
    bank = make_bank(tmp_path / "bank")
    assert all(seg.coarse is not None for seg in bank.routing_segments())
    monkeypatch.setattr(coarse, "CANDIDATES", 1000)
    monkeypatch.setattr(coarse, "SAMPLE", 1000)   # the sample is the whole bank: its statistics are exact
    assert ranked(bank, monkeypatch, two_steps=True) == ranked(bank, monkeypatch, two_steps=False)


def test_the_documents_scored_in_two_steps_get_their_exact_scores_and_bm25s_best_is_among_them(tmp_path,
                                                                                               monkeypatch):
    bank = make_bank(tmp_path / "bank")
    monkeypatch.setattr(coarse, "CANDIDATES", 5)
    monkeypatch.setattr(coarse, "SAMPLE", 10)
    segments, index = bank.routing_segments(), bank.lexical()
    bm25 = index.scores("reef coral storm")
    ids, scores, (mean, std) = coarse.two_step_scores(router(), query(), segments, bm25, index.doc_ids)
    all_ids, all_scores = router().scores(query(), segments)
    assert 10 <= ids.numel() <= 20 < all_ids.numel()
    exact = dict(zip(all_ids.tolist(), all_scores.tolist()))
    torch.testing.assert_close(scores, torch.tensor([exact[i] for i in ids.tolist()]))
    assert set(index.doc_ids[torch.topk(bm25, 5).indices].tolist()) <= set(ids.tolist())
    by_coarse = {}   # each document's score on its coarse keys: the 5 best are among those scored
    for seg in segments:
        s = route_scores(query(), seg.coarse, seg.coarse_doc, seg.doc_ids.shape[0], aggregate="mean")
        by_coarse |= dict(zip(seg.doc_ids.tolist(), s.tolist()))
    assert set(sorted(by_coarse, key=by_coarse.get)[-5:]) <= set(ids.tolist())
    assert abs(mean - float(all_scores.mean())) < 3 * float(all_scores.std()) and std > 0


def test_a_version_1_bank_is_read_as_it_is_and_upgraded_in_place_by_its_next_writer(tmp_path, monkeypatch):
    path = tmp_path / "bank"
    make_bank(path)
    before = ranked(Bank.open(path), monkeypatch, two_steps=False)
    manifest = json.loads((path / "manifest.json").read_text())   # what version 1 wrote: no coarse-key files
    for entry in manifest["segments"]:
        del entry["files"]["coarse.toy.safetensors"]
        (path / "segments" / entry["name"] / "coarse.toy.safetensors").unlink()
    (path / "manifest.json").write_text(json.dumps(dict(manifest, format_version=1)))

    old = Bank.open(path)
    assert all(seg.coarse is None for seg in old.routing_segments())
    assert ranked(old, monkeypatch, two_steps=True) == before   # every document of a version-1 segment is scored
    with old.lock():
        pass
    upgraded = Bank.open(path)
    assert json.loads((path / "manifest.json").read_text())["format_version"] == FORMAT_VERSION == 2
    assert all(seg.coarse is not None for seg in upgraded.routing_segments())
    assert ranked(upgraded, monkeypatch, two_steps=False) == before
    assert verify(path).problems == [] and verify(path).notes == []


def test_a_bank_of_a_newer_format_is_refused_with_its_version(tmp_path):
    path = tmp_path / "bank"
    make_bank(path, n_docs=3, segments=1)
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps(dict(manifest, format_version=3)))
    with pytest.raises(Exception, match="format version 3; this msa reads versions 1, 2"):
        Bank.open(path)
