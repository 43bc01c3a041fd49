"""What an ingest must never do: forget what it could not look at, stop on one hostile file, hang on a pipe, read a
file twice, disobey a parent's .msaignore, read the bank into itself, or hold the whole corpus in memory."""

import os
import zlib
from pathlib import Path

import pytest

import msa_cli.corpus.passages as passages_module
import msa_cli.ingest as ingest_module
from conftest import AS_A_USER, failing_reader, msa, msa_env
from msa_cli.corpus.readers import UnreadableFile, read_bytes
from msa_cli.corpus.walk import unique_files, walk
from msa_cli.engine import Engine
from msa_cli.ingest import ingest
from msa_cli.memory.bank import Bank
from test_ingest import write

pytestmark = pytest.mark.usefixtures("msa_home")   # each test's own MSA_HOME (conftest, as tiny_model is)


@pytest.fixture
def env(tiny_model_dir, msa_home):
    return msa_env(msa_home, tiny_model_dir)


def note(tag: str) -> str:
    return "\n\n".join(f"{tag} part {i}. " + "Words about the subject. " * 8 for i in range(2)) + "\n"


def sources(bank: Path) -> set[str]:
    return {d.source for d in Bank.open(bank).documents()}


def pdf_with_stream(content: bytes) -> bytes:
    """A one-page PDF whose content stream is `content`, Flate-compressed."""
    stream = zlib.compress(content, 9)
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(stream) + stream + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


# --- what could not be looked at is unknown, not gone ----------------------------------------------------------

@pytest.mark.parametrize("mode, unknown", [(0o000, ["private"]), (0o600, ["private/diary.md", "private/env"])],
                         ids=["cannot-list", "cannot-stat-entries"])
def test_an_unreadable_folder_keeps_its_documents_and_says_so(env, tmp_path, mode, unknown):
    notes = tmp_path / "notes"
    write(notes / "open.md", note("open"))
    write(notes / "private" / "diary.md", note("diary"))
    write(notes / "private" / "env" / "pyvenv.cfg", "home = /usr/bin\n")   # the virtualenv sniff looks in here
    bank = tmp_path / "bank"
    assert msa(env, "ingest", str(notes), "--bank", str(bank)).returncode == 0
    held = sources(bank)
    assert str(notes / "private" / "diary.md") in held

    write(notes / "new.md", note("new"))
    (notes / "private").chmod(mode)
    try:
        r = msa(env, "ingest", str(notes), "--bank", str(bank), prefix=AS_A_USER)
    finally:
        (notes / "private").chmod(0o755)
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("msa: warning:")]
    assert [w.split(": ")[2].removeprefix(f"skipped {notes}/") for w in warnings] == unknown, r.stderr
    assert all("Permission denied" in w for w in warnings)
    assert "its 2 documents stay in the bank" in warnings[0]
    assert "removed 0" in r.stderr
    assert sources(bank) == held | {str(notes / "new.md")}


def test_an_unreadable_file_is_kept_by_the_same_rule(env, tmp_path):
    notes = tmp_path / "notes"
    write(notes / "a.md", note("a"))
    locked = write(notes / "locked.md", note("locked"))
    bank = tmp_path / "bank"
    assert msa(env, "ingest", str(notes), "--bank", str(bank)).returncode == 0
    locked.chmod(0)
    r = msa(env, "ingest", str(notes), "--bank", str(bank), prefix=AS_A_USER)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("msa: warning: skipped") == 1 and "stay in the bank" in r.stderr
    assert str(locked) in sources(bank)


# --- one file never stops the others ----------------------------------------------------------------------------

def test_a_pdf_decompression_bomb_is_skipped_and_the_rest_ingested(tiny_model, tmp_path, capsys):
    docs = tmp_path / "docs"
    bomb = write(docs / "bomb.pdf", pdf_with_stream(b"BT /F1 12 Tf 72 720 Td (Boom) Tj ET\n" + b" " * 100_000_000))
    assert len(bomb.read_bytes()) < 200_000   # 100 MB of content in about 98 KB
    write(docs / "fine.pdf", pdf_with_stream(b"BT /F1 12 Tf 72 720 Td (A fine page of text) Tj ET\n"))
    write(docs / "notes.md", note("notes"))
    report = ingest(Engine.open(tiny_model, tmp_path / "bank", create=True), [docs])
    assert report.ingested == 2 and report.skipped == {"damaged PDF": 1}
    err = capsys.readouterr().err.splitlines()
    assert err == [f"msa: warning: skipped {bomb}: damaged PDF (LimitReachedError)"]
    assert sources(tmp_path / "bank") == {str(docs / "fine.pdf"), str(docs / "notes.md")}


def test_a_reader_that_fails_in_any_way_skips_only_its_file(tiny_model, tmp_path, capsys, monkeypatch):
    docs = tmp_path / "docs"
    for name in ("a.md", "b.md", "c.md"):
        write(docs / name, note(name))
    failing_reader(monkeypatch, "b.md", "a reader bug\nwith a second line")
    report = ingest(Engine.open(tiny_model, tmp_path / "bank", create=True), [docs])
    assert report.ingested == 2 and report.skipped == {"reader failed": 1}
    assert capsys.readouterr().err.splitlines() == [
        f"msa: warning: skipped {docs / 'b.md'}: its reader failed (RuntimeError: a reader bug)"]


# --- pipes, devices, links, ignore files, the bank itself -------------------------------------------------------

def test_a_fifo_or_device_named_as_a_root_is_refused_at_once(env, tmp_path):
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    for root in (fifo, Path("/dev/zero")):
        r = msa(env, "ingest", str(root), "--bank", str(tmp_path / "bank"), timeout=120)
        assert r.returncode == 6, r.stderr
        assert f"msa: warning: skipped {root}: not a regular file" in r.stderr


