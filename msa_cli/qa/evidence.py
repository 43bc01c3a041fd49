"""Evidence: the sentences of the routed documents that bear on the question, each cited to its exact lines.

Routing picks whole documents, and a 135M reader given five of them is drowned by everything they say besides
the answer: it answers twice as often from the gold passage alone (BENCHMARKS.md, "Evidence"). So the documents
found are cut into sentences (corpus/splitter.sentences: a code block without sentence ends stays whole, a long
sentence becomes lines), the sentences are ranked for the question by BM25 among them, fused with the router's
own keys inside each sentence (Engine.key_scores), and the reader reads the best few, each with its neighbours,
in each document's own order. Under the answer, the sentences read that say what the answer says are quoted
with `path:line` (or `path:page`) citations, so a user can check what says what; among them, one that holds the
kind of answer asked for (a date for "when": qa/expected.py) comes first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..corpus.readers import lines_are_newlines, make_text, read_file
from ..corpus.splitter import sentences
from ..errors import MsaError
from ..memory.bank import Document
from ..memory.lexical import LexicalIndex, fused
from .expected import answer_test

UNIT_TOKENS = 64     # a sentence longer than this is cut into lines, then windows


@dataclass(frozen=True)
class Evidence:
    """One sentence (or short block) of a document, scored for the question."""
    n: int                   # the source it quotes: [n] in the answer, Answer.sources()
    document: Document
    start: int               # offsets in document.text
    end: int
    score: float             # its BM25 (or fused) score among the sentences it was ranked with
    line_start: int | None   # lines of the file (None for paged formats: page cites it)
    line_end: int | None
    page: int | None

    @property
    def text(self) -> str:
        return self.document.text[self.start:self.end]

    def to_json(self) -> dict:
        return {"n": self.n, "path": self.document.source, "page": self.page, "line_start": self.line_start,
                "line_end": self.line_end, "text": self.text, "score": round(self.score, 4)}


@dataclass(frozen=True)
class Excerpt:
    """What the reader reads of one document: its chosen sentences with their neighbours, in the document's order."""
    document: Document
    text: str
    span: dict               # {"page", "line_start", "line_end"}: from its first sentence to its last
    read: list[Evidence]     # its sentences read (chosen ones and their neighbours), in the text's order


Unit = tuple[Document, tuple[int, int]]   # a sentence: its document, and (start, end) in the document's text


def excerpts(question: str, docs: list[Document], count_tokens: Callable[[str], int], budget: int,
             neighbours: int, router: Callable[[list[Unit]], list[float]] | None = None,
             weight: float = 0.0) -> list[Excerpt]:
    """The `budget` best sentences of `docs` for the question, each with `neighbours` sentences on either side,
    grouped by document, the document with the best sentence first (documents without a chosen sentence are left
    out): where the context is short, what is cut is the least relevant. Ties, and a question none of whose
    words occur, keep the order of `docs` (hop 1's best first) and of the text. With `router` (the router's
    score of each unit, Engine.key_scores) and weight > 0, sentences rank by weight * z(router) + (1 - weight) *
    z(BM25), as documents do (lexical.fused)."""
    units = [(d, span) for d in docs for span in sentence_spans(d, count_tokens)]
    if not units:
        return []
    scores = bm25(question, [d.text[s:e] for d, (s, e) in units])
    if router is not None and weight > 0:
        scores = fused(torch.tensor(router(units)), scores, weight)
    scores = scores.tolist()
    chosen = sorted(range(len(units)), key=lambda i: -scores[i])[:budget]   # sorted() is stable: ties keep order
    order: list[Document] = []   # by each document's best chosen sentence (Documents are not hashable)
    for i in chosen:
        if not any(units[i][0] is d for d in order):
            order.append(units[i][0])
    out = []
    for doc in order:
        rows = [i for i in range(len(units)) if units[i][0] is doc]
        picked = [i for i in chosen if units[i][0] is doc]
        lines = line_map(doc)
        keep = sorted({r for i in picked for r in rows if abs(r - i) <= neighbours})
        read = [cited(len(out) + 1, doc, *units[r][1], scores[r], lines) for r in keep]
        text = " … ".join(doc.text[units[run[0]][1][0]:units[run[-1]][1][1]] for run in contiguous(keep))
        span = {"page": read[0].page, "line_start": read[0].line_start, "line_end": read[-1].line_end}
        out.append(Excerpt(doc, text, span, read))
    return out


