"""The bank format's rules (docs/bank-format.md): what the manifest, documents.jsonl and each safetensors file must
hold, and that a bank is opened with the settings it was built with.

The snapshot applies the cheap rules whenever it opens a bank: the manifest, every safetensors header, file sizes
and the rows of documents.jsonl, all of which it reads anyway. So a damaged file is refused with one line naming
it, not met later as a crash. `msa check` (verify.py) applies them to a whole bank and adds what opening skips.
"""

from __future__ import annotations

import json
import re
from bisect import bisect_right
from pathlib import Path

import numpy as np

from ..errors import BankMismatch
from .format import FLOAT_DTYPES, Damaged, TensorInfo, file_record, is_count, json_object, json_value, \
    stored_dtype

# Router ids become file names (route.<id>.safetensors).
ROUTER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Segment names become directory names: <first doc id, 9 digits or more>-<8 random hex>.
SEGMENT_NAME = re.compile(r"[0-9]{9,}-[0-9a-f]{8}")
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")

# A documents.jsonl row: field -> type (int fields are counts, never negative). Rows may carry more fields.
ROW_FIELDS = {"doc_id": int, "source": str, "span": dict, "content_hash": str, "n_tokens": int,
              "chunk_start": int, "chunk_count": int, "text": str}


def check_record(path: Path, record: dict) -> None:
    """The file is byte for byte what was committed."""
    actual = file_record(path)
    if actual["size"] != record["size"]:
        raise Damaged(path, f"{actual['size']} bytes, the manifest recorded {record['size']}")
    if actual["sha256"] != record["sha256"]:
        raise Damaged(path, "sha256 differs from the one recorded at commit (the file changed on disk)")


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
        if not (_FILE_NAME.fullmatch(name) and isinstance(record, dict) and is_count(record.get("size"))
                and isinstance(record.get("sha256"), str) and _SHA256.fullmatch(record["sha256"])):
            raise Damaged(path, f"{where}: the record of {name!r} is not {{size, sha256}}")


# ----- manifest and settings -----

def check_settings(settings) -> None:
    """The settings the bank itself reads (ValueError naming the first bad one); the rest is opaque to it."""
    if not isinstance(settings, dict):
        raise ValueError("bank settings are not an object")
    layers = settings.get("content_layers")
    if not (isinstance(layers, list) and all(is_count(layer) for layer in layers)):
        raise ValueError(f"bank settings need content_layers, a list of layer numbers, not {layers!r}")
    if settings.get("dtype") not in FLOAT_DTYPES:
        raise ValueError(f"bank settings need dtype, one of {sorted(FLOAT_DTYPES)}, not {settings.get('dtype')!r}")
    for key in ("kv_heads", "head_dim"):
        if not (is_count(settings.get(key)) and settings[key] > 0):
            raise ValueError(f"bank settings need {key}, a positive int, not {settings.get(key)!r}")
    router = settings.get("router")
    if not (isinstance(router, dict) and isinstance(router.get("id"), str) and ROUTER_ID.fullmatch(router["id"])):
        raise ValueError("bank settings need router, an object with a file-name-safe id")


def check_same_settings(path: Path, stored: dict, expected: dict) -> None:
    """BankMismatch naming the first key where the bank's settings differ from the expected ones."""
    difference = _first_difference(stored, expected, "")
    if difference is not None:
        key, was, wanted = difference
        raise BankMismatch(f"bank {path} was built with {key}={_show(was)}, not {_show(wanted)} "
                           f"(use the settings it was built with, or another bank)")


_UNSET = object()


def _first_difference(stored, expected, prefix: str):
    """(dotted key, stored value, expected value) of the first leaf where two JSON values differ, or None."""
    if isinstance(stored, dict) and isinstance(expected, dict):
        for key in [*expected, *(k for k in stored if k not in expected)]:
            path = f"{prefix}.{key}" if prefix else key
            found = _first_difference(stored.get(key, _UNSET), expected.get(key, _UNSET), path)
            if found is not None:
                return found
        return None
    if stored is _UNSET or expected is _UNSET:
        return prefix, stored, expected
    # Compare as JSON so that 1, 1.0 and true stay different.
    return None if json.dumps(stored) == json.dumps(expected) else (prefix, stored, expected)


def _show(value) -> str:
    return "(unset)" if value is _UNSET else json.dumps(value)


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
    if not all(is_count(t) for t in tombstones) or any(a >= b for a, b in zip(tombstones, tombstones[1:])):
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


def parse_documents(path: Path, data: bytes, first_doc_id: int, n_docs: int) -> list[dict]:
    """A segment's rows (the bytes of its documents.jsonl), each checked: the ids the manifest gives it, every
    field's type, and chunk ranges that tile the content rows in row order (their total is checked against the
    content by content_rows)."""
    if data and not data.endswith(b"\n"):
        raise Damaged(path, "the last row is cut short (no final newline)")
    # Rows end with "\n" only: json.dumps escapes every other line break in a row.
    lines = data.split(b"\n")[:-1] if data else []
    if len(lines) > n_docs:
        raise Damaged(path, f"more rows than the {n_docs} documents the manifest lists")
    rows, chunks = [], 0
    for i, line in enumerate(lines):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Damaged(path, f"not UTF-8 ({e.reason})") from None
        rows.append(_row(path, i, text, first_doc_id + i, chunks))
        chunks += rows[-1]["chunk_count"]
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


# ----- the tensors each safetensors file must hold -----

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


def content_tensors(path: Path, tensors: dict[str, TensorInfo], settings: dict) -> None:
    """k.<l> and v.<l> [N_chunks, Hk, d] of every content layer; N_chunks is checked against the documents by
    content_rows."""
    shape = (None, settings["kv_heads"], settings["head_dim"])
    _expect(path, tensors, {f"{kv}.{layer}": (stored_dtype(settings), shape)
                            for layer in settings["content_layers"] for kv in "kv"})
    if len({t.shape[0] for t in tensors.values()}) > 1:
        raise Damaged(path, "content tensors of several lengths")


def content_rows(path: Path, content: dict, n_chunks: int) -> None:
    """The content tensors hold exactly the chunks their documents' rows tile."""
    for name, t in content.items():
        if t.shape[0] != n_chunks:
            raise Damaged(path, f"{name} has {t.shape[0]} rows, the documents' chunks are {n_chunks}")


def route_tensors(path: Path, tensors: dict[str, TensorInfo], settings: dict) -> None:
    _keys_and_rows(path, tensors, settings, (None, None))


def coarse_tensors(path: Path, tensors: dict[str, TensorInfo], settings: dict, key_shape: tuple) -> None:
    """A coarse-key file (memory/coarse.py): keys of the route file's shape and their rows."""
    _keys_and_rows(path, tensors, settings, key_shape)


def _keys_and_rows(path: Path, tensors: dict[str, TensorInfo], settings: dict, key_shape: tuple) -> None:
    """Exactly `keys` [N, *key_shape] (None: any size) and `key_doc` [N] int32."""
    _expect(path, tensors, {"keys": (stored_dtype(settings), (None, *key_shape)), "key_doc": ("I32", (None,))})
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
