"""Ingest on a tiny model: formats, bad files, incremental updates, prune, forget, interruption."""

import gzip
import os
from pathlib import Path

import pytest

import msa_cli.ingest as ingest_module
from msa_cli.engine import Engine
from msa_cli.ingest import IngestInterrupted, forget, ingest
from msa_cli.memory.bank import Bank
from test_formats import make_pdf

pytestmark = pytest.mark.usefixtures("msa_home")   # each test's own MSA_HOME (conftest, as tiny_model is)


def engine_for(model, bank: Path) -> Engine:
    return Engine.open(model, bank, create=True)


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


def sources(bank: Path) -> dict[str, int]:
    """source -> number of documents."""
    out: dict[str, int] = {}
    for d in Bank.open(bank).documents():
        out[d.source] = out.get(d.source, 0) + 1
    return out


def paragraphs(tag: str, n: int = 3) -> str:
    return "\n\n".join(f"{tag} paragraph {i}: " + "some words about it. " * 12 for i in range(n)) + "\n"


def count_encodes(monkeypatch) -> list[int]:
    """Patch Engine.encode to record the number of passages of every call."""
    calls = []
    real = Engine.encode

    def encode(self, passages, on_tokens=None):
        calls.append(len(passages))
        return real(self, passages, on_tokens)

    monkeypatch.setattr(Engine, "encode", encode)
    return calls


def test_every_format_is_ingested_and_every_bad_file_skipped_with_one_warning(tiny_model, tmp_path, capsys,
                                                                              monkeypatch):
    docs = tmp_path / "docs"
    write(docs / "notes.md", paragraphs("markdown"))
    write(docs / "page.html", "<html><body><nav>Menu</nav><p>" + paragraphs("html") + "</p></body></html>")
    write(docs / "book.pdf", make_pdf([["Page one text."], ["Page two text."]]))
    write(docs / "old.txt.gz", gzip.compress(paragraphs("gzip").encode()))
    write(docs / "code.py", "def f():\n    return 42\n")
    write(docs / "latin1.txt", "Café crème\n".encode("latin-1"))
    bad = {
        "binary.txt": b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(range(256)),
        "invalid-utf8.md": b"header line\n" * 1000 + b"\xff\x01\x02" * 2000,
        "corrupt.pdf": b"%PDF-1.7\n" + bytes(range(256)) * 4,
        "encrypted.pdf": make_pdf([["Secret."]], password="hunter2"),
        "minified.js": b"x=1;" * (3 * 1024 * 1024 // 4),
        "locked.txt": b"cannot be read",
    }
    for name, data in bad.items():
        write(docs / name, data)
    write(docs / "empty.txt", b"")
    os.symlink("loop.txt", docs / "loop.txt")
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: (
        (_ for _ in ()).throw(PermissionError(13, "Permission denied")) if Path(p).name == "locked.txt"
        else real_open(p, *a, **k)))

    report = ingest(engine_for(tiny_model, tmp_path / "bank"), [docs])

    assert report.ingested == 6
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == len(bad) + 1, warnings       # one line per bad file and the loop; none for empty
    for name in [*bad, "loop.txt"]:
        assert sum(name in w for w in warnings) == 1, name
    assert all(w.startswith("msa: warning: skipped ") for w in warnings)
    assert report.skipped == {"binary": 1, "not text": 1, "damaged PDF": 1, "encrypted PDF": 1, "long lines": 1,
                              "unreadable": 1, "link loop": 1, "empty": 1}
    held = sources(tmp_path / "bank")
    assert set(held) == {str(docs / n) for n in ("notes.md", "page.html", "book.pdf", "old.txt.gz", "code.py",
                                                  "latin1.txt")}
    pages = sorted(d.span["page"] for d in Bank.open(tmp_path / "bank").documents() if d.source.endswith(".pdf"))
    assert pages == [1, 2]


def test_reingest_is_incremental_replaces_changed_and_prunes_gone(tiny_model, tmp_path, monkeypatch):
    docs = tmp_path / "docs"
    for name in ("a.md", "b.md", "c.md", "d.md"):
        write(docs / name, paragraphs(name))
    bank = tmp_path / "bank"
    ingest(engine_for(tiny_model, bank), [docs])
    before = {d.source: d.doc_id for d in Bank.open(bank).documents()}

    calls = count_encodes(monkeypatch)
    report = ingest(engine_for(tiny_model, bank), [docs])
    assert calls == [] and report.unchanged == 4 and report.ingested == 0

    write(docs / "a.md", paragraphs("changed", n=1))     # changed
    (docs / "b.md").unlink()                              # gone
    write(docs / "c.md", "")                             # now empty: its old text is stale
    write(docs / "e.md", paragraphs("new"))               # new
    report = ingest(engine_for(tiny_model, bank), [docs])
    assert (report.ingested, report.unchanged, report.removed) == (2, 1, 2)
    held = sources(bank)
    assert set(held) == {str(docs / n) for n in ("a.md", "d.md", "e.md")}
    assert held[str(docs / "a.md")] == 1
    docs_now = {d.source: d for d in Bank.open(bank).documents()}
    assert "changed paragraph" in docs_now[str(docs / "a.md")].text
    assert docs_now[str(docs / "d.md")].doc_id == before[str(docs / "d.md")], "unchanged files keep their documents"


