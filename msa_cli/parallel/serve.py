"""A sharded bank at work: rank 0 answers, with an Engine whose memory is every rank's shard; the other ranks serve
their shards until rank 0 says stop.

Rank 0 runs the command as on one bank (ask, search, eval, chat: nothing above the engine knows it is sharded). Each
time it needs the memory it sends one command to every rank, and then every rank, rank 0 included, runs the same
step on its own shard (`handle`): a routing step (parallel/route.py), or a fetch of what rank 0 is about to read
(documents, routing keys, pooled K/V), which only the documents' owners answer: only what was chosen moves.
"""

from __future__ import annotations

import threading
from pathlib import Path

from torch import Tensor

from ..engine import Engine
from ..errors import MsaError
from ..faults import crash_point
from ..memory.bank import Bank, Document
from ..memory.lexical import LexicalIndex
from ..memory.search import Hit
from ..memory.shards import shard_of
from . import route
from .group import Group, RankFailed
from .route import LocalShard

KEPT = 4096   # documents, keys and contents rank 0 keeps from earlier fetches before it forgets them


def handle(group: Group, shard: LocalShard, message: tuple):
    """One command, on every rank; what rank 0 gets back (None elsewhere)."""
    kind, *args = message
    if kind == "route":
        return route.route(group, shard, *args)
    if kind == "select":
        return route.select(group, shard, *args)
    if kind == "fetch":
        return fetch(group, shard.engine.bank, *args)
    raise ValueError(f"unknown command {kind!r}")


def fetch(group: Group, bank: Bank, what: str, ids: list[int], layers: list[int]) -> dict | list | None:
    """What rank 0 asked of the documents `ids`, from the ranks that hold them, on rank 0. what: 'documents',
    'keys' or 'content' (pooled K/V of `layers`), each a dict by id holding only the live ones; 'all' (every live
    Document) or 'stats' (bank.stats), one per rank."""
    if what == "all":
        part = bank.documents()
    elif what == "stats":
        part = bank.stats()
    else:
        mine = [i for i in ids if shard_of(i) == group.rank and bank.has_document(i)]
        part = {i: (bank.document(i) if what == "documents" else
                    bank.document_keys(i).clone() if what == "keys" else
                    {layer: bank.load_content([i], layer)[:2] for layer in layers}) for i in mine}
    gathered = group.gather(part)
    if gathered is None or what in ("all", "stats", "status"):
        return gathered
    return {i: v for p in gathered for i, v in p.items()}


def serve(group: Group, shard: LocalShard) -> None:
    """A rank other than 0: run rank 0's commands on this shard until it says stop."""
    while (message := group.command()) != ("stop",):
        crash_point(f"parallel:{message[0]}")
        handle(group, shard, message)