def attribute(question: str, answer: str, read: list[Evidence], bonus: float = 0.0) -> list[Evidence]:
    """The sentences read, best first, scored by BM25 for the question and the answer together (a command quoted
    from a code block shares no word with the question that asked for it), standardised, plus `bonus` for one
    that holds the kind of answer the question asks for: the lines that say what the answer says. Ties keep the
    reading order."""
    scores = typed(question, bm25(f"{question}\n{answer}", [e.text for e in read]), [e.text for e in read], bonus)
    return [replace(read[i], score=scores[i]) for i in sorted(range(len(read)), key=lambda i: -scores[i])]


def best_line(question: str, doc: Document, count_tokens: Callable[[str], int], bonus: float = 0.0) -> Evidence:
    """The sentence of `doc` that BM25 ranks best for the question, plus `bonus` as attribute() gives it (`msa
    search` shows it under each hit)."""
    spans = sentence_spans(doc, count_tokens)
    texts = [doc.text[s:e] for s, e in spans]
    scores = typed(question, bm25(question, texts), texts, bonus)
    best = max(range(len(spans)), key=lambda i: scores[i])   # max() keeps the first of equals: the text's order
    return cited(1, doc, *spans[best], scores[best], line_map(doc))


def typed(question: str, scores: torch.Tensor, texts: list[str], bonus: float) -> list[float]:
    """Scores standardised (lexical.fused's z), each text holding the kind of answer asked for raised by `bonus`;
    the scores as they are when the question asks for no kind this knows, or bonus is 0."""
    test = answer_test(question) if bonus else None
    if test is None:
        return scores.tolist()
    z = fused(torch.zeros_like(scores), scores, 0.0)
    return [float(v) + bonus * test(t) for v, t in zip(z.tolist(), texts)]


def best_sentences(question: str, doc: Document, count_tokens: Callable[[str], int], n: int) -> str:
    """The `n` sentences of `doc` that BM25 ranks best for the question, in the text's order: what a later hop
    of Memory Interleave routes on (the bridge to the next document is in them, not in the rest)."""
    spans = sentence_spans(doc, count_tokens)
    if len(spans) <= n:
        return doc.text
    scores = bm25(question, [doc.text[s:e] for s, e in spans]).tolist()
    best = sorted(sorted(range(len(spans)), key=lambda i: -scores[i])[:n])
    return " ".join(doc.text[spans[i][0]:spans[i][1]] for i in best)


def bm25(query: str, texts: list[str]) -> torch.Tensor:
    """BM25 of each text for the query, among these texts. NLTK's stop words, not the bank's 33: within a few
    documents, "how" or "what" matches a heading that asks the question instead of the sentence that answers."""
    if not texts:
        return torch.zeros(0)
    return LexicalIndex.build(texts, list(range(len(texts))), "en_plus").scores(query)


def sentence_spans(doc: Document, count_tokens: Callable[[str], int]) -> list[tuple[int, int]]:
    return [(s, e) for s, e, _ in sentences(make_text(doc.source, doc.text), count_tokens, UNIT_TOKENS)]


def contiguous(rows: list[int]) -> list[list[int]]:
    """Sorted row numbers -> runs of consecutive ones."""
    runs: list[list[int]] = []
    for r in rows:
        if runs and r == runs[-1][-1] + 1:
            runs[-1].append(r)
        else:
            runs.append([r])
    return runs


def cited(n: int, doc: Document, start: int, end: int, score: float,
          lines: Callable[[int], int] | None) -> Evidence:
    if doc.span.get("page") is not None:   # a page cites it (a PDF's text lines are no lines a reader sees)
        return Evidence(n, doc, start, end, score, None, None, doc.span["page"])
    if lines is None:                      # lines we cannot place: the document's own
        return Evidence(n, doc, start, end, score, doc.span.get("line_start"), doc.span.get("line_end"), None)
    last = start + len(doc.text[start:end].rstrip()) - 1
    return Evidence(n, doc, start, end, score, lines(start), lines(max(start, last)), None)


def line_map(doc: Document) -> Callable[[int], int] | None:
    """Offset in doc.text -> line of its file. A text file's passage counts its own newlines; an HTML page's
    text is placed in the page as read again now (its lines are the HTML source's), and None when the file is
    gone or no longer holds the passage (the document's own span is cited then)."""
    if doc.span.get("line_start") is None:
        return None
    if lines_are_newlines(Path(doc.source)):
        return lambda offset: doc.span["line_start"] + doc.text.count("\n", 0, offset)
    try:
        text = read_file(Path(doc.source))
    except (MsaError, OSError):
        return None
    base = text.text.find(doc.text, text.line_starts[min(doc.span["line_start"], len(text.line_starts)) - 1])
    if base < 0:
        return None
    return lambda offset: text.line_at(base + offset)
