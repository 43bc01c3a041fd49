"""The bank format's rules, checked (docs/bank-format.md): what each bank file must hold, and `msa check`.

Bank applies the cheap rules whenever it opens a bank: the manifest, every safetensors header, file sizes and the
rows of documents.jsonl, all of which it reads anyway. So a damaged file is refused with one line naming it, not
met later as a crash. `verify` applies them to a whole bank and adds what opening skips: the sha256 of every file
whose hash the manifest records, the lexical index, and what lies on disk unlisted. It takes no lock and writes
nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

# Float dtypes a bank may store, by the name settings["dtype"] uses.
FLOAT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# safetensors dtype name -> (numpy dtype to map the bytes as, torch dtype to view them as).
# numpy has no bfloat16, so bf16 is mapped as uint16 and reinterpreted by torch.
TENSOR_DTYPES = {
    "BF16": (np.uint16, torch.bfloat16),
    "F16": (np.float16, torch.float16),
    "F32": (np.float32, torch.float32),
    "I32": (np.int32, torch.int32),
    "I64": (np.int64, torch.int64),
}
_SAFETENSORS_NAME = {torch_dtype: name for name, (_, torch_dtype) in TENSOR_DTYPES.items()}

# Router ids become file names (route.<id>.safetensors).
ROUTER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Segment names become directory names: <first doc id, 9 digits or more>-<8 random hex>.
SEGMENT_NAME = re.compile(r"[0-9]{9,}-[0-9a-f]{8}")
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")

# A documents.jsonl row: field -> type (int fields are counts, never negative). Rows may carry more fields.
ROW_FIELDS = {"doc_id": int, "source": str, "span": dict, "content_hash": str, "n_tokens": int,
              "chunk_start": int, "chunk_count": int, "text": str}


class Damaged(Exception):
    """A bank file breaks the format: which file, and what is wrong with it (one line)."""

    def __init__(self, path: Path, what: str):
        super().__init__(f"{path}: {what}")
        self.path = Path(path)
        self.what = what

    def where(self, bank: Path) -> str:
        """`file: what`, the file named relative to the bank."""
        try:
            name = self.path.relative_to(bank).as_posix()
        except ValueError:
            name = str(self.path)
        return f"{name}: {self.what}"


class TensorInfo(NamedTuple):
    dtype: str          # safetensors dtype name
    shape: tuple
    begin: int          # byte range in the file (not in the data section)
    end: int


# ----- files and records -----

def file_record(path: Path) -> dict:
    """What the manifest records of a file: its size and sha256."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def check_size(path: Path, size: int, record: dict | None) -> None:
    """Opening compares sizes only (a stat); hashes are `verify`'s."""
    if record is not None and size != record["size"]:
        raise Damaged(path, f"{size} bytes, the manifest recorded {record['size']}")


def check_record(path: Path, record: dict) -> None:
    """The file is byte for byte what was committed."""
    actual = file_record(path)
    if actual["size"] != record["size"]:
        raise Damaged(path, f"{actual['size']} bytes, the manifest recorded {record['size']}")
    if actual["sha256"] != record["sha256"]:
        raise Damaged(path, "sha256 differs from the one recorded at commit (the file changed on disk)")


def json_value(path: Path, raw: bytes | str, what: str):
    try:
        return json.loads(raw)
    except UnicodeDecodeError as e:
        raise Damaged(path, f"{what} is not UTF-8 ({e.reason} at byte {e.start})") from None
    except (ValueError, RecursionError) as e:   # RecursionError: nesting too deep for the parser
        raise Damaged(path, f"{what} is not JSON ({e})") from None


def json_object(path: Path, raw: bytes | str, what: str) -> dict:
    value = json_value(path, raw, what)
    if not isinstance(value, dict):
        raise Damaged(path, f"{what} is a JSON {type(value).__name__}, not an object")
    return value


def _is_count(value) -> bool:
    return type(value) is int and value >= 0   # bool is an int subclass, and is not a count


def _require(path: Path, obj: dict, fields: dict, where: str) -> None:
    for name, kind in fields.items():
        value = obj.get(name)
        if type(value) is not kind or (kind is int and value < 0):
            wanted = "a count" if kind is int else f"a {kind.__name__}"
            raise Damaged(path, f"{where}{name} is {json.dumps(value)[:40]}, not {wanted}")


