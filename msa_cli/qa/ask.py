"""Answer a question from memory: Memory Interleave retrieval (stage 2, in hops), then generation over what was
read (stage 3), or an abstention when nothing in memory is relevant. `msa ask`, `msa chat` and `msa eval` all
answer through `ask`."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .. import settings
from ..engine import Engine
from ..errors import MsaError, USAGE
from ..memory.search import Hit
from .answer import citation, cite, memory_prompt, text_prompt
from .evidence import Evidence, attribute, best_sentences, excerpts
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
    read: str = "evidence"        # with "text": "evidence", the best sentences of the documents; "passages", all
    evidence: int = settings.EVIDENCE      # sentences read, best first, each with its neighbours
    long: bool = False            # False: the answer ends with its first sentence (factoid questions)


@dataclass
class Answer:
    question: str
    text: str
    retrieval: Retrieval
    read: list[int]               # the retrieved documents the model read (retrieval.hits' indices), as numbered
    tokens: int                   # generated tokens
    timings: dict = field(default_factory=dict)
    abstained: bool = False       # nothing in memory was relevant: text is the abstention
    evidence: list[Evidence] = field(default_factory=list)   # the sentences read, best support first
    prompt_tokens: int = 0        # the prompt's tokens (for --context pooled, the question's)

    def sources(self) -> list[dict]:
        """The documents the model read, numbered as in its prompt: what `[n]` in the answer refers to."""
        r = self.retrieval
        return [{"n": n, "path": r.hits[i].document.source, **r.hits[i].document.span,
                 "doc_id": r.hits[i].document.doc_id, "score": round(r.hits[i].score, 4), "hop": r.hop_of[i]}
                for n, i in enumerate(self.read, 1)]

    def to_json(self, engine: Engine) -> dict:
        return {"question": self.question, "answer": self.text, "abstained": self.abstained,
                "sources": self.sources(), "evidence": [e.to_json() for e in self.evidence],
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
        return Answer(question, text, retrieval, read=list(range(len(retrieval.hits))), tokens=tokens,
                      timings={"total_ms": ms(seconds)})
    t0 = time.perf_counter()
    retrieval = retrieve(engine.route, question, opts.top_k, opts.hops, relevance(engine), opts.abstain,
                         read_back(engine, question))
    return answer_from(engine, question, retrieval, opts, t0, on_token)


def answer_from(engine: Engine, question: str, retrieval: Retrieval, opts: Options, t0: float,
                on_token: Callable[[int], None] | None = None) -> Answer:
    """Generation over what a retrieval found (started at perf_counter t0), or the abstention when it found
    nothing. `msa eval` feeds its baselines' retrievals through here too: same prompt, same generator."""
    t1 = time.perf_counter()
    timings = {"route_ms": ms(t1 - t0)}
    if retrieval.abstained:
        return Answer(question, ABSTENTION, retrieval, read=[], tokens=0, timings={**timings, "total_ms": ms(t1 - t0)},
                      abstained=True)

    first: list[float] = []

    def seen(token: int) -> None:
        if not first:
            first.append(time.perf_counter())
        if on_token:
            on_token(token)

    tok = engine.model.tokenizer
    evidence: list[Evidence] = []
    if opts.context == "pooled":
        read = list(range(len(retrieval.hits)))
        prompt = memory_prompt(tok, question)
        out = engine.generate_over_memory(prompt, retrieval.hits, opts.max_tokens, seen)
    else:
        budget = engine.model.backbone.cfg.max_positions - opts.max_tokens
        docs = [h.document for h in retrieval.hits]
        if opts.read == "evidence":
            count = counter(tok)
            found = excerpts(question, docs, count, opts.evidence, settings.NEIGHBOURS,
                             lambda units: engine.key_scores(question, units), settings.EVIDENCE_ROUTER_WEIGHT)
            sources = [(cite(e.document.source, e.span), e.text, count(e.text)) for e in found]
            at = [next(i for i, d in enumerate(docs) if d is e.document) for e in found]
        else:
            found, at = [], list(range(len(docs)))
            sources = [(citation(d), d.text, d.n_tokens) for d in docs]
        prompt, n = fitted_prompt(tok, question, sources, budget)
        read = at[:n]
        out = engine.generate(prompt, opts.max_tokens, seen, stop_when=None if opts.long else first_sentence(tok))
    t2 = time.perf_counter()
    timings |= {"first_token_ms": ms((first[0] if first else t2) - t0), "generate_ms": ms(t2 - t1),
                "total_ms": ms(t2 - t0)}
    text = tok.decode(out, skip_special_tokens=True).strip()
    text = text if opts.long else sentence_of(text)
    if opts.context != "pooled":
        evidence = attribute(question, text, [e for x in found[:n] for e in x.read], settings.ANSWER_TYPE_BONUS)
    return Answer(question, text, retrieval, read, len(out), timings, evidence=evidence, prompt_tokens=len(prompt))


