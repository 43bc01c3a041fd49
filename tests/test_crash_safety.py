"""kill -9 at every step of every bank change (msa_cli/faults.py's crash points, MSA_CRASH_AT): after each, the
bank opens (or, when the crash came before the first commit, the directory takes a new bank), `msa check` finds
nothing wrong, and running the same command again ends with exactly the documents of a run that never crashed:
every file's passages once, none twice, none lost."""

import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from conftest import msa, msa_here
from msa_cli import cli
from msa_cli.memory.bank import Bank
from msa_cli.memory.router import RouterSpec, save_spec

PASSAGE_TOKENS = "64"   # several documents per file


def crashing_at(env: dict, point: str) -> dict:
    """env (conftest's tiny_env) for a process that kills itself at crash point `point` ("": none)."""
    return {**env, "MSA_CRASH_AT": point}


def ingest(env, target: Path, bank: Path, crash: str = ""):
    return msa(crashing_at(env, crash), "ingest", str(target), "--bank", str(bank), "--passage-tokens",
               PASSAGE_TOKENS, "-q")


def text(name: str, parts: int, size: int = 6) -> str:
    return "\n\n".join(f"{name}, part {j}. " + f"What {name} says about point {j}. " * size
                       for j in range(parts)) + "\n"


def contents(bank: Path, root: Path) -> list[tuple]:
    """Every live document as (file relative to the corpus, span, text), sorted: equal lists mean the same
    passages, each as often."""
    return sorted((os.path.relpath(d.source, root), d.span["line_start"], d.span["line_end"], d.text)
                  for d in Bank.open(bank).documents())


def check_cli(bank: Path, monkeypatch, capsys) -> int:
    """`msa check` (in this process: it loads no model): its exit code."""
    code, out, err = msa_here(monkeypatch, capsys, "check", "--bank", str(bank))
    assert code != 4, out + err
    return code


def crashed(r) -> None:
    # The crash point was reached (else the command would have finished) and killed the process.
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)


