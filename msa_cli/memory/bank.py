"""The on-disk memory bank: documents, their pooled content K/V (cold tier) and routing keys (hot tier).

Layout, atomicity and the manifest are described in docs/bank-format.md. In short: `manifest.json` is
the single commit point; every append writes one new immutable segment directory and then replaces
the manifest atomically, so a crash leaves the last committed bank intact. Readers take no lock: they
read one manifest and then only immutable files. Writers hold an exclusive flock on `<bank>/.lock`.
No pickle anywhere: metadata is JSON, tensors are safetensors, mapped read-only with numpy.memmap.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor

from ..errors import USAGE, BankLocked, BankMismatch, BankNotFound, MsaError
from ..faults import crash_point
from . import check
from .check import FLOAT_DTYPES, TENSOR_DTYPES, Damaged

FORMAT_VERSION = 1

MANIFEST = "manifest.json"
TEMPLATE = "template.safetensors"
SEGMENTS = "segments"
LOCK = ".lock"
DOCUMENTS = "documents.jsonl"
CONTENT = "content.safetensors"

# What a directory may hold when create() finds no manifest there: leftovers of a create that crashed.
_CREATE_LEFTOVERS = {LOCK, TEMPLATE, MANIFEST + ".tmp", SEGMENTS}

# A router's own weights (tensors plus string metadata), kept beside the keys they made: a bank is read with
# the router it was indexed with, wherever the bank is moved.
RouterWeights = tuple[dict[str, Tensor], dict[str, str]]


@dataclass
class Document:
    """A live document as the bank returns it."""

    doc_id: int
    source: str
    span: dict                 # {"page", "line_start", "line_end"}, each int or None
    content_hash: str          # hash of the source file
    n_tokens: int
    text: str
    segment: str               # where it lives: segment name and row in that segment
    row: int
    chunk_start: int           # rows of the segment's content tensors
    chunk_count: int
    key_start: int             # rows of the segment's routing keys (current router)
    key_count: int


@dataclass
class NewDocument:
    """What a writer hands in."""

    source: str
    span: dict
    content_hash: str
    n_tokens: int
    text: str


@dataclass
class RoutingSegment:
    """One segment's hot tier, as the router scans it."""

    name: str
    keys: Tensor       # [N_keys, Hr, dr], memory-mapped, read-only
    key_doc: Tensor    # [N_keys] int32, memory-mapped: segment-local row of each key
    doc_ids: Tensor    # [n_docs] int64: global doc id of each row
    live: Tensor       # [n_docs] bool: False for tombstoned rows


class _Segment:
    """One committed segment of a snapshot: its rows (from documents.jsonl) and its mapped route file, checked
    against the manifest and the format (check.py). Segments are immutable, so a _Segment is reused across
    manifest reloads while its route file is."""

    def __init__(self, directory: Path, entry: dict, settings: dict, route_file: str):
        self.name = directory.name
        self.directory = directory
        self.route_file = route_file
        records = entry.get("files", {})   # sizes are compared here; `msa check` compares hashes
        n_docs = entry["n_docs"]
        self.rows = check.read_documents(directory / DOCUMENTS, entry["first_doc_id"], n_docs,
                                         records.get(DOCUMENTS))
        route = _map_safetensors(directory / route_file, records.get(route_file),
                                 lambda path, tensors: check.route_tensors(path, tensors, settings))
        self.keys, self.key_doc = route["keys"], route["key_doc"]
        # Keys are stored grouped by row in row order, so each row's keys are one range of key_doc;
        # deriving the ranges here lets reindex replace keys without rewriting documents.jsonl.
        key_doc = self.key_doc.numpy()
        check.key_rows(directory / route_file, key_doc, n_docs)
        counts = np.bincount(key_doc, minlength=n_docs)
        self.key_count = counts.tolist()
        self.key_start = (np.cumsum(counts) - counts).tolist()
        self.doc_ids = torch.arange(entry["first_doc_id"], entry["first_doc_id"] + n_docs, dtype=torch.int64)
        # Mapped now, with the rest of the snapshot: a writer may delete this segment once it has no live
        # documents, and a reader that opened the bank before that must still read what it saw. Mapping costs
        # no reading; pages are read only for the documents a question selects.
        n_chunks = sum(r["chunk_count"] for r in self.rows)
        self.content = _map_safetensors(directory / CONTENT, records.get(CONTENT),
                                        lambda path, tensors: check.content_tensors(path, tensors, settings, n_chunks))


