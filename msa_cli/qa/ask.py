"""Answer a question from memory: Memory Interleave retrieval (stage 2, in hops), then generation over what was
read (stage 3), or an abstention when nothing in memory is relevant. `msa ask`, `msa chat` and `msa eval` all
answer through `ask`."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .. import settings
from ..engine import Engine
from ..errors import MsaError, USAGE
from .answer import memory_prompt, text_prompt
from .generative import ask_generative
from .interleave import Relevance, Retrieval, retrieve

ABSTENTION = "Nothing in memory is relevant to this question, so I cannot answer it from memory."


@dataclass
class Options:
    top_k: int = settings.TOP_K
    hops: int = settings.HOPS
    max_tokens: int = 200
    abstain: bool = True          # False: read the k best even when none is relevant
    context: str = "text"         # "text": read the documents' original text; "pooled": their pooled K/V


@dataclass
class Answer:
    question: str
    text: str
    retrieval: Retrieval
    read: int                     # how many of the retrieved documents the model read (the rest did not fit)
    tokens: int                   # generated tokens
    timings: dict = field(default_factory=dict)
    abstained: bool = False       # nothing in memory was relevant: text is the abstention

    def sources(self) -> list[dict]:
        """The documents the model read, numbered as in its prompt: what `[n]` in the answer refers to."""
        r = self.retrieval
        return [{"n": n, "path": h.document.source, **h.document.span, "doc_id": h.document.doc_id,
                 "score": round(h.score, 4), "hop": hop}
                for n, (h, hop) in enumerate(zip(r.hits[:self.read], r.hop_of), 1)]

    def to_json(self, engine: Engine) -> dict:
        return {"question": self.question, "answer": self.text, "abstained": self.abstained,
                "sources": self.sources(),
                "hops": [{"routing_text": h.routing_text, "selected": h.selected, "scores": h.scores, "best": h.best,
                          **({"layers": h.layers} if h.layers is not None else {})}
                         for h in self.retrieval.hops],
                "model": engine.model.identity["name"], "router": engine.router.spec.describe(),
                "timings": self.timings, "tokens": self.tokens}


def ask(engine: Engine, question: str, opts: Options, on_token: Callable[[int], None] | None = None) -> Answer:
    """Route in hops, then generate greedily over the documents read (on_token sees each generated token)."""
    question = question.strip()
    if not question:
        raise MsaError("the question is empty", USAGE)
    if engine.mode.generative:   # an MSA checkpoint retrieves by itself, naming documents (qa/generative.py)
        text, retrieval, tokens, seconds = ask_generative(engine, question, opts.hops, opts.max_tokens, on_token)
        return Answer(question, text, retrieval, read=len(retrieval.hits), tokens=tokens,
                      timings={"total_ms": ms(seconds)})
    t0 = time.perf_counter()
    retrieval = retrieve(engine.route, question, opts.top_k, opts.hops, relevance(engine), opts.abstain)
    return answer_from(engine, question, retrieval, opts, t0, on_token)


def answer_from(engine: Engine, question: str, retrieval: Retrieval, opts: Options, t0: float,
                on_token: Callable[[int], None] | None = None) -> Answer:
    """Generation over what a retrieval found (started at perf_counter t0), or the abstention when it found
    nothing. `msa eval` feeds its baselines' retrievals through here too: same prompt, same generator."""
    t1 = time.perf_counter()
    timings = {"route_ms": ms(t1 - t0)}
    if retrieval.abstained:
        return Answer(question, ABSTENTION, retrieval, read=0, tokens=0, timings={**timings, "total_ms": ms(t1 - t0)},
                      abstained=True)

    first: list[float] = []

    def seen(token: int) -> None:
        if not first:
            first.append(time.perf_counter())
        if on_token:
            on_token(token)

    tok = engine.model.tokenizer
    if opts.context == "pooled":
        read = len(retrieval.hits)
        out = engine.generate_over_memory(memory_prompt(tok, question), retrieval.hits, opts.max_tokens, seen)
    else:
        prompt, read = fitted_prompt(tok, question, retrieval, engine.model.backbone.cfg.max_positions - opts.max_tokens)
        out = engine.generate(prompt, opts.max_tokens, seen)
    t2 = time.perf_counter()
    timings |= {"first_token_ms": ms((first[0] if first else t2) - t0), "generate_ms": ms(t2 - t1),
                "total_ms": ms(t2 - t0)}
    return Answer(question, tok.decode(out, skip_special_tokens=True).strip(), retrieval, read, len(out), timings)


def reading_budget(opts: Options) -> int:
    """How many documents `ask` reads at most: k at hop 1, then k // 2 (at least 1) per later hop."""
    return opts.top_k + (opts.hops - 1) * max(1, opts.top_k // 2)


def relevance(engine: Engine) -> Relevance:
    """The relevance test for the engine's router, with the threshold calibrated for it when it has one."""
    return Relevance(settings.RELEVANT_BM25, engine.router.spec.relevant)


def fitted_prompt(tokenizer, question: str, retrieval: Retrieval, budget: int) -> tuple[list[int], int]:
    """The prompt with as many of the retrieved documents as fit `budget` tokens, in retrieval order (hop 1's best
    first): the model's context is finite, the memory is not."""
    docs = [h.document for h in retrieval.hits]
    # Start from the documents whose own tokens fit (a bank can be far larger than any prompt), then trim the
    # last ones until the whole prompt does.
    total = 0
    for n, d in enumerate(docs):
        total += d.n_tokens
        if total > budget:
            docs = docs[:n]
            break
    while True:
        prompt = text_prompt(tokenizer, question, docs)
        if len(prompt) <= budget:
            return prompt, len(docs)
        if not docs:
            raise MsaError(f"the question is too long for the model's context ({len(prompt)} tokens)", USAGE)
        docs.pop()


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 1)


class TextStream:
    """Writes generated tokens as text as they arrive (for a terminal), holding back an incomplete multi-byte
    character until its last byte comes."""

    def __init__(self, tokenizer, write: Callable[[str], None]):
        self.tokenizer, self.write = tokenizer, write
        self.tokens: list[int] = []
        self.shown = 0

    def __call__(self, token: int) -> None:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self.write(text[self.shown:].lstrip() if self.shown == 0 else text[self.shown:])
            self.shown = len(text)
