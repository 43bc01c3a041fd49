"""BM25 over documents' text: the lexical half of the default router's fusion (engine.route).

bm25s (a maintained BM25 library) over each document's text, as lowercase words without English stop words.
This module knows indexes, not banks: it builds one from texts and ids, and saves, loads and checks one in a
directory. The bank owns its index (Bank.lexical, and the refresh its writers do when they release the lock):
saved in the bank under lexical/<key>, key = a hash of the indexed ids, so it is rebuilt only after the bank
changes. It is a cache: a saved index is used only if every file is what its writer recorded in files.json
(size and sha256), else readers build their own and the next writer replaces it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..faults import crash_point
from .format import Damaged, file_record, json_object

DIRECTORY = "lexical"      # in the bank
FILES = "files.json"       # name -> {size, sha256} of every other file of a saved index, written last


class LexicalIndex:
    def __init__(self, retriever, doc_ids: Tensor, stopwords: str = "en"):
        self.retriever = retriever
        self.doc_ids = doc_ids            # ascending: row i of the index is document doc_ids[i]
        self.stopwords = stopwords        # bm25s' name of the list: "en" (Lucene's 33) or "en_plus" (NLTK's 179)

    @classmethod
    def build(cls, texts: list[str], doc_ids: list[int], stopwords: str = "en") -> "LexicalIndex":
        bm25s = _bm25s()

        retriever = bm25s.BM25()
        if texts:
            retriever.index(tokenize(texts, stopwords=stopwords), show_progress=False)
        return cls(retriever, torch.tensor(doc_ids, dtype=torch.long), stopwords)

    def scores(self, text: str) -> Tensor:
        """BM25 score of every document for `text`, in doc_ids order (fp32)."""
        if self.doc_ids.numel() == 0:
            return torch.zeros(0)
        vocab = self.retriever.vocab_dict
        words = [w for w in tokenize([text], ids=False, stopwords=self.stopwords)[0] if w in vocab]
        if not words:
            return torch.zeros(self.doc_ids.shape[0])
        return torch.from_numpy(np.asarray(self.retriever.get_scores(words), dtype=np.float32))

    def rare_word(self) -> float:
        """The IDF of a word found in one document (bm25s' default, Lucene's: log(1 + (N - df + 0.5) / (df + 0.5))).
        BM25 scores grow with the log of the bank's size; divided by this they count rare-word matches, which
        mean the same in a bank of ten documents or a million."""
        n = self.doc_ids.numel()
        return float(np.log(1 + (n - 0.5) / 1.5)) if n > 1 else 1.0


def tokenize(texts: list[str], ids: bool = True, stopwords: str = "en"):
    bm25s = _bm25s()

    return bm25s.tokenize(texts, stopwords=stopwords, show_progress=False, return_ids=ids)


def _key(doc_ids: list[int]) -> str:
    return hashlib.sha256(np.array(doc_ids, dtype=np.int64).tobytes()).hexdigest()[:16]


def saved(root: Path, doc_ids: list[int]) -> LexicalIndex | None:
    """The index saved under `root` for exactly the documents `doc_ids` (ascending), or None if there is none
    or it is not what its writer saved."""
    try:
        return _load(root / _key(doc_ids), doc_ids)
    except Exception:   # none saved, damaged, or replaced by a writer while we read: a cache, so build our own
        return None


def _load(path: Path, doc_ids: list[int]) -> LexicalIndex:
    """The index saved at `path`, if it is exactly what a writer saved for the documents `doc_ids`; raises
    otherwise (Damaged naming the file, or whatever reading it raised)."""
    bm25s = _bm25s()

    _check_files(path)
    ids = np.load(path / "doc_ids.npy", allow_pickle=False)
    if ids.tolist() != doc_ids:
        raise Damaged(path / "doc_ids.npy", "indexes other documents than the bank's live ones")
    return LexicalIndex(bm25s.BM25.load(path, show_progress=False), torch.from_numpy(ids))


def _check_files(path: Path) -> None:
    # Hashed, not just sized: bm25s trusts its arrays (a flipped index would fail scoring, not loading).
    recorded = json_object(path / FILES, (path / FILES).read_bytes(), "the list of files")
    present = {f.name for f in path.iterdir()} - {FILES}
    if present != set(recorded):
        raise Damaged(path / FILES, f"lists {sorted(recorded)}, the index holds {sorted(present)}")
    for name, record in recorded.items():
        if file_record(path / name) != record:
            raise Damaged(path / name, f"size or sha256 differs from what its writer recorded in {FILES}")


def save(root: Path, index: LexicalIndex) -> None:
    """Write the index under `root` into a temporary directory and rename it into place: a reader sees all of it
    or none. The caller holds the bank's lock. No fsync: after a power loss a damaged index fails its hashes,
    and is rebuilt like any other."""
    key = _key(index.doc_ids.tolist())
    tmp = root / f".{key}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    index.retriever.save(tmp, show_progress=False)
    np.save(tmp / "doc_ids.npy", index.doc_ids.numpy())
    records = {f.name: file_record(f) for f in sorted(tmp.iterdir())}
    (tmp / FILES).write_text(json.dumps(records, indent=1), encoding="utf-8")
    crash_point("lexical:tmp-written")
    shutil.rmtree(root / key, ignore_errors=True)   # a damaged index of these documents: rename needs room
    os.replace(tmp, root / key)
    crash_point("lexical:renamed")


def remove_others(root: Path, doc_ids: list[int]) -> None:
    """Delete every saved index under `root` but the one of `doc_ids`. The caller holds the bank's lock."""
    key = _key(doc_ids)
    for old in root.iterdir() if root.is_dir() else []:
        if old.name != key:
            shutil.rmtree(old, ignore_errors=True)


