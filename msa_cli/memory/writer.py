"""What a writer puts on disk (docs/bank-format.md, "Commits and crashes"): a new bank's first files, a segment's
files, the manifest that commits them, and the clean-up of what crashed writers left. Bank (bank.py) calls these
under its lock and decides when; this module holds how, and checks every tensor before anything is written.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from bisect import bisect_left
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from ..errors import USAGE, MsaError
from ..faults import crash_point
from . import check
from .coarse import coarse_keys
from .format import CONTENT, DOCUMENTS, FLOAT_DTYPES, FORMAT_VERSION, LOCK, MANIFEST, SEGMENTS, TEMPLATE, \
    coarse_file, file_record, fsync_dir, fsync_file, now, route_file, router_weights_file

# What a directory may hold when create() finds no manifest there: leftovers of a create that crashed.
_CREATE_LEFTOVERS = {LOCK, TEMPLATE, MANIFEST + ".tmp", SEGMENTS}

# A router's own weights (tensors plus string metadata), kept beside the keys they made: a bank is read with
# the router it was indexed with, wherever the bank is moved.
RouterWeights = tuple[dict[str, Tensor], dict[str, str]]


@dataclass
class NewDocument:
    """What a writer hands in."""

    source: str
    span: dict
    content_hash: str
    n_tokens: int
    text: str


# ----- the commit -----

def write_manifest(path: Path, manifest: dict, step: str) -> None:
    """The commit: write a temporary file, make it durable, rename it over the manifest, make the rename
    durable. step: what commits (create, append, remove, info, reindex), naming its crash points."""
    tmp = path / (MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    crash_point(f"{step}:manifest-tmp")
    os.replace(tmp, path / MANIFEST)
    fsync_dir(path)
    crash_point(f"{step}:renamed")


def tombstoned(manifest: dict, doc_ids: set[int]) -> tuple[dict, list[str]]:
    """`manifest` with `doc_ids` tombstoned, and the names of the segments that no longer hold a live document
    (they leave the manifest, and so do their tombstones). Counts each segment's tombstones by bisection: the
    cost grows with the segments and tombstones, not with the documents."""
    if not doc_ids:
        return manifest, []
    tombstones = sorted(set(manifest["tombstones"]) | doc_ids)
    kept, kept_tombstones, dropped = [], [], []
    for entry in manifest["segments"]:
        first = entry["first_doc_id"]
        inside = tombstones[bisect_left(tombstones, first):bisect_left(tombstones, first + entry["n_docs"])]
        if len(inside) == entry["n_docs"]:
            dropped.append(entry["name"])
        else:
            kept.append(entry)
            kept_tombstones += inside
    return dict(manifest, segments=kept, tombstones=kept_tombstones), dropped


# ----- creating a bank -----

def create(path: Path, settings: dict, template: dict[str, Tensor], router_weights: RouterWeights | None,
           first_doc_id: int = 0) -> None:
    """A new bank's first commit: the template K/V and the router's weights, then a manifest with no segments,
    whose first document will get `first_doc_id` (a shard's: memory/shards.py). The caller holds the lock and
    found no manifest."""
    files = {TEMPLATE: save_safetensors(template, path / TEMPLATE)}
    crash_point("create:template")
    if router_weights:
        files.update(save_router_weights(path, settings["router"]["id"], router_weights))
        crash_point("create:router")
    created = now()
    manifest = {"format_version": FORMAT_VERSION, "settings": settings, "segments": [], "tombstones": [],
                "next_doc_id": first_doc_id, "created": created, "updated": created, "files": files}
    write_manifest(path, manifest, "create")
    fsync_dir(path.parent)  # the bank directory itself may be new
    remove_orphans(path, manifest)  # segments a crashed earlier create may have left


def refuse_strangers(path: Path) -> None:
    """A directory without a manifest may hold only what a crashed create leaves: never make a bank among
    someone's files (`msa ingest ~/Documents --bank ~/Documents`)."""
    strangers = sorted(f for f in set(os.listdir(path)) - _CREATE_LEFTOVERS if not f.startswith("router."))
    if strangers:
        raise MsaError(f"{path} is not empty ({strangers[0]}, ...) and holds no bank; "
                       f"choose another bank directory", USAGE)


def remove_orphans(path: Path, manifest: dict) -> None:
    """Delete what a crashed writer left: segments the manifest does not list, route and coarse-key files it
    does not list, the temporary manifest. Only writers call this, under the lock."""
    listed = {entry["name"]: entry.get("files", {}) for entry in manifest["segments"]}
    route = route_file(manifest["settings"]["router"]["id"])
    (path / (MANIFEST + ".tmp")).unlink(missing_ok=True)
    for f in path.glob("router.*.safetensors"):
        if f.name != router_weights_file(manifest["settings"]["router"]["id"]):
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
        for f in directory.glob("coarse.*.safetensors"):
            if f.name not in listed[directory.name]:
                f.unlink()


# ----- tensors, checked before they are written -----

def _checked(t: Tensor, shape: tuple, settings: dict, what: str) -> Tensor:
    if tuple(t.shape) != shape:
        raise ValueError(f"{what}: shape {tuple(t.shape)}, expected {shape}")
    if t.dtype != FLOAT_DTYPES[settings["dtype"]]:
        raise ValueError(f"{what}: dtype {t.dtype}, the bank stores {settings['dtype']}")
    return t.detach().to("cpu").contiguous()


def route_tensors(settings: dict, keys: Tensor, key_counts: list[int], rows: list[int],
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


def coarse_tensors(settings: dict, route: dict[str, Tensor]) -> dict[str, Tensor]:
    """A coarse-key file's tensors (memory/coarse.py) for a route file's: coarse keys in the keys' dtype, and
    the segment row of each."""
    rows, key_counts = torch.unique_consecutive(route["key_doc"], return_counts=True)
    coarse, counts = coarse_keys(route["keys"], key_counts.tolist())
    key_doc = torch.repeat_interleave(rows, torch.tensor(counts, dtype=torch.int64))
    return {"keys": coarse.to(FLOAT_DTYPES[settings["dtype"]]), "key_doc": key_doc.to(torch.int32)}


def template_tensors(settings: dict, template_kv: dict[int, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    missing = set(settings["content_layers"]) - set(template_kv)
    if missing:
        raise ValueError(f"template K/V lacks layers {sorted(missing)}")
    tensors = {}
    for layer, (k, v) in sorted(template_kv.items()):
        shape = (k.shape[0], settings["kv_heads"], settings["head_dim"])
        tensors[f"k.{layer}"] = _checked(k, shape, settings, f"template k.{layer}")
        tensors[f"v.{layer}"] = _checked(v, shape, settings, f"template v.{layer}")
    return tensors


# ----- a segment -----

def write_segment(path: Path, settings: dict, first: int, docs: list[NewDocument],
                  content: dict[int, tuple[Tensor, Tensor]], chunk_counts: list[int], route_keys: Tensor,
                  key_counts: list[int], key_shape: tuple | None) -> dict:
    """Check a segment of `docs` (ids from `first`) and write it durably; returns its manifest entry.
    Arguments as Bank.append's; key_shape: the (Hr, dr) of the bank's other keys, if any."""
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
    route = route_tensors(settings, route_keys, key_counts, list(range(len(docs))), key_shape)
    rows, chunk_start = [], 0
    for doc_id, doc, n_chunks in zip(range(first, first + len(docs)), docs, chunk_counts):
        if not check.valid_span(doc.span):
            raise ValueError(f"a span is {{page, line_start, line_end}}, each int or None; got {doc.span}")
        rows.append({"doc_id": doc_id, "source": str(doc.source), "span": doc.span,
                     "content_hash": doc.content_hash, "n_tokens": int(doc.n_tokens),
                     "chunk_start": chunk_start, "chunk_count": int(n_chunks), "text": doc.text})
        chunk_start += n_chunks

    # A counter (the first doc id, never reused) plus a random suffix: no collision with an orphan
    # a crashed writer left, even if it was not cleaned up.
    name = f"{first:09d}-{secrets.token_hex(4)}"
    directory = path / SEGMENTS / name
    directory.mkdir(parents=True)
    route_name, coarse_name = route_file(settings["router"]["id"]), coarse_file(settings["router"]["id"])
    # Each file's size and sha256 go into the manifest: opening compares sizes, `msa check` hashes.
    files = {DOCUMENTS: _write_jsonl(directory / DOCUMENTS, rows),
             CONTENT: save_safetensors(tensors, directory / CONTENT),
             route_name: save_safetensors(route, directory / route_name),
             coarse_name: save_safetensors(coarse_tensors(settings, route), directory / coarse_name)}
    fsync_dir(directory)
    fsync_dir(directory.parent)
    return {"name": name, "first_doc_id": first, "n_docs": len(docs), "files": files}


# ----- files -----

def save_router_weights(path: Path, router_id: str, router_weights: RouterWeights) -> dict[str, dict]:
    """Write the router's own file into the bank; returns {its name: its record} for the manifest."""
    weights, meta = router_weights
    name = router_weights_file(router_id)
    return {name: save_safetensors(weights, path / name, meta)}


def save_safetensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> dict:
    """Write a file durably; returns what the manifest records of it (size, sha256)."""
    save_file(tensors, path, metadata=metadata)
    fsync_file(path)
    return file_record(path)


def _write_jsonl(path: Path, rows: list[dict]) -> dict:
    """Write a file durably; returns what the manifest records of it (size, sha256)."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return file_record(path)
