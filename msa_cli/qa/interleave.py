"""Memory Interleave (MSA §4): retrieval in hops, for questions whose evidence is scattered.

Hop 1 routes on the question. Each later hop routes on the question plus the text just read (the best document
the previous hop added), so a document that names what the question only implies (a bridge entity: "the
association which published the journal") can pull in the next one. Hops stop when no new document is relevant,
or when the hop budget is spent. MSA's trained model decides for itself when to stop retrieving
(`<End-of-Retrieve>`); a model never trained for that gets a relevance test instead.

When nothing found at hop 1 is relevant, nothing in memory is: the caller abstains rather than let the model
invent an answer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..memory.search import Hit

READ_BACK = 1   # documents of the previous hop whose text a later hop routes on


@dataclass(frozen=True)
class Relevance:
    """Relevant = BM25 finds the routed text's words in the document, or the router matches it, well above what
    unrelated text reaches. Raw scores, not the fused ranking score: that one is standardised over the bank, so
    its scale moves with the bank's size and make-up, while these mean the same in any bank (BENCHMARKS.md has
    the calibration). `router` is None for a router with no calibrated threshold: BM25 alone decides."""
    bm25: float
    router: float | None = None

    def __call__(self, hit: Hit) -> bool:
        return hit.bm25 >= self.bm25 or (self.router is not None and hit.router >= self.router)


@dataclass
class Hop:
    routing_text: str
    selected: list[int]          # doc ids this hop added, best first
    scores: list[float]
    best: float | None           # the best new document's score, selected or not (None: nothing new to find)
    layers: dict[int, list[int]] | None = None   # an MSA checkpoint's round: each router layer's own top-k


@dataclass
class Retrieval:
    hits: list[Hit] = field(default_factory=list)     # documents to read: by hop, then by score
    hop_of: list[int] = field(default_factory=list)   # the (1-based) hop that found each hit
    hops: list[Hop] = field(default_factory=list)

    @property
    def abstained(self) -> bool:
        return not self.hits


def retrieve(route: Callable[[str, int], list[Hit]], question: str, k: int, max_hops: int,
             relevant: Callable[[Hit], bool], abstain: bool = True,
             read_back: Callable[[Hit], str] = lambda hit: hit.document.text) -> Retrieval:
    """Route in up to `max_hops` hops. Hop 1 reads the k best documents when any of them is relevant (else
    nothing: abstain; with abstain=False, whatever it finds); a later hop adds the relevant ones among its k best
    new documents, at most k // 2 of them: more would crowd the model's context for little (BENCHMARKS.md).
    A later hop routes on the question plus `read_back` of the best document just added (its whole text, or
    the sentences of it that bear on the question: qa/evidence.py)."""
    out = Retrieval()
    read: set[int] = set()
    text = question
    for hop in range(1, max_hops + 1):
        found = [h for h in route(text, k + len(read)) if h.document.doc_id not in read][:k]
        if hop == 1:
            chosen = found if not abstain or any(map(relevant, found)) else []
        else:
            chosen = [h for h in found if relevant(h)][:max(1, k // 2)]
        out.hops.append(Hop(text, [h.document.doc_id for h in chosen], [round(h.score, 4) for h in chosen],
                            round(found[0].score, 4) if found else None))
        if not chosen:
            break
        out.hits += chosen
        out.hop_of += [hop] * len(chosen)
        read |= {h.document.doc_id for h in chosen}
        text = "\n\n".join([question, *(read_back(h) for h in chosen[:READ_BACK])])
    return out
