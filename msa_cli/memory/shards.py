"""A sharded memory bank's layout: one ordinary bank per rank, `DIR/shard-<rank>-of-<N>` (msa_cli/parallel runs it).

Which shard a file goes to is a stable hash of its source (the absolute path the bank records), modulo N: the same
file always lands in the same shard, so re-ingest, prune and forget stay within one shard. Shard r gives its
documents ids from r * SHARD_IDS on, so an id names its shard and no two shards share one: the ranks' candidates
merge without renaming anything. On several machines each node's DIR holds only its own ranks' shards.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import BANK_MISMATCH, USAGE, MsaError

SHARD_IDS = 10 ** 12   # ids per shard: shard r's documents are r * SHARD_IDS + 0, 1, ...
_NAME = re.compile(r"shard-(\d+)-of-(\d+)")


def shard_path(root: Path, rank: int, world: int) -> Path:
    return Path(root) / f"shard-{rank}-of-{world}"


def owner(source: str, world: int) -> int:
    """The rank whose shard holds `source`: sha256, not hash(), which Python salts per process."""
    return int.from_bytes(hashlib.sha256(source.encode()).digest()[:8], "big") % world


def shard_of(doc_id: int) -> int:
    return doc_id // SHARD_IDS


def ways(root: Path) -> int | None:
    """N, when `root` holds shards of a bank sharded N ways (None when it holds none); BankMismatch when its
    shards disagree on N."""
    found = {int(m.group(2)) for p in (Path(root).iterdir() if Path(root).is_dir() else ())
             if (m := _NAME.fullmatch(p.name))}
    if len(found) > 1:
        raise MsaError(f"{root} holds shards of banks sharded {' and '.join(map(str, sorted(found)))} ways: "
                       f"keep one", BANK_MISMATCH)
    return found.pop() if found else None


def refuse_sharded(root: Path) -> None:
    """A one-process command on a sharded bank: say how to run it instead."""
    world = ways(root)
    if world is not None:
        raise MsaError(f"bank {root} is sharded over {world} ranks: run the command with `torchrun --nproc-per-node "
                       f"{world} -m msa_cli` in place of `msa` (--nnodes and --rdzv-endpoint for several machines), "
                       f"or give one shard: --bank {shard_path(root, 0, world)}", USAGE)


@dataclass(frozen=True)
class Shard:
    """This rank's part of a sharded bank."""

    root: Path   # the sharded bank's directory (DIR)
    rank: int
    world: int

    @property
    def path(self) -> Path:
        return shard_path(self.root, self.rank, self.world)

    @property
    def first_doc_id(self) -> int:
        return self.rank * SHARD_IDS

    def owns(self, source: str) -> bool:
        return owner(source, self.world) == self.rank
