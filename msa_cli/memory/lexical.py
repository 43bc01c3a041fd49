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
        return rare_word(self.doc_ids.numel())


class TermCounts:
    """One shard's raw BM25 statistics (each word's term frequencies, each document's length), for BM25 over a
    sharded bank (msa_cli/parallel): its IDF and average length must be the whole bank's, which the ranks sum from
    these. Scores as LexicalIndex does, bm25s' defaults (Lucene's BM25, k1 1.5, b 0.75), in its float32."""

    K1, B = 1.5, 0.75

    def __init__(self, texts: list[str], stopwords: str = "en"):
        self.stopwords = stopwords
        tokenized = tokenize(texts, stopwords=stopwords) if texts else None
        self.vocab: dict[str, int] = dict(tokenized.vocab) if tokenized else {}
        ids = tokenized.ids if tokenized else []
        self.lengths = np.array([len(x) for x in ids], dtype=np.float64)          # [n] words per document
        n = max(len(ids), 1)
        # (word, document) pairs counted, sorted by word: word w's postings are rows[starts[w]:starts[w + 1]]
        words = np.concatenate([np.asarray(x, dtype=np.int64) for x in ids] + [np.zeros(0, dtype=np.int64)])
        docs = np.repeat(np.arange(len(ids), dtype=np.int64), [len(x) for x in ids])
        pairs, counts = np.unique(words * n + docs, return_counts=True)
        self.rows, self.tf = pairs % n, counts.astype(np.float32)
        self.starts = np.searchsorted(pairs // n, np.arange(len(self.vocab) + 1))

    def words(self, text: str) -> list[str]:
        """The words of `text` BM25 scores, repeats kept (bm25s counts a repeated query word again)."""
        return tokenize([text], ids=False, stopwords=self.stopwords)[0]

    def frequencies(self, words: list[str]) -> np.ndarray:
        """This shard's document frequency of each word [W] (float64, to be summed over the shards)."""
        return np.array([self.starts[c + 1] - self.starts[c] if (c := self.vocab.get(w)) is not None else 0
                         for w in words], dtype=np.float64)

    def scores(self, words: list[str], df: np.ndarray, n: int, avg_length: float) -> Tensor:
        """BM25 of this shard's documents for `words`, with the whole bank's document frequencies df [W], number
        of documents n and average length (fp32, in document order)."""
        out = np.zeros(self.lengths.shape[0], dtype=np.float32)
        for word, d in zip(words, df):
            c = self.vocab.get(word)
            if c is None or d == 0:
                continue
            idf = np.float32(np.log(1 + (n - d + 0.5) / (d + 0.5)))
            rows, tf = self.rows[self.starts[c]:self.starts[c + 1]], self.tf[self.starts[c]:self.starts[c + 1]]
            norm = self.K1 * ((1 - self.B) + self.B * self.lengths[rows] / avg_length)
            out[rows] += (idf * (tf / (norm + tf))).astype(np.float32)
        return torch.from_numpy(out)


def rare_word(n: int) -> float:
    """The IDF of a word found in one of n documents (bm25s' default, Lucene's: log(1 + (N - df + 0.5) / (df +
    0.5))). BM25 scores grow with the log of the bank's size; divided by this they count rare-word matches, which
    mean the same in a bank of ten documents or a million."""
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
