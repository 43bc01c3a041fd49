"""The memory bank: round trip, settings checks, crash safety, removal, reindex, memory mapping, locking, what a
commit costs, lookups by id, and the BM25 index the bank keeps."""

import dataclasses
import hashlib
import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open

from msa_cli.errors import USAGE, BankLocked, BankMismatch, BankNotFound, MsaError
from msa_cli.memory import check, lexical, snapshot
from msa_cli.memory.bank import FORMAT_VERSION, Bank, NewDocument

LAYERS = [2, 3]          # content layers of a 4-layer toy model
HK, D = 2, 4             # kv heads, head dim
HR, DR = 3, 5            # router heads, router dim
DTYPE = torch.bfloat16


def make_settings(router_id="native", **changes):
    settings = {"model": {"name": "toy", "weights_sha256": "1234abcd"}, "pooling": 64,
                "content_layers": LAYERS, "dtype": "bfloat16", "kv_heads": HK, "head_dim": D,
                "router": {"id": router_id, "kind": "native", "granularity": 64}}
    settings.update(changes)
    return settings


def make_template():
    return {layer: (torch.randn(3, HK, D, dtype=DTYPE), torch.randn(3, HK, D, dtype=DTYPE)) for layer in range(4)}


def make_batch(n_docs, tag):
    """n_docs documents with 1..3 chunks and 1..2 keys each, plus their tensors."""
    chunk_counts = [1 + i % 3 for i in range(n_docs)]
    key_counts = [1 + i % 2 for i in range(n_docs)]
    docs = [NewDocument(source=f"{tag}/file{i}.txt", span={"page": None, "line_start": i + 1, "line_end": i + 9},
                        content_hash=f"hash-{tag}-{i}", n_tokens=64 * chunk_counts[i] - 5,
                        text=f"text {tag} {i} é")
            for i in range(n_docs)]
    n = sum(chunk_counts)
    content = {layer: (torch.randn(n, HK, D, dtype=DTYPE), torch.randn(n, HK, D, dtype=DTYPE)) for layer in LAYERS}
    keys = torch.randn(sum(key_counts), HR, DR, dtype=DTYPE)
    return docs, content, chunk_counts, keys, key_counts


def append(bank, batch):
    with bank.lock():
        return bank.append(*batch)


def new_bank(tmp_path):
    return Bank.create(tmp_path / "bank", make_settings(), make_template())


def two_segments(bank):
    """Appends segments of 3 and 2 documents and removes document 1: documents 0, 2 | 3, 4 stay."""
    append(bank, make_batch(3, "a"))
    append(bank, make_batch(2, "b"))
    with bank.lock():
        bank.remove([1])
    return bank


def doc_content(batch, index, layer):
    """Rows of document `index` of a batch in content layer `layer`."""
    _, content, chunk_counts, _, _ = batch
    start = sum(chunk_counts[:index])
    k, v = content[layer]
    return k[start:start + chunk_counts[index]], v[start:start + chunk_counts[index]]


def doc_keys(batch, index):
    _, _, _, keys, key_counts = batch
    start = sum(key_counts[:index])
    return keys[start:start + key_counts[index]]


def crash(*args):
    raise OSError("simulated crash")


