"""The bank format's primitives (docs/bank-format.md): file names, dtypes, the safetensors header and its
memory map, JSON parsing, file records, fsync and the writer's flock. Everything else in the bank builds on
these; this module imports none of it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import time
import warnings
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np
import torch
from torch import Tensor

from ..errors import BankLocked

# 2: each segment has a coarse-key file beside its route file (memory/coarse.py). A version-1 bank is read as it
# is (its segments scanned whole), and its next writer upgrades it in place (Bank.lock).
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)

MANIFEST = "manifest.json"
TEMPLATE = "template.safetensors"
SEGMENTS = "segments"
LOCK = ".lock"
DOCUMENTS = "documents.jsonl"
CONTENT = "content.safetensors"

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


def route_file(router_id: str) -> str:
    return f"route.{router_id}.safetensors"


def coarse_file(router_id: str) -> str:
    return f"coarse.{router_id}.safetensors"


def router_weights_file(router_id: str) -> str:
    return f"router.{router_id}.safetensors"


def stored_dtype(settings: dict) -> str:
    """The safetensors dtype of the bank's K/V and keys."""
    return _SAFETENSORS_NAME[FLOAT_DTYPES[settings["dtype"]]]


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


# ----- JSON -----

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


def json_normalised(value: dict) -> dict:
    # What the manifest will hold: tuples become lists, and a non-JSON value fails here, not at commit.
    return json.loads(json.dumps(value))


def is_count(value) -> bool:
    return type(value) is int and value >= 0   # bool is an int subclass, and is not a count


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ----- files and records -----

def file_record(path: Path) -> dict:
    """What the manifest records of a file: its size and sha256."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def check_size(path: Path, size: int, record: dict | None) -> None:
    """Opening compares sizes only (a stat); hashes are `msa check`'s."""
    if record is not None and size != record["size"]:
        raise Damaged(path, f"{size} bytes, the manifest recorded {record['size']}")


def size(path: Path) -> int:
    """A file's size, 0 if a writer deleted it (a reader's snapshot may list segments removed since)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    # A rename or a new file is durable only once its directory entry is.
    fsync_file(path)


@contextmanager
def flock(path: Path, timeout: float) -> Iterator[int]:
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


# ----- safetensors -----

def safetensors_header(path: Path, record: dict | None) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """A safetensors file's header, checked as the format requires: 8-byte little-endian length, a JSON object
    within the file, known dtypes, byte ranges matching the shapes and tiling the data exactly.
    Returns (tensors by name, metadata)."""
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        check_size(path, file_size, record)
        if file_size < 8:
            raise Damaged(path, f"{file_size} bytes, too short for a safetensors file")
        length = int.from_bytes(f.read(8), "little")
        if length > file_size - 8:
            raise Damaged(path, f"header length {length} runs past the end of the file ({file_size} bytes)")
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
    if end != file_size:
        raise Damaged(path, f"the tensors end at byte {end}, the file at {file_size}")
    return tensors, metadata


def _tensor_info(path: Path, name: str, info, data_start: int) -> TensorInfo:
    if not isinstance(info, dict) or info.get("dtype") not in TENSOR_DTYPES:
        dtype = info.get("dtype") if isinstance(info, dict) else info
        raise Damaged(path, f"tensor {name} has unsupported dtype {json.dumps(dtype)[:20]}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and all(is_count(n) for n in shape)):
        raise Damaged(path, f"tensor {name}: shape {json.dumps(shape)[:40]} is not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise Damaged(path, f"tensor {name}: data_offsets {json.dumps(offsets)[:40]} is not a byte range")
    itemsize = np.dtype(TENSOR_DTYPES[info["dtype"]][0]).itemsize
    if offsets[1] - offsets[0] != math.prod(shape) * itemsize:
        raise Damaged(path, f"tensor {name}: {offsets[1] - offsets[0]} bytes for shape {shape} of {info['dtype']}")
    return TensorInfo(info["dtype"], tuple(shape), data_start + offsets[0], data_start + offsets[1])


def map_bytes(path: Path, record: dict | None) -> np.ndarray:
    """A file mapped read-only (its size checked against its record): read only when touched, and readable
    after a writer deletes the file."""
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        check_size(path, file_size, record)
        return np.memmap(f, dtype=np.uint8, mode="r") if file_size else np.zeros(0, dtype=np.uint8)


def map_safetensors(path: Path, record: dict | None,
                    check_tensors: Callable[[Path, dict[str, TensorInfo]], None]) -> dict[str, Tensor]:
    """Map a safetensors file read-only, once its header passed safetensors_header and
    check_tensors(path, tensors) (the tensors this file must hold). Returns tensors that view the mapping, so
    nothing is read until it is touched."""
    tensors, _ = safetensors_header(path, record)
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


def raise_open_file_limit() -> None:
    """A bank maps up to four files per segment and a mapping holds a file descriptor: allow as many as the system
    lets an unprivileged process have, as databases do."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))
        except (ValueError, OSError):
            pass   # keep the default; only a very large bank needs more
