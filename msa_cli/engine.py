"""The model, its router and a memory bank wired together: what ingest, the qa verbs and eval call.

Data flows one way: passages -> encoder (stage 1) -> bank; question -> router (stage 2) -> documents ->
decoder (stage 3). This module only connects those pieces and holds the settings a bank must agree on; what
differs for an MSA checkpoint comes from its mode (memory/mode.py).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor

from . import settings as defaults
from .corpus.splitter import Passage
from .errors import USAGE, BankMismatch, MsaError
from .memory.bank import Bank, Document, NewDocument
from .memory.encoder import Encoded, encode, routing_query, template_kv
from .memory.mode import Mode, mode_for
from .memory.router import Router, RouterSpec, router_file_contents
from .memory.search import Hit, search
from .model.decode import Decoder, KVCache, Memory
from .model.loading import Model
from .model.protocol import TEMPLATE_HEAD

BANK_DTYPE = torch.bfloat16   # what the bank stores, whatever the CPU computes in


class Engine:
    def __init__(self, model: Model, bank: Bank, router: Router, mode: Mode):
        self.model, self.bank, self.router, self.mode = model, bank, router, mode
        self._last_query: tuple[str | None, Tensor | None] = (None, None)   # routing_query's last text and query

    @property
    def content_layers(self) -> list[int]:
        """The layers whose pooled K/V the bank keeps (none: a bank made with --content none)."""
        return list(self.bank.settings["content_layers"])

    @classmethod
    def open(cls, model: Model, bank_path: Path, create: bool = False,
             new_router: RouterSpec | None = None, content: bool | None = None, first_doc_id: int = 0) -> "Engine":
        """An existing bank is read with the router it was indexed with; a new one gets `new_router`, by default
        the mode's default router. content: whether the bank keeps pooled content K/V (the cold tier); None: as
        the bank already does, or for a new one settings.CONTENT (an MSA checkpoint's always keeps them).
        first_doc_id: a new bank's first document id (a shard's: memory/shards.py)."""
        mode = mode_for(model)
        if Bank.exists(bank_path):
            bank = Bank.open(bank_path)
            spec = stored_router(bank, mode)
            kept = bool(bank.settings["content_layers"])
            if content is not None and content != kept:
                raise MsaError(f"bank {bank_path} was made with --content {'kv' if kept else 'none'}: ingest "
                               f"into a new bank to change it", USAGE)
            bank.check_settings(bank_settings(mode, spec, kept))
        elif create:
            spec = new_router or mode.default_router()
            content = (mode.generative or defaults.CONTENT == "kv") if content is None else content
            if mode.generative and not content:
                raise MsaError("an MSA checkpoint reads its memory's pooled K/V: it needs --content kv", USAGE)
            bank = Bank.open_or_create(bank_path, bank_settings(mode, spec, content),
                                       lambda: template_kv(model.backbone, model.tokenizer, BANK_DTYPE),
                                       router_file_contents(spec, {}), first_doc_id)
        else:
            bank = Bank.open(bank_path)   # says there is no bank there
        return cls(model, bank, Router(spec, model.backbone.device), mode)

    # --- stage 1 ------------------------------------------------------------------------------------------

    def encode(self, passages: list[Passage], on_tokens=None) -> Encoded:
        """Stage 1 for a batch of passages, which the next commit appends; on_tokens(n) reports progress after
        each forward. The caller holds the bank's lock (a mode with ids in the text writes the ids the bank will
        give the documents)."""
        first = self.bank.next_doc_id
        token_ids = [self.mode.document_tokens(p.text, first + i) for i, p in enumerate(passages)]
        encoded = encode(self.model.backbone, token_ids, self.content_layers, self.router,
                         self.mode.pooling, BANK_DTYPE, defaults.PACK_TOKENS, on_pack=on_tokens)
        encoded.first_doc_id = first
        return encoded

    def commit(self, passages: list[tuple[Passage, str]], encoded: Encoded, replacing: list[int] = ()) -> list[int]:
        """Write encoded (passage, file content hash) pairs as one bank segment, removing the documents
        `replacing` in the same commit. The caller holds the bank's lock."""
        if self.mode.ids_in_text and encoded.first_doc_id != self.bank.next_doc_id:
            raise RuntimeError("documents were encoded with other ids than the bank would give them")
        docs = [NewDocument(source=p.path, span={"page": p.page, "line_start": p.line_start, "line_end": p.line_end},
                            content_hash=digest, n_tokens=p.n_tokens, text=p.text)
                for p, digest in passages]
        return self.bank.append(docs, encoded.content, encoded.chunk_counts, encoded.route_keys,
                                encoded.key_counts, replacing=replacing)

    # --- stage 2 ------------------------------------------------------------------------------------------

    def route(self, text: str, k: int, fuse: bool = True) -> list[Hit]:
        """The k documents for `text`, best first (memory/search.py)."""
        return search(self.bank, self.router, self.routing_query(text), text, k, fuse)

    def routing_query(self, text: str) -> Tensor:
        """The router's query vectors for `text` (encoder.routing_query), the last one kept: `ask` routes hop 1
        on the question, then scores the sentences it reads with the same query (key_scores)."""
        if self._last_query[0] != text:
            self._last_query = (text, routing_query(self.model.backbone, self.model.tokenizer, self.router, text))
        return self._last_query[1]

    def key_scores(self, text: str, units: list[tuple[Document, tuple[int, int]]]) -> list[float]:
        """The router's score of `text` for each unit (document, (start, end) in its text): its aggregate over
        routing tokens of each token's best key within the unit, as it scores documents (0 for a unit holding
        no key's start)."""
        q = self.routing_query(text)
        per_doc: dict[int, tuple[Tensor, Tensor]] = {}   # doc id -> (similarity [T, K], key starts [K])
        out = []
        for doc, (start, end) in units:
            if doc.doc_id not in per_doc:
                sim = self.router.similarity(q, self.bank.document_keys(doc.doc_id))
                offsets = self.model.tokenizer(doc.text, add_special_tokens=False, return_offsets_mapping=True)
                starts = self.router.key_starts([a for a, _ in offsets["offset_mapping"]])[:sim.shape[1]]
                per_doc[doc.doc_id] = sim, torch.tensor(starts)
            sim, starts = per_doc[doc.doc_id]
            inside = ((starts >= start) & (starts < end)).nonzero().flatten()
            if not inside.numel():
                out.append(0.0)
                continue
            best = sim[:, inside].max(1).values                                         # [T]
            out.append(float(best.mean() if self.router.spec.aggregate == "mean" else best.max()))
        return out

    def select(self, layer: int, x: Tensor, k: int) -> tuple[list[int], list[float], Tensor, Tensor]:
        """An MSA checkpoint's stage 2 in one router layer: x [T, D] is the layer's normalised input at the routing
        tokens. -> (the k best documents' ids, their scores, their pooled k and v [S, Hk, d] on the model's
        device)."""
        ids, scores = self.select_ids(layer, x, k)
        pooled_k, pooled_v, _ = self.bank.load_content(ids, layer)
        device = self.model.backbone.device
        if device.type != "cpu":   # the cold tier stays in host memory; only the selected rows go over
            pooled_k, pooled_v = (t.pin_memory().to(device, non_blocking=True) for t in (pooled_k, pooled_v))
        return ids, scores, pooled_k, pooled_v

    def select_ids(self, layer: int, x: Tensor, k: int) -> tuple[list[int], list[float]]:
        """select's choice: the k best documents' ids and scores. k never exceeds the live documents: no padding
        slot can be selected (digest §7 B8)."""
        q = self.router.query({layer: self.router.query_input(layer, x, None)}, layer)
        doc_ids, scores = self.router.scores(q, self.bank.routing_segments(), layer)
        best = torch.topk(scores, min(k, scores.shape[0]))
        return [int(doc_ids[i]) for i in best.indices], best.values.tolist()

    # --- stage 3 ------------------------------------------------------------------------------------------

    def generate(self, prompt_ids: list[int], max_new_tokens: int, on_token=None, stop_when=None) -> list[int]:
        """Ordinary decoding over a prompt that holds the selected documents' original text (stop_when: see
        Decoder.generate)."""
        backbone = self.model.backbone
        return Decoder(backbone).generate(prompt_ids, cache=KVCache.empty(backbone.cfg.n_layers), start_position=0,
                                          max_new_tokens=max_new_tokens, stop_ids=stop_ids(self.model.tokenizer),
                                          on_token=on_token, no_repeat_ngram=defaults.NO_REPEAT_NGRAM,
                                          stop_when=stop_when)

    def generate_over_memory(self, question_ids: list[int], hits: list[Hit], max_new_tokens: int,
                             on_token=None) -> list[int]:
        """MSA stage 3: content layers attend to the pooled K/V of the selected documents; the query continues
        the template head and its positions start at len(template) + k (digest §2)."""
        backbone = self.model.backbone
        doc_ids = [h.document.doc_id for h in hits]
        if not self.content_layers:
            raise MsaError(f"bank {self.bank.path} keeps no pooled K/V (ingested with --content none): read the "
                           f"documents' text (--context text), or ingest into a bank made with --content kv", USAGE)
        memory = Memory({layer: self.bank.load_content(doc_ids, layer)[:2] for layer in self.content_layers})
        cache = KVCache.from_prefix(self.bank.template_kv(), backbone.cfg.n_layers, backbone.dtype, backbone.device)
        return Decoder(backbone).generate(question_ids, cache=cache, start_position=cache.length + len(hits),
                                          max_new_tokens=max_new_tokens, memory=memory,
                                          stop_ids=stop_ids(self.model.tokenizer), on_token=on_token,
                                          no_repeat_ngram=defaults.NO_REPEAT_NGRAM)


