"""Answering with an MSA checkpoint: its own generative retrieval, Memory Interleave as it was trained (digest §4).

A round prefills the transcript over memory. In every router layer the routing tokens (the instruction and the
question, and the document text injected last) choose that layer's top-k documents, whose pooled K/V the layer
attends to after the template head; the transcript's positions start at 3 + k (digest §1.6, §2). The model then
writes the ids of the documents it wants, `[4]<|object_ref_end|>`, and their original text is injected for the
next round; or it writes `<End-of-Retrieve>`, the question is restated, and it answers
"The answer to the question is: ...".

Followed as the reference does it (digest §4), since that is what MSA-4B was trained on:
- which tokens route: in round 1 the whole user content; in later rounds the user content up to "...related to
  the question" (not the "\n" after it) and the text of the latest block read (not its `<|object_ref_end|>`).
  The reference finds that block after the last "]<|object_ref_end|>[": a block routes when it is not empty and
  the reply before it ends in "]<|object_ref_end|>"; otherwise the block that routed before goes on routing;
- the block holds every document named in the round's reply that memory has, read before or not; unknown ids are
  dropped, so naming only those injects a bare `<|object_ref_end|>`; either way the model routes again;
- a round ends at `<|object_ref_end|>`, `<End-of-Retrieve>`, `<|im_end|>`, or once the reply passes 1000
  characters (each token decoded on its own, special tokens shown).

Where the reference implementation is fragile (digest §7), this does what the paper describes instead:
- rounds are capped (`hops`; B9): at the cap the question is restated and the model must answer;
- a reply cut at 1000 characters is answered after the restated question (the reference feeds `<|im_end|>`, the
  fallback of its empty injection);
- a block fed after decoding (the restatement) attends causally within itself (B6: model.decode.local_attention);
- a layer selects at most as many documents as are live, so no padding slot is ever read (B8: Engine.select);
- each piece of the transcript is tokenized on its own, so which tokens route is exact (B10); pieces are cut only
  where the tokenizer cuts anyway (at special tokens, and before the "\n" after "...the question", which Qwen's
  pre-tokenizer keeps apart), so their ids are those of the reference's transcript tokenized whole;
- only ids the model wrote in this round's reply are read, never numbers inside injected text (B11).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..engine import Engine, stop_ids
from ..memory.search import Hit
from ..model.decode import Decoder, KVCache
from .interleave import Hop, Retrieval

INSTRUCTION = "\nPlease answer the question based on the above historical document information\n\n"
RETURN_DOCUMENTS = "\nPlease return all documents related to the question\n"
TEMPLATE_TAIL = "<|im_end|>\n"
RESPONSE_HEAD = "<|im_start|>"      # no "assistant\n" role line: the model starts right after it (digest §1.7)
REF_END = "<|object_ref_end|>"
END_OF_RETRIEVE = "<End-of-Retrieve>"
RESTATEMENT = "<|im_start|>The user's question is: {question}\n<|object_ref_end|>"
ANSWER_LEAD = "The answer to the question is:"
ROUND_CHARS = 1000   # a retrieval round ends once its reply is longer (the reference's max_ret_len)
DOC_ID = re.compile(r"\[(\d+)\]")


@dataclass
class Piece:
    """A part of the transcript: its tokens, and whether they route (doc_ids 0 in the reference)."""
    ids: list[int]
    routes: bool


class RoutedMemory:
    """What the router layers attend to in one round: each layer selects its documents when the prefill reaches
    it, from its own routing query, and keeps them for every token decoded after (no re-routing in decode)."""

    def __init__(self, engine: Engine, route_mask: Tensor, top_k: int):
        self.engine, self.route_mask, self.top_k = engine, route_mask, top_k
        self.layers = set(engine.mode.content_layers)
        self.selected: dict[int, list[int]] = {}      # layer -> doc ids, best first
        self.scores: dict[int, list[float]] = {}
        self._kv: dict[int, tuple[Tensor, Tensor]] = {}

    def layer(self, i: int, x: Tensor) -> tuple[Tensor, Tensor] | None:
        if i not in self.layers:
            return None
        if i not in self._kv:   # the prefill: x holds exactly the transcript's tokens
            ids, scores, k, v = self.engine.select(i, x[self.route_mask.to(x.device)], self.top_k)
            self.selected[i], self.scores[i], self._kv[i] = ids, scores, (k, v)
        return self._kv[i]


class RoundEnd:
    """Whether a retrieval round's reply is over (digest §4.2): it named ids (`<|object_ref_end|>`), it is done
    retrieving (`<End-of-Retrieve>`), or it is longer than ROUND_CHARS characters, counted as the reference counts
    them: each token decoded on its own, special tokens shown."""

    def __init__(self, tokenizer, ref_end: int):
        self.tokenizer, self.ref_end, self.chars = tokenizer, ref_end, 0

    def __call__(self, out: list[int]) -> bool:
        self.chars += len(self.tokenizer.decode(out[-1:]))
        return out[-1] == self.ref_end or END_OF_RETRIEVE in self.tokenizer.decode(out[-8:]) or self.too_long

    @property
    def too_long(self) -> bool:
        return self.chars > ROUND_CHARS


class Round:
    """One prefill of the transcript over memory, then greedy decoding, which can go on after a fed block."""

    def __init__(self, engine: Engine, pieces: list[Piece]):
        backbone = engine.model.backbone
        self.prompt = [t for p in pieces for t in p.ids]
        mask = torch.tensor([p.routes for p in pieces for _ in p.ids], dtype=torch.bool)
        self.memory = RoutedMemory(engine, mask, engine.model.msa.top_k)
        self.cache = KVCache.from_prefix(engine.bank.template_kv(), backbone.cfg.n_layers, backbone.dtype,
                                         backbone.device)
        # 3 + k whatever the number of documents selected: what the model was trained with (digest §2)
        self.position = self.cache.length + engine.model.msa.top_k
        self.decoder = Decoder(backbone)
        self.stop = stop_ids(engine.model.tokenizer)

    def write(self, max_new_tokens: int, feed: list[int] = (), stop_when=None, on_token=None) -> list[int]:
        """Prefill (first call) or feed `feed`, then decode greedily."""
        prompt = self.prompt + list(feed)
        if self.prompt and feed:   # fed with the prefill: fed tokens never route
            self.memory.route_mask = torch.cat([self.memory.route_mask, torch.zeros(len(feed), dtype=torch.bool)])
        self.prompt = []
        out = self.decoder.generate(prompt, cache=self.cache, start_position=self.position,
                                    max_new_tokens=max_new_tokens, stop_ids=self.stop, memory=self.memory,
                                    stop_when=stop_when, on_token=on_token)
        self.position += len(prompt) + len(out)   # all of out is in the cache (a stop id ends it, unkept)
        return out


def ask_generative(engine: Engine, question: str, max_rounds: int, max_tokens: int,
                   on_token: Callable[[int], None] | None = None):
    """The whole protocol for one question -> (answer text, Retrieval of the documents injected, generated
    tokens, seconds). on_token sees the answer's tokens (not the retrieval rounds', nor the answer's lead)."""
    tok = engine.model.tokenizer
    stream = AfterLead(tok, on_token) if on_token else None

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False).input_ids

    ref_end = tok.convert_tokens_to_ids(REF_END)
    # The "\n" that ends the user content routes in round 1 only, hence a piece of its own.
    user, newline = Piece(ids(INSTRUCTION + question + RETURN_DOCUMENTS[:-1]), True), Piece(ids("\n"), True)
    pieces = [user, newline, Piece(ids(TEMPLATE_TAIL), False), Piece(ids(RESPONSE_HEAD), False)]
    retrieval, tokens, read = Retrieval(), 0, set()
    t0 = time.perf_counter()

    answer: list[int] | None = None
    for hop in range(1, max_rounds + 1):
        current, over = Round(engine, pieces), RoundEnd(tok, ref_end)
        # a token shows at least one character, so the character cap ends the round before this token budget
        reply = current.write(ROUND_CHARS + 1, stop_when=over)
        tokens += len(reply)
        pieces.append(Piece(reply, False))
        text = tok.decode(reply)
        routed = current.memory
        retrieval.hops.append(Hop(routing_text=tok.decode([t for p in pieces if p.routes for t in p.ids]),
                                  selected=[], scores=[],
                                  best=max((s[0] for s in routed.scores.values() if s), default=None),
                                  layers={layer: routed.selected[layer] for layer in sorted(routed.selected)}))
        if END_OF_RETRIEVE in text or over.too_long:   # answer now
            restated = ids(RESTATEMENT.format(question=question))
            pieces.append(Piece(restated, False))
            answer = current.write(max_tokens, feed=restated, on_token=stream)
            tokens += len(answer)
            break
        if reply[-1:] != [ref_end]:   # it answered without retrieving (stopped at <|im_end|>)
            answer = reply
            for t in reply if stream else ():
                stream(t)
            break
        # ids memory does not have are dropped
        named = [i for i in sorted({int(m) for m in DOC_ID.findall(text)}) if engine.bank.has_document(i)]
        new = [i for i in named if i not in read]   # a source is counted once, in the round that first read it
        shares = [_layer_share(routed, i) for i in new]
        retrieval.hops[-1].selected, retrieval.hops[-1].scores = new, shares
        retrieval.hits += [Hit(engine.bank.document(i), share, _best_score(routed, i)) for i, share in zip(new, shares)]
        retrieval.hop_of += [hop] * len(new)
        read |= set(new)
        block = "".join(f"[{i}]. {engine.bank.document(i).text}\n" for i in named)
        # the reference routes the text after the last "]<|object_ref_end|>[" (up to its <|object_ref_end|>)
        routes = bool(block) and text.endswith("]" + REF_END)
        newline.routes = False
        if routes:
            for p in pieces:          # the block just read replaces the one that routed before
                p.routes = p is user
        if block:
            pieces.append(Piece(ids(block), routes))
        pieces.append(Piece([ref_end], False))
    if answer is None:                # the round cap: restate, prefill once more, answer
        pieces.append(Piece(ids(RESTATEMENT.format(question=question)), False))
        answer = Round(engine, pieces).write(max_tokens, on_token=stream)
        tokens += len(answer)
    return final_answer(tok.decode(answer, skip_special_tokens=True)), retrieval, tokens, time.perf_counter() - t0