def test_reading_a_fifo_never_blocks(tmp_path):
    fifo = tmp_path / "pipe.md"
    os.mkfifo(fifo)   # e.g. a regular file replaced by a pipe between the walk and the read
    with pytest.raises(UnreadableFile, match="not a regular file"):
        read_bytes(fifo)


def test_a_file_reached_by_several_paths_is_read_once_by_its_real_path(tiny_model, tmp_path):
    docs = tmp_path / "docs"
    write(docs / "real.md", note("real"))
    os.symlink("real.md", docs / "a-link.md")          # sorts first, but the real path wins
    os.symlink(docs / "real.md", tmp_path / "outside-link.md")
    write(tmp_path / "elsewhere" / "only.md", note("only"))
    os.symlink(tmp_path / "elsewhere" / "only.md", docs / "only-link.md")   # the link is the only way in
    os.link(docs / "real.md", docs / "z-hard.md")
    items = unique_files([tmp_path / "outside-link.md", docs])
    assert [str(p) for _, p in items] == [str(docs / "real.md"), str(docs / "only-link.md")]

    ingest(Engine.open(tiny_model, tmp_path / "bank", create=True), [docs])
    assert sources(tmp_path / "bank") == {str(docs / "real.md"), str(docs / "only-link.md")}


def test_a_parent_msaignore_applies_to_a_subfolder_and_the_parent_prunes_nothing(tiny_model, tmp_path):
    notes = tmp_path / "notes"
    write(notes / ".msaignore", "secret.md\nbuild/\n")
    write(notes / "sub" / "secret.md", note("secret"))
    write(notes / "sub" / "plain.md", note("plain"))
    write(notes / "sub" / "build" / "out.md", note("out"))
    assert [p.name for p in walk(notes / "sub") if isinstance(p, Path)] == ["plain.md"]
    (ignored,) = walk(notes / "sub" / "build")
    assert ignored.kind == "ignored" and str(notes / ".msaignore") in ignored.detail

    bank = tmp_path / "bank"
    ingest(Engine.open(tiny_model, bank, create=True), [notes / "sub"])
    assert sources(bank) == {str(notes / "sub" / "plain.md")}
    report = ingest(Engine.open(tiny_model, bank), [notes])
    assert (report.ingested, report.unchanged, report.removed) == (0, 1, 0)


def test_the_bank_inside_an_ingested_folder_is_not_read_and_a_root_inside_the_bank_is_refused(env, tmp_path):
    docs = tmp_path / "docs"
    write(docs / "a.md", note("a"))
    bank = docs / "bank"
    for _ in range(2):   # the second run sees the bank's own files (manifest.json...) under docs
        r = msa(env, "ingest", str(docs), "--bank", str(bank))
        assert r.returncode == 0, r.stderr
    assert sources(bank) == {str(docs / "a.md")}
    r = msa(env, "ingest", str(bank / "segments"), "--bank", str(bank))
    assert (r.returncode, r.stderr.count("\n")) == (2, 1) and "inside the memory bank" in r.stderr


# --- memory does not grow with the corpus -----------------------------------------------------------------------

def test_files_are_encoded_and_committed_as_they_are_read(tiny_model, tmp_path, monkeypatch):
    """Bounded work: at every commit, nothing beyond the batch being committed has been read. Peak memory is one
    batch, whatever the corpus's size (benchmarks/ingest_memory.py measures the RSS)."""
    docs = tmp_path / "docs"
    for i in range(12):
        write(docs / f"f{i:02d}.md", note(f"file {i}"))
    monkeypatch.setattr(ingest_module, "COMMIT_TOKENS", 200)   # about two files per commit
    parsed, at_commit = [], []
    real_parse, real_commit = passages_module.parse, Engine.commit
    monkeypatch.setattr(passages_module, "parse", lambda path, data: parsed.append(path) or real_parse(path, data))

    def commit(self, passages, encoded, replacing=()):
        at_commit.append((len(parsed), len({p.path for p, _ in passages})))
        return real_commit(self, passages, encoded, replacing)

    monkeypatch.setattr(Engine, "commit", commit)
    ingest(Engine.open(tiny_model, tmp_path / "bank", create=True), [docs])
    assert len(at_commit) >= 4
    committed = 0
    for read_so_far, in_batch in at_commit:
        committed += in_batch
        assert read_so_far == committed, at_commit
    assert committed == 12


# --- every bank keeps its lexical index --------------------------------------------------------------------------

def test_every_bank_keeps_its_lexical_index_so_readers_never_rebuild_it(tiny_model, tmp_path, monkeypatch):
    from msa_cli.memory import lexical

    docs = tmp_path / "docs"
    for name in ("a.md", "b.md", "c.md"):
        write(docs / name, note(name))
    bank = tmp_path / "bank"
    engine = Engine.open(tiny_model, bank, create=True)
    assert engine.router.spec.kind != "learned"   # the case that used to rebuild BM25 in every process
    ingest(engine, [docs])
    ingest_module.forget(Bank.open(bank), [docs / "b.md"])

    def no_rebuild(*args):
        raise AssertionError("a reader rebuilt the lexical index")

    monkeypatch.setattr(lexical.LexicalIndex, "build", no_rebuild)
    hits = Engine.open(tiny_model, bank).route("a.md part 1", 5)
    assert {h.document.source for h in hits} == {str(docs / "a.md"), str(docs / "c.md")}
    assert hits[0].bm25 > 0
