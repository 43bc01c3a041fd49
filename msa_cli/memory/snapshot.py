"""A bank as one manifest describes it: the read side of the bank (docs/bank-format.md, "Readers and writers").

A Snapshot is immutable: one manifest and the segments it lists, each opened and checked once. Segments are
immutable on disk too, so a Snapshot loaded after a commit reuses every segment object of the one before it
(documents included) and opens only what the commit added: the cost of a commit does not grow with the bank.
Documents are found by id through the segments' id ranges and the manifest's tombstones, not through a map of
every document.
"""

from __future__ import annotations

import os
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import BankMismatch, BankNotFound, MsaError
from . import check
from .format import CONTENT, DOCUMENTS, FLOAT_DTYPES, MANIFEST, READABLE_VERSIONS, SEGMENTS, TEMPLATE, Damaged, \
    coarse_file, json_object, map_bytes, map_safetensors, raise_open_file_limit, route_file, router_weights_file, \
    safetensors_header, size


# Frozen: one Document serves every snapshot that lists its segment.
@dataclass(frozen=True)
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
class RoutingSegment:
    """One segment's hot tier, as the router scans it."""

    name: str
    keys: Tensor       # [N_keys, Hr, dr], memory-mapped, read-only
    key_doc: Tensor    # [N_keys] int32, memory-mapped: segment-local row of each key
    doc_ids: Tensor    # [n_docs] int64: global doc id of each row
    live: Tensor       # [n_docs] bool: False for tombstoned rows
    coarse: Tensor | None = None       # [N_coarse, Hr, dr], memory-mapped (memory/coarse.py); None: none written
    coarse_doc: Tensor | None = None   # [N_coarse] int32: segment-local row of each coarse key


class Segment:
    """One committed segment: its mapped documents, route and content files, checked against the manifest entry
    and the format rules, and a Document for every row (tombstoned ones too: tombstones are the manifest's),
    parsed from documents.jsonl when first asked for: a bank of a million documents opens without reading their
    text. Reused by every snapshot that lists it with the same files."""

    def __init__(self, directory: Path, entry: dict, settings: dict, route: str):
        self.name = directory.name
        self.directory = directory
        self.route_file = route
        # What the manifest records of its files: sizes are compared here, `msa check` compares hashes, and a
        # snapshot reuses this object only for an entry recording the same (an upgrade adds coarse keys).
        self.files = records = entry.get("files", {})
        self.first_doc_id = entry["first_doc_id"]
        self.n_docs = n_docs = entry["n_docs"]
        # Everything is mapped now, with the rest of the snapshot: a writer may delete this segment once it has
        # no live documents, and a reader that opened the bank before that must still read what it saw. Mapping
        # costs no reading; pages are read only when touched.
        self._rows = map_bytes(directory / DOCUMENTS, records.get(DOCUMENTS))
        mapped = map_safetensors(directory / route, records.get(route),
                                 lambda path, tensors: check.route_tensors(path, tensors, settings))
        self.keys, self.key_doc = mapped["keys"], mapped["key_doc"]
        # Checked now: the scan indexes documents by key_doc.
        check.key_rows(directory / route, self.key_doc.numpy(), n_docs)
        # The coarse keys (memory/coarse.py), when the manifest lists them: a version-1 segment has none.
        self.coarse = self.coarse_doc = None
        coarse = coarse_file(settings["router"]["id"])
        if coarse in records:
            mapped = map_safetensors(directory / coarse, records[coarse], lambda path, tensors: check.coarse_tensors(
                path, tensors, settings, self.key_shape))
            self.coarse, self.coarse_doc = mapped["keys"], mapped["key_doc"]
            check.key_rows(directory / coarse, self.coarse_doc.numpy(), n_docs)
        self.doc_ids = torch.arange(self.first_doc_id, self.first_doc_id + n_docs, dtype=torch.int64)
        self.content = map_safetensors(directory / CONTENT, records.get(CONTENT),
                                       lambda path, tensors: check.content_tensors(path, tensors, settings))
        self._documents: list[Document] | None = None

    @property
    def documents(self) -> list[Document]:
        """Every row's Document, parsed and checked on first use (Damaged if documents.jsonl breaks the format)."""
        if self._documents is None:
            rows = check.parse_documents(self.directory / DOCUMENTS, self._rows.tobytes(), self.first_doc_id,
                                         self.n_docs)
            check.content_rows(self.directory / CONTENT, self.content, sum(r["chunk_count"] for r in rows))
            # Keys are stored grouped by row in row order, so each row's keys are one range of key_doc;
            # deriving the ranges lets reindex replace keys without rewriting documents.jsonl.
            per_row = np.bincount(self.key_doc.numpy(), minlength=self.n_docs)
            counts, starts = per_row.tolist(), (np.cumsum(per_row) - per_row).tolist()
            self._documents = [
                Document(doc_id=r["doc_id"], source=r["source"], span=r["span"], content_hash=r["content_hash"],
                         n_tokens=r["n_tokens"], text=r["text"], segment=self.name, row=row,
                         chunk_start=r["chunk_start"], chunk_count=r["chunk_count"],
                         key_start=starts[row], key_count=counts[row])
                for row, r in enumerate(rows)]
        return self._documents

    @property
    def key_shape(self) -> tuple:
        """(Hr, dr) of its routing keys."""
        return tuple(self.keys.shape[1:])


