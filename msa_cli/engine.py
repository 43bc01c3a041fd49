"""The model, its router and a memory bank wired together: what the CLI verbs call.

Data flows one way: passages -> encoder (stage 1) -> bank; question -> router (stage 2) -> documents ->
generator (stage 3). This module only connects those pieces and holds the settings a bank must agree on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from . import settings as defaults
from .corpus.splitter import Passage
from .memory.bank import Bank, Document, NewDocument
from .memory.encoder import Encoded, document_ids, encode, routing_query, template_kv, TEMPLATE_HEAD
from .memory.router import Router, RouterSpec, default_router, top_k
from .model.loading import Model
from .qa.generate import Decoder, KVCache, Memory

BANK_DTYPE = torch.bfloat16   # what the bank stores, whatever the CPU computes in


@dataclass
class Hit:
    document: Document
    score: float


class Engine:
    def __init__(self, model: Model, bank: Bank, router: Router):
        self.model = model
        self.bank = bank
        self.router = router

    @classmethod
    def open(cls, model: Model, bank_path: Path, create: bool = False) -> "Engine":
        router = Router(default_router(model))
        expected = bank_settings(model, router.spec)
        if create:
            bank = Bank.open_or_create(bank_path, expected,
                                       lambda: template_kv(model.backbone, model.tokenizer, BANK_DTYPE))
        else:
            bank = Bank.open(bank_path, expect=expected)
        return cls(model, bank, router)

    # --- stage 1 ------------------------------------------------------------------------------------------

    def encode(self, passages: list[Passage], on_tokens=None) -> Encoded:
        """Stage 1 for a batch of passages; on_tokens(n) reports progress after each forward."""
        s = self.bank.settings
        token_ids = [document_ids(self.model.tokenizer, p.text) for p in passages]
        return encode(self.model.backbone, token_ids, s["content_layers"], self.router, s["pooling"],
                      BANK_DTYPE, defaults.PACK_TOKENS, on_pack=on_tokens)

    def commit(self, passages: list[tuple[Passage, str]], encoded: Encoded, replacing: list[int] = ()) -> list[int]:
        """Write encoded (passage, file content hash) pairs as one bank segment, removing the documents
        `replacing` in the same commit. The caller holds the bank's lock."""
        docs = [NewDocument(source=p.path, span={"page": p.page, "line_start": p.line_start, "line_end": p.line_end},
                            content_hash=digest, n_tokens=p.n_tokens, text=p.text)
                for p, digest in passages]
        return self.bank.append(docs, encoded.content, encoded.chunk_counts, encoded.route_keys,
                                encoded.key_counts, replacing=replacing)

    # --- stage 2 ------------------------------------------------------------------------------------------

    def route(self, text: str, k: int) -> list[Hit]:
        q = routing_query(self.model.backbone, self.model.tokenizer, self.router, text)
        doc_ids, scores = self.router.scores(q, self.bank.routing_segments())
        by_id = {d.doc_id: d for d in self.bank.documents()}
        return [Hit(by_id[i], s) for i, s in top_k(doc_ids, scores, k)]

    # --- stage 3 ------------------------------------------------------------------------------------------

    def generate(self, prompt_ids: list[int], max_new_tokens: int, on_token=None) -> list[int]:
        """Ordinary decoding over a prompt that holds the selected documents' original text."""
        backbone = self.model.backbone
        decoder = Decoder(backbone)
        return decoder.generate(prompt_ids, cache=KVCache.empty(backbone.cfg.n_layers), start_position=0,
                                max_new_tokens=max_new_tokens, stop_ids=stop_ids(self.model.tokenizer),
                                on_token=on_token)

    def generate_over_memory(self, question_ids: list[int], hits: list[Hit], max_new_tokens: int,
                             on_token=None) -> list[int]:
        """MSA stage 3: content layers attend to the pooled K/V of the selected documents; the query continues
        the template head and its positions start at len(template) + k (digest §2)."""
        backbone = self.model.backbone
        doc_ids = [h.document.doc_id for h in hits]
        memory = Memory({layer: self.bank.load_content(doc_ids, layer)[:2] for layer in self.bank.settings["content_layers"]})
        cache = KVCache.from_prefix(self.bank.template_kv(), backbone.cfg.n_layers, backbone.dtype)
        return Decoder(backbone).generate(question_ids, cache=cache, start_position=cache.length + len(hits),
                                          max_new_tokens=max_new_tokens, memory=memory,
                                          stop_ids=stop_ids(self.model.tokenizer), on_token=on_token)


def bank_settings(model: Model, router: RouterSpec) -> dict:
    """Everything a bank's tensors depend on: opening a bank with different values is an error."""
    cfg = model.backbone.cfg
    return {
        "model": model.identity,
        "pooling": defaults.POOLING,
        "content_layers": list(range(cfg.n_layers // 2, cfg.n_layers)),  # MSA's router layers: the upper half
        "dtype": str(BANK_DTYPE).removeprefix("torch."),
        "kv_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "document_template": "<|im_start|>{text}<|im_end|>",
        "template_head": TEMPLATE_HEAD,
        "router": router.describe(),
    }


def stop_ids(tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(end, int) and end != tokenizer.unk_token_id:
        ids.add(end)
    return {i for i in ids if i is not None}


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
