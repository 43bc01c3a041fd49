"""`msa ingest / forget / status / search` as a user runs them, on a tiny model: exit codes, clean stdout, one-line
errors, the write lock, and kill -9 in the middle of an ingest."""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from conftest import MSA, msa
from msa_cli.memory.bank import Bank


def corpus(root: Path, n_files: int, paragraphs: int = 3) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        (root / f"note-{i:03d}.md").write_text(
            "\n\n".join(f"Note {i}, part {j}. " + "Words about the subject of this note. " * 10
                        for j in range(paragraphs)) + "\n")
    return root


def test_ingest_status_search_forget(tiny_env, tmp_path):
    docs = corpus(tmp_path / "docs", 3)
    (docs / "image.png").write_bytes(b"\x89PNG")
    bank = str(tmp_path / "bank")
    r = msa(tiny_env, "ingest", str(docs), "--bank", bank)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    assert r.stderr.startswith("ingested 3 files") and "skipped: 1 unsupported type" in r.stderr
    assert r.stderr.count("\n") == 1

    status = json.loads(msa(tiny_env, "status", "--bank", bank, "--json").stdout)
    assert status["files"] == 3 and status["documents"] >= 3 and status["tokens"] > 0
    assert status["last_ingest"]["ingested"] == 3 and status["model"]["name"] == "tiny-test"
    assert sum(status["bytes_on_disk"].values()) > 0

    hits = [json.loads(line) for line in msa(tiny_env, "search", "Note 1", "--bank", bank, "--json", "-k", "2").stdout
            .splitlines()]
    assert [h["rank"] for h in hits] == [1, 2]
    assert all(Path(h["path"]).is_absolute() and h["line_start"] >= 1 for h in hits)
    for h in hits:   # each hit's best line, verbatim at the lines it cites, inside the document's span
        e = h["evidence"]
        assert h["line_start"] <= e["line_start"] <= e["line_end"] <= h["line_end"]
        assert e["text"] in "\n".join(Path(h["path"]).read_text().splitlines()[e["line_start"] - 1:e["line_end"]])
    shown = msa(tiny_env, "search", "Note 1", "--bank", bank, "-k", "1").stdout.splitlines()
    assert len(shown) == 2 and shown[1].startswith(f"    {hits[0]['evidence']['line_start']}")

    r = msa(tiny_env, "forget", str(docs / "note-000.md"), "--bank", bank)
    assert r.returncode == 0 and "forgot 1 files" in r.stderr
    assert json.loads(msa(tiny_env, "status", "--bank", bank, "--json").stdout)["files"] == 2


