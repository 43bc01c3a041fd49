"""Readers: turn a file into a `Text` (its text plus the map from character offsets to lines and pages).

One reader per format, chosen by file suffix in `_READERS`: plain text, markup and code as they are, HTML as its
visible text (cited by the HTML file's lines), PDF page by page through pypdf (cited by page), and `.gz` of any of
these. A reader takes the path to show in citations and the file's bytes, and returns a `Text`.
"""

import bisect
import codecs
import gzip
import io
import logging
import os
import stat
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from msa_cli.errors import NOTHING_INGESTED, MsaError


class UnreadableFile(MsaError):
    """A file that cannot be turned into text: unsupported type, binary, undecodable or unreadable."""

    # When this reaches the CLI, the file was named on its own, so nothing was ingested.
    code = NOTHING_INGESTED

    def __init__(self, path: str | Path, kind: str, detail: str = ""):
        super().__init__(f"{path}: {detail or kind}")
        self.path = str(path)
        self.detail = detail or kind
        self.kind = kind   # a short category, counted in ingest's summary: "binary", "damaged PDF"...

    @property
    def warn(self) -> bool:
        """Whether ingest warns about it: not for what every tree holds (files of other types, empty files)."""
        return self.kind not in QUIET_KINDS


QUIET_KINDS = frozenset({"unsupported type", "empty"})
# A file or folder that could not be looked at or read (permissions, an I/O error, a stale network mount): its
# content is unknown, not gone, so ingest keeps what the bank holds from it.
UNKNOWN = "unreadable"


@dataclass(frozen=True)
class Text:
    """A file's text, with newlines normalised to "\\n", and where each line (and page) starts in it."""

    path: str                      # as the caller passed it: this is what citations show
    text: str
    line_starts: tuple[int, ...]   # line_starts[n - 1] is the offset where line n (1-based) starts
    pages: tuple[int, ...] | None = None  # pages[n - 1] is the offset where page n starts; None if not paged

    def line_at(self, offset: int) -> int:
        """The 1-based line holding the character at `offset`."""
        return bisect.bisect_right(self.line_starts, offset)

    def page_at(self, offset: int) -> int | None:
        """The 1-based page holding the character at `offset`, or None for formats without pages."""
        if self.pages is None:
            return None
        return bisect.bisect_right(self.pages, offset)


def make_text(path: str, text: str) -> Text:
    """Build a `Text` from decoded text: normalise newlines and record where each line starts."""
    # "\r\n" (Windows) and a lone "\r" (classic Mac) both end a line, as in editors and Python's universal newlines.
    # Other characters that str.splitlines() treats as breaks (form feed, U+2028...) do not: editors do not break
    # lines there either, so line numbers stay the ones an editor shows.
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    starts = [0]
    newline = text.find("\n")
    while newline != -1:
        starts.append(newline + 1)
        newline = text.find("\n", newline + 1)
    return Text(path=path, text=text, line_starts=tuple(starts))


# --- text sniffing and decoding -------------------------------------------------------------------------------

SNIFF_BYTES = 8192
# Bytes that plain text may contain: printable ASCII, anything >= 0x80 (UTF-8 or Latin-1), and the control
# characters that real text files use (backspace, tab, newline, form feed, carriage return, ESC for ANSI colours).
_TEXT_BYTES = bytes([8, 9, 10, 12, 13, 27]) + bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100))
_MAX_CONTROL_FRACTION = 0.1  # more control bytes than this and it is not text


def looks_like_text(data: bytes) -> bool:
    """True if `data` reads as text: no NUL byte and few control characters."""
    if b"\0" in data:
        return False
    controls = data.translate(None, _TEXT_BYTES)
    return len(controls) <= _MAX_CONTROL_FRACTION * len(data)


