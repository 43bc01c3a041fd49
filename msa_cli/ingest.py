"""Files -> memory documents -> bank, incrementally: `msa ingest` and `msa forget`.

Two passes under the bank's write lock. The scan walks the roots, reads and hashes every file, and splits the new
and changed ones into passages, so that the encode pass knows how many tokens it has ahead (progress and ETA). The
encode pass runs stage 1 over the passages in batches of whole files and commits each batch together with the
removal of the documents it replaces. So a crash, kill -9 or Ctrl-C loses at most the batch in flight and never
leaves a file half in the bank; a rerun finds the committed files unchanged by their content hash and encodes only
the rest. Last, files gone from an ingested folder leave the bank (prune).

A document's source is the file's absolute path (without resolving links): the bank is shared by every working
directory, so a relative path would name different files from different places.
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
from .corpus.readers import UnreadableFile, parse, read_bytes
from .corpus.splitter import Passage, split
from .corpus.walk import walk
from .engine import Engine, content_hash
from .memory import lexical
from .memory.bank import Bank

# Tokens per commit (one bank segment): bounds the work a crash loses (about a minute of encoding on a laptop
# CPU) while keeping segments, and the files a reader maps, few. A file's passages always share one commit.
COMMIT_TOKENS = 65_536


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
    """A new or changed file, split and waiting to be encoded."""
    shown: str                 # the path as the user gave it, for messages
    digest: str
    passages: list[Passage]
    replacing: list[int]       # the documents of its previous version

    @property
    def tokens(self) -> int:
        return sum(p.n_tokens for p in self.passages)


def ingest(engine: Engine, roots: list[Path], *, prune: bool = True,
           passage_tokens: int = settings.PASSAGE_TOKENS, progress: bool = False) -> IngestReport:
    """Bring the bank up to date with `roots` (folders or files). Each skipped file gets one warning line on
    stderr; `progress` shows progress bars there."""
    report = IngestReport()
    start = time.perf_counter()
    bank = engine.bank
    with bank.lock():
        known = _files_in(bank)
        try:
            work, present, stale = _scan(engine, roots, known, passage_tokens, report, progress)
            report.scan_seconds = time.perf_counter() - start
            _encode(engine, work, report, progress)
        except KeyboardInterrupt:
            raise IngestInterrupted(f"interrupted; {report.ingested} files were committed, and running the same "
                                    f"command again goes on from there") from None
        gone = stale + (_gone(known, roots, present) if prune else [])
        if gone:
            bank.remove(doc_id for source in gone for doc_id in known[source][1])
            report.removed = len(gone)
        report.seconds = time.perf_counter() - start
        bank.set_info("last_ingest", {
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "roots": [os.path.abspath(r) for r in roots],
            "ingested": report.ingested, "unchanged": report.unchanged, "removed": report.removed,
            "skipped": dict(report.skipped), "documents": report.documents, "tokens": report.tokens,
            "seconds": round(report.seconds, 2), "scan_seconds": round(report.scan_seconds, 2),
            "encode_seconds": round(report.encode_seconds, 2), "write_seconds": round(report.write_seconds, 2)})
        if engine.router.spec.kind == "learned":   # its routing fuses BM25: index the new documents now
            lexical.save_for_bank(bank)
    return report


def forget(bank: Bank, paths: list[Path]) -> tuple[int, int]:
    """Remove every document from the given files, or from files under the given folders (which need not exist
    any more). Returns (files, documents) removed."""
    targets = [os.path.abspath(p) for p in paths]
    with bank.lock():
        docs = [d for d in bank.documents() if any(_within(d.source, t) for t in targets)]
        bank.remove(d.doc_id for d in docs)
        if (bank.path / lexical.DIRECTORY).is_dir():
            lexical.save_for_bank(bank)
    return len({d.source for d in docs}), len(docs)


def _files_in(bank: Bank) -> dict[str, tuple[str, list[int]]]:
    """source -> (content hash, its documents) for every file the bank holds."""
    known: dict[str, tuple[str, list[int]]] = {}
    for d in bank.documents():
        known.setdefault(d.source, (d.content_hash, []))[1].append(d.doc_id)
    return known


def _scan(engine: Engine, roots: list[Path], known: dict, passage_tokens: int, report: IngestReport,
          progress: bool) -> tuple[list[_FileWork], set[str], list[str]]:
    """(work to encode, sources still present, sources whose file is now unreadable or empty)."""
    tokenizer = engine.model.tokenizer
    count = lambda s: len(tokenizer(s, add_special_tokens=False).input_ids)  # noqa: E731
    work: list[_FileWork] = []
    present: set[str] = set()   # files found, read or not: prune keeps their documents unless they changed
    stale: list[str] = []
    bar = tqdm(desc="reading", unit=" files", disable=not progress, file=sys.stderr, leave=False)

    def skip(error: UnreadableFile, shown, named: bool) -> None:
        report.skipped[error.kind] += 1
        if error.warn or named:   # a file the user named gets a reason, even when it is only empty
            # tqdm.write keeps a progress bar intact below the message.
            tqdm.write(f"msa: warning: skipped {shown}: {error.detail}", file=sys.stderr)

    for root in roots:
        named = not root.is_dir()
        for item in walk(root):
            bar.update()
            if isinstance(item, UnreadableFile):
                skip(item, item.path, named)
                continue
            source = os.path.abspath(item)
            if source in present:   # named twice (a folder and a file in it, or two links)
                continue
            try:
                data = read_bytes(item)
            except UnreadableFile as e:
                if os.path.lexists(item):
                    present.add(source)
                    skip(e, item, named)
                else:
                    skip(UnreadableFile(item, "vanished", "vanished while being read"), item, named)
                continue
            present.add(source)
            digest = content_hash(data)
            previous = known.get(source)
            if previous and previous[0] == digest:
                report.unchanged += 1
                continue
            try:
                passages = split(parse(Path(source), data), count, passage_tokens)
            except UnreadableFile as e:
                skip(e, item, named)
                if previous:
                    stale.append(source)   # its old content is gone, and the new one cannot be read
                continue
            work.append(_FileWork(str(item), digest, passages, previous[1] if previous else []))
    bar.close()
    return work, present, stale


def _encode(engine: Engine, work: list[_FileWork], report: IngestReport, progress: bool) -> None:
    total = sum(w.tokens for w in work)
    bar = tqdm(total=total, desc="encoding", unit="tok", unit_scale=True, disable=not progress or not total,
               file=sys.stderr, dynamic_ncols=True)
    done = 0
    for batch in _batches(work):
        passages = [p for w in batch for p in w.passages]
        t0 = time.perf_counter()
        encoded = engine.encode(passages, on_tokens=lambda n: bar.update(min(n, total - bar.n)))
        t1 = time.perf_counter()
        engine.commit([(p, w.digest) for w in batch for p in w.passages], encoded,
                      replacing=[i for w in batch for i in w.replacing])
        report.encode_seconds += t1 - t0
        report.write_seconds += time.perf_counter() - t1
        report.ingested += len(batch)
        report.documents += len(passages)
        report.tokens += sum(w.tokens for w in batch)
        done += len(batch)
        bar.n = report.tokens   # the forwards also count each document's two wrapper tokens
        bar.set_postfix_str(f"{done}/{len(work)} files", refresh=True)
    bar.close()


def _batches(work: list[_FileWork]) -> list[list[_FileWork]]:
    """Consecutive whole files, about COMMIT_TOKENS per batch (a larger file makes a batch of its own).
    Files without passages still need their commit, to remove their old documents."""
    batches, current, size = [], [], 0
    for w in work:
        current.append(w)
        size += w.tokens
        if size >= COMMIT_TOKENS:
            batches.append(current)
            current, size = [], 0
    if current:
        batches.append(current)
    return batches


def _gone(known: dict, roots: list[Path], present: set[str]) -> list[str]:
    """Sources under a folder root that the walk no longer found (deleted, moved, or now ignored)."""
    folders = [os.path.abspath(r) for r in roots if r.is_dir()]
    return [s for s in known if s not in present and any(_within(s, f) for f in folders)]


def _within(source: str, target: str) -> bool:
    return source == target or source.startswith(target.rstrip(os.sep) + os.sep)