def test_nothing_readable_is_a_one_line_error_per_file_and_exit_6(tiny_env, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.txt").write_bytes(b"\0\1\2binary")
    (bad / "b.pdf").write_bytes(b"%PDF-1.4 not really")
    r = msa(tiny_env, "ingest", str(bad), "--bank", str(tmp_path / "bank"))
    assert r.returncode == 6
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 4, lines
    assert lines[0] == f"msa: warning: skipped {bad / 'a.txt'}: binary content"
    assert lines[1].startswith(f"msa: warning: skipped {bad / 'b.pdf'}: damaged PDF (")
    assert re.fullmatch(r"ingested 0 files \(0 documents, 0 tokens\) in [0-9.]+s; unchanged 0; removed 0; "
                        r"skipped: 1 binary, 1 damaged PDF", lines[2]), lines[2]
    assert lines[3] == "msa: error: nothing was ingested"

    r = msa(tiny_env, "ingest", str(tmp_path / "missing"), "--bank", str(tmp_path / "bank"))
    assert r.returncode == 2 and r.stderr == f"msa: error: no such file or folder: {tmp_path / 'missing'}\n"


def test_an_unknown_compute_dtype_is_a_usage_error_and_leaves_the_bank_as_it_was(tiny_env, tmp_path):
    docs, bank = corpus(tmp_path / "docs", 2), str(tmp_path / "bank")
    assert msa(tiny_env, "ingest", str(docs), "--bank", bank).returncode == 0
    before = json.loads(msa(tiny_env, "status", "--bank", bank, "--json").stdout)
    (docs / "note-000.md").write_text("Changed content.\n")
    r = msa({**tiny_env, "MSA_DTYPE": "half"}, "ingest", str(docs), "--bank", bank)
    assert r.returncode == 2
    assert r.stderr == "msa: error: MSA_DTYPE must be one of bfloat16, bf16, float32, fp32, not 'half'\n"
    after = json.loads(msa(tiny_env, "status", "--bank", bank, "--json").stdout)
    assert (after["files"], after["documents"]) == (before["files"], before["documents"])


def test_a_second_writer_is_refused_clearly(tiny_env, tmp_path):
    docs = corpus(tmp_path / "docs", 1)
    bank = tmp_path / "bank"
    assert msa(tiny_env, "ingest", str(docs), "--bank", str(bank), "-q").returncode == 0
    with Bank.open(bank).lock():   # another ingest is writing
        r = msa(tiny_env, "ingest", str(docs), "--bank", str(bank))
    assert r.returncode == 8
    assert r.stderr.count("\n") == 1 and "being changed by another msa process" in r.stderr


def test_kill_9_mid_ingest_then_rerun_resumes(tiny_env, tmp_path):
    docs = corpus(tmp_path / "docs", 120, paragraphs=6)
    bank = tmp_path / "bank"
    proc = subprocess.Popen([*MSA, "ingest", str(docs), "--bank", str(bank), "-q"], env=tiny_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        manifest = bank / "manifest.json"
        if manifest.is_file() and json.loads(manifest.read_text())["segments"]:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the ingest finished before it could be killed: give it more files"
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    committed = {d.source for d in Bank.open(bank).documents()}
    assert 0 < len(committed) < 120
    r = msa(tiny_env, "ingest", str(docs), "--bank", str(bank))
    assert r.returncode == 0, r.stderr
    assert f"ingested {120 - len(committed)} files" in r.stderr and f"unchanged {len(committed)}" in r.stderr
    held: dict[str, str] = {}
    for d in Bank.open(bank).documents():
        held[d.source] = held.get(d.source, "") + d.text
    assert len(held) == 120
    for source, text in held.items():   # each file exactly once: no document lost or doubled
        assert "".join(text.split()) == "".join(Path(source).read_text().split())


def test_progress_bar_only_on_a_terminal_and_named_files_say_why(tiny_env, tmp_path):
    import fcntl
    import pty
    import struct
    import termios

    docs = corpus(tmp_path / "docs", 4)
    (tmp_path / "photo.png").write_bytes(b"\x89PNG")
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))   # a 120-column terminal
    proc = subprocess.Popen([*MSA, "ingest", str(docs), str(tmp_path / "photo.png"), "--bank", str(tmp_path / "bank")],
                            env=tiny_env, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:   # the terminal closes when the process exits
            break
        if not chunk:
            break
        seen += chunk
    assert proc.wait() == 0 and proc.stdout.read() == b""
    text = seen.decode()
    assert "ingesting" in text and "4 files, 4,752 tokens" in text and "tok/s" in text
    assert f"msa: warning: skipped {tmp_path / 'photo.png'}: unsupported file type '.png'" in text
    assert "ingested 4 files" in text


def test_train_router_and_reindex_from_the_command_line(tiny_env, tmp_path):
    docs = corpus(tmp_path / "docs", 4)
    bank = str(tmp_path / "bank")
    assert msa(tiny_env, "ingest", str(docs), "--bank", bank).returncode == 0
    out = tmp_path / "router.safetensors"
    r = msa(tiny_env, "train-router", "--ict", str(docs), "--layers", "1", "--epochs", "1", "--no-teacher",
            "--head-dim", "8", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and f"wrote {out} (layer 1" in r.stderr and out.with_suffix(".json").is_file()

    r = msa(tiny_env, "reindex", "--router", str(out), "--bank", bank)
    assert r.returncode == 0 and "routing keys of router learned" in r.stderr, r.stderr
    assert json.loads(msa(tiny_env, "status", "--bank", bank, "--json").stdout)["router"]["kind"] == "learned"
    assert msa(tiny_env, "search", "subject of this note", "--bank", bank).returncode == 0

    for args, code, message in [
            (("reindex", "--bank", str(tmp_path / "none")), 3, "no memory bank at"),
            (("reindex", "--router", "nope", "--bank", bank), 2, "no router 'nope'"),
            (("train-router", "--out", str(out)), 2, "nothing to train on"),
            (("train-router", "--qa", str(tmp_path / "none"), "--out", str(out)), 2, "does not exist"),
            (("train-router", "--ict", str(docs), "--layers", "9", "--out", str(out)), 2, "layer 9 is not in"),
            (("train-router", "--ict", str(docs), "--layers", "a,b", "--out", str(out)), 2, "--layers takes"),
            (("train-router", "--ict", str(docs), "--aggregate", "sum", "--out", str(out)), 2, "--aggregate must")]:
        r = msa(tiny_env, *args)
        assert (r.returncode, r.stdout) == (code, ""), (args, r.stderr)
        assert r.stderr.startswith("msa: error: ") and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
