"""Stage 1, memory encoding: documents -> pooled content K/V and routing keys, with no logits.

Many documents are packed into one forward (no padding: the linear layers run over the concatenated
tokens). Each document is encoded alone: positions restart at 0 (document-wise RoPE) and attention never
crosses documents, so a document's output does not depend on what it was packed with. For each content
layer we keep the 64-token chunk means of K (after k_norm and RoPE) and of V; the router keeps its own keys
from its own layers. The forward stops at the last layer anything is read from: no lm_head, no final MLP.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..model.backbone import Backbone, causal_attention
from .router import Router, rank_in_doc

TEMPLATE_HEAD = "<|im_start|>user\n"   # MSA's template head, shared by every query (digest §1.7)


@dataclass
class Encoded:
    """Stage-1 output for a list of documents; rows are in the documents' order."""
    content: dict[int, tuple[Tensor, Tensor]]   # layer -> (k [C, Hk, d], v [C, Hk, d]), C = sum(chunk_counts)
    chunk_counts: list[int]
    route_keys: Tensor                          # [K, Hr, d], K = sum(key_counts)
    key_counts: list[int]
    first_doc_id: int | None = None             # the id the first document was encoded with, if ids are in the text


def document_ids(tokenizer, text: str) -> list[int]:
    """A memory document as the model reads it: its own start token (the attention sink), text, end token."""
    return tokenizer(f"<|im_start|>{text}<|im_end|>", add_special_tokens=False).input_ids


@torch.inference_mode()
def encode(backbone: Backbone, docs: list[list[int]], content_layers: list[int], router: Router,
           pooling: int, out_dtype: torch.dtype, pack_tokens: int = 4096,
           on_pack: Callable[[int], None] | None = None) -> Encoded:
    """Stage 1 for a batch of documents, one pack of consecutive documents per forward; on_pack(tokens) is
    called after each pack (for progress)."""
    parts = []
    for pack in packs([len(d) for d in docs], pack_tokens):
        parts.append(encode_pack(backbone, [docs[i] for i in pack], content_layers, router, pooling, out_dtype))
        if on_pack:
            on_pack(sum(len(docs[i]) for i in pack))
    if not parts:
        raise ValueError("no documents to encode")
    return Encoded(
        content={layer: (torch.cat([p.content[layer][0] for p in parts]),
                         torch.cat([p.content[layer][1] for p in parts])) for layer in content_layers},
        chunk_counts=[c for p in parts for c in p.chunk_counts],
        route_keys=torch.cat([p.route_keys for p in parts]),
        key_counts=[c for p in parts for c in p.key_counts],
    )


def packs(lengths: list[int], pack_tokens: int) -> list[list[int]]:
    """Consecutive documents grouped so each forward holds at most pack_tokens (a longer document goes alone)."""
    out, current, size = [], [], 0
    for i, n in enumerate(lengths):
        if current and size + n > pack_tokens:
            out.append(current)
            current, size = [], 0
        current.append(i)
        size += n
    if current:
        out.append(current)
    return out