def _check_records(path: Path, records, where: str) -> None:
    if not isinstance(records, dict):
        raise Damaged(path, f"{where} is not an object")
    for name, record in records.items():
        if not (_FILE_NAME.fullmatch(name) and isinstance(record, dict) and _is_count(record.get("size"))
                and isinstance(record.get("sha256"), str) and _SHA256.fullmatch(record["sha256"])):
            raise Damaged(path, f"{where}: the record of {name!r} is not {{size, sha256}}")


# ----- manifest and settings -----

def check_settings(settings) -> None:
    """The settings the bank itself reads (ValueError naming the first bad one); the rest is opaque to it."""
    if not isinstance(settings, dict):
        raise ValueError("bank settings are not an object")
    layers = settings.get("content_layers")
    if not (isinstance(layers, list) and all(_is_count(layer) for layer in layers)):
        raise ValueError(f"bank settings need content_layers, a list of layer numbers, not {layers!r}")
    if settings.get("dtype") not in FLOAT_DTYPES:
        raise ValueError(f"bank settings need dtype, one of {sorted(FLOAT_DTYPES)}, not {settings.get('dtype')!r}")
    for key in ("kv_heads", "head_dim"):
        if not (_is_count(settings.get(key)) and settings[key] > 0):
            raise ValueError(f"bank settings need {key}, a positive int, not {settings.get(key)!r}")
    router = settings.get("router")
    if not (isinstance(router, dict) and isinstance(router.get("id"), str) and ROUTER_ID.fullmatch(router["id"])):
        raise ValueError("bank settings need router, an object with a file-name-safe id")


def check_manifest(path: Path, manifest: dict) -> None:
    """Everything in the manifest but format_version (which the caller compares first: another version may have
    another layout)."""
    _require(path, manifest, {"settings": dict, "segments": list, "tombstones": list, "next_doc_id": int,
                              "created": str, "updated": str}, "")
    try:
        check_settings(manifest["settings"])
    except ValueError as e:
        raise Damaged(path, str(e)) from None
    if not isinstance(manifest.get("info", {}), dict):
        raise Damaged(path, "info is not an object")
    _check_records(path, manifest.get("files", {}), "files")
    starts, end, names = [], 0, set()
    for i, entry in enumerate(manifest["segments"]):
        where = f"segments[{i}]"
        if not isinstance(entry, dict):
            raise Damaged(path, f"{where} is not an object")
        _require(path, entry, {"name": str, "first_doc_id": int, "n_docs": int}, where + ".")
        if not SEGMENT_NAME.fullmatch(entry["name"]) or entry["name"] in names:
            raise Damaged(path, f"{where}.name {entry['name']!r} is not a segment name, or is listed twice")
        # Segments are listed in id order, and each holds at least one document (an emptied one leaves).
        if entry["first_doc_id"] < end or entry["n_docs"] == 0:
            raise Damaged(path, f"{where} ({entry['name']}): its ids overlap the previous segment's, or it is empty")
        _check_records(path, entry.get("files", {}), where + ".files")
        names.add(entry["name"])
        starts.append(entry["first_doc_id"])
        end = entry["first_doc_id"] + entry["n_docs"]
    if manifest["next_doc_id"] < end:
        raise Damaged(path, f"next_doc_id {manifest['next_doc_id']} is not above the last document's id {end - 1}")
    tombstones = manifest["tombstones"]
    if not all(_is_count(t) for t in tombstones) or any(a >= b for a, b in zip(tombstones, tombstones[1:])):
        raise Damaged(path, "tombstones are not ascending document ids")
    for t in tombstones:
        i = bisect_right(starts, t) - 1
        segment = manifest["segments"][i] if i >= 0 else None
        if segment is None or t >= segment["first_doc_id"] + segment["n_docs"]:
            raise Damaged(path, f"tombstone {t} is in no listed segment")


# ----- documents.jsonl -----

_SPAN_KEYS = {"page", "line_start", "line_end"}
_INT_OR_NONE = (int, type(None))


