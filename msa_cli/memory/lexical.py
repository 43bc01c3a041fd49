"""BM25 over a bank's documents: the lexical half of the default router's fusion (engine.route).

bm25s (a maintained BM25 library) over each document's stored text, as lowercase words without English stop
words. The index is saved inside the bank (lexical/<key>, key = a hash of the live document ids), so it is
rebuilt only after the bank changes: writers build it when they finish (ingest, forget), and a reader that
finds none for its snapshot builds its own in memory.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil

import numpy as np
import torch
from torch import Tensor

from .bank import Bank

DIRECTORY = "lexical"


class LexicalIndex:
    def __init__(self, retriever, doc_ids: Tensor):
        self.retriever = retriever
        self.doc_ids = doc_ids            # ascending: row i of the index is document doc_ids[i]

    @classmethod
    def build(cls, texts: list[str], doc_ids: list[int]) -> "LexicalIndex":
        import bm25s

        retriever = bm25s.BM25()
        if texts:
            retriever.index(tokenize(texts), show_progress=False)
        return cls(retriever, torch.tensor(doc_ids, dtype=torch.long))

    def scores(self, text: str) -> Tensor:
        """BM25 score of every document for `text`, in doc_ids order (fp32)."""
        if self.doc_ids.numel() == 0:
            return torch.zeros(0)
        vocab = self.retriever.vocab_dict
        words = [w for w in tokenize([text], ids=False)[0] if w in vocab]
        if not words:
            return torch.zeros(self.doc_ids.shape[0])
        return torch.from_numpy(np.asarray(self.retriever.get_scores(words), dtype=np.float32))

    def rare_word(self) -> float:
        """The IDF of a word found in one document (bm25s' default, Lucene's: log(1 + (N - df + 0.5) / (df + 0.5))).
        BM25 scores grow with the log of the bank's size; divided by this they count rare-word matches, which
        mean the same in a bank of ten documents or a million."""
        n = self.doc_ids.numel()
        return float(np.log(1 + (n - 0.5) / 1.5)) if n > 1 else 1.0


def tokenize(texts: list[str], ids: bool = True):
    import bm25s

    return bm25s.tokenize(texts, stopwords="en", show_progress=False, return_ids=ids)


def _key(bank: Bank) -> str:
    ids = np.array(sorted(d.doc_id for d in bank.documents()), dtype=np.int64)
    return hashlib.sha256(ids.tobytes()).hexdigest()[:16]


def for_bank(bank: Bank) -> LexicalIndex:
    """The bank's saved index for its current documents, else one built in memory."""
    import bm25s

    path = bank.path / DIRECTORY / _key(bank)
    if path.is_dir():
        try:
            logging.getLogger("bm25s").setLevel(logging.ERROR)
            retriever = bm25s.BM25.load(path, show_progress=False)
            return LexicalIndex(retriever, torch.from_numpy(np.load(path / "doc_ids.npy")))
        except (OSError, ValueError, KeyError):
            pass   # a writer replaced it while we read: build our own
    return _build(bank)


def _build(bank: Bank) -> LexicalIndex:
    docs = sorted(bank.documents(), key=lambda d: d.doc_id)
    return LexicalIndex.build([d.text for d in docs], [d.doc_id for d in docs])


def save_for_bank(bank: Bank) -> None:
    """Build and save the index of the bank's current documents, removing older ones. The caller holds the
    bank's lock (and has committed)."""
    root = bank.path / DIRECTORY
    key = _key(bank)
    if not (root / key).is_dir():
        index = _build(bank)
        tmp = root / f".{key}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        index.retriever.save(tmp, show_progress=False)
        np.save(tmp / "doc_ids.npy", index.doc_ids.numpy())
        os.replace(tmp, root / key)
    for old in root.iterdir():
        if old.name != key:
            shutil.rmtree(old, ignore_errors=True)


def fused(router: Tensor, bm25: Tensor, weight: float) -> Tensor:
    """weight * z(router) + (1 - weight) * z(bm25), z standardising each over the documents: their scales differ
    (cosines vs. unbounded BM25 sums), and a question with no known word gives BM25 all zeros (z = 0)."""
    def z(s: Tensor) -> Tensor:
        return (s - s.mean()) / s.std().clamp(min=1e-6) if s.numel() > 1 else torch.zeros_like(s)
    return weight * z(router.float()) + (1 - weight) * z(bm25.float())