class AfterLead:
    """Passes the answer's tokens on once they are past the lead "The answer to the question is:" (or clearly
    not it), so a terminal shows what `final_answer` returns."""

    def __init__(self, tokenizer, on_token: Callable[[int], None]):
        self.tokenizer, self.on_token = tokenizer, on_token
        self.held: list[int] = []
        self.passing = False

    def __call__(self, token: int) -> None:
        if self.passing:
            self.on_token(token)
            return
        self.held.append(token)
        text = self.tokenizer.decode(self.held, skip_special_tokens=True).lstrip()
        if text.startswith(ANSWER_LEAD):
            self.passing = True                      # the lead itself is not shown
            rest = text[len(ANSWER_LEAD):]
            if rest.strip():                         # a token that ends the lead and starts the answer
                for t in self.tokenizer(rest, add_special_tokens=False).input_ids:
                    self.on_token(t)
        elif not ANSWER_LEAD.startswith(text):
            self.passing = True
            for t in self.held:
                self.on_token(t)


def final_answer(text: str) -> str:
    """The text after the last "The answer to the question is:", as the reference's evaluator reads it; the
    whole reply when the model did not use that form."""
    return text.rsplit(ANSWER_LEAD, 1)[-1].strip()


def _layer_share(memory: RoutedMemory, doc_id: int) -> float:
    """The share of router layers whose top-k held the document: how strongly the memory pointed at it."""
    return round(sum(doc_id in ids for ids in memory.selected.values()) / max(1, len(memory.selected)), 4)


def _best_score(memory: RoutedMemory, doc_id: int) -> float:
    """The document's best routing score over the layers that selected it (0 when none did)."""
    return max((s for layer, ids in memory.selected.items() for i, s in zip(ids, memory.scores[layer])
                if i == doc_id), default=0.0)
