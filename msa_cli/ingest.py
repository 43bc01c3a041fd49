"""Files -> memory documents -> bank, skipping files whose content the bank already holds."""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from . import settings
from .corpus.readers import UnreadableFile, iter_files, read_file
from .corpus.splitter import Passage, split
from .engine import Engine, content_hash

COMMIT_DOCUMENTS = 256   # documents per bank commit: a crash loses at most this much work


@dataclass
class IngestReport:
    ingested: int = 0          # files encoded (new or changed)
    unchanged: int = 0
    documents: int = 0
    tokens: int = 0
    skipped: Counter = field(default_factory=Counter)   # reason -> files
    warnings: list[str] = field(default_factory=list)


def ingest(engine: Engine, paths: list[Path], quiet: bool = False) -> IngestReport:
    report = IngestReport()
    files = [f for p in paths for f in ([p] if p.is_file() else iter_files(p))]
    known: dict[str, tuple[str, list[int]]] = {}   # source -> (content hash, its doc ids)
    for d in engine.bank.documents():
        known.setdefault(d.source, (d.content_hash, []))[1].append(d.doc_id)
    tokenizer = engine.model.tokenizer
    count = lambda s: len(tokenizer(s, add_special_tokens=False).input_ids)  # noqa: E731

    pending: list[tuple[Passage, str]] = []
    replaced: list[int] = []   # documents of changed files, removed once their replacements are committed

    def commit():
        if pending:
            engine.add(pending)
        if replaced:
            engine.bank.remove(replaced)
        pending.clear()
        replaced.clear()

    bar = tqdm(files, unit="file", disable=quiet or not sys.stderr.isatty(), file=sys.stderr)
    with engine.bank.lock():
        for path in bar:
            source = str(path)
            try:
                data = path.read_bytes()
            except OSError as e:
                report.skipped["unreadable"] += 1
                report.warnings.append(f"skipped {source}: {e.strerror or e}")
                continue
            digest = content_hash(data)
            if source in known and known[source][0] == digest:
                report.unchanged += 1
                continue
            try:
                passages = split(read_file(path), count, settings.PASSAGE_TOKENS)
            except UnreadableFile as e:
                report.skipped[e.reason] += 1
                report.warnings.append(f"skipped {e}")
                continue
            pending.extend((p, digest) for p in passages)
            replaced.extend(known.get(source, ("", []))[1])
            report.ingested += 1
            report.documents += len(passages)
            report.tokens += sum(p.n_tokens for p in passages)
            if len(pending) >= COMMIT_DOCUMENTS:
                commit()
        if pending or replaced:
            commit()
    return report
