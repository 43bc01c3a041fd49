"""Which files an ingest reads: hidden folders, environments, .msaignore, links and loops."""

import os
from pathlib import Path

from msa_cli.corpus.readers import UnreadableFile
from msa_cli.corpus.walk import walk


def touch(root: Path, relative: str, content: str = "x\n") -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    return path


def split_walk(root):
    items = list(walk(root))
    files = [p.relative_to(root).as_posix() for p in items if isinstance(p, Path)]
    skipped = {Path(s.path).relative_to(root).as_posix(): s.kind for s in items if isinstance(s, UnreadableFile)}
    return files, skipped


def test_skips_hidden_vcs_environments_and_counts_other_types(tmp_path):
    for kept in ("README", "a.txt", "sub/b.md", "sub/deeper/c.py", "page.html", "book.pdf", "notes.md.gz"):
        touch(tmp_path, kept)
    for hidden in (".hidden.txt", ".git/config.txt", ".hg/x.txt", ".svn/x.txt", ".venv/lib/x.py",
                   "node_modules/pkg/index.js", "__pycache__/x.py"):
        touch(tmp_path, hidden)
    touch(tmp_path, "env-any-name/pyvenv.cfg", "home = /usr/bin\n")
    touch(tmp_path, "env-any-name/lib/x.py")
    touch(tmp_path, "conda-env/conda-meta/history", "")
    touch(tmp_path, "conda-env/lib/y.py")
    touch(tmp_path, "sub/photo.png")
    touch(tmp_path, "backup.tar.gz")

    files, skipped = split_walk(tmp_path)
    assert files == ["README", "a.txt", "book.pdf", "notes.md.gz", "page.html", "sub/b.md", "sub/deeper/c.py"]
    assert skipped == {"backup.tar.gz": "unsupported type", "sub/photo.png": "unsupported type"}
    assert split_walk(tmp_path) == (files, skipped), "the order is fixed"


def test_msaignore_patterns_apply_below_their_folder(tmp_path):
    for name in ("keep.md", "drafts/a.md", "notes/secret.txt", "notes/ok.txt", "notes/sub/secret.txt", "build/x.md"):
        touch(tmp_path, name)
    touch(tmp_path, ".msaignore", "# comment\ndrafts/\nbuild\n*.log\n")
    touch(tmp_path, "notes/.msaignore", "secret.txt\n")
    touch(tmp_path, "run.log")
    files, skipped = split_walk(tmp_path)
    assert files == ["keep.md", "notes/ok.txt"]
    assert skipped == {}


def test_links_are_followed_and_loops_skipped_with_a_reason(tmp_path):
    touch(tmp_path, "docs/a.txt")
    touch(tmp_path, "elsewhere/b.txt")
    os.symlink(".", tmp_path / "docs" / "loop")                         # back to a folder being read: a loop
    os.symlink(tmp_path / "elsewhere", tmp_path / "docs" / "linked")     # a folder outside: read through the link
    os.symlink("a.txt", tmp_path / "docs" / "same.txt")                  # a file link is read as a file
    os.symlink("nowhere.txt", tmp_path / "docs" / "broken.txt")
    os.symlink("self.txt", tmp_path / "docs" / "self.txt")               # a link to itself
    files, skipped = split_walk(tmp_path / "docs")
    assert files == ["a.txt", "linked/b.txt", "same.txt"]
    assert skipped == {"broken.txt": "broken link", "loop": "link loop", "self.txt": "link loop"}


def test_a_file_root_is_itself(tmp_path):
    one = touch(tmp_path, "one.txt")
    assert list(walk(one)) == [one]
    (skip,) = walk(touch(tmp_path, "image.png"))
    assert skip.kind == "unsupported type"
