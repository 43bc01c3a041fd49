"""Readers while a writer works: a second process runs `msa search`, `status` and `ask` in a loop while this one
ingests, re-ingests changed files and forgets folders, each step a real `msa` process. No reader may fail, and every
answer must come from one consistent snapshot."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import msa
from msa_cli.memory.bank import Bank

HERE = Path(__file__).parent


def write_notes(folder: Path, version: int, n: int = 4) -> None:
    """Every version has the same line layout and is cut the same way (the tiny model's tokenizer reads a byte a
    token), so two versions of a file mixed in one answer would repeat a span."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"note-{i}.md").write_text("\n\n".join(
            f"Version {version} of note {i}, part {j}. " + "Words about the subject of this note. " * 2
            for j in range(3)) + "\n")


def test_readers_see_one_snapshot_while_a_writer_ingests_changes_and_forgets(tiny_env, tiny_model_dir, tmp_path):
    docs, bank, stop = tmp_path / "docs", tmp_path / "bank", tmp_path / "stop"

    def write(*args):
        r = msa(tiny_env, *args, "--bank", str(bank))
        assert r.returncode == 0, (args, r.stderr)

    write_notes(docs / "kept", 1)
    write_notes(docs / "churn", 1)
    write("ingest", str(docs))
    reader = subprocess.Popen([sys.executable, str(HERE / "concurrent_reader.py"), str(bank), str(tiny_model_dir),
                               str(stop)], env={**tiny_env, "PYTHONPATH": str(HERE)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    writes = 0
    try:
        for version in range(2, 4):
            write_notes(docs / "kept", version)            # every file changed: replaced in place
            write("ingest", str(docs))
            write("forget", str(docs / "churn"))            # a folder leaves the bank
            shutil.rmtree(docs / "churn")
            write_notes(docs / "churn", version, n=2 + version % 3)
            write("ingest", str(docs), "--passage-tokens", "150")   # and comes back, one paragraph a passage
            writes += 3
    finally:
        stop.touch()
        out, err = reader.communicate(timeout=300)
    assert reader.returncode == 0, err
    report = json.loads(out)
    print("concurrent reader:", report)
    assert report["problems"] == []
    assert min(report["done"].values()) >= 3, report   # the readers really ran alongside the writes
    held = Bank.open(bank).documents()
    assert {d.source for d in held} == {str(p) for p in docs.rglob("*.md")}
    assert all("Version 3" in d.text for d in held)
    assert writes == 6
