"""The on-disk memory bank: documents, their pooled content K/V (cold tier) and routing keys (hot tier).

Layout, atomicity and the manifest are described in docs/bank-format.md. In short: `manifest.json` is
the single commit point; every append writes one new immutable segment directory and then replaces
the manifest atomically, so a crash leaves the last committed bank intact. Readers take no lock: they
read one manifest and then only immutable files. Writers hold an exclusive flock on `<bank>/.lock`.
No pickle anywhere: metadata is JSON, tensors are safetensors, mapped read-only with numpy.memmap.

The modules, each importing only those before it: format.py (file names, safetensors headers and mapping,
fsync, flock) <- check.py (the format's rules) <- snapshot.py (one committed state, read-only) <- writer.py
(the files a commit writes) <- bank.py (Bank: opening, the lock, the changes, and the bank's BM25 index)
<- verify.py (`msa check`). lexical.py (BM25 indexes) needs format.py only.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from torch import Tensor

from ..errors import MsaError
from ..faults import crash_point
from . import lexical, writer
from .check import check_same_settings, check_settings
from .format import FORMAT_VERSION, MANIFEST, SEGMENTS, coarse_file, flock, fsync_dir, json_normalised, now, \
    route_file, router_weights_file
from .lexical import LexicalIndex
from .snapshot import Document, RoutingSegment, Snapshot
from .writer import NewDocument, RouterWeights

__all__ = ["FORMAT_VERSION", "Bank", "Document", "NewDocument", "RouterWeights", "RoutingSegment"]


class Bank:
    """A memory bank directory. Open one with Bank.open / Bank.create / Bank.open_or_create.

    Reading goes to the bank's current snapshot (snapshot.py): the state it was opened at, kept whatever other
    processes commit, until this Bank takes its lock (which reloads it) or commits."""

    def __init__(self, path: Path):
        self.path = path
        self._lock_fd: int | None = None
        self._committed = False                 # since the lock was taken
        self._snapshot = Snapshot.load(path)
        self._lexical: LexicalIndex | None = None   # of this snapshot, built or loaded on first use

    # ----- opening -----

    @classmethod
    def create(cls, path, settings: dict, template_kv: dict[int, tuple[Tensor, Tensor]],
               router_weights: RouterWeights | None = None, first_doc_id: int = 0) -> "Bank":
        """Make a bank, or open the one another process made meanwhile (refusing other settings, as
        open_or_create does): two first ingests into one place may race, and the second just goes on. Its first
        document gets the id `first_doc_id` (a shard's: memory/shards.py)."""
        path = Path(path)
        settings = json_normalised(settings)
        check_settings(settings)
        template = writer.template_tensors(settings, template_kv)
        path.mkdir(parents=True, exist_ok=True)
        if not (path / MANIFEST).exists():
            writer.refuse_strangers(path)   # before the lock, whose file would be one more stranger in their folder
        with flock(path, 0):
            if not (path / MANIFEST).exists():
                writer.create(path, settings, template, router_weights, first_doc_id)
        return cls.open(path, expect=settings)

    @classmethod
    def open(cls, path, expect: dict | None = None) -> "Bank":
        bank = cls(Path(path))
        if expect is not None:
            check_same_settings(bank.path, bank.settings, json_normalised(expect))
        return bank

    @classmethod
    def open_or_create(cls, path, settings: dict, make_template_kv: Callable[[], dict],
                       router_weights: RouterWeights | None = None, first_doc_id: int = 0) -> "Bank":
        if (Path(path) / MANIFEST).exists():
            return cls.open(path, expect=settings)
        return cls.create(path, settings, make_template_kv(), router_weights, first_doc_id)

    @staticmethod
    def exists(path) -> bool:
        return (Path(path) / MANIFEST).is_file()

    def check_settings(self, expected: dict) -> None:
        """BankMismatch unless the bank was built with exactly these settings."""
        check_same_settings(self.path, self.settings, json_normalised(expected))

    @property
    def router_weights(self) -> Path | None:
        """The file of the weights of the router whose keys the bank holds, if they were stored with it."""
        path = self.path / router_weights_file(self.settings["router"]["id"])
        return path if path.is_file() else None

    # ----- reading: the current snapshot -----

    @property
    def settings(self) -> dict:
        """As given when the bank was created (docs/bank-format.md lists the keys the bank itself reads)."""
        return self._snapshot.settings

    def documents(self) -> list[Document]:
        """Live documents in doc_id order."""
        return self._snapshot.documents()

    @property
    def num_documents(self) -> int:
        return self._snapshot.num_documents

    def document(self, doc_id: int) -> Document:
        """The live document `doc_id`; MsaError if the bank has none of that id (never had, or removed)."""
        return self._snapshot.document(doc_id)

    def document_keys(self, doc_id: int) -> Tensor:
        """The routing keys of the live document `doc_id` [key_count, Hr, d], in its text's order (memory-mapped)."""
        return self._snapshot.document_keys(doc_id)

    def has_document(self, doc_id: int) -> bool:
        """Whether the bank holds a live document `doc_id` (an id a model names may be none)."""
        return self._snapshot.has_document(doc_id)

    @property
    def next_doc_id(self) -> int:
        """The id the next appended document gets (ids are never reused). Stable while the writer lock is held."""
        return self._snapshot.next_doc_id

    def load_content(self, doc_ids: list[int], layer: int) -> tuple[Tensor, Tensor, list[int]]:
        """Pooled K/V of one content layer for the given documents, concatenated in the given order:
        (k [S, Hk, d], v [S, Hk, d], chunk count per document). Reads only those documents' rows."""
        return self._snapshot.load_content(doc_ids, layer)

    @property
    def info(self) -> dict:
        """Small facts a writer recorded with set_info, for `msa status`: `last_ingest` (its time, roots, counts
        and seconds) and `roots` (every root ever ingested: what `msa mcp` may ingest again by default)."""
        return self._snapshot.info

    def stats(self) -> dict:
        """Counts of documents, segments, tokens, chunks, keys, and bytes_on_disk by tier."""
        return self._snapshot.stats()

    def status(self) -> dict:
        """What `msa status --json` says: the bank, its files (sources), stats, model, router and last ingest."""
        return {"bank": str(self.path.absolute()), "files": len({d.source for d in self.documents()}),
                **self.stats(), "model": self.settings["model"], "router": self.settings["router"],
                "last_ingest": self.info.get("last_ingest")}

    def template_kv(self) -> dict[int, tuple[Tensor, Tensor]]:
        """Template-head K/V of every model layer (copies), for generation."""
        return self._snapshot.template_kv()

    def routing_segments(self) -> list[RoutingSegment]:
        """Every segment's routing keys (memory-mapped) and which of its rows are live, for the router's scan."""
        return self._snapshot.routing_segments()

    def lexical(self) -> LexicalIndex:
        """BM25 over the live documents (index.doc_ids: their ids, ascending): the index a writer saved if it is
        sound, else one built in memory. Once per snapshot."""
        if self._lexical is None:
            self._lexical = self._lexical_index()[0]
        return self._lexical

    def _lexical_index(self) -> tuple[LexicalIndex, bool]:
        """(the index of the live documents, whether it is the one saved in the bank)."""
        ids = self._snapshot.live_ids().tolist()   # no document is parsed for a saved index
        index = lexical.saved(self.path / lexical.DIRECTORY, ids)
        if index is not None:
            return index, True
        return LexicalIndex.build([d.text for d in self._snapshot.documents()], ids), False

    # ----- writing -----

    @contextmanager
    def lock(self, timeout: float = 0) -> Iterator["Bank"]:
        """Exclusive writer lock. Taking it reloads the manifest (another writer may have committed since
        this Bank was opened) and deletes what crashed writers left behind. Releasing it after commits (and
        no exception) saves the bank's BM25 index of the documents the writer leaves."""
        if self._lock_fd is not None:
            raise RuntimeError("this Bank already holds its lock")
        before = self.settings
        with flock(self.path, timeout) as fd:
            self._reload()
            # Tensors computed for the settings this Bank was opened with must not land in a bank
            # that another writer has since re-keyed.
            check_same_settings(self.path, self.settings, before)
            writer.remove_orphans(self.path, self._snapshot.manifest)
            self._lock_fd, self._committed = fd, False
            try:
                self._upgrade()
                yield self
                if self._committed:
                    self._save_lexical()
            finally:
                self._lock_fd = None

    def _upgrade(self) -> None:
        """A version-1 bank becomes version 2 in place, in one commit: each segment gets the coarse-key file
        computed from its routing keys (memory/coarse.py); nothing else changes. A crash before the commit leaves
        the bank as it was (an unlisted coarse file is written again next time)."""
        snapshot = self._snapshot
        if snapshot.manifest["format_version"] == FORMAT_VERSION:
            return
        name = coarse_file(snapshot.settings["router"]["id"])
        segments = []
        for entry, segment in zip(snapshot.manifest["segments"], snapshot.segments):
            if segment.coarse is None:
                route = {"keys": segment.keys, "key_doc": segment.key_doc}
                record = writer.save_safetensors(writer.coarse_tensors(snapshot.settings, route),
                                                 segment.directory / name)
                fsync_dir(segment.directory)
                entry = dict(entry, files={**entry.get("files", {}), name: record})
            segments.append(entry)
        crash_point("upgrade:coarse-written")
        self._commit(dict(snapshot.manifest, segments=segments), "upgrade")

    def _save_lexical(self) -> None:
        """The one rule that keeps a bank's saved BM25 index current, so that readers never build their own:
        once a writer is done committing, it saves the index of the live documents (unless a sound one is saved
        already: this also replaces a damaged one) and deletes the others. Once per lock, not per commit: a
        commit stays cheap, and an ingest of many commits indexes once. An empty bank keeps none."""
        index, is_saved = self._lexical_index()
        root = self.path / lexical.DIRECTORY
        if not is_saved and index.doc_ids.numel():
            lexical.save(root, index)
        lexical.remove_others(root, index.doc_ids.tolist())
        self._lexical = index

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
        snapshot = self._snapshot
        first = snapshot.next_doc_id
        # The router's shape is not in the settings; every segment's keys must share it.
        entry = writer.write_segment(self.path, snapshot.settings, first, docs, content, chunk_counts, route_keys,
                                     key_counts, snapshot.key_shape)
        crash_point("append:segment-written")
        manifest = dict(snapshot.manifest, segments=[*snapshot.manifest["segments"], entry],
                        next_doc_id=first + len(docs))
        manifest, dropped = writer.tombstoned(manifest, replacing)
        self._commit(manifest, "append")
        self._delete_segments(dropped, "append")
        return list(range(first, first + len(docs)))

    def remove(self, doc_ids: Iterable[int]) -> None:
        """Tombstone documents and commit. A segment left without live documents leaves the manifest,
        and its files are deleted after the commit."""
        self._require_lock()
        doc_ids = self._live_ids(doc_ids)
        if not doc_ids:
            return
        manifest, dropped = writer.tombstoned(dict(self._snapshot.manifest), doc_ids)
        self._commit(manifest, "remove")
        self._delete_segments(dropped, "remove")

    def set_info(self, **values) -> None:
        """Record JSON values under their keys in the manifest, in one commit."""
        self._require_lock()
        self._commit(dict(self._snapshot.manifest, info={**self.info, **values}), "info")

    def reindex(self, router: dict, compute_keys: Callable[[list[Document]], tuple[Tensor, list[int]]],
                router_weights: RouterWeights | None = None) -> None:
        """Replace the routing keys of every live segment, leaving content untouched. compute_keys gets one
        segment's live documents (row order) and returns (keys [N, Hr, dr], key count per document)."""
        self._require_lock()
        snapshot = self._snapshot
        router = json_normalised(router)
        old_id = snapshot.settings["router"]["id"]
        settings = dict(snapshot.settings, router=router)
        check_settings(settings)
        old_route, new_route = route_file(old_id), route_file(router["id"])
        old_coarse, new_coarse = coarse_file(old_id), coarse_file(router["id"])
        if new_route == old_route:
            # Route files are immutable: new keys need a new id (e.g. one naming the router weights' hash).
            raise MsaError(f"bank {self.path} already holds keys of router {router['id']!r}; "
                           f"give the new router another id")
        # Tombstoned rows get no keys: the router never needs them again.
        key_shape = None
        segments = []
        for entry, segment in zip(snapshot.manifest["segments"], snapshot.segments):
            docs = snapshot.live_documents(segment)
            keys, counts = compute_keys(docs)
            route = writer.route_tensors(settings, keys, counts, [d.row for d in docs], key_shape)
            key_shape = tuple(keys.shape[1:])
            record = writer.save_safetensors(route, segment.directory / new_route)
            coarse = writer.save_safetensors(writer.coarse_tensors(settings, route), segment.directory / new_coarse)
            fsync_dir(segment.directory)
            files = {name: r for name, r in entry.get("files", {}).items() if name not in (old_route, old_coarse)}
            segments.append(dict(entry, files={**files, new_route: record, new_coarse: coarse}))
        crash_point("reindex:routes-written")
        old_weights = router_weights_file(old_id)
        files = {name: r for name, r in snapshot.manifest.get("files", {}).items() if name != old_weights}
        if router_weights:
            files.update(writer.save_router_weights(self.path, router["id"], router_weights))
            crash_point("reindex:router-written")
        self._commit(dict(snapshot.manifest, settings=settings, segments=segments, files=files), "reindex")
        crash_point("reindex:before-delete")
        for segment in snapshot.segments:
            (segment.directory / old_route).unlink()
            (segment.directory / old_coarse).unlink(missing_ok=True)   # a version-1 segment has none
        (self.path / old_weights).unlink(missing_ok=True)
        crash_point("reindex:after-delete")

    def _commit(self, manifest: dict, step: str) -> None:
        """step: what commits (create, append, remove, info, reindex), naming its crash points."""
        manifest["updated"] = now()
        manifest["format_version"] = FORMAT_VERSION
        writer.write_manifest(self.path, manifest, step)
        self._committed = True
        self._reload()

    def _reload(self) -> None:
        # Reuses the segments the new manifest still lists: only what a commit added is opened.
        self._snapshot = Snapshot.load(self.path, self._snapshot)
        self._lexical = None

    def _require_lock(self) -> None:
        if self._lock_fd is None:
            raise RuntimeError("changing a bank needs its lock: use `with bank.lock(): ...`")

    def _live_ids(self, doc_ids: Iterable[int]) -> set[int]:
        doc_ids = set(doc_ids)
        for doc_id in sorted(doc_ids):
            self._snapshot.document(doc_id)   # MsaError naming the first one the bank does not hold
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