def check_saved(root: Path, doc_ids: list[int]) -> tuple[list[str], list[str]]:
    """For `msa check`: (problems, notes) of the indexes saved under `root` (a bank's lexical directory), whose
    live documents are `doc_ids`. Files are named relative to the bank."""
    if not root.is_dir():
        return [], []
    key = _key(doc_ids)
    problems, notes = [], []
    for path in sorted(root.iterdir()):
        name = f"{root.name}/{path.name}"
        if path.name != key:
            notes.append(f"{name}: not the index of the current documents (the next writer removes it)")
        elif not (path / FILES).is_file():
            notes.append(f"{name}: saved without {FILES} (by an older msa): readers build their own index "
                         f"until the next writer replaces it")
        else:
            try:
                _load(path, doc_ids)
            except Damaged as e:
                problems.append(f"{e.where(root.parent)}; readers build their own index, the next writer replaces it")
            except Exception as e:   # whatever else reading it raised: the cache is unusable
                problems.append(f"{name}: unusable ({type(e).__name__}: {e}); readers build their own index, "
                                f"the next writer replaces it")
    return problems, notes


Stats = tuple[float, float]   # mean and standard deviation of a score over the bank's documents


def stats(s: Tensor) -> Stats:
    return (float(s.mean()), float(s.std())) if s.numel() > 1 else (0.0, 0.0)


def fused(router: Tensor, bm25: Tensor, weight: float, router_stats: Stats | None = None,
          bm25_stats: Stats | None = None) -> Tensor:
    """weight * z(router) + (1 - weight) * z(bm25), z standardising each over the bank's documents: their scales
    differ (cosines vs. unbounded BM25 sums), and a question with no known word gives BM25 all zeros (z = 0).
    The statistics are those of the scores given, unless given (when only some documents were scored)."""
    def z(s: Tensor, over: Stats | None) -> Tensor:
        mean, std = over or stats(s)
        return (s - mean) / max(std, 1e-6) if std > 0 else torch.zeros_like(s)
    return weight * z(router.float(), router_stats) + (1 - weight) * z(bm25.float(), bm25_stats)


def _bm25s():
    """bm25s, imported when first needed (it is slow to import), its logger quiet: it logs every build at DEBUG,
    which a log handler (msa mcp's) would print."""
    import bm25s

    logging.getLogger("bm25s").setLevel(logging.ERROR)
    return bm25s
