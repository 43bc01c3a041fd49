"""Stage 1, memory encoding: documents -> pooled content K/V and routing keys, with no logits.

Many documents are packed into one forward (model/packing.py: no padding, positions restart at 0 for each
document, attention never crosses documents), so a document's output does not depend on what it was packed with.
For each content layer we keep the 64-token chunk means of K (after k_norm and RoPE) and of V; the router keeps
its own keys from its own layers. The walk stops at the last layer anything is read from: no lm_head, no MLP.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..model.backbone import Backbone, causal_attention
from ..model.packing import Pack, packs
from ..model.protocol import question_tokens
from .router import Router


@dataclass
class Encoded:
    """Stage-1 output for a list of documents; rows are in the documents' order."""
    content: dict[int, tuple[Tensor, Tensor]]   # layer -> (k [C, Hk, d], v [C, Hk, d]), C = sum(chunk_counts)
    chunk_counts: list[int]
    route_keys: Tensor                          # [K, Hr, d], K = sum(key_counts)
    key_counts: list[int]
    first_doc_id: int | None = None             # the id the first document was encoded with, if ids are in the text


@torch.inference_mode()
def encode(backbone: Backbone, docs: list[list[int]], content_layers: list[int], router: Router,
           pooling: int, out_dtype: torch.dtype, pack_tokens: int = 4096,
           on_pack: Callable[[int], None] | None = None) -> Encoded:
    """Stage 1 for a batch of documents, one pack of consecutive documents per forward; on_pack(tokens) is
    called after each pack (for progress)."""
    parts = []
    for pack in packs([len(d) for d in docs], pack_tokens):
        parts.append(encode_pack(backbone, Pack.of([docs[i] for i in pack]), content_layers, router, pooling,
                                 out_dtype))
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


def encode_pack(backbone: Backbone, pack: Pack, content_layers: list[int], router: Router, pooling: int,
                out_dtype: torch.dtype) -> Encoded:
    route_layers, content_set = set(router.spec.layers), set(content_layers)
    k_pre: dict[int, Tensor] = {}                      # routing layer -> its key_input (T, H, d)
    content: dict[int, tuple[Tensor, Tensor]] = {}     # content layer -> k after RoPE, v (T, Hk, d)

    def read(i: int, x: Tensor, q: Tensor, k: Tensor, v: Tensor) -> None:
        if i in route_layers:
            k_pre[i] = router.key_input(i, x, k)
        if i in content_set:
            content[i] = (backbone.rope(k, pack.positions), v)

    backbone.forward(pack.ids, pack.positions, pack.attend, read=read, last=max(content_set | route_layers))
    # A bank without content layers keeps no chunks (its documents have chunk_count 0).
    chunk_counts = ((pack.lengths + pooling - 1) // pooling * bool(content_set)).tolist()
    chunk_of_token = chunk_index(pack.token_doc, pack.positions, chunk_counts, pooling)
    # The bank is on the CPU: so are the outputs, whatever device computed them.
    pooled = {layer: (mean_by(k, chunk_of_token, sum(chunk_counts)).to("cpu", out_dtype),
                      mean_by(v, chunk_of_token, sum(chunk_counts)).to("cpu", out_dtype))
              for layer, (k, v) in content.items()}
    keys, key_counts = router.keys(k_pre, pack.token_doc, len(pack.lengths))
    return Encoded(pooled, chunk_counts, keys.to("cpu", out_dtype), key_counts)


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
    """K/V (after RoPE) of the template head for every layer (positions 0..n-1), prepended to every question's
    context."""
    head, _ = question_tokens(tokenizer, "")
    out = {}

    def attend(i: int, x: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out[i] = (k.to("cpu", out_dtype).contiguous(), v.to("cpu", out_dtype).contiguous())
        return causal_attention(q, k, v)

    backbone.forward(torch.tensor(head), torch.arange(len(head)), attend)
    return out


@torch.inference_mode()
def routing_query(backbone: Backbone, tokenizer, router: Router, text: str) -> Tensor:
    """Routing vectors of a question: the template head then the text, run up to the router's last layer;
    only the text's tokens route (the template is shared by every question, so it carries no signal).
    Returns [T, Hr * G, d] as `Router.query` makes them."""
    head, body = question_tokens(tokenizer, text)
    layers, n = set(router.spec.layers), len(head)
    q_pre: dict[int, Tensor] = {}

    def read(i: int, x: Tensor, q: Tensor, k: Tensor, v: Tensor) -> None:
        if i in layers:
            q_pre[i] = router.query_input(i, x[n:], q[n:])

    backbone.forward(torch.tensor(head + body), torch.arange(n + len(body)),
                     lambda i, x, q, k, v: causal_attention(q, k, v), read=read, last=max(layers))
    return router.query(q_pre)