def _decode(path: str, data: bytes) -> str:
    # UTF-16 text is full of NUL bytes, so recognise it by its byte-order mark before sniffing.
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            raise UnreadableFile(path, "not text", "invalid UTF-16") from None
    if not looks_like_text(data[:SNIFF_BYTES]):
        raise UnreadableFile(path, "binary", "binary content")
    try:
        return data.decode("utf-8-sig")  # plain UTF-8, with or without a byte-order mark
    except UnicodeDecodeError:
        pass
    # Latin-1 decodes any bytes at all, so use it only for what still looks like text as a whole: this keeps a
    # file with a text header and a binary body out.
    if not looks_like_text(data):
        raise UnreadableFile(path, "not text", "not valid UTF-8 and not plain text")
    return data.decode("latin-1")



# --- readers, one per format ----------------------------------------------------------------------------------

MAX_FILE_BYTES = 256 << 20    # larger files (or .gz contents) are refused: nobody's notes are this big
MAX_LINE_CHARS = 100_000      # a longer line is minified code or a data dump, not something to answer from


def _checked(text: Text) -> Text:
    if not text.text.strip():
        raise UnreadableFile(text.path, "empty")
    if text.pages is None:
        bounds = list(text.line_starts) + [len(text.text) + 1]
        longest = max(b - a - 1 for a, b in zip(bounds, bounds[1:]))
        if longest > MAX_LINE_CHARS:
            raise UnreadableFile(text.path, "long lines", f"has a line of {longest:,} characters (minified or generated?)")
    return text


def _read_plain(path: str, data: bytes) -> Text:
    """Plain text, markup and source code: the text as it is."""
    return make_text(path, _decode(path, data))


def _read_html(path: str, data: bytes) -> Text:
    """The visible text; each piece is cited by the line of the HTML file it came from."""
    from .html import DamagedHTML, visible_text

    source = _decode(path, data)
    try:
        text, marks = visible_text(source)
    except DamagedHTML as exc:
        raise UnreadableFile(path, "damaged HTML", f"damaged HTML ({exc})") from None
    if not text and source.strip():
        # Not "empty" (quiet): the file has content, and a page whose text we drop entirely deserves a look.
        raise UnreadableFile(path, "HTML without text",
                             "HTML without visible text (only navigation, scripts or markup?)")
    # line_starts[n - 1] = offset of the first text that comes from source line n or later, so that
    # line_at(offset) gives the source line of the text at offset.
    last_line = marks[-1][1] if marks else 1
    starts, i = [], 0
    for line in range(1, last_line + 1):
        while i < len(marks) and marks[i][1] < line:
            i += 1
        starts.append(marks[i][0] if i < len(marks) else len(text))
    starts[0] = 0
    return Text(path=path, text=text, line_starts=tuple(starts))


# pypdf reports recoverable damage through logging; a skipped or repaired file gets our one line instead.
logging.getLogger("pypdf").setLevel(logging.CRITICAL)


def _read_pdf(path: str, data: bytes) -> Text:
    """Each page's text, pages separated by a blank line so that no paragraph spans two pages."""
    import pypdf
    from pypdf.errors import DependencyError, FileNotDecryptedError, PyPdfError

    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            # Many PDFs are encrypted only against editing, with an empty password for reading.
            if not reader.decrypt(""):
                raise UnreadableFile(path, "encrypted PDF", "encrypted PDF (needs a password)")
        pages = [page.extract_text() or "" for page in reader.pages]
    except UnreadableFile:
        raise
    except (FileNotDecryptedError, DependencyError):
        raise UnreadableFile(path, "encrypted PDF", "encrypted PDF that cannot be opened") from None
    except (PyPdfError, ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError,
            AssertionError, OverflowError, zlib.error) as exc:
        # pypdf raises many kinds for damaged files (PyPdfError covers PdfReadError and LimitReachedError, its
        # refusal of a decompression bomb); the user needs one line.
        raise UnreadableFile(path, "damaged PDF", f"damaged PDF ({type(exc).__name__})") from None
    if not any(p.strip() for p in pages):
        raise UnreadableFile(path, "PDF without text", "PDF without text (scanned images?)")
    text, starts, offset = [], [], 0
    for page in pages:
        page = page.replace("\r\n", "\n").replace("\r", "\n").strip("\n") + "\n\n"
        starts.append(offset)
        text.append(page)
        offset += len(page)
    plain = make_text(path, "".join(text))
    return Text(path=path, text=plain.text, line_starts=plain.line_starts, pages=tuple(starts))