def read_back(engine: Engine, question: str) -> Callable[[Hit], str]:
    """What a later hop routes on, besides the question, of the best document just read: its best
    settings.READ_BACK_SENTENCES sentences for the question (0: all its text)."""
    n = settings.READ_BACK_SENTENCES
    if not n:
        return lambda hit: hit.document.text
    count = counter(engine.model.tokenizer)
    return lambda hit: best_sentences(question, hit.document, count, n)


def counter(tokenizer) -> Callable[[str], int]:
    """Tokens in a text, as the splitter counts them."""
    return lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)


def reading_budget(opts: Options) -> int:
    """How many documents `ask` reads at most: k at hop 1, then k // 2 (at least 1) per later hop."""
    return opts.top_k + (opts.hops - 1) * max(1, opts.top_k // 2)


def relevance(engine: Engine) -> Relevance:
    """The relevance test for the engine's router, with the threshold calibrated for it when it has one."""
    return Relevance(settings.RELEVANT_BM25, engine.router.spec.relevant)


def fitted_prompt(tokenizer, question: str, sources: list[tuple[str, str, int]], budget: int) -> tuple[list[int], int]:
    """The prompt with as many of the sources ((citation, text, tokens of the text) each) as fit `budget` tokens, in
    the order given (the best first), the last ones left out: the model's context is finite, the memory is not."""
    # Start from the sources whose own tokens fit (a bank can be far larger than any prompt), then trim the
    # last ones until the whole prompt does.
    total = 0
    for n, (_, _, tokens) in enumerate(sources):
        total += tokens
        if total > budget:
            sources = sources[:n]
            break
    while True:
        prompt = text_prompt(tokenizer, question, [(where, text) for where, text, _ in sources])
        if len(prompt) <= budget:
            return prompt, len(sources)
        if not sources:
            raise MsaError(f"the question is too long for the model's context ({len(prompt)} tokens)", USAGE)
        sources = sources[:-1]


# The end of an answer's first sentence: a word of two or more characters, then . ! or ? (closing quotes or
# brackets kept) and whitespace ("U.S." and "e.g." go on), or a line break after a line that does not end with
# ":" (which announces what follows), never inside a ``` code block. A short answer to a factoid question is all
# there is to say; more is a small model rambling to its token budget, which dilutes what is right
# (BENCHMARKS.md, "Evidence").
_SENTENCE_END = re.compile(r"[^\s.]{2}[.!?][\"')\]]*(?=\s)|[^\s:](?=\n)")


def sentence_of(text: str) -> str:
    """The first sentence of an answer (all of it when it has one sentence)."""
    for end in _SENTENCE_END.finditer(text):
        if text.count("```", 0, end.end()) % 2 == 0:
            return text[:end.end()]
    return text


def first_sentence(tokenizer) -> Callable[[list[int]], bool]:
    """A stop rule for the decoder: true once the answer holds a whole first sentence and what follows it."""
    def done(out: list[int]) -> bool:
        text = tokenizer.decode(out, skip_special_tokens=True).strip()
        return sentence_of(text) != text
    return done


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 1)


class TextStream:
    """Writes generated tokens as text as they arrive (for a terminal), holding back an incomplete multi-byte
    character until its last byte comes; unless `long`, only the answer's first sentence, as `ask` keeps it."""

    def __init__(self, tokenizer, write: Callable[[str], None], long: bool = True):
        self.tokenizer, self.write, self.long = tokenizer, write, long
        self.tokens: list[int] = []
        self.shown = 0

    def __call__(self, token: int) -> None:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True).lstrip()
        if text.endswith("\ufffd"):
            return
        text = text if self.long else sentence_of(text)
        if len(text) > self.shown:
            self.write(text[self.shown:])
            self.shown = len(text)