class ShardedBank:
    """Rank 0's view of the whole sharded bank: what the engine and the commands above it read of a bank, each
    fetched from the rank that holds it. Settings and the template are shard 0's (every shard's are checked equal
    when the ranks start: parallel/launch.py)."""

    def __init__(self, run, local: Bank, root: Path):
        self._run, self.local, self.path = run, local, root
        self._documents: dict[int, Document] = {}
        self._keys: dict[int, Tensor] = {}
        self._content: dict[int, dict] = {}
        self._stats: dict | None = None

    @property
    def settings(self) -> dict:
        return self.local.settings

    def template_kv(self):
        return self.local.template_kv()

    def remember(self, docs) -> None:
        _keep(self._documents, {d.doc_id: d for d in docs})

    def document(self, doc_id: int) -> Document:
        if doc_id not in self._documents:
            self.remember(self._fetch("documents", [doc_id]).values())
        if doc_id not in self._documents:
            raise MsaError(f"bank {self.path} has no live document {doc_id}")
        return self._documents[doc_id]

    def has_document(self, doc_id: int) -> bool:
        try:
            self.document(doc_id)
        except MsaError:
            return False
        return True

    def prefetch_keys(self, doc_ids) -> None:
        wanted = [i for i in dict.fromkeys(doc_ids) if i not in self._keys]
        if wanted:
            _keep(self._keys, self._fetch("keys", wanted))

    def document_keys(self, doc_id: int) -> Tensor:
        self.prefetch_keys([doc_id])
        return self._keys[doc_id]

    def load_content(self, doc_ids: list[int], layer: int) -> tuple[Tensor, Tensor, list[int]]:
        """As Bank.load_content; one fetch brings every content layer of the documents not yet here."""
        import torch

        wanted = [i for i in dict.fromkeys(doc_ids) if i not in self._content]
        if wanted:
            _keep(self._content, self._fetch("content", wanted, self.settings["content_layers"]))
        if not doc_ids:
            return self.local.load_content([], layer)
        parts = [self._content[i][layer] for i in doc_ids]
        return torch.cat([k for k, _ in parts]), torch.cat([v for _, v in parts]), [k.shape[0] for k, _ in parts]

    def documents(self) -> list[Document]:
        return sorted((d for part in self._fetch("all") for d in part), key=lambda d: d.doc_id)

    @property
    def num_documents(self) -> int:
        return self.stats()["documents"]

    def stats(self) -> dict:
        """Asked once: every shard is a snapshot that stays as it was while the ranks run."""
        if self._stats is None:
            self._stats = _added(self._fetch("stats"))
        return self._stats

    def status(self) -> dict:
        parts = self._fetch("status")
        return status_of(self.path, parts, len(parts))

    def lexical(self) -> LexicalIndex:
        """BM25 over every shard's documents in one index, built on rank 0: for `msa eval --baseline bm25`, which
        measures what one BM25 index over the whole bank finds."""
        docs = self.documents()
        return LexicalIndex.build([d.text for d in docs], [d.doc_id for d in docs])

    def _fetch(self, what: str, ids: list[int] = (), layers: list[int] = ()):
        return self._run(("fetch", what, list(ids), list(layers)))


class ShardedEngine(Engine):
    """Rank 0's engine over a sharded bank: its own model and router, the whole bank's memory."""

    def __init__(self, local: Engine, group: Group, root: Path):
        self.group, self.shard = group, LocalShard.of(local)
        self._turn = threading.Lock()   # one command at a time: msa serve reads the bank from many threads
        super().__init__(local.model, ShardedBank(self.run, local.bank, root), local.router, local.mode)

    def run(self, message: tuple):
        with self._turn:
            self.group.command(message)
            return handle(self.group, self.shard, message)

    def route(self, text: str, k: int, fuse: bool = True) -> list[Hit]:
        hits = self.run(("route", self.routing_query(text).cpu(), text, k, fuse))
        self.bank.remember(h.document for h in hits)
        return hits

    def select_ids(self, layer: int, x: Tensor, k: int) -> tuple[list[int], list[float]]:
        return self.run(("select", layer, x.cpu(), k))

    def key_scores(self, text: str, units: list[tuple[Document, tuple[int, int]]]) -> list[float]:
        self.bank.prefetch_keys(d.doc_id for d, _ in units)   # one fetch for all of them
        return super().key_scores(text, units)

    def close(self) -> None:
        """Tell the other ranks to stop (unless one was lost, or a signal stopped them: they are stopping anyway)."""
        with self._turn:
            try:
                if not self.group.failed:
                    self.group.command(("stop",))
            except RankFailed:
                pass
            self.group.close()


def status_of(root: Path, parts: list[dict], world: int) -> dict:
    """Bank.status of a sharded bank from its shards' (`parts`, of `world`): their counts added up, the latest
    ingest into any of them."""
    ingests = [p["last_ingest"] for p in parts if p["last_ingest"]]
    return {"bank": str(root.absolute()), "shards": world, "shards_read": len(parts),
            "files": sum(p["files"] for p in parts), **_added(parts), "model": parts[0]["model"],
            "router": parts[0]["router"], "last_ingest": max(ingests, key=lambda i: i["finished"], default=None)}


def _added(parts: list[dict]) -> dict:
    """The shards' bank.stats() added up."""
    out = {key: sum(p[key] for p in parts) for key in ("documents", "segments", "tokens", "chunks", "keys")}
    out["bytes_on_disk"] = {key: sum(p["bytes_on_disk"][key] for p in parts) for key in parts[0]["bytes_on_disk"]}
    return out


def _keep(cache: dict, new: dict) -> None:
    if len(cache) + len(new) > KEPT:
        cache.clear()
    cache.update(new)