def after_crash(bank: Path, monkeypatch, capsys) -> None:
    if Bank.exists(bank):
        Bank.open(bank)
        assert check_cli(bank, monkeypatch, capsys) == 0
    else:   # the crash came before the first commit: no bank yet, and the rerun must be able to make one
        assert check_cli(bank, monkeypatch, capsys) == 3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three files, and a bank of them made as two ingests (a.md, then the folder): a.md has a segment of its
    own, so replacing or forgetting it deletes a segment."""
    root = tmp_path_factory.mktemp("corpus")
    docs = root / "docs"
    docs.mkdir()
    for name in ("a", "b", "c"):
        (docs / f"{name}.md").write_text(text(f"File {name}", 3))
    return docs


@pytest.fixture(scope="module")
def two_segments(tiny_env, corpus, tmp_path_factory):
    bank = tmp_path_factory.mktemp("two-segments") / "bank"
    for target in (corpus / "a.md", corpus):
        assert ingest(tiny_env, target, bank).returncode == 0
    assert len(Bank.open(bank).routing_segments()) == 2
    return bank


def copy_bank(bank: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bank, tmp_path / "bank"))


FRESH_INGEST = ["create:template", "create:router", "create:manifest-tmp", "create:renamed",
                "append:segment-written", "append:manifest-tmp", "append:renamed",
                "info:manifest-tmp", "info:renamed", "lexical:tmp-written", "lexical:renamed"]


@pytest.mark.parametrize("point", FRESH_INGEST)
def test_crash_in_a_first_ingest(tiny_env, corpus, two_segments, tmp_path, monkeypatch, capsys, point):
    bank = tmp_path / "bank"
    crashed(ingest(tiny_env, corpus, bank, crash=point))
    after_crash(bank, monkeypatch, capsys)
    r = ingest(tiny_env, corpus, bank)
    assert r.returncode == 0, r.stderr
    assert check_cli(bank, monkeypatch, capsys) == 0
    assert contents(bank, corpus) == contents(two_segments, corpus)


@pytest.fixture(scope="module")
def large_corpus(tiny_env, tmp_path_factory):
    """Two files of 34K tokens (the tiny tokenizer's are bytes) and a small one, read in name order: the first
    commit (ingest.COMMIT_TOKENS = 65,536) holds the two large ones, a second commit the small one. With its
    reference bank."""
    docs = tmp_path_factory.mktemp("large") / "docs"
    docs.mkdir()
    for name in ("x", "y"):
        (docs / f"{name}.md").write_text(text(f"Large file {name}", 34, size=26))
        assert 33_000 <= (docs / f"{name}.md").stat().st_size < 40_000
    (docs / "z.md").write_text(text("Small file z", 3))
    reference = docs.parent / "reference"
    assert ingest(tiny_env, docs, reference).returncode == 0
    return docs, reference


def test_crash_after_the_first_of_several_commits(tiny_env, large_corpus, tmp_path, monkeypatch, capsys):
    docs, reference = large_corpus
    bank = tmp_path / "bank"
    crashed(ingest(tiny_env, docs, bank, crash="append:renamed"))
    after_crash(bank, monkeypatch, capsys)
    committed = {os.path.basename(d.source) for d in Bank.open(bank).documents()}
    assert committed == {"x.md", "y.md"}   # the first commit's two files, whole
    r = msa(tiny_env, "ingest", str(docs), "--bank", str(bank), "--passage-tokens", PASSAGE_TOKENS)
    assert r.returncode == 0 and "ingested 1 files" in r.stderr and "unchanged 2" in r.stderr, r.stderr
    assert check_cli(bank, monkeypatch, capsys) == 0
    assert contents(bank, docs) == contents(reference, docs)


@pytest.fixture
def changed_a(tiny_env, corpus, tmp_path_factory):
    """a.md rewritten (restored afterwards), and a bank made from the corpus as it then is."""
    original = (corpus / "a.md").read_text()
    (corpus / "a.md").write_text(text("File a, second version", 4))
    reference = tmp_path_factory.mktemp("changed") / "bank"
    assert ingest(tiny_env, corpus, reference).returncode == 0
    yield reference
    (corpus / "a.md").write_text(original)


REPLACING = ["append:manifest-tmp", "append:renamed", "append:before-delete", "append:after-delete"]


@pytest.mark.parametrize("point", REPLACING)
def test_crash_while_a_changed_file_replaces_its_segment(tiny_env, corpus, two_segments, changed_a, tmp_path,
                                                         monkeypatch, capsys, point):
    bank = copy_bank(two_segments, tmp_path)
    crashed(ingest(tiny_env, corpus, bank, crash=point))
    after_crash(bank, monkeypatch, capsys)
    a_now, before, after = ([c for c in contents(b, corpus) if c[0] == "a.md"] for b in (bank, two_segments, changed_a))
    assert a_now in (before, after), "a.md's old and new documents are never both live, nor half of either"
    r = ingest(tiny_env, corpus, bank)
    assert r.returncode == 0, r.stderr
    assert check_cli(bank, monkeypatch, capsys) == 0
    assert contents(bank, corpus) == contents(changed_a, corpus)


FORGET = ["remove:manifest-tmp", "remove:renamed", "remove:before-delete", "remove:after-delete"]


@pytest.mark.parametrize("point", FORGET)
def test_crash_while_forgetting_a_file(tiny_env, corpus, two_segments, tmp_path, monkeypatch, capsys, point):
    bank = copy_bank(two_segments, tmp_path)
    crashed(msa(crashing_at(tiny_env, point), "forget", str(corpus / "a.md"), "--bank", str(bank)))
    after_crash(bank, monkeypatch, capsys)
    r = msa(tiny_env, "forget", str(corpus / "a.md"), "--bank", str(bank))
    assert r.returncode == 0, r.stderr
    assert check_cli(bank, monkeypatch, capsys) == 0
    assert contents(bank, corpus) == [c for c in contents(two_segments, corpus) if c[0] != "a.md"]
    assert len(Bank.open(bank).routing_segments()) == 1


@pytest.fixture(scope="module")
def router_file(tmp_path_factory):
    """Another native router for the tiny model (its default is MSA's every-head choice)."""
    path = tmp_path_factory.mktemp("router") / "narrow.safetensors"
    save_spec(RouterSpec(heads=((2, 0), (3, 3)), group=3, granularity=32), path, {})
    return path


REINDEX = ["reindex:routes-written", "reindex:router-written", "reindex:manifest-tmp", "reindex:renamed",
           "reindex:before-delete", "reindex:after-delete"]


@pytest.mark.parametrize("point", REINDEX)
def test_crash_while_reindexing(tiny_env, corpus, two_segments, router_file, tmp_path, monkeypatch, capsys, point):
    bank = copy_bank(two_segments, tmp_path)
    new_id = RouterSpec(heads=((2, 0), (3, 3)), group=3, granularity=32).id
    crashed(msa(crashing_at(tiny_env, point), "reindex", "--router", str(router_file), "--bank", str(bank)))
    after_crash(bank, monkeypatch, capsys)
    r = msa(tiny_env, "reindex", "--router", str(router_file), "--bank", str(bank))
    assert r.returncode == 0, r.stderr
    assert check_cli(bank, monkeypatch, capsys) == 0
    reindexed = Bank.open(bank)
    assert reindexed.settings["router"]["id"] == new_id
    assert all(seg.keys.shape[1] == 2 for seg in reindexed.routing_segments())
    assert contents(bank, corpus) == contents(two_segments, corpus)
    files = sorted(p.name for p in bank.rglob("*.safetensors"))
    assert files == sorted(["template.safetensors", f"router.{new_id}.safetensors"]
                           + ["content.safetensors", f"route.{new_id}.safetensors", f"coarse.{new_id}.safetensors"] * 2)


def version_1(bank: Path) -> Path:
    """The bank as format version 1 wrote it: the same, without coarse-key files."""
    manifest = json.loads((bank / "manifest.json").read_text())
    for entry in manifest["segments"]:
        for name in [n for n in entry["files"] if n.startswith("coarse.")]:
            del entry["files"][name]
            (bank / "segments" / entry["name"] / name).unlink()
    (bank / "manifest.json").write_text(json.dumps(dict(manifest, format_version=1)))
    return bank


UPGRADE = ["upgrade:coarse-written", "upgrade:manifest-tmp", "upgrade:renamed"]


@pytest.mark.parametrize("point", UPGRADE)
def test_crash_while_a_version_1_bank_is_upgraded(tiny_env, corpus, two_segments, tmp_path, monkeypatch, capsys,
                                                  point):
    bank = version_1(copy_bank(two_segments, tmp_path))
    crashed(ingest(tiny_env, corpus, bank, crash=point))   # its writer upgrades it first
    after_crash(bank, monkeypatch, capsys)
    r = ingest(tiny_env, corpus, bank)
    assert r.returncode == 0, r.stderr
    assert check_cli(bank, monkeypatch, capsys) == 0
    assert contents(bank, corpus) == contents(two_segments, corpus)
    manifest = json.loads((bank / "manifest.json").read_text())
    assert manifest["format_version"] == 2
    assert all(any(n.startswith("coarse.") for n in entry["files"]) for entry in manifest["segments"])


CRASH_POINTS = sorted(set(FRESH_INGEST + ["append:renamed"] + REPLACING + FORGET + REINDEX + UPGRADE))


def test_every_crash_point_in_the_code_is_tested():
    """A crash point added to the bank's modules (bank.py, writer.py, lexical.py, ...) without a test here fails
    this."""
    import re

    memory = Path(cli.__file__).parent / "memory"
    source = "".join(path.read_text() for path in sorted(memory.glob("*.py")))
    named = set(re.findall(r'crash_point\("([^"]+)"\)', source))
    # write_manifest's and _delete_segments' points are named after the step that calls them.
    commit_steps = re.findall(r'(?:_commit|write_manifest)\(.*, "([a-z]+)"\)', source)
    delete_steps = re.findall(r'_delete_segments\(.*, "([a-z]+)"\)', source)
    named |= {f"{step}:{point}" for step in commit_steps for point in ("manifest-tmp", "renamed")}
    named |= {f"{step}:{point}" for step in delete_steps for point in ("before-delete", "after-delete")}
    assert sorted(named) == CRASH_POINTS
    assert len(CRASH_POINTS) == 26
