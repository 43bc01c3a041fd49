"""How a command gets its memory: one bank, or, when torchrun started this process as one rank of a job, this rank's
shard of a sharded bank (memory/shards.py's layout), joined with the other ranks'.

`ingest` fills each rank's shard with the files it owns; `open_engine` gives rank 0 an engine over every shard
(parallel/serve.py) and keeps the other ranks serving theirs until rank 0's command ends, when they exit.
Whatever fails while the ranks open their shards is said once, by rank 0, with the failing rank's error.
"""

from __future__ import annotations

import atexit
import dataclasses
import sys
from collections import Counter
from pathlib import Path

from ..engine import Engine, reindex as reindex_bank
from ..errors import USAGE, BankMismatch, BankNotFound, MsaError
from ..ingest import IngestReport, forget as forget_files, ingest as ingest_files
from ..memory.bank import Bank
from ..memory.router import RouterSpec
from ..memory.shards import Shard, refuse_sharded, shard_path, ways
from ..model.loading import Model
from .group import Group, launched
from .route import LocalShard
from .serve import ShardedEngine, serve, status_of

_group: Group | None = None   # one per process: torchrun starts each rank once


def ingest(model: Model, root: Path, roots: list[Path], content: bool | None = None,
           new_router: RouterSpec | None = None, **options) -> IngestReport | None:
    """Bring the bank at `root` up to date with `roots` (Engine.open's content and new_router for a new bank,
    ingest.ingest's options). Under torchrun every rank ingests the files its shard owns, and rank 0 gets the
    sum of the ranks' reports (the others None)."""
    if not launched():
        refuse_sharded(root)
        engine = Engine.open(model, root, create=True, new_router=new_router, content=content)
        return ingest_files(engine, roots, **options)
    group = _joined(model)
    engine = _open_shard(group, model, root, True, new_router, content)
    options["progress"] = options.get("progress", False) and group.rank == 0   # one bar: rank 0's shard
    reports = group.gather(ingest_files(engine, roots, shard=Shard(root, group.rank, group.world), **options))
    return _merged(reports) if reports else None


def open_engine(model: Model, root: Path, create: bool = False, new_router: RouterSpec | None = None,
                content: bool | None = None) -> Engine:
    """Engine.open, or under torchrun: on rank 0 an engine over the whole sharded bank, while every other rank
    serves its shard here and then exits (it never returns)."""
    if not launched():
        refuse_sharded(root)
        return Engine.open(model, root, create=create, new_router=new_router, content=content)
    group = _joined(model)
    local = _open_shard(group, model, root, create, new_router, content)
    if group.rank == 0:
        engine = ShardedEngine(local, group, root)
        atexit.register(engine.close)   # the others stop when rank 0's command ends, however it ends
        return engine
    serve(group, LocalShard.of(local))
    sys.exit(0)


def reindex(model: Model, root: Path, spec: RouterSpec) -> None:
    """engine.reindex of the bank at `root`, or under torchrun of this rank's shard, if there is one yet."""
    path = Shard(root, (group := _joined(model)).rank, group.world).path if launched() else root
    if Bank.exists(path):
        reindex_bank(model, path, spec)


def forget(root: Path, paths: list[Path]) -> tuple[int, int]:
    """ingest.forget from the bank at `root`, or from each of a sharded bank's shards on this machine (under
    torchrun: each rank from its own, rank 0 adding up)."""
    world = ways(root)
    if world is None:
        return forget_files(Bank.open(root), paths)
    if launched():
        group = _joined("cpu")
        counts = group.gather(forget_files(Bank.open(Shard(root, group.rank, group.world).path), paths))
        if counts is None:
            sys.exit(0)
    else:
        counts = [forget_files(Bank.open(p), paths) for r in range(world)
                  if Bank.exists(p := shard_path(root, r, world))]
    return sum(c[0] for c in counts), sum(c[1] for c in counts)


def status(root: Path) -> dict:
    """Bank.status of the bank at `root`, or of a sharded bank: its shards' added up (under torchrun every rank's
    own, on rank 0; else every shard on this machine)."""
    world = ways(root)
    if world is None:
        return Bank.open(root).status()
    if launched():
        group = _joined("cpu")
        parts = group.gather(Bank.open(Shard(root, group.rank, group.world).path).status())
        if parts is None:
            sys.exit(0)
    else:
        parts = [Bank.open(p).status() for r in range(world) if Bank.exists(p := shard_path(root, r, world))]
        if not parts:
            raise BankNotFound(f"no shard of {root} on this machine holds a bank yet")
    return status_of(root, parts, world)


def _joined(on: Model | str) -> Group:
    """This rank's group, joined on first use, on the model's device (or `on`, for a command without one)."""
    global _group
    if _group is None:
        _group = Group(on if isinstance(on, str) else str(on.backbone.device))
        atexit.register(_group.close)   # first registered, so it runs after whatever else needs the group
    return _group


def _open_shard(group: Group, model: Model, root: Path, create: bool, new_router: RouterSpec | None,
                content: bool | None) -> Engine:
    """This rank's shard, opened (made, with `create`) once every rank has opened its own with the same settings."""
    engine, failure = None, None
    try:
        world = ways(root)
        if Bank.exists(root):
            raise MsaError(f"bank {root} is one bank, not a sharded one: ingest into another directory with "
                           f"torchrun, or run msa without it", USAGE)
        if world not in (None, group.world):
            raise MsaError(f"bank {root} is sharded over {world} ranks, and this job has {group.world}: run it "
                           f"with {world} ranks in all", USAGE)
        shard = Shard(root, group.rank, group.world)
        if not create and not Bank.exists(shard.path):
            raise BankNotFound(f"no shard {shard.path} on this machine: make the sharded bank with `torchrun "
                               f"--nproc-per-node {group.world} -m msa_cli ingest PATH --bank {root}`")
        engine = Engine.open(model, shard.path, create=create, new_router=new_router, content=content,
                             first_doc_id=shard.first_doc_id)
    except MsaError as e:
        failure = (e.code, f"rank {group.rank}: {e}" if group.world > 1 else str(e))
    outcomes = group.all_gather((failure, engine.bank.settings if engine else None))
    failures = [f for f, _ in outcomes if f]
    settings = [s for _, s in outcomes]
    if not failures and any(s != settings[0] for s in settings):
        odd = next(r for r, s in enumerate(settings) if s != settings[0])
        failures = [(BankMismatch.code, f"shard {odd} of {root} was made with other settings than shard 0 (model, "
                                        f"router or content): rebuild it")]
    if failures:
        if group.rank == 0:
            raise MsaError(failures[0][1], failures[0][0])
        sys.exit(failures[0][0])   # rank 0 says why
    return engine


def _merged(reports: list[IngestReport]) -> IngestReport:
    """The ranks' reports as one: counts added up, the time the slowest rank took."""
    out = IngestReport()
    for f in dataclasses.fields(IngestReport):
        values = [getattr(r, f.name) for r in reports]
        setattr(out, f.name, sum(values, Counter()) if f.name == "skipped" else
                max(values) if f.name.endswith("seconds") else sum(values))
    return out