def valid_span(span) -> bool:
    # Spelled out, not looped: opening checks every row's span.
    return (type(span) is dict and span.keys() == _SPAN_KEYS and type(span["page"]) in _INT_OR_NONE
            and type(span["line_start"]) in _INT_OR_NONE and type(span["line_end"]) in _INT_OR_NONE)


def read_documents(path: Path, first_doc_id: int, n_docs: int, record: dict | None) -> list[dict]:
    """A segment's rows, each checked: the ids the manifest gives it, every field's type, and chunk ranges that
    tile the content rows in row order (so their total is the content's row count)."""
    rows, chunks = [], 0
    # newline="\n": rows end with "\n" only (json.dumps escapes every other line break in a row).
    with open(path, encoding="utf-8", newline="\n") as f:
        check_size(path, os.fstat(f.fileno()).st_size, record)
        try:
            for i, line in enumerate(f):
                if not line.endswith("\n"):
                    raise Damaged(path, "the last row is cut short (no final newline)")
                if i == n_docs:
                    raise Damaged(path, f"more rows than the {n_docs} documents the manifest lists")
                rows.append(_row(path, i, line, first_doc_id + i, chunks))
                chunks += rows[-1]["chunk_count"]
        except UnicodeDecodeError as e:
            raise Damaged(path, f"not UTF-8 ({e.reason})") from None
    if len(rows) != n_docs:
        raise Damaged(path, f"{len(rows)} rows, the manifest lists {n_docs} documents")
    return rows


def _row(path: Path, i: int, line: str, doc_id: int, chunk_start: int) -> dict:
    row = json_object(path, line, f"row {i}")
    _require(path, row, ROW_FIELDS, f"row {i}: ")
    if row["doc_id"] != doc_id:
        raise Damaged(path, f"row {i} is document {row['doc_id']}, the manifest says {doc_id}")
    if not valid_span(row["span"]):
        raise Damaged(path, f"row {i}: span is not {{page, line_start, line_end}}, each an int or null")
    if row["chunk_start"] != chunk_start:
        raise Damaged(path, f"row {i}: chunk_start {row['chunk_start']}, its rows start at {chunk_start}")
    return row


# ----- safetensors -----

def safetensors_header(path: Path, record: dict | None) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """A safetensors file's header, checked as the format requires: 8-byte little-endian length, a JSON object
    within the file, known dtypes, byte ranges matching the shapes and tiling the data exactly.
    Returns (tensors by name, metadata)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        check_size(path, size, record)
        if size < 8:
            raise Damaged(path, f"{size} bytes, too short for a safetensors file")
        length = int.from_bytes(f.read(8), "little")
        if length > size - 8:
            raise Damaged(path, f"header length {length} runs past the end of the file ({size} bytes)")
        header = json_object(path, f.read(length), "the header")
    metadata = header.pop("__metadata__", {})
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise Damaged(path, "the header's __metadata__ is not a map of strings")
    tensors = {name: _tensor_info(path, name, info, 8 + length) for name, info in header.items()}
    end = 8 + length
    for name, t in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if t.begin != end:
            raise Damaged(path, f"tensor {name} starts at byte {t.begin}, not {end}: the data has a gap or overlap")
        end = t.end
    if end != size:
        raise Damaged(path, f"the tensors end at byte {end}, the file at {size}")
    return tensors, metadata


def _tensor_info(path: Path, name: str, info, data_start: int) -> TensorInfo:
    if not isinstance(info, dict) or info.get("dtype") not in TENSOR_DTYPES:
        dtype = info.get("dtype") if isinstance(info, dict) else info
        raise Damaged(path, f"tensor {name} has unsupported dtype {json.dumps(dtype)[:20]}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and all(_is_count(n) for n in shape)):
        raise Damaged(path, f"tensor {name}: shape {json.dumps(shape)[:40]} is not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise Damaged(path, f"tensor {name}: data_offsets {json.dumps(offsets)[:40]} is not a byte range")
    itemsize = np.dtype(TENSOR_DTYPES[info["dtype"]][0]).itemsize
    if offsets[1] - offsets[0] != math.prod(shape) * itemsize:
        raise Damaged(path, f"tensor {name}: {offsets[1] - offsets[0]} bytes for shape {shape} of {info['dtype']}")
    return TensorInfo(info["dtype"], tuple(shape), data_start + offsets[0], data_start + offsets[1])


def stored_dtype(settings: dict) -> str:
    """The safetensors dtype of the bank's K/V and keys."""
    return _SAFETENSORS_NAME[FLOAT_DTYPES[settings["dtype"]]]


