"""Damaged banks: every bank file truncated or garbled is refused at open with one line naming it (exit code 4),
or, when only data changed, found by `msa check` through the sha256 the manifest records. Then `msa check`
itself on sound and on damaged banks. The first part works on a toy bank through the Bank API; the second
runs the CLI on a bank a tiny model made."""

import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from conftest import msa, msa_here
from msa_cli.errors import BankMismatch
from msa_cli.memory.bank import Bank
from msa_cli.memory.verify import verify
from test_bank import LAYERS, make_settings, make_template, two_segments

ROUTER_SPEC = {k: v for k, v in make_settings()["router"].items() if k != "id"}


# ----- a toy bank, through the Bank API -----

def toy_bank(root: Path) -> Path:
    """Two segments, one tombstone, router weights with a tensor: every kind of file, each with data."""
    path = root / "bank"
    weights = ({"w": torch.arange(6, dtype=torch.float32)}, {"spec": json.dumps(ROUTER_SPEC)})
    two_segments(Bank.create(path, make_settings(), make_template(), weights))
    return path


@pytest.fixture(scope="module")
def toy_master(tmp_path_factory):
    return toy_bank(tmp_path_factory.mktemp("toy"))


@pytest.fixture
def toy(toy_master, tmp_path):
    return Path(shutil.copytree(toy_master, tmp_path / "bank"))


def bank_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file() and p.name != ".lock")


