"""Splitter: cut a `Text` into passages of at most `max_tokens` tokens (the paper's memory "documents").

Whole paragraphs (runs of non-blank lines; for code, blocks between blank lines) are packed greedily. A paragraph
that does not fit is cut into sentences, a sentence that does not fit into lines, and a line that does not fit into
windows that end at whitespace, or anywhere when a run has no whitespace. Every passage is an exact slice of the
text, so its citation (lines or page) can be checked against the file.

`count_tokens` is the model tokenizer's length and may be slow: each piece of text is counted about once at each
level it passes through, plus once per packed passage to verify it, never once per character or per word.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass

from msa_cli.corpus.readers import Text


@dataclass(frozen=True)
class Passage:
    path: str
    text: str          # text.text[start:end] of the file's normalised text
    line_start: int    # 1-based, inclusive
    line_end: int      # 1-based, inclusive
    page: int | None   # page where the passage starts, for paged formats
    n_tokens: int      # count_tokens(text), counted exactly


# Tokens rarely cover more than a few characters, so a span longer than this many characters per allowed token
# cannot fit; it is cut without being counted, which spares the tokenizer megabyte-long inputs.
_MAX_CHARS_PER_TOKEN = 16
# A guess at the characters per token, where a run must be cut blind; corrected from each count.
_CHARS_PER_TOKEN_GUESS = 4
# Packing estimates a passage as the sum of its pieces' counts plus this much per gap between pieces (the blank
# line or space there); the packed passage is then counted exactly.
_TOKENS_PER_GAP = 1
# A blind window that counts below this share of max_tokens is grown once, so runs do not become many small pieces.
_FILL = 0.75

# A sentence ends at . ! or ?, with any closing quotes or brackets, followed by whitespace.
_SENTENCE_END = re.compile(r"([.!?]['\")\]]*)\s+")
_NON_SPACE = re.compile(r"\S")

Span = tuple[int, int, int]  # (start, end, n_tokens)


def split(text: Text, count_tokens: Callable[[str], int], max_tokens: int = 320) -> list[Passage]:
    """The passages of `text`, in order, each at most `max_tokens` tokens; none for an empty or blank text."""
    if max_tokens < 1:
        raise ValueError("max_tokens must be at least 1")
    cutter = _Cutter(text.text, count_tokens, max_tokens)
    pieces = cutter.fit(_paragraphs(text), depth=0)
    # A passage never spans two pages, so that `path:page` cites all of it (readers end every page with a
    # blank line, so no paragraph spans two pages either).
    by_page: dict[int | None, list[Span]] = {}
    for piece in pieces:
        by_page.setdefault(text.page_at(piece[0]), []).append(piece)
    return [
        Passage(
            path=text.path,
            text=text.text[start:end],
            line_start=text.line_at(start),
            line_end=text.line_at(end - 1),
            page=text.page_at(start),
            n_tokens=n,
        )
        for page_pieces in by_page.values()
        for start, end, n in cutter.pack(page_pieces)
    ]


def sentences(text: Text, count_tokens: Callable[[str], int], max_tokens: int) -> list[Span]:
    """The sentences of `text`'s paragraphs, in order, each an exact slice: the units qa/evidence.py ranks. A block
    without sentence ends (code, a list) stays whole while it fits `max_tokens`; a longer one is cut into lines,
    then windows, as split() cuts what does not fit."""
    cutter = _Cutter(text.text, count_tokens, max_tokens)
    return cutter.fit([s for p in _paragraphs(text) for s in _sentences(text.text, *p)], depth=len(_FINER) - 1)


def _paragraphs(text: Text) -> list[tuple[int, int]]:
    """Runs of non-blank lines, from the start of the first line (indentation kept) to the end of the last."""
    spans = []
    start = None
    bounds = list(text.line_starts) + [len(text.text) + 1]
    for line_start, next_start in zip(bounds, bounds[1:]):
        line = text.text[line_start:next_start - 1]
        if line.strip():
            if start is None:
                start = line_start
            end = line_start + len(line.rstrip())
        elif start is not None:
            spans.append((start, end))
            start = None
    if start is not None:
        spans.append((start, end))
    return spans


def _trimmed(text: str, start: int, end: int) -> tuple[int, int] | None:
    """(start, end) without surrounding whitespace, or None if nothing is left."""
    found = _NON_SPACE.search(text, start, end)
    if found is None:
        return None
    end_trimmed = start + len(text[start:end].rstrip())
    return found.start(), end_trimmed


def _sentences(text: str, start: int, end: int) -> list[tuple[int, int]]:
    spans = []
    for match in _SENTENCE_END.finditer(text, start, end):
        spans.append((start, match.end(1)))
        start = match.end()
    spans.append((start, end))
    return [span for span in (_trimmed(text, s, e) for s, e in spans) if span]


def _lines(text: str, start: int, end: int) -> list[tuple[int, int]]:
    spans = []
    newline = text.find("\n", start, end)
    while newline != -1:
        spans.append((start, newline))
        start = newline + 1
        newline = text.find("\n", start, end)
    spans.append((start, end))
    return [span for span in (_trimmed(text, s, e) for s, e in spans) if span]


# Finer and finer ways to cut a span that does not fit; after the last come blind windows.
_FINER = (_sentences, _lines)


class _Cutter:
    def __init__(self, text: str, count_tokens: Callable[[str], int], max_tokens: int):
        self.text = text
        self.count_tokens = count_tokens
        self.max_tokens = max_tokens

    def count(self, start: int, end: int) -> int | None:
        """Tokens in text[start:end], or None when it is too long to possibly fit."""
        if end - start > self.max_tokens * _MAX_CHARS_PER_TOKEN:
            return None
        return self.count_tokens(self.text[start:end])

    def fit(self, spans: list[tuple[int, int]], depth: int) -> list[Span]:
        """Cut each span that does not fit with _FINER[depth], and so on, until every piece fits; order is kept."""
        pieces = []
        for start, end in spans:
            n = self.count(start, end)
            if n is not None and n <= self.max_tokens:
                pieces.append((start, end, n))
            elif depth < len(_FINER):
                pieces.extend(self.fit(_FINER[depth](self.text, start, end), depth + 1))
            else:
                pieces.extend(self.windows(start, end))
        return pieces

    def pack(self, pieces: list[Span]) -> list[Span]:
        """Join consecutive pieces greedily into passages that fit, verifying each joined passage's count."""
        passages = []
        i = 0
        while i < len(pieces):
            j = i + 1
            estimate = pieces[i][2]
            while j < len(pieces) and estimate + _TOKENS_PER_GAP + pieces[j][2] <= self.max_tokens:
                estimate += _TOKENS_PER_GAP + pieces[j][2]
                j += 1
            while True:
                if j - i == 1:
                    n = pieces[i][2]  # counted exactly already
                    break
                # The estimate can be off where tokens merge or split across a gap; drop pieces until it fits.
                n = self.count_tokens(self.text[pieces[i][0]:pieces[j - 1][1]])
                if n <= self.max_tokens:
                    break
                j -= 1
            passages.append((pieces[i][0], pieces[j - 1][1], n))
            i = j
        return passages

    def windows(self, start: int, end: int) -> list[Span]:
        """Cut a run that has no finer structure into windows that fit, ending at whitespace where there is some."""
        pieces = []
        size = self.max_tokens * _CHARS_PER_TOKEN_GUESS
        largest = self.max_tokens * _MAX_CHARS_PER_TOKEN
        while start < end:
            grown = shrunk = False
            while True:
                cut = self._cut(start, start + size, end)
                n = self.count_tokens(self.text[start:cut])
                if n > self.max_tokens and cut - start > 1:
                    size = max(1, min(cut - start - 1, (cut - start) * self.max_tokens // n))
                    shrunk = True
                elif n < _FILL * self.max_tokens and cut < end and not (grown or shrunk):
                    size = min(largest, (cut - start) * self.max_tokens // max(n, 1))
                    grown = True
                else:
                    # A single character is never cut further, whatever it counts.
                    break
            pieces.append((start, cut, n))
            following = _NON_SPACE.search(self.text, cut, end)
            start = following.start() if following else end
        return pieces

    def _cut(self, start: int, limit: int, end: int) -> int:
        """End of a window from `start` (a non-space) to at most `limit`, within a run ending at `end`: at the
        last whitespace before `limit` if there is one, otherwise at `limit` (a run without whitespace is cut
        between characters)."""
        if limit >= end:
            return end
        if self.text[limit].isspace():
            stop = limit
        else:
            stop = max(self.text.rfind(" ", start, limit), self.text.rfind("\t", start, limit))
            if stop <= start:
                return limit
        return start + len(self.text[start:stop].rstrip())
