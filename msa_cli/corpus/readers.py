"""Readers: turn a file into a `Text` (its text plus the map from character offsets to lines and pages).

One reader per format, chosen by file suffix in `_READERS`. A reader takes the path to show in citations and the
file's bytes, and returns a `Text`; formats added later (HTML, PDF, .gz) plug in there.
"""

import bisect
import codecs
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from msa_cli.errors import NOTHING_INGESTED, MsaError


class UnreadableFile(MsaError):
    """A file that cannot be turned into text: unsupported type, binary, undecodable or unreadable."""

    # When this reaches the CLI, the file was named on its own, so nothing was ingested.
    code = NOTHING_INGESTED

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


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
            raise UnreadableFile(path, "invalid UTF-16") from None
    if not looks_like_text(data[:SNIFF_BYTES]):
        raise UnreadableFile(path, "binary content")
    try:
        return data.decode("utf-8-sig")  # plain UTF-8, with or without a byte-order mark
    except UnicodeDecodeError:
        pass
    # Latin-1 decodes any bytes at all, so use it only for what still looks like text as a whole: this keeps a
    # file with a text header and a binary body out.
    if not looks_like_text(data):
        raise UnreadableFile(path, "not valid UTF-8 and not plain text")
    return data.decode("latin-1")


# --- readers, one per format ----------------------------------------------------------------------------------

def _read_plain(path: str, data: bytes) -> Text:
    """Plain text, markup and source code: the text as it is."""
    return make_text(path, _decode(path, data))


_PLAIN_SUFFIXES = (
    ".txt .md .markdown .rst "
    ".py .js .ts .c .h .cpp .hpp .java .go .rs .rb .sh "
    ".toml .yaml .yml .json .cfg .ini"
).split()
_READERS: dict[str, Callable[[str, bytes], Text]] = {suffix: _read_plain for suffix in _PLAIN_SUFFIXES}
SUPPORTED_SUFFIXES = frozenset(_READERS)


def _reader_for(path: Path) -> Callable[[str, bytes], Text] | None:
    suffix = path.suffix.lower()
    if suffix == "":
        # README, LICENSE, Makefile...: read as plain text, and the sniff rejects binaries.
        return _read_plain
    return _READERS.get(suffix)


def is_supported(path: Path) -> bool:
    """True if some reader handles files with this name (the content may still turn out unreadable)."""
    return _reader_for(path) is not None


def read_file(path: Path) -> Text:
    """Read one file into a `Text`; raises UnreadableFile with the reason when that is not possible."""
    shown = str(path)
    reader = _reader_for(path)
    if reader is None:
        raise UnreadableFile(shown, f"unsupported file type '{path.suffix}'")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UnreadableFile(shown, exc.strerror or str(exc)) from None
    return reader(shown, data)


# --- walking a folder -----------------------------------------------------------------------------------------

_SKIPPED_DIRS = frozenset({"node_modules", "__pycache__", "venv"})


def _skip_dir(parent: str, name: str) -> bool:
    # Hidden names cover .git, .hg, .svn and .venv; pyvenv.cfg marks a virtualenv of any name.
    return (
        name.startswith(".")
        or name in _SKIPPED_DIRS
        or os.path.isfile(os.path.join(parent, name, "pyvenv.cfg"))
    )


def iter_files(root: Path) -> Iterator[Path]:
    """The files under `root` that a reader supports, in a fixed order (`root` itself if it is a file).

    Skips hidden files and folders, version-control folders, virtualenvs, node_modules and __pycache__.
    Symlinked folders are not entered, so link loops cannot trap the walk; symlinked files are read.
    Paths keep the form of `root` (relative stays relative) because citations show them.
    """
    if root.is_file():
        yield root
        return
    if not root.is_dir():
        raise UnreadableFile(root, "no such file or folder")
    # os.walk skips folders it cannot list (permissions) rather than failing the whole walk.
    for parent, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(name for name in dirnames if not _skip_dir(parent, name))
        for name in sorted(filenames):
            path = Path(parent, name)
            # isfile drops broken links and anything that is not a regular file (sockets, fifos).
            if not name.startswith(".") and is_supported(path) and os.path.isfile(path):
                yield path
