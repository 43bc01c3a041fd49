"""Router training's data: queries, each with the passages that answer it, and the pool they are ranked against.

(a) Labelled pairs: a question and the passages of its gold documents, from an eval set (corpus/eval_set.py).
(b) Inverse-cloze (ICT) pairs from any passages (a folder read as `msa ingest` reads it, or a bank's documents):
one sentence is the query and the passage without it the positive. All the positives form the pool every query
is ranked against.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..corpus.eval_set import load_set
from ..corpus.passages import file_passages
from ..corpus.readers import UnreadableFile, read_bytes
from ..corpus.walk import unique_files
from ..memory.bank import Bank

MIN_ICT_WORDS = 5            # an ICT query sentence shorter than this says too little to find its passage
MAX_ICT_CHARS = 400          # nor should it be most of the passage


@dataclass
class Pairs:
    """Queries, the pool of passages they are ranked against, and which pool passages answer each query."""
    queries: list[str] = field(default_factory=list)
    positives: list[list[int]] = field(default_factory=list)   # pool indices per query
    pool: list[str] = field(default_factory=list)
    held_out: list[int] = field(default_factory=list)          # query indices never trained on
    labelled: list[int] = field(default_factory=list)          # query indices from QA sets (not ICT)
    _index: dict[str, int] = field(default_factory=dict)

    def passage(self, text: str) -> int:
        if text not in self._index:
            self._index[text] = len(self.pool)
            self.pool.append(text)
        return self._index[text]

    def add(self, query: str, positives: list[str], labelled: bool, held_out: bool = False) -> None:
        if held_out:
            self.held_out.append(len(self.queries))
        if labelled:
            self.labelled.append(len(self.queries))
        self.queries.append(query)
        self.positives.append(sorted({self.passage(p) for p in positives}))


def ict_pair(passage: str, rng: random.Random) -> tuple[str, str] | None:
    """(a sentence of the passage, the passage without it), or None when it has no usable sentence. A first
    line without a full stop (a title) stays in the passage: it names the subject, as a document's title does."""
    spans = [m.span() for m in re.finditer(r"[^.!?\n]*[^.!?\s][^.!?\n]*[.!?]+(?=\s|$)", passage)]
    usable = [(a, b) for a, b in spans if len(passage[a:b].split()) >= MIN_ICT_WORDS and b - a <= MAX_ICT_CHARS]
    if len(spans) < 2 or not usable:
        return None
    a, b = rng.choice(usable)
    left, right = passage[:a].rstrip(" "), passage[b:].lstrip(" ")
    gap = " " if left and right and not left.endswith("\n") and not right.startswith("\n") else ""
    rest = (left + gap + right).strip()
    return passage[a:b].strip(), rest


def labelled_pairs(pairs: Pairs, set_dir: Path, limit: int | None, held_out: float,
                   passages_of: Callable[[Path], list[str]]) -> dict:
    """Add a QA set's first `limit` questions, each with its gold files' passages; the last `held_out` share of
    them is kept for validation. Returns the source's description for the router's manifest."""
    s = load_set(set_dir, limit)
    n_held = round(len(s.questions) * held_out)
    for n, q in enumerate(s.questions):
        golds = [p for g in q["gold_docs"] for p in passages_of(s.corpus / f"{g}.txt")]
        if golds:
            pairs.add(q["question"], golds, labelled=True, held_out=n >= len(s.questions) - n_held)
    digest = hashlib.sha256((set_dir / "questions.jsonl").read_bytes()).hexdigest()[:16]
    return {"qa": str(set_dir), "questions": len(s.questions), "held_out": n_held, "questions_sha256": digest}


def ict_pairs(pairs: Pairs, name: str, passages: list[str], limit: int | None, rng: random.Random) -> dict:
    """Add inverse-cloze pairs from passages (at most `limit` of them, drawn at random)."""
    if limit is not None and len(passages) > limit:
        passages = rng.sample(passages, limit)
    made = 0
    for p in passages:
        pair = ict_pair(p, rng)
        if pair:
            pairs.add(pair[0], [pair[1]], labelled=False)
            made += 1
    digest = hashlib.sha256("\0".join(passages).encode()).hexdigest()[:16]
    return {"ict": name, "passages": len(passages), "pairs": made, "passages_sha256": digest}


def passages_in(path: Path, tokenizer, passage_tokens: int) -> list[str]:
    """Passage texts of a bank's documents, or of a folder or file walked, read and split as `msa ingest` does."""
    if Bank.exists(path):
        return [d.text for d in Bank.open(path).documents()]
    count = lambda s: len(tokenizer(s, add_special_tokens=False).input_ids)  # noqa: E731
    out = []
    for _, item in unique_files([path]):
        if isinstance(item, Path):
            try:
                out += [p.text for p in file_passages(item, read_bytes(item), count, passage_tokens)]
            except UnreadableFile:
                pass   # ingest warns about these; training just does without them
    return out
