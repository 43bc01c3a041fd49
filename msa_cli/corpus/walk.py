"""Walking the folders a user ingests: which files to read, and which to skip and why.

Skipped without a word: hidden files and folders (which covers .git, .hg, .svn, .venv), virtualenvs of any name
(a pyvenv.cfg inside) and conda environments, node_modules, __pycache__, and whatever a `.msaignore` matches. A `.msaignore` holds
gitignore-style patterns and applies to the folder it sits in and everything below it, like a .gitignore.
Symbolic links are followed; a link back into a folder already being read (a loop) or to a folder already read
is skipped with a warning, as are broken links. Files no reader supports are skipped and counted.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pathspec

from .readers import UnreadableFile, is_supported

IGNORE_FILE = ".msaignore"
_SKIPPED_DIRS = frozenset({"node_modules", "__pycache__"})


@dataclass(frozen=True)
class _Rules:
    base: Path
    spec: pathspec.GitIgnoreSpec


def walk(root: Path) -> Iterator[Path | UnreadableFile]:
    """The files under `root` to read, in a fixed (sorted) order, and an UnreadableFile for each one skipped with a
    reason. `root` may be a file. Paths keep the form of `root`."""
    if not root.is_dir():
        yield root if is_supported(root) else UnreadableFile(root, "unsupported type",
                                                            f"unsupported file type '{root.suffix}'")
        return
    st = root.stat()
    yield from _walk(root, [], {(st.st_dev, st.st_ino)})


def _walk(directory: Path, rules: list[_Rules], seen: set) -> Iterator[Path | UnreadableFile]:
    rules = rules + _read_rules(directory)
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as exc:
        yield UnreadableFile(directory, "unreadable", f"folder cannot be listed ({exc.strerror or exc})")
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
                yield UnreadableFile(path, "unreadable", f"cannot be read ({exc.strerror or exc})")
            continue
        if os.path.isdir(path):
            if _ignored(path, True, rules) or entry.name in _SKIPPED_DIRS or _is_environment(path):
                continue
            key = (st.st_dev, st.st_ino)
            if key in seen:
                yield UnreadableFile(path, "link loop", "symbolic link to a folder already read (a loop?)")
                continue
            seen.add(key)
            yield from _walk(path, rules, seen)
        elif os.path.isfile(path) and not _ignored(path, False, rules):
            if is_supported(path):
                yield path
            else:
                yield UnreadableFile(path, "unsupported type", f"unsupported file type '{path.suffix}'")
        # Sockets, fifos and devices are not documents: passed over in silence.


def _is_environment(directory: Path) -> bool:
    """A Python virtualenv (of any name) or a conda environment: installed packages, not the user's documents."""
    return (directory / "pyvenv.cfg").is_file() or (directory / "conda-meta").is_dir()


def _read_rules(directory: Path) -> list[_Rules]:
    try:
        lines = (directory / IGNORE_FILE).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    return [_Rules(directory, pathspec.GitIgnoreSpec.from_lines(lines))]


def _ignored(path: Path, is_dir: bool, rules: list[_Rules]) -> bool:
    for r in rules:
        relative = path.relative_to(r.base).as_posix() + ("/" if is_dir else "")
        if r.spec.match_file(relative):
            return True
    return False