class Snapshot:
    """One committed state of a bank. Load one with Snapshot.load."""

    def __init__(self, path: Path, manifest: dict, segments: tuple[Segment, ...]):
        self.path = path
        self.manifest = manifest
        self.segments = segments                       # in doc id order
        self._starts = [seg.first_doc_id for seg in segments]
        self._tombstones = manifest["tombstones"]      # ascending (check.check_manifest)
        self._documents: list[Document] | None = None  # built on first use
        self._live: list[Tensor] | None = None

    @classmethod
    def load(cls, path: Path, previous: "Snapshot | None" = None) -> "Snapshot":
        """The bank's current snapshot, sharing the segments it has in common with `previous`."""
        raise_open_file_limit()
        for _ in range(3):
            try:
                return cls._open(path, read_manifest(path), previous)
            except FileNotFoundError as e:
                # A writer committed and deleted files that the manifest just read listed: read the new one.
                missing = e.filename
            except Damaged as e:
                raise BankMismatch(f"bank {path} is unreadable: {e.where(path)}") from None
            except OSError as e:
                raise BankMismatch(f"bank {path} is unreadable: {e.filename}: {e.strerror}") from None
        raise BankMismatch(f"bank {path} is unreadable: {missing} is missing")

    @classmethod
    def _open(cls, path: Path, manifest: dict, previous: "Snapshot | None") -> "Snapshot":
        settings = manifest["settings"]
        records = manifest.get("files", {})
        # Read later (by generation, by the engine), but checked now: a damaged one is refused at open.
        map_template(path / TEMPLATE, settings, records.get(TEMPLATE))
        weights = path / router_weights_file(settings["router"]["id"])
        # A bank without it (made before routers were stored, or copied without it) is the engine's to judge:
        # it may read the bank with a shipped router of the same id.
        if weights.is_file():
            check_router_weights(weights, settings, records.get(weights.name))
        route = route_file(settings["router"]["id"])
        known = {seg.name: seg for seg in previous.segments} if previous else {}
        segments = []
        for entry in manifest["segments"]:
            seg = known.get(entry["name"])
            if seg is None or seg.route_file != route or seg.files != entry.get("files", {}):
                seg = Segment(path / SEGMENTS / entry["name"], entry, settings, route)
            segments.append(seg)
        # The router scans every segment's keys alike; appends and reindex keep one shape.
        shapes = sorted({seg.key_shape for seg in segments})
        if len(shapes) > 1:
            raise Damaged(path / SEGMENTS, f"routing keys of several shapes {shapes}")
        return cls(path, manifest, tuple(segments))

    @property
    def settings(self) -> dict:
        return self.manifest["settings"]

    @property
    def next_doc_id(self) -> int:
        return self.manifest["next_doc_id"]

    @property
    def info(self) -> dict:
        return self.manifest.get("info", {})

    @property
    def key_shape(self) -> tuple | None:
        """(Hr, dr) of the bank's routing keys; None before the first segment fixes it."""
        return self.segments[0].key_shape if self.segments else None

    def _documents_of(self, seg: Segment) -> list[Document]:
        """seg.documents, a damaged documents.jsonl refused as opening refuses damage (one line, BankMismatch)."""
        try:
            return seg.documents
        except Damaged as e:
            raise BankMismatch(f"bank {self.path} is unreadable: {e.where(self.path)}") from None

    def live_ids(self) -> Tensor:
        """The live documents' ids, ascending, without parsing any document."""
        segments = self.routing_segments()
        return torch.cat([s.doc_ids[s.live] for s in segments]) if segments else torch.zeros(0, dtype=torch.long)

    def _dead_rows(self, seg: Segment) -> list[int]:
        """The rows of `seg` whose documents are tombstoned."""
        lo = bisect_left(self._tombstones, seg.first_doc_id)
        hi = bisect_left(self._tombstones, seg.first_doc_id + seg.n_docs)
        return [t - seg.first_doc_id for t in self._tombstones[lo:hi]]

    def live_documents(self, seg: Segment) -> list[Document]:
        """A segment's live documents, in row order."""
        dead = set(self._dead_rows(seg))
        documents = self._documents_of(seg)
        return [d for d in documents if d.row not in dead] if dead else list(documents)

    def documents(self) -> list[Document]:
        """Live documents in doc_id order."""
        if self._documents is None:
            self._documents = [d for seg in self.segments for d in self.live_documents(seg)]
        return list(self._documents)

    @property
    def num_documents(self) -> int:
        # Every tombstone lies in a listed segment (check.check_manifest).
        return sum(seg.n_docs for seg in self.segments) - len(self._tombstones)

    def document(self, doc_id: int) -> Document:
        return self._locate(doc_id)[1]

    def document_keys(self, doc_id: int) -> Tensor:
        seg, doc = self._locate(doc_id)
        return seg.keys[doc.key_start:doc.key_start + doc.key_count]

    def has_document(self, doc_id: int) -> bool:
        try:
            self._locate(doc_id)
        except MsaError:
            return False
        return True

    def _locate(self, doc_id: int) -> tuple[Segment, Document]:
        i = bisect_right(self._starts, doc_id) - 1
        t = bisect_left(self._tombstones, doc_id)
        if i >= 0 and not (t < len(self._tombstones) and self._tombstones[t] == doc_id):
            seg = self.segments[i]
            if doc_id - seg.first_doc_id < seg.n_docs:
                return seg, self._documents_of(seg)[doc_id - seg.first_doc_id]
        raise MsaError(f"bank {self.path} has no live document {doc_id}")

    def routing_segments(self) -> list[RoutingSegment]:
        if self._live is None:
            self._live = []
            for seg in self.segments:
                live = torch.ones(seg.n_docs, dtype=torch.bool)
                live[torch.tensor(self._dead_rows(seg), dtype=torch.long)] = False
                self._live.append(live)
        return [RoutingSegment(name=seg.name, keys=seg.keys, key_doc=seg.key_doc, doc_ids=seg.doc_ids, live=live,
                               coarse=seg.coarse, coarse_doc=seg.coarse_doc)
                for seg, live in zip(self.segments, self._live)]

    def load_content(self, doc_ids: list[int], layer: int) -> tuple[Tensor, Tensor, list[int]]:
        if layer not in self.settings["content_layers"]:
            raise ValueError(f"layer {layer} is not a content layer of this bank")
        ks, vs, counts = [], [], []
        for doc_id in doc_ids:
            seg, doc = self._locate(doc_id)
            rows = slice(doc.chunk_start, doc.chunk_start + doc.chunk_count)
            ks.append(seg.content[f"k.{layer}"][rows])
            vs.append(seg.content[f"v.{layer}"][rows])
            counts.append(doc.chunk_count)
        if not doc_ids:
            empty = torch.empty(0, self.settings["kv_heads"], self.settings["head_dim"],
                                dtype=FLOAT_DTYPES[self.settings["dtype"]])
            return empty, empty.clone(), []
        return torch.cat(ks), torch.cat(vs), counts  # cat copies: callers get ordinary writable tensors

    def template_kv(self) -> dict[int, tuple[Tensor, Tensor]]:
        tensors = map_template(self.path / TEMPLATE, self.settings, self.manifest.get("files", {}).get(TEMPLATE))
        layers = sorted(int(name.split(".")[1]) for name in tensors if name.startswith("k."))
        # Copies: callers get ordinary writable tensors, not views of the read-only mapping.
        return {layer: (tensors[f"k.{layer}"].clone(), tensors[f"v.{layer}"].clone()) for layer in layers}

    def stats(self) -> dict:
        docs = self.documents()
        sizes = {"hot": 0, "cold": 0, "text": 0, "other": 0}
        # A writer may delete this snapshot's segments while we count (their mappings stay readable): a file
        # gone counts as 0.
        coarse = coarse_file(self.settings["router"]["id"])
        for seg in self.segments:   # the hot tier: routing keys and their coarse keys
            sizes["hot"] += size(seg.directory / seg.route_file) + (size(seg.directory / coarse) if seg.coarse
                                                                     is not None else 0)
            sizes["cold"] += size(seg.directory / CONTENT)
            sizes["text"] += size(seg.directory / DOCUMENTS)
        # Everything else in the directory: manifest, template K/V, router weights, the BM25 index.
        total = sum(size(Path(d) / f) for d, _, files in os.walk(self.path) for f in files)
        sizes["other"] = max(0, total - sizes["hot"] - sizes["cold"] - sizes["text"])
        return {"documents": len(docs), "segments": len(self.segments),
                "tokens": sum(d.n_tokens for d in docs), "chunks": sum(d.chunk_count for d in docs),
                "keys": sum(d.key_count for d in docs), "bytes_on_disk": sizes}


def read_manifest(path: Path) -> dict:
    """The manifest, checked (check.check_manifest); Damaged if it is not a well-formed manifest."""
    try:
        raw = (path / MANIFEST).read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        raise BankNotFound(f"no bank at {path} (`msa ingest` makes one)") from None
    manifest = json_object(path / MANIFEST, raw, "the manifest")
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS:   # first: another version may have another layout
        raise BankMismatch(f"bank {path} has format version {version}; this msa reads versions "
                           f"{', '.join(map(str, READABLE_VERSIONS))}")
    check.check_manifest(path / MANIFEST, manifest)
    return manifest


def map_template(path: Path, settings: dict, record: dict | None) -> dict[str, Tensor]:
    return map_safetensors(path, record, lambda p, tensors: check.template_tensors(p, tensors, settings))


def check_router_weights(path: Path, settings: dict, record: dict | None) -> None:
    """The engine reads this file itself (router.load_spec): its header, and the spec in it, are checked here."""
    _, metadata = safetensors_header(path, record)
    check.router_file(path, metadata, settings)