def encode_pack(backbone: Backbone, docs: list[list[int]], content_layers: list[int], router: Router,
                pooling: int, out_dtype: torch.dtype) -> Encoded:
    lengths = torch.tensor([len(d) for d in docs])
    ids = torch.tensor([t for d in docs for t in d])
    token_doc = torch.repeat_interleave(torch.arange(len(docs)), lengths)   # [T]
    positions = rank_in_doc(token_doc)                                      # document-wise RoPE
    bounds = torch.cumsum(lengths, 0).tolist()
    route_layers = set(router.spec.layers)
    content_set = set(content_layers)
    last = max(content_set | route_layers)

    k_pre: dict[int, Tensor] = {}
    content: dict[int, tuple[Tensor, Tensor]] = {}
    h = backbone.embed_tokens(ids)
    for i in range(last + 1):
        q, k, v = backbone.qkv(i, h)
        if i in route_layers:
            k_pre[i] = router.key_input(i, backbone.attn_input(i, h), k)
        k = backbone.rope(k, positions)
        if i in content_set:
            content[i] = (k, v)
        if i == last:
            break  # nothing after this layer's K/V is read
        q = backbone.rope(q, positions)
        h = backbone.finish_layer(i, h, per_document_attention(q, k, v, bounds))

    chunk_counts = ((lengths + pooling - 1) // pooling).tolist()
    chunk_of_token = chunk_index(token_doc, positions, chunk_counts, pooling)
    # The bank is on the CPU: so are the outputs, whatever device computed them.
    pooled = {layer: (mean_by(k, chunk_of_token, sum(chunk_counts)).to("cpu", out_dtype),
                      mean_by(v, chunk_of_token, sum(chunk_counts)).to("cpu", out_dtype))
              for layer, (k, v) in content.items()}
    keys, key_counts = router.keys(k_pre, token_doc, len(docs))
    return Encoded(pooled, chunk_counts, keys.to("cpu", out_dtype), key_counts)


def per_document_attention(q: Tensor, k: Tensor, v: Tensor, bounds: list[int]) -> Tensor:
    """Causal attention inside each document of a pack: q [T, Hq, d], k/v [T, Hk, d] -> [T, Hq, d]."""
    out = torch.empty_like(q)
    start = 0
    for end in bounds:
        out[start:end] = causal_attention(q[start:end], k[start:end], v[start:end])
        start = end
    return out


def chunk_index(token_doc: Tensor, positions: Tensor, chunk_counts: list[int], pooling: int) -> Tensor:
    """Each token's pooled chunk (global over the pack): chunk j of a document holds its tokens
    pooling*j .. pooling*j + pooling-1; the last chunk may be partial."""
    first = torch.cumsum(torch.tensor(chunk_counts), 0) - torch.tensor(chunk_counts)
    return first[token_doc] + positions // pooling


def mean_by(x: Tensor, group: Tensor, n_groups: int) -> Tensor:
    """Mean of x [T, ...] over tokens of each group, accumulated in fp32 (a partial group over its real size).
    x may live on any device; group [T] is on the CPU."""
    group = group.to(x.device)
    sums = torch.zeros(n_groups, *x.shape[1:], device=x.device).index_add_(0, group, x.float())
    counts = torch.bincount(group, minlength=n_groups).clamp(min=1).float()
    return sums / counts.view(-1, *([1] * (x.dim() - 1)))


@torch.inference_mode()
def template_kv(backbone: Backbone, tokenizer, out_dtype: torch.dtype) -> dict[int, tuple[Tensor, Tensor]]:
    """K/V of the template head for every layer (positions 0..n-1), prepended to every question's context."""
    ids = torch.tensor(tokenizer(TEMPLATE_HEAD, add_special_tokens=False).input_ids)
    positions = torch.arange(ids.shape[0])
    out = {}
    h = backbone.embed_tokens(ids)
    for i in range(backbone.cfg.n_layers):
        q, k, v = backbone.qkv(i, h)
        q, k = backbone.rope(q, positions), backbone.rope(k, positions)
        out[i] = (k.to("cpu", out_dtype).contiguous(), v.to("cpu", out_dtype).contiguous())
        h = backbone.finish_layer(i, h, per_document_attention(q, k, v, [ids.shape[0]]))
    return out


@torch.inference_mode()
def routing_query(backbone: Backbone, tokenizer, router: Router, text: str) -> Tensor:
    """Routing vectors of a question: the template head then the text, run up to the router's last layer;
    only the text's tokens route (the template is shared by every question, so it carries no signal).
    Returns [T, Hr * G, d] as `Router.query` makes them."""
    head = tokenizer(TEMPLATE_HEAD, add_special_tokens=False).input_ids
    body = tokenizer(text, add_special_tokens=False).input_ids
    ids = torch.tensor(head + body)
    positions = torch.arange(ids.shape[0])
    layers = set(router.spec.layers)
    q_pre: dict[int, Tensor] = {}
    h = backbone.embed_tokens(ids)
    for i in range(max(layers) + 1):
        q, k, v = backbone.qkv(i, h)
        if i in layers:
            q_pre[i] = router.query_input(i, backbone.attn_input(i, h)[len(head):], q[len(head):])
        if i == max(layers):
            break
        h = backbone.finish_layer(i, h, causal_attention(backbone.rope(q, positions), backbone.rope(k, positions), v))
    return router.query(q_pre)