def digests(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def segment_file(path: Path, name: str, index: int = 0) -> Path:
    return sorted((path / "segments").iterdir())[index] / name


def forget_records(path: Path) -> None:
    """The manifest of a bank made before files were recorded: opening then relies on the format checks alone."""
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.pop("files")
    for entry in manifest["segments"]:
        entry.pop("files")
    (path / "manifest.json").write_text(json.dumps(manifest))


def edit_manifest(path: Path, edit) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def refused(path: Path, file_part: str) -> str:
    """Damage is refused when the bank opens, or (documents.jsonl, parsed on first use) when it is first read."""
    with pytest.raises(BankMismatch) as e:
        Bank.open(path).documents()
    message = str(e.value)
    assert "\n" not in message and file_part in message, message
    return message


def test_a_sound_bank_checks_clean_and_records_every_file(toy):
    report = verify(toy)
    assert (report.problems, report.notes, report.segments, report.documents) == ([], [], 2, 4)
    manifest = json.loads((toy / "manifest.json").read_text())
    assert set(manifest["files"]) == {"template.safetensors", "router.native.safetensors"}
    for entry in manifest["segments"]:
        assert set(entry["files"]) == {"documents.jsonl", "content.safetensors", "route.native.safetensors",
                                      "coarse.native.safetensors"}
        for name, record in entry["files"].items():
            data = (toy / "segments" / entry["name"] / name).read_bytes()
            assert record == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def rows_edit(edit):
    def apply(path: Path):
        lines = path.read_text(encoding="utf-8").splitlines()
        rows = [json.loads(line) for line in lines]
        path.write_text("".join(line + "\n" for line in edit(rows, lines)), encoding="utf-8")
    return apply


def set_field(field, value, row=0):
    def edit(rows, lines):
        rows[row][field] = value
        return [json.dumps(r) for r in rows]
    return edit


def drop_field(field):
    def edit(rows, lines):
        del rows[0][field]
        return [json.dumps(r) for r in rows]
    return edit


DOCUMENTS_DAMAGE = {
    "truncated row": rows_edit(lambda rows, lines: [lines[0][:25], *lines[1:]]),
    "a row that is a list": rows_edit(lambda rows, lines: ["[1, 2]", *lines[1:]]),
    "a row that is a number": rows_edit(lambda rows, lines: ["7", *lines[1:]]),
    "a row nested too deep": rows_edit(lambda rows, lines: ["[" * 100_000, *lines[1:]]),
    "missing key": rows_edit(drop_field("text")),
    "negative chunk count": rows_edit(set_field("chunk_count", -1)),
    "negative token count": rows_edit(set_field("n_tokens", -3)),
    "string count": rows_edit(set_field("n_tokens", "12")),
    "bool id": rows_edit(set_field("doc_id", True, row=1)),
    "float id": rows_edit(set_field("doc_id", 0.0)),
    "null source": rows_edit(set_field("source", None)),
    "list hash": rows_edit(set_field("content_hash", ["x"])),
    "null span": rows_edit(set_field("span", None)),
    "string in span": rows_edit(set_field("span", {"page": "1", "line_start": 1, "line_end": 2})),
    "chunk range out of order": rows_edit(set_field("chunk_start", 5, row=1)),
    "chunks beyond the content": rows_edit(set_field("chunk_count", 9, row=2)),
    "wrong id": rows_edit(set_field("doc_id", 7, row=2)),
    "a row fewer": rows_edit(lambda rows, lines: lines[:-1]),
    "a row more": rows_edit(lambda rows, lines: [*lines, lines[-1]]),
    "not UTF-8": lambda path: path.write_bytes(path.read_bytes().replace("é".encode(), b"\xff", 1)),
    "no final newline": lambda path: path.write_bytes(path.read_bytes()[:-1]),
    "empty": lambda path: path.write_bytes(b""),
    "a directory": lambda path: (path.unlink(), path.mkdir()),
}


@pytest.mark.parametrize("damage", DOCUMENTS_DAMAGE)
def test_damaged_documents_are_refused_naming_the_file(toy, damage):
    forget_records(toy)   # else most of these fail the size check first
    DOCUMENTS_DAMAGE[damage](segment_file(toy, "documents.jsonl"))
    file = "content.safetensors" if damage == "chunks beyond the content" else "documents.jsonl"
    refused(toy, f"segments/{segment_file(toy, file).parent.name}/{file}")
    assert verify(toy).problems


def rewrite_header(path: Path, edit) -> None:
    """Replace a safetensors file's header by edit(header), keeping its data."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = edit(json.loads(raw[8:8 + n]))
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])


def tensor(name, **changes):
    def edit(header):
        header[name].update(changes)
        return header
    return edit


def without(name):
    def edit(header):
        del header[name]
        return header
    return edit


def set_key_doc(values):
    """Overwrite the first entries of a route file's key_doc (int32), wherever in the data it lies."""
    def damage(path: Path):
        raw = bytearray(path.read_bytes())
        n = int.from_bytes(raw[:8], "little")
        begin = 8 + n + json.loads(raw[8:8 + n])["key_doc"]["data_offsets"][0]
        for i, value in enumerate(values):
            raw[begin + 4 * i:begin + 4 * i + 4] = value.to_bytes(4, "little", signed=True)
        path.write_bytes(bytes(raw))
    return damage


def header_length(value):
    return lambda path: path.write_bytes(value.to_bytes(8, "little") + path.read_bytes()[8:])


HEADER_DAMAGE = {
    "content.safetensors": {
        "length past the end": header_length(1 << 40),
        "length short of the header": header_length(20),
        "a list for a header": lambda p: rewrite_header(p, lambda h: [h]),
        "unknown dtype": lambda p: rewrite_header(p, tensor("k.2", dtype="Q4")),
        "offsets past the data": lambda p: rewrite_header(
            p, tensor("k.2", data_offsets=[10 ** 9, 10 ** 9 + 72])),
        "offsets reversed": lambda p: rewrite_header(
            p, lambda h: {**h, "k.2": {**h["k.2"], "data_offsets": h["k.2"]["data_offsets"][::-1]}}),
        "shape unlike its bytes": lambda p: rewrite_header(
            p, lambda h: {**h, "k.2": {**h["k.2"], "shape": [h["k.2"]["shape"][0] + 1, 2, 4]}}),
        "negative size": lambda p: rewrite_header(p, tensor("k.2", shape=[-1, 2, 4])),
        "a layer missing": lambda p: rewrite_header(p, without("v.3")),
        "metadata not strings": lambda p: rewrite_header(p, lambda h: {**h, "__metadata__": {"a": 1}}),
        "trailing bytes": lambda p: p.write_bytes(p.read_bytes() + b"\0\0"),
        "truncated data": lambda p: p.write_bytes(p.read_bytes()[:-2]),
        "too short": lambda p: p.write_bytes(b"\1\0"),
    },
    "route.native.safetensors": {
        "keys of another dtype": lambda p: rewrite_header(p, tensor("keys", dtype="F16")),
        "key_doc of another dtype": lambda p: rewrite_header(p, tensor("key_doc", dtype="F32")),
        "key_doc missing": lambda p: rewrite_header(p, without("key_doc")),
        "keys not 3-d": lambda p: rewrite_header(
            p, lambda h: {**h, "keys": {**h["keys"], "shape": [h["keys"]["shape"][0] * 3, 5]}}),
        "key_doc descending": set_key_doc([2, 0]),
        "key_doc beyond the rows": set_key_doc([99]),
        "key_doc negative": set_key_doc([-1]),
    },
}
HEADER_CASES = [(file, damage) for file, cases in HEADER_DAMAGE.items() for damage in cases]


@pytest.mark.parametrize("file,damage", HEADER_CASES)
def test_damaged_segment_tensors_are_refused_naming_the_file(toy, file, damage):
    forget_records(toy)
    HEADER_DAMAGE[file][damage](segment_file(toy, file))
    refused(toy, f"segments/{segment_file(toy, file).parent.name}/{file}")
    assert verify(toy).problems


def test_damaged_template_and_router_weights_are_refused(toy):
    forget_records(toy)
    original = {name: (toy / name).read_bytes() for name in ("template.safetensors", "router.native.safetensors")}
    for damage in [without("k.2"), tensor("k.0", shape=[2, 2, 4], data_offsets=[0, 32]),
                   lambda h: {**h, "x.1": h["k.0"]}]:
        rewrite_header(toy / "template.safetensors", damage)
        refused(toy, "template.safetensors")
        (toy / "template.safetensors").write_bytes(original["template.safetensors"])
    spec = dict(ROUTER_SPEC, granularity=32)
    for metadata in [{"spec": json.dumps(spec)}, {"spec": "{not json"}, {"about": "{}"}]:
        rewrite_header(toy / "router.native.safetensors", lambda h: {**h, "__metadata__": metadata})
        refused(toy, "router.native.safetensors")
        (toy / "router.native.safetensors").write_bytes(original["router.native.safetensors"])
    Bank.open(toy)


MANIFEST_DAMAGE = {
    "a list": lambda m: m.clear() or m.update({"format_version": 1, "segments": "x"}),
    "no settings": lambda m: m.pop("settings"),
    "unknown dtype": lambda m: m["settings"].update(dtype="int4"),
    "router id with a slash": lambda m: m["settings"]["router"].update(id="../x"),
    "segment name escaping": lambda m: m["segments"][0].update(name="../../etc"),
    "segment listed twice": lambda m: m["segments"].append(dict(m["segments"][0])),
    "negative first id": lambda m: m["segments"][0].update(first_doc_id=-1),
    "empty segment": lambda m: m["segments"][1].update(n_docs=0),
    "overlapping segments": lambda m: m["segments"][1].update(first_doc_id=2),
    "next id too small": lambda m: m.update(next_doc_id=4),
    "tombstone in no segment": lambda m: m.update(tombstones=[1, 40]),
    "tombstones unsorted": lambda m: m.update(tombstones=[4, 1]),
    "a string tombstone": lambda m: m.update(tombstones=["1"]),
    "info a list": lambda m: m.update(info=[]),
    "record without hash": lambda m: m["files"].update({"template.safetensors": {"size": 5}}),
    "segment records a list": lambda m: m["segments"][0].update(files=[]),
}


@pytest.mark.parametrize("damage", MANIFEST_DAMAGE)
def test_damaged_manifest_is_refused(toy, damage):
    edit_manifest(toy, MANIFEST_DAMAGE[damage])
    refused(toy, "manifest.json")
    report = verify(toy)
    assert len(report.problems) == 1 and report.problems[0].startswith("manifest.json: ")


def test_size_records_catch_truncation_at_open_and_hashes_catch_flips_in_check(toy):
    content = segment_file(toy, "content.safetensors", 1)
    data = bytearray(content.read_bytes())
    data[-3] ^= 0x01   # inside the last tensor's data: the header cannot tell
    content.write_bytes(bytes(data))
    bank = Bank.open(toy)   # opening compares sizes, not hashes
    assert bank.num_documents == 4
    report = verify(toy)
    assert report.problems == [f"segments/{content.parent.name}/content.safetensors: sha256 differs from the one "
                               f"recorded at commit (the file changed on disk)"]

    documents = segment_file(toy, "documents.jsonl")
    documents.write_bytes(documents.read_bytes() + b"\n")
    refused(toy, "documents.jsonl: ")
    assert "bytes, the manifest recorded" in refused(toy, "documents.jsonl")


def test_old_banks_without_records_open_and_check_without_hashes(toy):
    forget_records(toy)
    content = segment_file(toy, "content.safetensors")
    data = bytearray(content.read_bytes())
    data[-3] ^= 0x01
    content.write_bytes(bytes(data))
    assert Bank.open(toy).num_documents == 4
    assert verify(toy).problems == []   # nothing recorded to compare with


def test_check_lists_every_problem_and_mentions_leftovers(toy):
    segments = sorted((toy / "segments").iterdir())
    shutil.rmtree(segments[0])
    route = segments[1] / "route.native.safetensors"
    route.write_bytes(route.read_bytes()[:-1])
    (toy / "template.safetensors").write_bytes(b"")
    (toy / "segments" / "000000009-deadbeef").mkdir()
    (toy / "manifest.json.tmp").write_text("{")
    (segments[1] / "route.other.safetensors").write_bytes(b"")
    before = digests(toy)
    report = verify(toy)
    assert report.problems == [
        f"segments/{segments[0].name}/documents.jsonl: missing",
        f"segments/{segments[1].name}/route.native.safetensors: {route.stat().st_size} bytes, the manifest "
        f"recorded {route.stat().st_size + 1}",
        "template.safetensors: 0 bytes, the manifest recorded " +
        str(json.loads((toy / 'manifest.json').read_text())["files"]["template.safetensors"]["size"])]
    lexical_index = next((toy / "lexical").iterdir()).name   # of documents the missing segment held too
    assert [n.split(":")[0] for n in report.notes] == [
        "manifest.json.tmp", f"segments/{segments[1].name}/route.other.safetensors", "segments/000000009-deadbeef",
        f"lexical/{lexical_index}"]
    assert digests(toy) == before   # check writes nothing


def test_check_reports_an_unlisted_record(toy):
    edit_manifest(toy, lambda m: m["segments"][0]["files"].update(
        {"route.old.safetensors": m["segments"][0]["files"]["route.native.safetensors"]}))
    Bank.open(toy)
    assert [p.split(": ", 1)[1] for p in verify(toy).problems] == [
        "recorded in the manifest, but no file of a segment"]


def flips(data: bytes, rng: random.Random, n: int) -> list[int]:
    """Positions to garble: all of a small file's first 200 bytes (headers), and a sample of the rest."""
    head = list(range(min(len(data), 200)))
    rest = list(range(200, len(data)))
    return head + rng.sample(rest, min(n, len(rest)))


def use_everything(bank: Bank) -> None:
    """What the CLI's commands read of an opened bank."""
    bank.stats()
    docs = bank.documents()
    for layer in LAYERS:
        bank.load_content([d.doc_id for d in docs], layer)
    bank.routing_segments()
    bank.template_kv()
    assert bank.lexical().doc_ids.tolist() == [d.doc_id for d in docs]   # a damaged index: built in memory
    for d in docs:
        assert isinstance(d.text, str) and isinstance(d.span["line_start"], (int, type(None)))


def test_any_flipped_or_cut_byte_is_refused_or_found_by_check(toy_master, tmp_path):
    """Garble each byte of every file's head and a sample of the rest, and cut each file at many lengths: opening
    raises nothing but BankMismatch, what opens can be read whole, and check finds every change to a recorded
    file."""
    rng = random.Random(0)
    work = tmp_path / "bank"
    shutil.copytree(toy_master, work)
    for file in bank_files(toy_master):
        name = file.relative_to(toy_master)
        original = file.read_bytes()
        damaged = [original[:i] + bytes([original[i] ^ (1 << rng.randrange(8))]) + original[i + 1:]
                   for i in flips(original, rng, 40)]
        damaged += [original[:n] for n in sorted({*rng.sample(range(len(original)), min(30, len(original))), 0})]
        for data in damaged:
            (work / name).write_bytes(data)
            try:
                use_everything(Bank.open(work))
            except BankMismatch as e:
                assert "\n" not in str(e)
                opened = False
            else:
                opened = True
            if name.as_posix() != "manifest.json":
                assert verify(work).problems, (name, opened)   # recorded files: the hash tells
            else:
                try:
                    verify(work)
                except BankMismatch:   # a flipped format_version is another format, not damage
                    pass
        (work / name).write_bytes(original)
    assert verify(work).problems == []


# ----- the CLI on a bank a tiny model made (conftest's tiny_env) -----

def write_corpus(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in ("a", "b", "c"):
        (root / f"{name}.md").write_text("\n\n".join(
            f"File {name}, part {j}. " + f"Facts about {name} number {j}. " * 6 for j in range(4)) + "\n")
    return root


@pytest.fixture(scope="module")
def cli_master(tiny_env, tmp_path_factory):
    """A bank of two segments (a.md first, then the rest) keeping pooled K/V, with its lexical index saved."""
    root = tmp_path_factory.mktemp("cli")
    corpus = write_corpus(root / "docs")
    bank = root / "bank"
    for target in (corpus / "a.md", corpus):
        r = msa(tiny_env, "ingest", str(target), "--bank", str(bank), "--passage-tokens", "64", "-q",
                "--content", "kv")
        assert r.returncode == 0, r.stderr
    assert len(list((bank / "lexical").iterdir())) == 1   # saved by the writer; the suite damages it too
    return corpus, bank


def run(monkeypatch, capsys, env, *args) -> tuple[int, str, str]:
    """`msa ARGS` in this process (conftest's msa_here), with env's MSA_ settings: (code, stdout, stderr)."""
    for key, value in env.items():
        if key.startswith("MSA_"):
            monkeypatch.setenv(key, value)
    return msa_here(monkeypatch, capsys, *args)


def truncate(size):
    return lambda data: data[:size(len(data))]


def flip_at(position):
    def damage(data: bytes) -> bytes:
        i = position(data)
        return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]
    return damage


def flip_in_float_data(data: bytes) -> bytes:
    """Flip the lowest mantissa bit of the middle element of the largest float tensor: a change no header or
    size can reveal, and a harmless value."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    name = max((k for k, v in header.items() if k != "__metadata__" and v["dtype"] in ("BF16", "F16", "F32")),
               key=lambda k: header[k]["data_offsets"][1] - header[k]["data_offsets"][0])
    begin, end = header[name]["data_offsets"]
    size = {"BF16": 2, "F16": 2, "F32": 4}[header[name]["dtype"]]
    i = 8 + n + begin + (end - begin) // size // 2 * size
    return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:]


def flip_in_text(data: bytes) -> bytes:
    """Change one letter of the first document's text: still UTF-8 and JSON, so only the hash tells."""
    i = data.index(b'"text": "') + len(b'"text": "')
    return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:]