def test_no_prune_keeps_files_gone_from_the_folder(tiny_model, tmp_path):
    docs = tmp_path / "docs"
    write(docs / "a.md", paragraphs("a"))
    write(docs / "b.md", paragraphs("b"))
    bank = tmp_path / "bank"
    ingest(engine_for(tiny_model, bank), [docs])
    (docs / "b.md").unlink()
    report = ingest(engine_for(tiny_model, bank), [docs], prune=False)
    assert report.removed == 0 and str(docs / "b.md") in sources(bank)
    # Ingesting one file never prunes its siblings.
    write(docs / "c.md", paragraphs("c"))
    ingest(engine_for(tiny_model, bank), [docs / "c.md"])
    assert str(docs / "a.md") in sources(bank)


def test_forget_files_and_folders_even_when_gone(tiny_model, tmp_path):
    write(tmp_path / "docs" / "keep.md", paragraphs("keep"))
    write(tmp_path / "docs" / "drop.md", paragraphs("drop"))
    write(tmp_path / "docs" / "sub" / "x.md", paragraphs("x"))
    write(tmp_path / "docs-other" / "y.md", paragraphs("y"))   # shares a prefix, not a folder
    bank = tmp_path / "bank"
    ingest(engine_for(tiny_model, bank), [tmp_path / "docs", tmp_path / "docs-other"])
    import shutil
    shutil.rmtree(tmp_path / "docs" / "sub")
    assert forget(Bank.open(bank), [tmp_path / "docs" / "sub", tmp_path / "docs" / "drop.md"])[0] == 2
    assert set(sources(bank)) == {str(tmp_path / "docs" / "keep.md"), str(tmp_path / "docs-other" / "y.md")}
    assert forget(Bank.open(bank), [tmp_path / "nothing"]) == (0, 0)


def test_a_file_that_vanishes_mid_ingest_is_skipped(tiny_model, tmp_path, capsys, monkeypatch):
    docs = tmp_path / "docs"
    write(docs / "a.md", paragraphs("a"))
    write(docs / "b.md", paragraphs("b"))
    real_list = ingest_module.unique_files

    def list_and_delete(roots, exclude):
        items = real_list(roots, exclude)
        (docs / "a.md").unlink()   # listed, then gone before it is read
        return items

    monkeypatch.setattr(ingest_module, "unique_files", list_and_delete)
    report = ingest(engine_for(tiny_model, tmp_path / "bank"), [docs])
    assert report.ingested == 1 and report.skipped == {"vanished": 1}
    assert capsys.readouterr().err.count("\n") == 1


def test_interrupted_ingest_keeps_committed_batches_and_resumes(tiny_model, tmp_path, monkeypatch):
    docs = tmp_path / "docs"
    for i in range(6):
        write(docs / f"f{i}.md", paragraphs(f"file {i}", n=2))
    monkeypatch.setattr(ingest_module, "COMMIT_TOKENS", 1)   # one file per commit
    calls = count_encodes(monkeypatch)
    real = Engine.encode

    def encode_then_stop(self, passages, on_tokens=None):
        if len(calls) == 3:   # three files encoded and committed, the fourth is interrupted
            raise KeyboardInterrupt
        return real(self, passages, on_tokens)

    monkeypatch.setattr(Engine, "encode", encode_then_stop)
    with pytest.raises(IngestInterrupted, match="3 files were committed"):
        ingest(engine_for(tiny_model, tmp_path / "bank"), [docs])
    assert len(sources(tmp_path / "bank")) == 3

    monkeypatch.setattr(Engine, "encode", real)
    calls = count_encodes(monkeypatch)
    report = ingest(engine_for(tiny_model, tmp_path / "bank"), [docs])
    assert (report.unchanged, report.ingested, len(calls)) == (3, 3, 3)
    assert len(sources(tmp_path / "bank")) == 6


def test_last_ingest_is_recorded(tiny_model, tmp_path):
    write(tmp_path / "docs" / "a.md", paragraphs("a"))
    write(tmp_path / "docs" / "b.bin", b"\0\1")
    ingest(engine_for(tiny_model, tmp_path / "bank"), [tmp_path / "docs"])
    last = Bank.open(tmp_path / "bank").info["last_ingest"]
    assert last["roots"] == [str(tmp_path / "docs")]
    assert (last["ingested"], last["skipped"]) == (1, {"unsupported type": 1})