def _expect(path: Path, tensors: dict[str, TensorInfo], expected: dict[str, tuple[str, tuple]]) -> None:
    """Exactly these tensors, each of this dtype and shape (None: any size there)."""
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise Damaged(path, f"tensors {missing} are missing" if missing else f"unexpected tensors {extra}")
    for name, (dtype, shape) in expected.items():
        t = tensors[name]
        if t.dtype != dtype or len(t.shape) != len(shape) or any(e not in (None, s) for s, e in zip(t.shape, shape)):
            shown = ["N" if e is None else e for e in shape]
            raise Damaged(path, f"tensor {name} is {t.dtype} {list(t.shape)}, not {dtype} {shown}")


def content_tensors(path: Path, tensors: dict[str, TensorInfo], settings: dict, n_chunks: int) -> None:
    shape = (n_chunks, settings["kv_heads"], settings["head_dim"])
    _expect(path, tensors, {f"{kv}.{layer}": (stored_dtype(settings), shape)
                            for layer in settings["content_layers"] for kv in "kv"})


def route_tensors(path: Path, tensors: dict[str, TensorInfo], settings: dict) -> None:
    _expect(path, tensors, {"keys": (stored_dtype(settings), (None, None, None)), "key_doc": ("I32", (None,))})
    if tensors["keys"].shape[0] != tensors["key_doc"].shape[0]:
        raise Damaged(path, f"{tensors['keys'].shape[0]} keys but {tensors['key_doc'].shape[0]} key_doc entries")


def key_rows(path: Path, key_doc: np.ndarray, n_docs: int) -> None:
    """Keys are grouped by row in row order: each row's keys are one range of key_doc."""
    if np.any(key_doc[1:] < key_doc[:-1]) or np.any(key_doc < 0) or np.any(key_doc >= n_docs):
        raise Damaged(path, "key_doc is not ascending segment rows")


def template_tensors(path: Path, tensors: dict[str, TensorInfo], settings: dict) -> None:
    """k.<l> and v.<l> [T, Hk, d] for every model layer: the content layers at least, all of one length T."""
    layers = {int(name[2:]) for name in tensors if re.fullmatch(r"[kv]\.[0-9]+", name)}
    missing = set(settings["content_layers"]) - layers
    if missing:
        raise Damaged(path, f"no template K/V for layers {sorted(missing)}")
    shape = (None, settings["kv_heads"], settings["head_dim"])
    _expect(path, tensors, {f"{kv}.{layer}": (stored_dtype(settings), shape) for layer in layers for kv in "kv"})
    lengths = sorted({t.shape[0] for t in tensors.values()})
    if len(lengths) > 1:
        raise Damaged(path, f"template K/V of several lengths {lengths}")


def router_file(path: Path, metadata: dict[str, str], settings: dict) -> None:
    """Its metadata `spec` describes the router the settings name (the router's description is settings.router,
    less the id), so the router read from the file is the one the keys were made with."""
    spec = json_value(path, metadata.get("spec", "null"), "metadata spec")
    described = {k: v for k, v in settings["router"].items() if k != "id"}
    if spec != described:
        raise Damaged(path, f"its metadata spec does not describe router {settings['router']['id']}")


# ----- msa check -----

@dataclass
class Report:
    problems: list[str] = field(default_factory=list)   # one line each: file: what is wrong
    notes: list[str] = field(default_factory=list)      # harmless leftovers worth knowing of
    segments: int = 0
    documents: int = 0


def verify(path: Path) -> Report:
    """Check a whole bank, as SQLite's integrity_check does. BankNotFound if there is none; BankMismatch only for
    a format version this msa does not read; everything else is a problem in the report."""
    path = Path(path)
    for _ in range(3):
        before = _manifest_bytes(path)
        report = _verify_once(path)
        if _manifest_bytes(path) == before:
            return report
        # A writer committed while we read (and may have deleted what we were reading): check the new state.
    return report