def flip_npy_data(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0x01])


CUTS = {"empty": truncate(lambda n: 0), "half": truncate(lambda n: n // 2), "last-byte": truncate(lambda n: n - 1)}
SAFETENSORS = {**CUTS, "length": flip_at(lambda d: 3), "header": flip_at(lambda d: 8)}
JSON = {**CUTS, "header": flip_at(lambda d: 0)}
NPY = {**CUTS, "header": flip_at(lambda d: 1), "data": flip_npy_data}


def damage_of(name: str, damage: str):
    if name.startswith("lexical/"):
        return (NPY if name.endswith(".npy") else JSON)[damage]
    if name.endswith(".safetensors"):
        return {**SAFETENSORS, "data": flip_in_float_data}[damage]
    return {**JSON, "data": flip_in_text}[damage]


# The files of a bank made as cli_master makes it, named generically (segment names are random).
CLI_FILES = (["manifest.json", "template.safetensors", "router.ROUTER.safetensors"]
             + [f"segments/{i}/{f}" for i in (0, 1)
                for f in ("documents.jsonl", "content.safetensors", "route.ROUTER.safetensors",
                          "coarse.ROUTER.safetensors")]
             + [f"lexical/KEY/{f}" for f in ("data.csc.index.npy", "indices.csc.index.npy", "indptr.csc.index.npy",
                                              "doc_ids.npy", "params.index.json", "vocab.index.json", "files.json")])


def generic_cases() -> list[tuple[str, str]]:
    cases = []
    for name in CLI_FILES:
        if name.startswith("lexical/"):
            damages = NPY if name.endswith(".npy") else JSON
        elif name.startswith("router."):
            damages = SAFETENSORS   # the tiny model's native router has no tensors, only its spec
        elif name.endswith(".safetensors"):
            damages = {**SAFETENSORS, "data": flip_in_float_data}
        else:
            damages = {**JSON, "data": flip_in_text} if name.endswith("documents.jsonl") else JSON
        cases += [(name, damage) for damage in damages]
    return cases


def real_name(bank: Path, name: str) -> str:
    """segments/0/x -> segments/<first segment>/x, ROUTER and KEY -> the bank's."""
    parts = name.split("/")
    if parts[0] == "segments":
        parts[1] = sorted((bank / "segments").iterdir())[int(parts[1])].name
    if parts[0] == "lexical":
        parts[1] = next((bank / "lexical").iterdir()).name
    router_id = json.loads((bank / "manifest.json").read_text())["settings"]["router"]["id"]
    return "/".join(parts).replace("ROUTER", router_id)


@pytest.mark.parametrize("name,damage", generic_cases())
def test_cli_on_a_damaged_bank(cli_master, tiny_env, tmp_path, monkeypatch, capsys, name, damage):
    corpus, master = cli_master
    bank = Path(shutil.copytree(master, tmp_path / "bank"))
    real = real_name(bank, name)
    file = bank / real
    file.write_bytes(damage_of(name, damage)(file.read_bytes()))
    before = digests(bank)
    lexical_only = name.startswith("lexical/")
    data_only = damage == "data" and not lexical_only

    def on_bank(*args):   # in this process, as run() does
        return run(monkeypatch, capsys, tiny_env, *args, "--bank", str(bank))

    for args in (["status"], ["search", "facts about b"], ["check"]):
        code, out, err = on_bank(*args)
        if args[0] == "check" or not (lexical_only or data_only):
            assert code == 4, (args, code, err)
            assert err.count("\n") == 1 and err.startswith("msa: error: bank ") and "Traceback" not in err, err
            if args[0] != "check":
                assert real in err, err   # the line names the damaged file
            else:
                assert real in out, out
        else:
            assert code == 0, (args, code, err)
            assert err == "", err
        assert digests(bank) == before, args   # reading never writes, the damaged file included

    code, out, err = on_bank("ingest", str(corpus), "--passage-tokens", "64")
    if lexical_only or data_only:
        assert code == 0, err
    else:
        assert code == 4 and err.count("\n") == 1 and "Traceback" not in err, err
        assert digests(bank) == before
    if lexical_only:   # a cache: the writer rebuilt it, and the bank checks clean again
        assert run(monkeypatch, capsys, tiny_env, "check", "--bank", str(bank))[0] == 0


def test_cli_check_on_sound_and_missing_banks(cli_master, tiny_env, tmp_path, monkeypatch, capsys):
    corpus, master = cli_master
    bank = Path(shutil.copytree(master, tmp_path / "bank"))
    documents = Bank.open(bank).num_documents
    code, out, err = run(monkeypatch, capsys, tiny_env, "check", "--bank", str(bank))
    assert (code, out, err) == (0, f"ok: 2 segments, {documents} documents\n", "")
    code, out, err = run(monkeypatch, capsys, tiny_env, "check", "--bank", str(bank), "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"] and report["problems"] == [] and report["documents"] == documents
    code, out, err = run(monkeypatch, capsys, tiny_env, "check", "--bank", str(tmp_path / "none"))
    assert code == 3 and err.count("\n") == 1

    file = bank / "template.safetensors"
    file.write_bytes(b"")
    code, out, err = run(monkeypatch, capsys, tiny_env, "check", "--bank", str(bank), "--json")
    report = json.loads(out)
    assert code == 4 and not report["ok"] and len(report["problems"]) == 1
    assert err == f"msa: error: bank {bank} has 1 problem\n"


def test_cli_subprocess_damaged_bank_is_one_line_exit_4(cli_master, tiny_env, tmp_path):
    """The same as above, once, as a user runs it: a separate process, nothing but its exit code and stderr."""
    corpus, master = cli_master
    bank = Path(shutil.copytree(master, tmp_path / "bank"))
    content = bank / real_name(bank, "segments/1/content.safetensors")
    content.write_bytes(content.read_bytes()[:-1])
    for args in (["status"], ["search", "facts"], ["check"], ["ingest", str(corpus)]):
        r = msa(tiny_env, *args, "--bank", str(bank))
        assert r.returncode == 4 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, (args, r.stderr)


def test_cli_ingest_into_a_folder_of_other_files_is_a_usage_error(cli_master, tiny_env, tmp_path, monkeypatch,
                                                                  capsys):
    documents = write_corpus(tmp_path / "Documents")
    before = sorted(p.name for p in documents.iterdir())
    code, out, err = run(monkeypatch, capsys, tiny_env, "ingest", str(documents), "--bank", str(documents))
    assert code == 2 and err.count("\n") == 1 and "is not empty" in err and "holds no bank" in err, err
    assert sorted(p.name for p in documents.iterdir()) == before
