"""Files -> memory documents -> bank, incrementally: `msa ingest` and `msa forget`.

Under the bank's write lock, the walk first lists the files to look at (paths and sizes only, so the progress bar
knows the bytes ahead). Then each file is read, hashed, and, when new or changed, split into passages that wait in
the current batch; a batch of about COMMIT_TOKENS is encoded (stage 1) and committed together with the removal of
the documents it replaces. So memory holds one batch whatever the corpus's size, and a crash, kill -9 or Ctrl-C
loses at most the batch in flight and never leaves a file half in the bank; a rerun finds the committed files
unchanged by their content hash and encodes only the rest. Last, files gone from an ingested folder leave the bank
(prune). A file or folder that could not be looked at or read is unknown, not gone: the bank keeps what it holds
from it. Nothing one file does (a reader's failure included) stops the others.

A document's source is the file's absolute path (without resolving links): the bank is shared by every working
directory, so a relative path would name different files from different places. A text remembered with no file
behind it (`remember`, for an agent through `msa mcp`) has the source `memory:NAME`, which no path can be.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from . import errors, settings
from .corpus.passages import file_passages
from .corpus.readers import UNKNOWN, UnreadableFile, read_bytes
from .corpus.splitter import Passage
from .corpus.walk import unique_files
from .engine import Engine, content_hash
from .memory.bank import Bank
from .memory.shards import Shard

# Tokens per commit (one bank segment): bounds the work a crash loses (about a minute of encoding on a laptop
# CPU) and the passages held in memory, while keeping segments, and the files a reader maps, few. A file's
# passages always share one commit.
COMMIT_TOKENS = 65_536
REMEMBERED = "memory:"   # the source of a remembered text is REMEMBERED + its name


@dataclass
class IngestReport:
    ingested: int = 0          # files encoded (new or changed)
    unchanged: int = 0         # files whose content the bank already holds
    removed: int = 0           # files whose documents left the bank (gone from a root, or now unreadable)
    documents: int = 0         # documents written
    tokens: int = 0            # tokens encoded
    skipped: Counter = field(default_factory=Counter)   # kind of problem -> files
    scan_seconds: float = 0.0  # walking, reading, parsing and splitting
    encode_seconds: float = 0.0  # stage 1
    write_seconds: float = 0.0   # committing segments
    seconds: float = 0.0

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {kind}" for kind, n in sorted(self.skipped.items())) or "none"
        return (f"ingested {self.ingested} files ({self.documents} documents, {self.tokens:,} tokens) in "
                f"{self.seconds:.1f}s; unchanged {self.unchanged}; removed {self.removed}; skipped: {skipped}")


class IngestInterrupted(errors.MsaError):
    code = errors.INTERRUPTED


@dataclass
class _FileWork:
    """A new or changed file, split and waiting in the batch to be encoded."""
    digest: str
    passages: list[Passage]
    replacing: list[int]       # the documents of its previous version

    @property
    def tokens(self) -> int:
        return sum(p.n_tokens for p in self.passages)


def ingest(engine: Engine, roots: list[Path], *, prune: bool = True,
           passage_tokens: int = settings.PASSAGE_TOKENS, progress: bool = False,
           confine: list[Path] | None = None, shard: Shard | None = None) -> IngestReport:
    """Bring the bank up to date with `roots` (folders or files). Each skipped file gets one warning line on
    stderr; `progress` shows a progress bar there. `confine` (resolved folders or files; a server's allowed roots):
    a file whose real path, links resolved, lies under none of them is not read, and its documents stay. `shard`:
    the engine's bank is this rank's shard, which takes only the files it owns (the others are not its to read,
    report or prune)."""
    bank = engine.bank
    whole = shard.root if shard else bank.path
    inside = [r for r in roots if _within(os.path.abspath(r), str(whole.absolute()))]
    if inside:
        raise errors.MsaError(f"{inside[0]} is inside the memory bank {whole}: ingest your documents, "
                              f"not the bank", errors.USAGE)
    report = IngestReport()
    start = time.perf_counter()
    with bank.lock():
        known = _files_in(bank)
        scan = _Scan(engine, known, passage_tokens, report, progress, confine, shard)
        try:
            scan.run(roots)
        except KeyboardInterrupt:
            raise IngestInterrupted(f"interrupted; {report.ingested} files were committed, and running the same "
                                    f"command again goes on from there") from None
        report.scan_seconds = time.perf_counter() - start - report.encode_seconds - report.write_seconds
        gone = scan.stale + (_gone(known, roots, scan.present, scan.unknown) if prune else [])
        if gone:
            bank.remove(doc_id for source in gone for doc_id in known[source][1])
            report.removed = len(gone)
        report.seconds = time.perf_counter() - start
        named = [os.path.abspath(r) for r in roots]
        bank.set_info(roots=sorted(set(bank.info.get("roots", [])) | set(named)), last_ingest={
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "roots": named,
            "ingested": report.ingested, "unchanged": report.unchanged, "removed": report.removed,
            "skipped": dict(report.skipped), "documents": report.documents, "tokens": report.tokens,
            "seconds": round(report.seconds, 2), "scan_seconds": round(report.scan_seconds, 2),
            "encode_seconds": round(report.encode_seconds, 2), "write_seconds": round(report.write_seconds, 2)})
    return report


def remember(engine: Engine, name: str, text: str, passage_tokens: int = settings.PASSAGE_TOKENS) -> IngestReport:
    """Store `text` as the documents of the source memory:NAME, replacing what that name held before; its
    citations are memory:NAME:LINES. UnreadableFile (an MsaError) when nothing of it can be stored."""
    if not name.strip() or "\n" in name:
        raise errors.MsaError("a remembered text needs a one-line name", errors.USAGE)
    source, data = REMEMBERED + name.strip(), text.encode()
    report = IngestReport()
    start = time.perf_counter()
    with engine.bank.lock():
        scan = _Scan(engine, _files_in(engine.bank), passage_tokens, report, progress=False)
        if not scan.content(source, data):
            raise errors.MsaError(f"nothing to remember in {source}: the text is empty", errors.NOTHING_INGESTED)
        scan.commit()
    report.seconds = time.perf_counter() - start
    return report


def forget(bank: Bank, paths: list[Path], names: list[str] = ()) -> tuple[int, int]:
    """Remove every document from the given files, or from files under the given folders (which need not exist
    any more), and the remembered texts of the given names. Returns (sources, documents) removed."""
    targets = [os.path.abspath(p) for p in paths]
    remembered = {REMEMBERED + n.strip() for n in names}
    with bank.lock():
        docs = [d for d in bank.documents()
                if d.source in remembered or any(_within(d.source, t) for t in targets)]
        bank.remove(d.doc_id for d in docs)
    return len({d.source for d in docs}), len(docs)


def _files_in(bank: Bank) -> dict[str, tuple[str, list[int]]]:
    """source -> (content hash, its documents) for every file the bank holds."""
    known: dict[str, tuple[str, list[int]]] = {}
    for d in bank.documents():
        known.setdefault(d.source, (d.content_hash, []))[1].append(d.doc_id)
    return known


class _Scan:
    """One pass over the files: read, hash, split, and encode and commit a batch whenever it is full."""

    def __init__(self, engine: Engine, known: dict, passage_tokens: int, report: IngestReport, progress: bool,
                 confine: list[Path] | None = None, shard: Shard | None = None):
        self.engine, self.known, self.passage_tokens, self.report = engine, known, passage_tokens, report
        self.confine, self.shard = confine, shard
        tokenizer = engine.model.tokenizer
        self.count = lambda s: len(tokenizer(s, add_special_tokens=False).input_ids)  # noqa: E731
        self.progress = progress
        self.present: set[str] = set()   # files found and read: prune keeps their documents unless they changed
        self.unknown: list[str] = []     # files and folders that could not be looked at: their documents stay
        self.stale: list[str] = []       # files whose new content cannot be read: their old documents leave
        self.batch: list[_FileWork] = []
        self.batch_tokens = 0
        self.bar = tqdm(disable=True)    # run() puts up one that shows, when it knows the bytes ahead

    def run(self, roots: list[Path]) -> None:
        # A shard reads its own files, and hears of every folder that could not be looked at: what it holds
        # from one stays (the folder's owner reports it).
        items = [(root, item) for root, item in unique_files(roots, exclude=[self._whole()])
                 if self._owns(item) or isinstance(item, UnreadableFile) and item.kind == UNKNOWN]
        sizes = {item: _size(item) for _, item in items if isinstance(item, Path)}   # stat each file once
        # The ETA comes from bytes read: cheap to know up front, unlike tokens, and it tracks encoding time
        # once the rate settles.
        self.bar = tqdm(total=sum(sizes.values()), desc="ingesting", unit="B", unit_scale=True,
                        disable=not self.progress, file=sys.stderr, dynamic_ncols=True)
        named = {root: not os.path.isdir(root) for root in roots}
        try:
            for root, item in items:
                if isinstance(item, Path) and self.confine is not None and not confined(item, self.confine):
                    # the walk follows links, out of the roots too
                    item = UnreadableFile(item, UNKNOWN, "its real path is outside the allowed roots: not read")
                if isinstance(item, UnreadableFile):
                    self.skip(item, named[root])
                else:
                    self.file(item, named[root])
                    self.bar.update(sizes[item])
            self.commit()
        finally:
            self.bar.close()

    def _whole(self) -> Path:
        return self.shard.root if self.shard else self.engine.bank.path

    def _owns(self, item: Path | UnreadableFile) -> bool:
        path = item.path if isinstance(item, UnreadableFile) else item
        return self.shard is None or self.shard.owns(os.path.abspath(path))

    def file(self, path: Path, named: bool) -> None:
        source = os.path.abspath(path)
        if source in self.present:   # named twice (a folder and a file in it)
            return
        try:
            data = read_bytes(path)
        except UnreadableFile as error:
            gone = not os.path.lexists(path)
            self.skip(UnreadableFile(path, "vanished", "vanished while being read") if gone else error, named)
            return
        self.present.add(source)
        try:   # a reader's failure, too, stops only this file (corpus/passages.py)
            self.content(source, data)
        except UnreadableFile as e:
            self.failed(e, self.known.get(source), source, named)

    def content(self, source: str, data: bytes) -> bool:
        """Put a source's content in the batch unless the bank holds it already; False when it has no passages
        (the batch still removes its old documents). UnreadableFile when it cannot be read."""
        digest = content_hash(data)
        previous = self.known.get(source)
        if previous and previous[0] == digest:
            self.report.unchanged += 1
            return True
        passages = file_passages(Path(source), data, self.count, self.passage_tokens)
        work = _FileWork(digest, passages, previous[1] if previous else [])
        self.batch.append(work)
        self.batch_tokens += work.tokens
        if self.batch_tokens >= COMMIT_TOKENS:
            self.commit()
        return bool(passages)

    def failed(self, error: UnreadableFile, previous, source: str, named: bool) -> None:
        self.skip(error, named)
        if previous:
            self.stale.append(source)   # its old content is gone, and the new one cannot be read

    def skip(self, error: UnreadableFile, named: bool) -> None:
        report = self.report
        detail = error.detail
        if error.kind == UNKNOWN:
            target = os.path.abspath(error.path)
            self.unknown.append(target)
        if not self._owns(error):
            return
        report.skipped[error.kind] += 1
        if error.kind == UNKNOWN:
            if self.shard:   # the other shards' documents from it are not counted here
                detail += "; what the bank holds from it stays"
            elif kept := sum(len(ids) for s, (_, ids) in self.known.items() if _within(s, target)):
                detail += f"; its {kept} documents stay in the bank"
        if error.warn or named:   # a file the user named gets a reason, even when it is only empty
            # tqdm.write keeps a progress bar intact below the message.
            tqdm.write(f"msa: warning: skipped {error.path}: {detail}", file=sys.stderr)

    def commit(self) -> None:
        """Encode the batch and commit it as one segment, with the removal of the documents it replaces. Files
        without passages still need their commit, to remove their old documents."""
        batch, self.batch, self.batch_tokens = self.batch, [], 0
        if not batch:
            return
        report, engine = self.report, self.engine
        passages = [p for w in batch for p in w.passages]
        t0 = time.perf_counter()
        encoded = engine.encode(passages)
        t1 = time.perf_counter()
        engine.commit([(p, w.digest) for w in batch for p in w.passages], encoded,
                      replacing=[i for w in batch for i in w.replacing])
        report.encode_seconds += t1 - t0
        report.write_seconds += time.perf_counter() - t1
        report.ingested += len(batch)
        report.documents += len(passages)
        report.tokens += sum(w.tokens for w in batch)
        rate = report.tokens / max(report.encode_seconds, 1e-9)
        self.bar.set_postfix_str(f"{report.ingested} files, {report.tokens:,} tokens, {rate:,.0f} tok/s",
                                 refresh=True)


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _gone(known: dict, roots: list[Path], present: set[str], unknown: list[str]) -> list[str]:
    """Sources under a folder root that the walk no longer found (deleted, moved, or now ignored), except those
    under what could not be looked at."""
    folders = [os.path.abspath(r) for r in roots if os.path.isdir(r)]
    return [s for s in known if s not in present and any(_within(s, f) for f in folders)
            and not any(_within(s, u) for u in unknown)]


def confined(path: str | Path, roots: list[Path]) -> bool:
    """Whether `path`, every link and `..` resolved, is one of `roots` (resolved themselves) or lies below one."""
    real = os.path.realpath(path)
    return any(_within(real, str(root)) for root in roots)


def _within(source: str, target: str) -> bool:
    return source == target or source.startswith(target.rstrip(os.sep) + os.sep)