class Bank:
    """A memory bank directory. Open one with Bank.open / Bank.create / Bank.open_or_create."""

    def __init__(self, path: Path):
        self.path = path
        self._lock_fd: int | None = None
        self._segments: dict[str, _Segment] = {}
        self._load()

    # ----- opening -----

    @classmethod
    def create(cls, path, settings: dict, template_kv: dict[int, tuple[Tensor, Tensor]],
               router_weights: RouterWeights | None = None) -> "Bank":
        """Make a bank, or open the one another process made meanwhile (refusing other settings, as
        open_or_create does): two first ingests into one place may race, and the second just goes on."""
        path = Path(path)
        settings = _json_normalised(settings)
        check.check_settings(settings)
        template = _template_tensors(settings, template_kv)
        path.mkdir(parents=True, exist_ok=True)
        if not (path / MANIFEST).exists():
            _refuse_strangers(path)   # before the lock, whose file would be one more stranger in their folder
        with _flock(path, 0):
            if not (path / MANIFEST).exists():
                _create(path, settings, template, router_weights)
        return cls.open(path, expect=settings)

    @classmethod
    def open(cls, path, expect: dict | None = None) -> "Bank":
        bank = cls(Path(path))
        if expect is not None:
            _check_same_settings(bank.path, bank.settings, _json_normalised(expect))
        return bank

    @classmethod
    def open_or_create(cls, path, settings: dict, make_template_kv: Callable[[], dict],
                       router_weights: RouterWeights | None = None) -> "Bank":
        if (Path(path) / MANIFEST).exists():
            return cls.open(path, expect=settings)
        return cls.create(path, settings, make_template_kv(), router_weights)

    @staticmethod
    def exists(path) -> bool:
        return (Path(path) / MANIFEST).is_file()

    def check_settings(self, expected: dict) -> None:
        """BankMismatch unless the bank was built with exactly these settings."""
        _check_same_settings(self.path, self.settings, _json_normalised(expected))

    @property
    def router_weights(self) -> Path | None:
        """The file of the weights of the router whose keys the bank holds, if they were stored with it."""
        path = self.path / _router_weights_file(self.settings["router"]["id"])
        return path if path.is_file() else None

    def _load(self) -> None:
        """Read the manifest and the segments it lists: this Bank's snapshot."""
        for _ in range(3):
            try:
                return self._load_snapshot(_read_manifest(self.path))
            except FileNotFoundError as e:
                # A writer committed and deleted files that the manifest just read listed: read the new one.
                missing = e.filename
            except Damaged as e:
                raise BankMismatch(f"bank {self.path} is unreadable: {e.where(self.path)}") from None
            except OSError as e:
                raise BankMismatch(f"bank {self.path} is unreadable: {e.filename}: {e.strerror}") from None
        raise BankMismatch(f"bank {self.path} is unreadable: {missing} is missing")

    def _load_snapshot(self, manifest: dict) -> None:
        settings = manifest["settings"]
        records = manifest.get("files", {})
        # Read later (by generation, by the engine), but checked now: a damaged one is refused at open.
        _map_template(self.path / TEMPLATE, settings, records.get(TEMPLATE))
        weights = self.path / _router_weights_file(settings["router"]["id"])
        # A bank without it (made before routers were stored, or copied without it) is the engine's to judge:
        # it may read the bank with a shipped router of the same id.
        if weights.is_file():
            _check_router_weights(weights, settings, records.get(weights.name))
        route_file = _route_file(settings["router"]["id"])
        segments = {}
        for entry in manifest["segments"]:
            seg = self._segments.get(entry["name"])
            if seg is None or seg.route_file != route_file:
                seg = _Segment(self.path / SEGMENTS / entry["name"], entry, settings, route_file)
            segments[entry["name"]] = seg
        # The router scans every segment's keys alike; appends and reindex keep one shape.
        shapes = sorted({tuple(seg.keys.shape[1:]) for seg in segments.values()})
        if len(shapes) > 1:
            raise Damaged(self.path / SEGMENTS, f"routing keys of several shapes {shapes}")
        tombstones = set(manifest["tombstones"])
        docs = {}
        for seg in segments.values():
            for row, r in enumerate(seg.rows):
                if r["doc_id"] not in tombstones:
                    docs[r["doc_id"]] = Document(
                        doc_id=r["doc_id"], source=r["source"], span=r["span"], content_hash=r["content_hash"],
                        n_tokens=r["n_tokens"], text=r["text"], segment=seg.name, row=row,
                        chunk_start=r["chunk_start"], chunk_count=r["chunk_count"],
                        key_start=seg.key_start[row], key_count=seg.key_count[row])
        self._manifest = manifest
        self._segments = segments
        self._docs = docs

    # ----- reading -----

    @property
    def settings(self) -> dict:
        return self._manifest["settings"]

    def documents(self) -> list[Document]:
        """Live documents in doc_id order."""
        return list(self._docs.values())

    @property
    def num_documents(self) -> int:
        return len(self._docs)

    def stats(self) -> dict:
        docs = self._docs.values()
        sizes = {"hot": 0, "cold": 0, "text": 0, "other": 0}
        # A writer may delete this snapshot's segments while we count (their mappings stay readable): a file
        # gone counts as 0.
        for seg in self._segments.values():
            sizes["hot"] += _size(seg.directory / seg.route_file)
            sizes["cold"] += _size(seg.directory / CONTENT)
            sizes["text"] += _size(seg.directory / DOCUMENTS)
        # Everything else in the directory: manifest, template K/V, router weights, the BM25 cache.
        total = sum(_size(Path(d) / f) for d, _, files in os.walk(self.path) for f in files)
        sizes["other"] = max(0, total - sizes["hot"] - sizes["cold"] - sizes["text"])
        return {"documents": len(docs), "segments": len(self._segments),
                "tokens": sum(d.n_tokens for d in docs), "chunks": sum(d.chunk_count for d in docs),
                "keys": sum(d.key_count for d in docs), "bytes_on_disk": sizes}

    @property
    def next_doc_id(self) -> int:
        """The id the next appended document gets (ids are never reused). Stable while the writer lock is held."""
        return self._manifest["next_doc_id"]

    def routing_segments(self) -> list[RoutingSegment]:
        tombstones = torch.tensor(self._manifest["tombstones"], dtype=torch.int64)
        return [RoutingSegment(name=seg.name, keys=seg.keys, key_doc=seg.key_doc, doc_ids=seg.doc_ids,
                               live=~torch.isin(seg.doc_ids, tombstones))
                for seg in self._segments.values()]

    def load_content(self, doc_ids: list[int], layer: int) -> tuple[Tensor, Tensor, list[int]]:
        """Pooled K/V of one content layer for the given documents, concatenated in the given order:
        (k [S, Hk, d], v [S, Hk, d], chunk count per document). Reads only those documents' rows."""
        if layer not in self.settings["content_layers"]:
            raise ValueError(f"layer {layer} is not a content layer of this bank")
        ks, vs, counts = [], [], []
        for doc_id in doc_ids:
            doc = self._docs.get(doc_id)
            if doc is None:
                raise MsaError(f"bank {self.path} has no live document {doc_id}")
            content = self._segments[doc.segment].content
            rows = slice(doc.chunk_start, doc.chunk_start + doc.chunk_count)
            ks.append(content[f"k.{layer}"][rows])
            vs.append(content[f"v.{layer}"][rows])
            counts.append(doc.chunk_count)
        if not doc_ids:
            empty = torch.empty(0, self.settings["kv_heads"], self.settings["head_dim"],
                                dtype=FLOAT_DTYPES[self.settings["dtype"]])
            return empty, empty.clone(), []
        return torch.cat(ks), torch.cat(vs), counts  # cat copies: callers get ordinary writable tensors

    def template_kv(self) -> dict[int, tuple[Tensor, Tensor]]:
        tensors = _map_template(self.path / TEMPLATE, self.settings, self._manifest.get("files", {}).get(TEMPLATE))
        layers = sorted(int(name.split(".")[1]) for name in tensors if name.startswith("k."))
        # Copies: callers get ordinary writable tensors, not views of the read-only mapping.
        return {layer: (tensors[f"k.{layer}"].clone(), tensors[f"v.{layer}"].clone()) for layer in layers}

    # ----- writing -----

    @contextmanager
    def lock(self, timeout: float = 0) -> Iterator["Bank"]:
        """Exclusive writer lock. Taking it reloads the manifest (another writer may have committed since
        this Bank was opened) and deletes what crashed writers left behind."""
        if self._lock_fd is not None:
            raise RuntimeError("this Bank already holds its lock")
        before = self.settings
        with _flock(self.path, timeout) as fd:
            self._load()
            # Tensors computed for the settings this Bank was opened with must not land in a bank
            # that another writer has since re-keyed.
            _check_same_settings(self.path, self.settings, before)
            _remove_orphans(self.path, self._manifest)
            self._lock_fd = fd
            try:
                yield self
            finally:
                self._lock_fd = None

    def append(self, docs: list[NewDocument], content: dict[int, tuple[Tensor, Tensor]],
               chunk_counts: list[int], route_keys: Tensor, key_counts: list[int],
               replacing: Iterable[int] = ()) -> list[int]:
        """Write one segment holding `docs` and commit it, removing the documents `replacing` in the same commit
        (so a changed file's old and new documents are never both live). content[l] = (k, v), each
        [sum(chunk_counts), Hk, d] with rows in document order; route_keys [sum(key_counts), Hr, dr].
        Returns the new doc ids."""
        self._require_lock()
        if not docs:
            self.remove(replacing)
            return []
        replacing = self._live_ids(replacing)
        settings = self.settings
        if not len(docs) == len(chunk_counts) == len(key_counts):
            raise ValueError("docs, chunk_counts and key_counts differ in length")
        if min(chunk_counts) < 0 or min(key_counts) < 0:
            raise ValueError("chunk and key counts must not be negative")
        if set(content) != set(settings["content_layers"]):
            raise ValueError(f"content layers {sorted(content)} != bank's {settings['content_layers']}")
        # Everything is checked before anything is written.
        shape = (sum(chunk_counts), settings["kv_heads"], settings["head_dim"])
        tensors = {}
        for layer in settings["content_layers"]:
            for name, t in zip("kv", content[layer]):
                tensors[f"{name}.{layer}"] = _checked(t, shape, settings, f"{name}.{layer}")
        # The router's shape is not in the settings; every segment's keys must share it.
        key_shape = next((tuple(seg.keys.shape[1:]) for seg in self._segments.values()), None)
        route = _route_tensors(settings, route_keys, key_counts, list(range(len(docs))), key_shape)

        first = self._manifest["next_doc_id"]
        doc_ids = list(range(first, first + len(docs)))
        rows, chunk_start = [], 0
        for doc_id, doc, n_chunks in zip(doc_ids, docs, chunk_counts):
            if not check.valid_span(doc.span):
                raise ValueError(f"a span is {{page, line_start, line_end}}, each int or None; got {doc.span}")
            rows.append({"doc_id": doc_id, "source": str(doc.source), "span": doc.span,
                         "content_hash": doc.content_hash, "n_tokens": int(doc.n_tokens),
                         "chunk_start": chunk_start, "chunk_count": int(n_chunks), "text": doc.text})
            chunk_start += n_chunks

        # A counter (the first doc id, never reused) plus a random suffix: no collision with an orphan
        # a crashed writer left, even if it was not cleaned up.
        name = f"{first:09d}-{secrets.token_hex(4)}"
        directory = self.path / SEGMENTS / name
        directory.mkdir(parents=True)
        route_file = _route_file(settings["router"]["id"])
        # Each file's size and sha256 go into the manifest: opening compares sizes, `msa check` hashes.
        files = {DOCUMENTS: _write_jsonl(directory / DOCUMENTS, rows),
                 CONTENT: _save_safetensors(tensors, directory / CONTENT),
                 route_file: _save_safetensors(route, directory / route_file)}
        _fsync_dir(directory)
        _fsync_dir(directory.parent)
        crash_point("append:segment-written")

        manifest = dict(self._manifest)
        entry = {"name": name, "first_doc_id": first, "n_docs": len(docs), "files": files}
        manifest["segments"] = [*manifest["segments"], entry]
        manifest["next_doc_id"] = first + len(docs)
        manifest, dropped = _tombstoned(manifest, replacing)
        self._commit(manifest, "append")
        self._delete_segments(dropped, "append")
        return doc_ids

    def remove(self, doc_ids: Iterable[int]) -> None:
        """Tombstone documents and commit. A segment left without live documents leaves the manifest,
        and its files are deleted after the commit."""
        self._require_lock()
        doc_ids = self._live_ids(doc_ids)
        if not doc_ids:
            return
        manifest, dropped = _tombstoned(dict(self._manifest), doc_ids)
        self._commit(manifest, "remove")
        self._delete_segments(dropped, "remove")

    @property
    def info(self) -> dict:
        """Small facts a writer recorded with set_info (e.g. the last ingest), for `msa status`."""
        return self._manifest.get("info", {})

    def set_info(self, key: str, value) -> None:
        """Record a JSON value under `key` in the manifest and commit."""
        self._require_lock()
        self._commit(dict(self._manifest, info={**self.info, key: value}), "info")

    def _live_ids(self, doc_ids: Iterable[int]) -> set[int]:
        doc_ids = set(doc_ids)
        missing = sorted(doc_ids - set(self._docs))
        if missing:
            raise MsaError(f"bank {self.path} has no live document {missing[0]}")
        return doc_ids

    def _delete_segments(self, names: list[str], step: str) -> None:
        # After the commit: readers holding an older snapshot keep their mappings (the files stay readable
        # until unmapped), and a crash before the end leaves orphans that the next writer deletes.
        if not names:
            return
        crash_point(f"{step}:before-delete")
        for name in names:
            shutil.rmtree(self.path / SEGMENTS / name)
        crash_point(f"{step}:after-delete")

    def reindex(self, router: dict, compute_keys: Callable[[list[Document]], tuple[Tensor, list[int]]],
                router_weights: RouterWeights | None = None) -> None:
        """Replace the routing keys of every live segment, leaving content untouched. compute_keys gets one
        segment's live documents (row order) and returns (keys [N, Hr, dr], key count per document)."""
        self._require_lock()
        router = _json_normalised(router)
        old_route = _route_file(self.settings["router"]["id"])
        settings = dict(self.settings, router=router)
        check.check_settings(settings)
        new_route = _route_file(router["id"])
        if new_route == old_route:
            # Route files are immutable: new keys need a new id (e.g. one naming the router weights' hash).
            raise MsaError(f"bank {self.path} already holds keys of router {router['id']!r}; "
                           f"give the new router another id")
        live: dict[str, list[Document]] = {name: [] for name in self._segments}
        for doc in self._docs.values():
            live[doc.segment].append(doc)
        # Tombstoned rows get no keys: the router never needs them again.
        key_shape = None
        segments = []
        for entry in self._manifest["segments"]:
            docs = live[entry["name"]]
            keys, counts = compute_keys(docs)
            route = _route_tensors(settings, keys, counts, [d.row for d in docs], key_shape)
            key_shape = tuple(keys.shape[1:])
            directory = self.path / SEGMENTS / entry["name"]
            record = _save_safetensors(route, directory / new_route)
            _fsync_dir(directory)
            files = {name: r for name, r in entry.get("files", {}).items() if name != old_route}
            segments.append(dict(entry, files={**files, new_route: record}))
        crash_point("reindex:routes-written")
        old_weights = _router_weights_file(self.settings["router"]["id"])
        files = {name: r for name, r in self._manifest.get("files", {}).items() if name != old_weights}
        if router_weights:
            weights, meta = router_weights
            new_weights = _router_weights_file(router["id"])
            files[new_weights] = _save_safetensors(weights, self.path / new_weights, meta)
            crash_point("reindex:router-written")
        self._commit(dict(self._manifest, settings=settings, segments=segments, files=files), "reindex")
        crash_point("reindex:before-delete")
        for name in live:
            (self.path / SEGMENTS / name / old_route).unlink()
        (self.path / old_weights).unlink(missing_ok=True)
        crash_point("reindex:after-delete")

    def _commit(self, manifest: dict, step: str) -> None:
        """step: what commits (create, append, remove, info, reindex), naming its crash points."""
        manifest["updated"] = _now()
        _write_manifest(self.path, manifest, step)
        self._load()

    def _require_lock(self) -> None:
        if self._lock_fd is None:
            raise RuntimeError("changing a bank needs its lock: use `with bank.lock(): ...`")