def bank_settings(mode: Mode, router: RouterSpec, content: bool) -> dict:
    """Everything a bank's tensors depend on: opening a bank with different values is an error. Without
    content the bank keeps no content layers, and stage 1 stops at the router's last layer."""
    cfg = mode.model.backbone.cfg
    return {
        "model": mode.model.identity,
        "pooling": mode.pooling,
        "content_layers": list(mode.content_layers) if content else [],
        "dtype": str(BANK_DTYPE).removeprefix("torch."),
        "kv_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "document_template": mode.document_template,
        "template_head": TEMPLATE_HEAD,
        "router": router.describe(),
    }


def reindex(model: Model, bank_path: Path, spec: RouterSpec, on_tokens=None) -> bool:
    """Recompute a bank's routing keys with another router (stage 1 up to its last routing layer only); content,
    documents and text stay as they are. False when the bank already holds this router's keys."""
    bank, mode = Bank.open(bank_path), mode_for(model)   # the bank's own router need not be at hand
    settings = bank_settings(mode, spec, bool(bank.settings["content_layers"]))
    with bank.lock():
        bank.check_settings({**settings, "router": bank.settings["router"]})   # the same model and layout
        if bank.settings["router"]["id"] == spec.id:
            return False
        router = Router(spec, model.backbone.device)

        def compute_keys(docs: list[Document]):
            if not docs:   # a segment whose documents were all removed keeps an empty key file
                d = spec.proj[spec.layers[0]][1].shape[1] if spec.proj else model.backbone.cfg.head_dim
                return torch.zeros(0, len(spec.key_heads), d, dtype=BANK_DTYPE), []
            token_ids = [mode.document_tokens(d.text, d.doc_id) for d in docs]
            encoded = encode(model.backbone, token_ids, [], router, mode.pooling, BANK_DTYPE,
                             defaults.PACK_TOKENS, on_pack=on_tokens)
            return encoded.route_keys, encoded.key_counts

        bank.reindex(settings["router"], compute_keys, router_file_contents(spec, {}))
    return True


def stored_router(bank: Bank, mode: Mode) -> RouterSpec:
    """The router whose keys the bank holds (Mode.router_candidates, matched by id)."""
    wanted = bank.settings["router"]["id"]
    for spec in mode.router_candidates(bank.router_weights):
        if spec.id == wanted:
            return spec
    raise BankMismatch(f"bank {bank.path} was indexed with router {wanted}, whose weights are not here "
                       f"(another model's bank, or a router file that is gone): rebuild it, or "
                       f"run `msa reindex --router default --bank {bank.path}`")


def stop_ids(tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(end, int) and end != tokenizer.unk_token_id:
        ids.add(end)
    return {i for i in ids if i is not None}


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