def _manifest_bytes(path: Path) -> bytes | None:
    try:
        return (path / "manifest.json").read_bytes()
    except FileNotFoundError:
        return None


def _verify_once(path: Path) -> Report:
    # bank.py imports this module's rules, so its names are imported here, when they are all defined.
    from . import bank as b
    from . import lexical

    report = Report()
    try:
        manifest = b._read_manifest(path)
    except Damaged as e:
        report.problems.append(_one_line(e.where(path)))
        return report
    settings = manifest["settings"]
    route_file = b._route_file(settings["router"]["id"])
    listed = {entry["name"] for entry in manifest["segments"]}
    tombstones = set(manifest["tombstones"])
    live: list[int] = []
    key_shapes = set()
    for entry in manifest["segments"]:
        directory = path / b.SEGMENTS / entry["name"]
        try:
            segment = b._Segment(directory, entry, settings, route_file)
            for name, record in entry.get("files", {}).items():
                if name not in (b.DOCUMENTS, b.CONTENT, route_file):
                    raise Damaged(directory / name, "recorded in the manifest, but no file of a segment")
                check_record(directory / name, record)
        except Damaged as e:
            report.problems.append(_one_line(e.where(path)))
            continue
        except OSError as e:
            what = "missing" if isinstance(e, FileNotFoundError) else e.strerror
            report.problems.append(Damaged(e.filename or directory, what).where(path))
            continue
        key_shapes.add(tuple(segment.keys.shape[1:]))
        live += [i for i in segment.doc_ids.tolist() if i not in tombstones]
    if len(key_shapes) > 1:
        report.problems.append(f"{b.SEGMENTS}: routing keys of several shapes {sorted(key_shapes)}")
    report.problems += _check_bank_files(path, manifest)
    report.notes += _leftovers(path, listed, route_file, manifest)
    problems, notes = lexical.check_saved(path, live)
    report.problems += [_one_line(p) for p in problems]
    report.notes += notes
    report.segments, report.documents = len(listed), len(live)
    return report


def _check_bank_files(path: Path, manifest: dict) -> list[str]:
    """The template and the router's weights, as opening checks them, plus their hashes when recorded."""
    from . import bank as b

    settings = manifest["settings"]
    records = manifest.get("files", {})
    weights = b._router_weights_file(settings["router"]["id"])
    problems = [f"{name}: recorded in the manifest, but not a file of the bank"
                for name in records if name not in (b.TEMPLATE, weights)]
    for name, check_file in ((b.TEMPLATE, b._map_template), (weights, b._check_router_weights)):
        file = path / name
        if not file.is_file():
            if name == b.TEMPLATE:
                problems.append(f"{name}: missing")
            elif name in records:   # readers fall back on a shipped router of the same id, if there is one
                problems.append(f"{name}: missing, though the manifest records it")
            continue
        try:
            check_file(file, settings, records.get(name))
            if name in records:
                check_record(file, records[name])
        except Damaged as e:
            problems.append(_one_line(e.where(path)))
    return problems


def _leftovers(path: Path, listed: set[str], route_file: str, manifest: dict) -> list[str]:
    """What crashed writers leave: readers ignore it and the next writer deletes it."""
    from . import bank as b

    notes = []
    if (path / (b.MANIFEST + ".tmp")).exists():
        notes.append(f"{b.MANIFEST}.tmp: an uncommitted manifest")
    weights = b._router_weights_file(manifest["settings"]["router"]["id"])
    notes += [f"{f.name}: weights of another router" for f in sorted(path.glob("router.*.safetensors"))
              if f.name != weights]
    segments = path / b.SEGMENTS
    for directory in sorted(segments.iterdir()) if segments.is_dir() else []:
        if directory.name not in listed:
            notes.append(f"{b.SEGMENTS}/{directory.name}: not listed in the manifest")
            continue
        notes += [f"{b.SEGMENTS}/{directory.name}/{f.name}: keys of another router"
                  for f in sorted(directory.glob("route.*.safetensors")) if f.name != route_file]
    return [note + " (left by an interrupted writer; the next writer removes it)" for note in notes]


def _one_line(text: str) -> str:
    return " ".join(str(text).split())