def _read_gzip(path: str, data: bytes) -> Text:
    """A gzipped file of any other format, read by the reader for its inner name (notes.md.gz -> .md)."""
    inner = _reader_for(Path(path).with_suffix(""))
    if inner is None or inner is _read_gzip:
        raise UnreadableFile(path, "unsupported type", "unsupported file type inside .gz")
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
            content = f.read(MAX_FILE_BYTES + 1)
    except (OSError, EOFError, zlib.error):
        raise UnreadableFile(path, "damaged .gz") from None
    if len(content) > MAX_FILE_BYTES:
        raise UnreadableFile(path, "too large", f"larger than {MAX_FILE_BYTES >> 20} MB uncompressed")
    return inner(path, content)


_PLAIN_SUFFIXES = (
    ".txt .text .md .markdown .rst .adoc .asciidoc .org .tex .bib .csv .tsv .log "
    ".py .pyi .ipynb .js .jsx .mjs .ts .tsx .c .h .cc .cpp .cxx .hh .hpp .cs .java .kt .kts .scala .go .rs .rb "
    ".php .pl .pm .lua .r .jl .swift .m .mm .hs .ml .ex .exs .erl .clj .el .vim .sql .sh .bash .zsh .fish .ps1 "
    ".css .scss .xml .toml .yaml .yml .json .cfg .ini .conf .properties .proto .graphql .dockerfile .cmake .mk"
).split()
_READERS: dict[str, Callable[[str, bytes], Text]] = {
    **{suffix: _read_plain for suffix in _PLAIN_SUFFIXES},
    ".html": _read_html, ".htm": _read_html, ".xhtml": _read_html,
    ".pdf": _read_pdf,
    ".gz": _read_gzip,
}
SUPPORTED_SUFFIXES = frozenset(_READERS)


def _reader_for(path: Path) -> Callable[[str, bytes], Text] | None:
    suffix = path.suffix.lower()
    if suffix == "":
        # README, LICENSE, Makefile...: read as plain text, and the sniff rejects binaries.
        return _read_plain
    if suffix == ".gz" and _reader_for(path.with_suffix("")) in (None, _read_gzip):
        return None   # an archive of something we cannot read (.tar.gz, .bin.gz)
    return _READERS.get(suffix)


def is_supported(path: Path) -> bool:
    """True if some reader handles files with this name (the content may still turn out unreadable)."""
    return _reader_for(path) is not None


def lines_are_newlines(path: Path) -> bool:
    """True when the reader's text has the file's own lines, so that a passage's newlines count its lines: every
    format but HTML, whose text is the visible text cited by the HTML source's lines (a .gz as what it holds)."""
    reader = _reader_for(path)
    if reader is _read_gzip:
        reader = _reader_for(path.with_suffix(""))
    return reader is not _read_html


def read_bytes(path: Path) -> bytes:
    """A regular file's bytes; UnreadableFile if it cannot be read, is not a regular file or is too large."""
    try:
        # O_NONBLOCK: opening a FIFO would otherwise wait forever for a writer. It does not change how a
        # regular file reads.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise UnreadableFile(path, UNKNOWN, f"cannot be read ({exc.strerror or exc})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnreadableFile(path, "not a file", "not a regular file (a pipe, socket or device)")
        with open(fd, "rb", closefd=False) as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise UnreadableFile(path, UNKNOWN, f"cannot be read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:
        raise UnreadableFile(path, "too large", f"larger than {MAX_FILE_BYTES >> 20} MB")
    return data


def parse(path: Path, data: bytes) -> Text:
    """Turn a file's bytes into a `Text` with the reader for its name; UnreadableFile says why it cannot."""
    reader = _reader_for(path)
    if reader is None:
        raise UnreadableFile(path, "unsupported type", f"unsupported file type '{path.suffix}'")
    return _checked(reader(str(path), data))


def read_file(path: Path) -> Text:
    """Read and parse one file."""
    return parse(path, read_bytes(path))
