"""Walking the folders a user ingests: which files to read, and which to skip and why.

Skipped without a word: hidden files and folders (which covers .git, .hg, .svn, .venv), virtualenvs of any name
(a pyvenv.cfg inside) and conda environments, node_modules, __pycache__, the bank's own folder, and whatever a
`.msaignore` matches. A `.msaignore` holds gitignore-style patterns and applies to the folder it sits in and
everything below it, like a .gitignore, whichever folder below it the user names: ingesting `notes/sub` obeys
`notes/.msaignore`, so that a later ingest of `notes` finds the same files.
Symbolic links are followed; a link back into a folder already being read (a loop) or to a folder already read
is skipped with a warning, as are broken links. A file reached by several paths (a link to it, a hard link) is
read once, by its path without links when it has one. Files no reader supports are skipped and counted.

What could not be looked at (a folder that cannot be listed, an entry whose stat fails with anything but "no such
file") is *unknown*, not gone: it is reported with kind UNKNOWN, and ingest keeps what the bank holds from it.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pathspec

from .readers import UNKNOWN, UnreadableFile, is_supported

IGNORE_FILE = ".msaignore"
_SKIPPED_DIRS = frozenset({"node_modules", "__pycache__"})


@dataclass(frozen=True)
class _Rules:
    base: str                  # absolute folder holding the .msaignore
    spec: pathspec.GitIgnoreSpec


def unique_files(roots: Iterable[Path], exclude: Iterable[Path] = ()) -> list[tuple[Path, Path | UnreadableFile]]:
    """(root, item) for every root's walk, with each file once: where several paths reach one file (same device
    and inode), the first path without a symbolic link in it is kept, else the first path."""
    items: list[tuple[Path, Path | UnreadableFile]] = []
    where: dict[tuple[int, int], int] = {}     # file identity -> index of its path in items
    for root in roots:
        for item in walk(root, exclude):
            if isinstance(item, Path):
                try:
                    st = os.stat(item)
                except OSError:
                    pass   # gone or unreadable since the walk looked: reading it will say which
                else:
                    key = (st.st_dev, st.st_ino)
                    if key in where:
                        first = where[key]
                        if _has_link(items[first][1]) and not _has_link(item):
                            items[first] = (root, item)
                        continue
                    where[key] = len(items)
            items.append((root, item))
    return items


def walk(root: Path, exclude: Iterable[Path] = ()) -> Iterator[Path | UnreadableFile]:
    """The files under `root` to read, in a fixed (sorted) order, and an UnreadableFile for each one skipped with a
    reason. `root` may be a file. Paths keep the form of `root`. Folders in `exclude` are passed over."""
    excluded = frozenset(os.path.abspath(p) for p in exclude)
    rules = _ancestor_rules(root)
    try:
        st = os.stat(root)
    except OSError as exc:
        yield UnreadableFile(root, UNKNOWN, f"cannot be looked at ({exc.strerror or exc})")
        return
    is_dir = stat.S_ISDIR(st.st_mode)
    ignored_by = _ignored(root, is_dir, rules)
    if ignored_by:
        yield UnreadableFile(root, "ignored", f"ignored by {ignored_by}")
    elif is_dir:
        if os.path.abspath(root) not in excluded:
            yield from _walk(root, rules, {(st.st_dev, st.st_ino)}, excluded)
    elif not stat.S_ISREG(st.st_mode):
        yield UnreadableFile(root, "not a file", "not a regular file (a pipe, socket or device)")
    else:
        yield _document(root)


def _walk(directory: Path, rules: list[_Rules], seen: set, excluded: frozenset) -> Iterator[Path | UnreadableFile]:
    rules = rules + _read_rules(directory)
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as exc:
        yield UnreadableFile(directory, UNKNOWN, f"folder cannot be listed ({exc.strerror or exc})")
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        path = Path(directory, entry.name)
        try:
            st = os.stat(path)  # follows links
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                yield UnreadableFile(path, "link loop", "symbolic link loop")
            elif exc.errno == errno.ENOENT and entry.is_symlink():
                yield UnreadableFile(path, "broken link", "broken symbolic link")
            elif exc.errno != errno.ENOENT:   # a file deleted while we walk is simply gone
                yield UnreadableFile(path, UNKNOWN, f"cannot be looked at ({exc.strerror or exc})")
            continue
        if stat.S_ISDIR(st.st_mode):
            if (_ignored(path, True, rules) or entry.name in _SKIPPED_DIRS or _is_environment(path)
                    or os.path.abspath(path) in excluded):
                continue
            key = (st.st_dev, st.st_ino)
            if key in seen:
                yield UnreadableFile(path, "link loop", "symbolic link to a folder already read (a loop?)")
                continue
            seen.add(key)
            yield from _walk(path, rules, seen, excluded)
        elif stat.S_ISREG(st.st_mode) and not _ignored(path, False, rules):
            yield _document(path)
        # Sockets, fifos and devices inside a folder are not documents: passed over in silence.


def _document(path: Path) -> Path | UnreadableFile:
    """A regular file, not ignored: a document if a reader knows its type."""
    return path if is_supported(path) else UnreadableFile(path, "unsupported type",
                                                          f"unsupported file type '{path.suffix}'")


def _is_environment(directory: Path) -> bool:
    """A Python virtualenv (of any name) or a conda environment: installed packages, not the user's documents.
    os.path answers False where it cannot look (an unreadable folder), and the walk then reports the folder."""
    return os.path.isfile(directory / "pyvenv.cfg") or os.path.isdir(directory / "conda-meta")


def _has_link(path: Path) -> bool:
    return os.path.realpath(path) != os.path.abspath(path)


def _ancestor_rules(root: Path) -> list[_Rules]:
    """The .msaignore rules of every folder above `root`, outermost first."""
    rules: list[_Rules] = []
    for folder in reversed(Path(os.path.abspath(root)).parents):
        rules += _read_rules(folder)
    return rules


def _read_rules(directory: Path) -> list[_Rules]:
    try:
        lines = (directory / IGNORE_FILE).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    return [_Rules(os.path.abspath(directory), pathspec.GitIgnoreSpec.from_lines(lines))]


def _ignored(path: Path, is_dir: bool, rules: list[_Rules]) -> str | None:
    """The .msaignore that matches `path`, if any."""
    absolute = os.path.abspath(path)
    for r in rules:
        relative = os.path.relpath(absolute, r.base)
        if relative == "." or relative.startswith(".."):
            continue
        if r.spec.match_file(Path(relative).as_posix() + ("/" if is_dir else "")):
            return os.path.join(r.base, IGNORE_FILE)
    return None