def file_digests(root):
    return {p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_round_trip(tmp_path):
    template = make_template()
    Bank.create(tmp_path / "bank", make_settings(), template)
    bank = Bank.open(tmp_path / "bank")
    first, second = make_batch(3, "a"), make_batch(4, "b")
    ids_a = append(bank, first)
    ids_b = append(bank, second)
    assert ids_a == [0, 1, 2] and ids_b == [3, 4, 5, 6]

    bank = Bank.open(tmp_path / "bank", expect=make_settings())
    docs = bank.documents()
    assert [d.doc_id for d in docs] == ids_a + ids_b and bank.num_documents == 7
    for doc, (batch, i) in zip(docs, [(first, i) for i in range(3)] + [(second, i) for i in range(4)]):
        given = batch[0][i]
        assert (doc.source, doc.span, doc.content_hash, doc.n_tokens, doc.text) == \
               (given.source, given.span, given.content_hash, given.n_tokens, given.text)
        assert doc.chunk_count == batch[2][i] and doc.key_count == batch[4][i]

    # Content comes back in the requested order, with only the requested documents' rows.
    order = [5, 0, 2]
    for layer in LAYERS:
        k, v, counts = bank.load_content(order, layer)
        expected = [doc_content(second, 2, layer), doc_content(first, 0, layer), doc_content(first, 2, layer)]
        assert counts == [len(e[0]) for e in expected]
        assert torch.equal(k, torch.cat([e[0] for e in expected]))
        assert torch.equal(v, torch.cat([e[1] for e in expected]))
    k, v, counts = bank.load_content([], LAYERS[0])
    assert k.shape == (0, HK, D) and counts == []

    # Routing keys per segment, and each document's key range inside them.
    segments = bank.routing_segments()
    assert [s.doc_ids.tolist() for s in segments] == [ids_a, ids_b]
    for seg, batch in zip(segments, [first, second]):
        assert torch.equal(seg.keys, batch[3]) and seg.live.all()
        assert seg.key_doc.dtype == torch.int32
        assert torch.bincount(seg.key_doc.long()).tolist() == batch[4]
    for doc in docs:
        seg = next(s for s in segments if s.name == doc.segment)
        batch = first if doc.doc_id < 3 else second
        keys = seg.keys[doc.key_start:doc.key_start + doc.key_count]
        assert torch.equal(keys, doc_keys(batch, doc.row))

    loaded = bank.template_kv()
    assert sorted(loaded) == sorted(template)
    assert all(torch.equal(loaded[l][0], template[l][0]) and torch.equal(loaded[l][1], template[l][1])
               for l in template)

    stats = bank.stats()
    assert stats["documents"] == 7 and stats["chunks"] == sum(first[2]) + sum(second[2])
    assert stats["keys"] == sum(first[4]) + sum(second[4])
    assert stats["tokens"] == sum(d.n_tokens for d in docs)
    assert all(stats["bytes_on_disk"][tier] > 0 for tier in ("hot", "cold", "text", "other"))


def test_create_opens_a_bank_another_process_made_meanwhile(tmp_path):
    # Two first ingests race: both saw no bank, the first made it, the second's create finds it under the lock.
    first = new_bank(tmp_path)
    append(first, make_batch(2, "a"))
    second = new_bank(tmp_path)
    assert [d.doc_id for d in second.documents()] == [0, 1]   # opened, not overwritten
    with pytest.raises(BankMismatch, match="pooling=64, not 32"):   # checked as open_or_create checks
        Bank.create(tmp_path / "bank", make_settings(pooling=32), make_template())
    with first.lock():   # the first still writes: the second is locked out, not told something is wrong
        with pytest.raises(BankLocked):
            new_bank(tmp_path)


def test_create_refuses_a_folder_of_other_files_as_usage(tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    with pytest.raises(MsaError, match="not empty") as e:
        Bank.create(notes, make_settings(), make_template())
    assert e.value.code == USAGE
    assert sorted(p.name for p in notes.iterdir()) == ["todo.txt"]   # not even a lock file left among them


def test_open_or_create(tmp_path):
    calls = []

    def template():
        calls.append(1)
        return make_template()

    Bank.open_or_create(tmp_path / "bank", make_settings(), template)
    Bank.open_or_create(tmp_path / "bank", make_settings(), template)
    assert len(calls) == 1  # the template is computed only when the bank is made
    with pytest.raises(BankMismatch):
        Bank.open_or_create(tmp_path / "bank", make_settings(pooling=32), template)


def test_settings_mismatch_names_the_key(tmp_path):
    new_bank(tmp_path)
    other = make_settings(model={"name": "toy", "weights_sha256": "ffff0000"})
    with pytest.raises(BankMismatch, match=r'model\.weights_sha256="1234abcd", not "ffff0000"'):
        Bank.open(tmp_path / "bank", expect=other)
    with pytest.raises(BankMismatch, match=r"router\.id"):
        Bank.open(tmp_path / "bank", expect=make_settings(router_id="trained-1"))
    extra = dict(make_settings(), top_k=5)
    with pytest.raises(BankMismatch, match=r"top_k=\(unset\), not 5"):
        Bank.open(tmp_path / "bank", expect=extra)


def test_missing_bank(tmp_path):
    with pytest.raises(BankNotFound, match="msa ingest") as e:
        Bank.open(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(e.value) and "\n" not in str(e.value)


def test_unknown_format_version_and_garbage(tmp_path):
    new_bank(tmp_path)
    manifest_path = tmp_path / "bank" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    manifest_path.write_text(json.dumps(dict(manifest, format_version=FORMAT_VERSION + 1)))
    with pytest.raises(BankMismatch, match="format version"):
        Bank.open(tmp_path / "bank")
    manifest_path.write_text("{not json")
    with pytest.raises(BankMismatch, match="unreadable"):
        Bank.open(tmp_path / "bank")


def test_append_validates_before_writing(tmp_path):
    bank = new_bank(tmp_path)
    append(bank, make_batch(1, "first"))
    segments = list((tmp_path / "bank" / "segments").iterdir())
    docs, content, chunk_counts, keys, key_counts = make_batch(2, "a")
    with bank.lock():
        with pytest.raises(ValueError, match="route keys"):  # all segments' keys share one shape
            bank.append(docs, content, chunk_counts, keys[:, :, :2], key_counts)
        with pytest.raises(ValueError, match="dtype"):
            bank.append(docs, {l: (k.float(), v.float()) for l, (k, v) in content.items()}, chunk_counts,
                        keys, key_counts)
        with pytest.raises(ValueError, match="content layers"):
            bank.append(docs, {LAYERS[0]: content[LAYERS[0]]}, chunk_counts, keys, key_counts)
        with pytest.raises(ValueError, match="span"):
            bank.append([NewDocument("x", {"page": "1"}, "h", 1, "t")] * 2, content, chunk_counts, keys, key_counts)
    assert list((tmp_path / "bank" / "segments").iterdir()) == segments
    with pytest.raises(RuntimeError, match="lock"):
        bank.append(docs, content, chunk_counts, keys, key_counts)


def test_crash_before_commit_keeps_last_state(tmp_path, monkeypatch):
    bank = new_bank(tmp_path)
    first = make_batch(2, "a")
    append(bank, first)
    segments = tmp_path / "bank" / "segments"
    committed = {p.name for p in segments.iterdir()}
    with monkeypatch.context() as m:
        m.setattr(os, "replace", crash)
        with pytest.raises(OSError, match="simulated"):
            append(bank, make_batch(3, "b"))
    assert len(list(segments.iterdir())) == 2  # the new segment was written, then the commit failed
    assert (tmp_path / "bank" / "manifest.json.tmp").exists()

    reopened = Bank.open(tmp_path / "bank")
    assert [d.doc_id for d in reopened.documents()] == [0, 1]
    k, _, _ = reopened.load_content([1], LAYERS[0])
    assert torch.equal(k, doc_content(first, 1, LAYERS[0])[0])

    with reopened.lock():  # the next writer removes what the crash left
        assert {p.name for p in segments.iterdir()} == committed
        assert not (tmp_path / "bank" / "manifest.json.tmp").exists()
        # Ids of the lost batch were never committed, so they are handed out again.
        assert reopened.append(*make_batch(1, "c")) == [2]


def test_orphan_directory_is_removed_by_next_writer(tmp_path):
    bank = new_bank(tmp_path)
    append(bank, make_batch(2, "a"))
    orphan = tmp_path / "bank" / "segments" / "000000002-deadbeef"
    orphan.mkdir()
    (orphan / "documents.jsonl").write_text("{}\n")
    assert Bank.open(tmp_path / "bank").num_documents == 2  # readers ignore it
    with bank.lock():
        assert not orphan.exists()


def test_remove(tmp_path):
    bank = new_bank(tmp_path)
    append(bank, make_batch(3, "a"))
    append(bank, make_batch(2, "b"))
    with bank.lock():
        bank.remove([1, 3])
        with pytest.raises(MsaError, match="no live document 1"):
            bank.remove([1])
    bank = Bank.open(tmp_path / "bank")
    assert [d.doc_id for d in bank.documents()] == [0, 2, 4]
    assert [s.live.tolist() for s in bank.routing_segments()] == [[True, False, True], [False, True]]
    with pytest.raises(MsaError):
        bank.load_content([3], LAYERS[0])

    second = bank.routing_segments()[1].name
    with bank.lock():
        bank.remove([4])  # the second segment is now empty: it leaves the manifest and the disk
    manifest = json.loads((tmp_path / "bank" / "manifest.json").read_text())
    assert [s["name"] for s in manifest["segments"]] == [bank.routing_segments()[0].name]
    assert manifest["tombstones"] == [1] and manifest["next_doc_id"] == 5
    assert not (tmp_path / "bank" / "segments" / second).exists()
    assert [d.doc_id for d in Bank.open(tmp_path / "bank").documents()] == [0, 2]
    assert append(bank, make_batch(1, "c")) == [5]  # ids are never reused


def test_reindex_replaces_keys_not_content(tmp_path):
    bank = two_segments(new_bank(tmp_path))
    root = tmp_path / "bank"
    before = {name: digest for name, digest in file_digests(root).items()
              if name.endswith(("content.safetensors", "documents.jsonl"))}
    new_keys = {}

    def compute_keys(docs):
        counts = [2] * len(docs)
        keys = torch.randn(sum(counts), 4, 6, dtype=DTYPE)
        new_keys[docs[0].segment] = (keys, [d.row for d in docs])
        return keys, counts

    router = {"id": "trained-abc123", "kind": "trained", "granularity": 32}
    with bank.lock():
        with pytest.raises(MsaError, match="another id"):
            bank.reindex(make_settings()["router"], compute_keys)
        bank.reindex(router, compute_keys)

    after = file_digests(root)
    assert {name: after[name] for name in before} == before
    assert not list(root.glob("segments/*/route.native.safetensors"))
    assert len(list(root.glob("segments/*/route.trained-abc123.safetensors"))) == 2

    bank = Bank.open(root, expect=make_settings(router_id="trained-abc123") | {"router": router})
    for seg in bank.routing_segments():
        keys, rows = new_keys[seg.name]
        assert torch.equal(seg.keys, keys) and seg.key_doc.tolist() == [r for r in rows for _ in range(2)]
    docs = {d.doc_id: d for d in bank.documents()}
    assert [(d.key_start, d.key_count) for d in docs.values()] == [(0, 2), (2, 2), (0, 2), (2, 2)]
    assert bank.stats()["keys"] == 8


def test_crashed_reindex_leaves_old_router(tmp_path, monkeypatch):
    bank = new_bank(tmp_path)
    append(bank, make_batch(2, "a"))
    router = {"id": "trained-1", "kind": "trained"}
    with monkeypatch.context() as m:
        m.setattr(os, "replace", crash)
        with pytest.raises(OSError, match="simulated"):
            with bank.lock():
                bank.reindex(router, lambda docs: (torch.zeros(len(docs), HR, DR, dtype=DTYPE), [1] * len(docs)))
    root = tmp_path / "bank"
    assert Bank.open(root).settings["router"]["id"] == "native"
    assert list(root.glob("segments/*/route.trained-1.safetensors"))
    with Bank.open(root).lock():
        assert not list(root.glob("segments/*/route.trained-1.safetensors"))
        assert list(root.glob("segments/*/route.native.safetensors"))


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc/self/maps")
def test_routing_keys_are_memory_mapped(tmp_path):
    bank = new_bank(tmp_path)
    append(bank, make_batch(3, "a"))
    bank = Bank.open(tmp_path / "bank")
    seg = bank.routing_segments()[0]
    route_file = os.path.realpath(tmp_path / "bank" / "segments" / seg.name / "route.native.safetensors")
    # The tensors' memory must lie inside a mapping of the route file itself, not in a heap copy.
    for t in (seg.keys, seg.key_doc):
        address = t.data_ptr()
        with open("/proc/self/maps") as maps:
            owners = [line.split(maxsplit=5)[5].strip() for line in maps
                      if len(line.split()) == 6
                      and int(line.split("-")[0], 16) <= address < int(line.split()[0].split("-")[1], 16)]
        assert owners == [route_file]


def test_second_writer_is_locked_out(tmp_path):
    bank = new_bank(tmp_path)
    other = Bank.open(tmp_path / "bank")  # its own file descriptor, so flock treats it as another writer
    with bank.lock():
        with pytest.raises(BankLocked, match=str(tmp_path / "bank")):
            with other.lock():
                pass
        with pytest.raises(BankLocked):
            with other.lock(timeout=0.2):
                pass
    with other.lock():  # released
        pass


def test_writer_reloads_what_another_writer_committed(tmp_path):
    a = new_bank(tmp_path)
    b = Bank.open(tmp_path / "bank")
    append(a, make_batch(2, "a"))
    assert append(b, make_batch(1, "b")) == [2]  # b did not overwrite a's commit
    assert [d.doc_id for d in Bank.open(tmp_path / "bank").documents()] == [0, 1, 2]


def test_reader_keeps_its_snapshot(tmp_path):
    writer = new_bank(tmp_path)
    first = make_batch(2, "a")
    append(writer, first)
    reader = Bank.open(tmp_path / "bank")
    append(writer, make_batch(3, "b"))
    assert [d.doc_id for d in reader.documents()] == [0, 1]
    assert len(reader.routing_segments()) == 1
    k, v, _ = reader.load_content([0, 1], LAYERS[1])
    assert torch.equal(k, torch.cat([doc_content(first, 0, LAYERS[1])[0], doc_content(first, 1, LAYERS[1])[0]]))
    assert Bank.open(tmp_path / "bank").num_documents == 5


def test_reader_keeps_reading_a_segment_removed_after_it_opened(tmp_path):
    # `msa ask` during an ingest that replaces files: the reader's snapshot stays whole.
    writer = new_bank(tmp_path)
    first = make_batch(2, "a")
    append(writer, first)
    reader = Bank.open(tmp_path / "bank")
    with writer.lock():
        writer.remove([0, 1])
    assert not list((tmp_path / "bank" / "segments").iterdir())
    k, _, _ = reader.load_content([1], LAYERS[0])
    assert torch.equal(k, doc_content(first, 1, LAYERS[0])[0])
    assert [d.text for d in reader.documents()] == [d.text for d in first[0]]


def test_stats_tolerates_a_segment_deleted_while_it_counts(tmp_path):
    # `msa status` during an ingest that replaces files: the files of the snapshot's segments may be gone.
    writer = new_bank(tmp_path)
    append(writer, make_batch(3, "a"))
    append(writer, make_batch(2, "b"))
    snapshot = Bank.open(tmp_path / "bank")
    with writer.lock():
        writer.remove([3, 4])   # the second segment's every document: its files are deleted
    assert len(list((tmp_path / "bank" / "segments").iterdir())) == 1
    stats = snapshot.stats()
    assert stats["documents"] == 5 and stats["segments"] == 2 and stats["chunks"] == 1 + 2 + 3 + 1 + 2
    sizes = stats["bytes_on_disk"]
    assert sizes["cold"] == (tmp_path / "bank" / "segments" / snapshot.routing_segments()[0].name
                             / "content.safetensors").stat().st_size   # the deleted segment counts 0


def test_append_replacing_is_one_commit(tmp_path):
    bank = new_bank(tmp_path)
    append(bank, make_batch(2, "a"))
    b = make_batch(1, "b")
    commits = []
    with bank.lock():
        real_commit = bank._commit
        bank._commit = lambda m, step: (commits.append(m), real_commit(m, step))
        bank.append(*b, replacing=[0, 1])
    assert len(commits) == 1
    bank = Bank.open(tmp_path / "bank")
    assert [d.doc_id for d in bank.documents()] == [2]
    assert len(list((tmp_path / "bank" / "segments").iterdir())) == 1   # the emptied segment is deleted


def test_info_is_committed_and_survives_appends(tmp_path):
    bank = new_bank(tmp_path)
    with bank.lock():
        bank.set_info(last_ingest={"files": 3})
    append(bank, make_batch(1, "a"))
    assert Bank.open(tmp_path / "bank").info == {"last_ingest": {"files": 3}}


def test_every_file_is_json_jsonl_or_safetensors(tmp_path):
    two_segments(new_bank(tmp_path))
    files = [p for p in (tmp_path / "bank").rglob("*") if p.is_file()]
    assert files
    for p in files:
        if p.name == ".lock":
            assert p.stat().st_size == 0
        elif p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".npy":   # the BM25 index's arrays (bm25s), read without pickle
            assert p.relative_to(tmp_path / "bank").parts[0] == "lexical", p
            np.load(p, allow_pickle=False)
        elif p.suffix == ".jsonl":
            with open(p, encoding="utf-8") as f:
                assert all(json.loads(line) for line in f)
        else:
            assert p.suffix == ".safetensors", p
            with safe_open(p, framework="pt") as f:
                assert list(f.keys())


def test_a_commit_reuses_what_it_does_not_change(tmp_path, monkeypatch):
    """A commit opens only the segment it adds: the earlier segments, their Document objects and their mapped
    keys are the very objects of the snapshot before it, so a commit's cost does not grow with the bank."""
    bank = new_bank(tmp_path)
    append(bank, make_batch(3, "a"))
    append(bank, make_batch(2, "b"))
    before, keys_before = bank.documents(), [s.keys for s in bank.routing_segments()]
    read = []
    real_parse = check.parse_documents
    monkeypatch.setattr(check, "parse_documents", lambda path, *args: (read.append(path.parent.name),
                                                                        real_parse(path, *args))[1])
    with bank.lock():
        bank.append(*make_batch(4, "c"))
        bank.remove([1])
    segments = bank.routing_segments()
    assert read == [segments[2].name]   # the new segment's rows only, once
    after = bank.documents()
    assert [d.doc_id for d in after] == [0, 2, 3, 4, 5, 6, 7, 8]
    assert all(a is b for a, b in zip(after[:4], [before[0], *before[2:]]))
    assert all(s.keys is k for s, k in zip(segments, keys_before))


def test_document_looks_up_one_id(tmp_path, monkeypatch):
    bank = two_segments(new_bank(tmp_path))
    docs = bank.documents()
    # Through the segments' id ranges and the tombstones, not through the list of every document.
    monkeypatch.setattr(snapshot.Snapshot, "documents", lambda self: pytest.fail("listed every document"))
    for doc in docs:
        assert bank.document(doc.doc_id) is doc
    assert bank.document(3).text == "text b 0 é" and bank.document(3).row == 0
    for missing in (1, 5, 100, -1):   # tombstoned, next to come, never, not an id
        with pytest.raises(MsaError, match=f"has no live document {missing}$"):
            bank.document(missing)
        assert not bank.has_document(missing)
    assert all(bank.has_document(d.doc_id) for d in docs)


def saved_index_ids(bank_path) -> list[list[int]]:
    """The ids of every index saved in the bank."""
    root = bank_path / "lexical"
    return [np.load(d / "doc_ids.npy").tolist() for d in sorted(root.iterdir())] if root.is_dir() else []


def worded(batch, words):
    """The batch with document i's text made of words[i] (the toy texts share every indexed word)."""
    docs, *rest = batch
    return [dataclasses.replace(d, text=f"{w} {w}") for d, w in zip(docs, words)], *rest


def test_the_bank_saves_its_lexical_index_when_a_writer_releases_the_lock(tmp_path, monkeypatch):
    bank = new_bank(tmp_path)
    path = tmp_path / "bank"
    assert saved_index_ids(path) == [] and bank.lexical().doc_ids.tolist() == []
    with bank.lock():
        bank.append(*worded(make_batch(3, "a"), ["apple", "banana", "cherry"]))
        assert saved_index_ids(path) == []   # not while committing: commits stay cheap
    assert saved_index_ids(path) == [[0, 1, 2]]
    append(bank, worded(make_batch(2, "b"), ["damson", "elderberry"]))
    assert saved_index_ids(path) == [[0, 1, 2, 3, 4]]   # the old one is gone
    with bank.lock():
        bank.remove([1, 3])
    assert saved_index_ids(path) == [[0, 2, 4]]

    monkeypatch.setattr(lexical.LexicalIndex, "build", lambda *a: pytest.fail("a reader built its own index"))
    reader = Bank.open(path)
    index = reader.lexical()
    assert index is reader.lexical()   # once per snapshot
    assert index.doc_ids.tolist() == [0, 2, 4]
    assert index.scores("cherry").argmax() == 1 and index.scores("banana").max() == 0
    monkeypatch.undo()

    with bank.lock():
        pass   # no commit, nothing to refresh
    assert saved_index_ids(path) == [[0, 2, 4]]
    with bank.lock():
        bank.remove([0, 2, 4])
    assert saved_index_ids(path) == []   # an empty bank keeps none
    assert Bank.open(path).lexical().doc_ids.tolist() == []


def test_the_next_writer_replaces_a_damaged_lexical_index(tmp_path):
    bank = new_bank(tmp_path)
    append(bank, worded(make_batch(2, "a"), ["apple", "banana"]))
    [saved] = list((tmp_path / "bank" / "lexical").iterdir())
    (saved / "doc_ids.npy").write_bytes(b"garbage")
    assert Bank.open(tmp_path / "bank").lexical().scores("banana").argmax() == 1   # built in memory
    with bank.lock():
        bank.set_info(note="any commit")
    assert saved_index_ids(tmp_path / "bank") == [[0, 1]]


def test_no_lexical_index_is_saved_when_the_writer_fails(tmp_path):
    bank = new_bank(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with bank.lock():
            bank.append(*make_batch(2, "a"))
            raise KeyboardInterrupt
    assert saved_index_ids(tmp_path / "bank") == []   # readers build their own; the next writer saves it
    assert Bank.open(tmp_path / "bank").num_documents == 2