# ----- manifest and settings -----

def _tombstoned(manifest: dict, doc_ids: set[int]) -> tuple[dict, list[str]]:
    """`manifest` with `doc_ids` tombstoned, and the names of the segments that no longer hold a live document
    (they leave the manifest, and so do their tombstones)."""
    if not doc_ids:
        return manifest, []
    tombstones = set(manifest["tombstones"]) | doc_ids
    kept, dropped = [], []
    for entry in manifest["segments"]:
        ids = range(entry["first_doc_id"], entry["first_doc_id"] + entry["n_docs"])
        (dropped if all(i in tombstones for i in ids) else kept).append(entry)
    for entry in dropped:
        tombstones -= set(range(entry["first_doc_id"], entry["first_doc_id"] + entry["n_docs"]))
    return dict(manifest, segments=kept, tombstones=sorted(tombstones)), [e["name"] for e in dropped]


def _read_manifest(path: Path) -> dict:
    """The manifest, checked (check.check_manifest); Damaged if it is not a well-formed manifest."""
    try:
        raw = (path / MANIFEST).read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        raise BankNotFound(f"no bank at {path} (`msa ingest` makes one)") from None
    manifest = check.json_object(path / MANIFEST, raw, "the manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:   # first: another version may have another layout
        raise BankMismatch(f"bank {path} has format version {version}; this msa reads version {FORMAT_VERSION}")
    check.check_manifest(path / MANIFEST, manifest)
    return manifest


def _write_manifest(path: Path, manifest: dict, step: str) -> None:
    """The commit: write a temporary file, make it durable, rename it over the manifest, make the rename
    durable."""
    tmp = path / (MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    crash_point(f"{step}:manifest-tmp")
    os.replace(tmp, path / MANIFEST)
    _fsync_dir(path)
    crash_point(f"{step}:renamed")


def _create(path: Path, settings: dict, template: dict[str, Tensor], router_weights: RouterWeights | None) -> None:
    """A new bank's first commit: the template K/V and the router's weights, then a manifest with no segments.
    The caller holds the lock and found no manifest."""
    files = {TEMPLATE: _save_safetensors(template, path / TEMPLATE)}
    crash_point("create:template")
    if router_weights:
        weights, meta = router_weights
        name = _router_weights_file(settings["router"]["id"])
        files[name] = _save_safetensors(weights, path / name, meta)
        crash_point("create:router")
    now = _now()
    manifest = {"format_version": FORMAT_VERSION, "settings": settings, "segments": [], "tombstones": [],
                "next_doc_id": 0, "created": now, "updated": now, "files": files}
    _write_manifest(path, manifest, "create")
    _fsync_dir(path.parent)  # the bank directory itself may be new
    _remove_orphans(path, manifest)  # segments a crashed earlier create may have left


def _refuse_strangers(path: Path) -> None:
    """A directory without a manifest may hold only what a crashed create leaves: never make a bank among
    someone's files (`msa ingest ~/Documents --bank ~/Documents`)."""
    strangers = sorted(f for f in set(os.listdir(path)) - _CREATE_LEFTOVERS if not f.startswith("router."))
    if strangers:
        raise MsaError(f"{path} is not empty ({strangers[0]}, ...) and holds no bank; "
                       f"choose another bank directory", USAGE)


def _remove_orphans(path: Path, manifest: dict) -> None:
    """Delete what a crashed writer left: segments the manifest does not list, route files of other routers,
    the temporary manifest. Only writers call this, under the lock."""
    listed = {entry["name"] for entry in manifest["segments"]}
    route = _route_file(manifest["settings"]["router"]["id"])
    (path / (MANIFEST + ".tmp")).unlink(missing_ok=True)
    for f in path.glob("router.*.safetensors"):
        if f.name != _router_weights_file(manifest["settings"]["router"]["id"]):
            f.unlink()
    segments = path / SEGMENTS
    if not segments.is_dir():
        return
    for directory in segments.iterdir():
        if directory.name not in listed:
            shutil.rmtree(directory)
            continue
        for f in directory.glob("route.*.safetensors"):
            if f.name != route:
                f.unlink()


def _check_same_settings(path: Path, stored: dict, expected: dict) -> None:
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


def _json_normalised(value: dict) -> dict:
    # What the manifest will hold: tuples become lists, and a non-JSON value fails here, not at commit.
    return json.loads(json.dumps(value))


def _route_file(router_id: str) -> str:
    return f"route.{router_id}.safetensors"


def _router_weights_file(router_id: str) -> str:
    return f"router.{router_id}.safetensors"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ----- tensors and files -----

def _checked(t: Tensor, shape: tuple, settings: dict, what: str) -> Tensor:
    if tuple(t.shape) != shape:
        raise ValueError(f"{what}: shape {tuple(t.shape)}, expected {shape}")
    if t.dtype != FLOAT_DTYPES[settings["dtype"]]:
        raise ValueError(f"{what}: dtype {t.dtype}, the bank stores {settings['dtype']}")
    return t.detach().to("cpu").contiguous()


def _route_tensors(settings: dict, keys: Tensor, key_counts: list[int], rows: list[int],
                   key_shape: tuple | None) -> dict[str, Tensor]:
    """A route file's tensors: keys grouped by row in row order, and key_doc naming each key's row
    (rows[i] owns key_counts[i] keys). key_shape: the (Hr, dr) the bank's other keys have, if any."""
    if len(rows) != len(key_counts):
        raise ValueError("one key count per document is needed")
    if min(key_counts, default=0) < 0:
        raise ValueError("key counts must not be negative")
    if keys.dim() != 3:
        raise ValueError(f"route keys: shape {tuple(keys.shape)}, expected [N_keys, Hr, dr]")
    shape = (sum(key_counts), *(key_shape or keys.shape[1:]))
    key_doc = torch.repeat_interleave(torch.tensor(rows, dtype=torch.int32),
                                      torch.tensor(key_counts, dtype=torch.int64))
    return {"keys": _checked(keys, shape, settings, "route keys"), "key_doc": key_doc}


def _template_tensors(settings: dict, template_kv: dict[int, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    missing = set(settings["content_layers"]) - set(template_kv)
    if missing:
        raise ValueError(f"template K/V lacks layers {sorted(missing)}")
    tensors = {}
    for layer, (k, v) in sorted(template_kv.items()):
        shape = (k.shape[0], settings["kv_heads"], settings["head_dim"])
        tensors[f"k.{layer}"] = _checked(k, shape, settings, f"template k.{layer}")
        tensors[f"v.{layer}"] = _checked(v, shape, settings, f"template v.{layer}")
    return tensors


def _map_safetensors(path: Path, record: dict | None, check_tensors) -> dict[str, Tensor]:
    """Map a safetensors file read-only, once its header passed check.safetensors_header and
    check_tensors(path, tensors) (the tensors this file must hold). Returns tensors that view the mapping, so
    nothing is read until it is touched."""
    tensors, _ = check.safetensors_header(path, record)
    check_tensors(path, tensors)
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    mapped = {}
    for name, t in tensors.items():
        np_dtype, torch_dtype = TENSOR_DTYPES[t.dtype]
        array = buf[t.begin:t.end].view(np_dtype).reshape(t.shape)
        # The mapping is read-only by design (segments are immutable); torch warns that it cannot
        # express that. Writing to these tensors in place would fault, and nothing here does.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            mapped[name] = torch.from_numpy(array).view(torch_dtype)
    return mapped


def _map_template(path: Path, settings: dict, record: dict | None) -> dict[str, Tensor]:
    return _map_safetensors(path, record, lambda p, tensors: check.template_tensors(p, tensors, settings))


def _check_router_weights(path: Path, settings: dict, record: dict | None) -> None:
    """The engine reads this file itself (router.load_spec): its header, and the spec in it, are checked here."""
    _, metadata = check.safetensors_header(path, record)
    check.router_file(path, metadata, settings)


def _save_safetensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> dict:
    """Write a file durably; returns what the manifest records of it (size, sha256)."""
    save_file(tensors, path, metadata=metadata)
    _fsync_file(path)
    return check.file_record(path)


def _write_jsonl(path: Path, rows: list[dict]) -> dict:
    """Write a file durably; returns what the manifest records of it (size, sha256)."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return check.file_record(path)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # A rename or a new file is durable only once its directory entry is.
    _fsync_file(path)


@contextmanager
def _flock(path: Path, timeout: float) -> Iterator[int]:
    """Hold an exclusive flock on <bank>/.lock; wait up to `timeout` seconds, then raise BankLocked."""
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise BankLocked(f"bank {path} is being changed by another msa process; "
                                     f"try again when it has finished") from None
                time.sleep(0.05)
        yield fd
    finally:
        os.close(fd)  # closing the descriptor releases the lock
