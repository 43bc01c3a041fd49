"""Stage 3: prefill and greedy decoding with a KV cache, optionally over pooled memory.

Two ways to give the model what the router selected:
- original text (the default for models never trained on pooled K/V): the documents' text is part of the
  prompt, read as ordinary tokens. The MSA paper's ablation loses 37% without it even for its trained model.
- pooled memory (MSA stage 3): in each content layer the local tokens also attend to the pooled K/V chunks
  of the selected documents; every layer starts from the template head's cached K/V (positions 0..2) and the
  query's positions start at 3 + k (digest §2).
- routed memory (an MSA checkpoint, qa/generative.py): as pooled memory, but each router layer picks its own
  documents when the prefill reaches it, from its own routing query (digest §1.5, §3.2).
All run through `Backbone.forward`, the model's one layer walk: the memory, when there is one, is only an extra
prefix in the content layers' attention.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right

from msa_kernels.memory_attention import memory_attention

from .backbone import Backbone


@dataclass
class KVCache:
    """Per-layer K/V of the local sequence so far: k/v [T, Hk, d] after RoPE, on the model's device."""
    k: list[Tensor | None]
    v: list[Tensor | None]
    length: int = 0

    @classmethod
    def empty(cls, n_layers: int) -> "KVCache":
        return cls([None] * n_layers, [None] * n_layers)

    @classmethod
    def from_prefix(cls, prefix: dict[int, tuple[Tensor, Tensor]], n_layers: int, dtype: torch.dtype,
                    device: torch.device | str = "cpu") -> "KVCache":
        """A cache that starts with a precomputed prefix (the bank's template head) in every layer."""
        k = [prefix[i][0].to(device, dtype) for i in range(n_layers)]
        v = [prefix[i][1].to(device, dtype) for i in range(n_layers)]
        return cls(k, v, k[0].shape[0])

    def append(self, i: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k[i] = k if self.k[i] is None else torch.cat([self.k[i], k])
        self.v[i] = v if self.v[i] is None else torch.cat([self.v[i], v])
        return self.k[i], self.v[i]


@dataclass
class Memory:
    """Pooled K/V of the selected documents for each content layer: layer -> (k [S, Hk, d], v [S, Hk, d])."""
    kv: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)

    def layer(self, i: int, x: Tensor) -> tuple[Tensor, Tensor] | None:
        """What layer i attends to besides the local tokens (x: its normalised input, unused: the selection is
        fixed)."""
        return self.kv.get(i)


class Decoder:
    def __init__(self, backbone: Backbone):
        self.backbone = backbone

    @torch.inference_mode()
    def forward(self, ids: Tensor, positions: Tensor, cache: KVCache, memory: Memory | None = None) -> Tensor:
        """Run ids [T] at positions [T] after what the cache holds; extend the cache -> last logits [vocab]."""
        def attend(i: int, x: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            k_all, v_all = cache.append(i, k, v)                       # (Tl, Hk, d): the cache and the new tokens
            selected = memory.layer(i, x) if memory is not None else None
            if selected is None:
                return local_attention(q, k_all, v_all)
            k_mem, v_mem = selected                                     # (S, Hk, d): pooled memory chunks
            index = torch.arange(k_mem.shape[0], device=k_mem.device)
            return memory_attention(q, k_all, v_all, k_mem.to(q.dtype), v_mem.to(q.dtype), index)

        h = self.backbone.forward(ids, positions, attend)
        cache.length += ids.shape[0]
        return self.backbone.head(h[-1:])[0].float()

    def generate(self, prompt: list[int], *, cache: KVCache, start_position: int, max_new_tokens: int,
                 stop_ids: Iterable[int], memory: Memory | None = None,
                 on_token: Callable[[int], None] | None = None, no_repeat_ngram: int = 0,
                 stop_when: Callable[[list[int]], bool] | None = None) -> list[int]:
        """Greedy decoding: prefill the prompt, then one token at a time until a stop id (left out of the output
        and of the cache), stop_when(output so far) holds (its last token kept: the cache holds the whole output,
        so decoding can go on from it), or the budget.
        no_repeat_ngram = n > 0 never lets the answer repeat an n-token run of itself (the prompt may be copied):
        small greedy models fall into loops, writing one line over and over."""
        stop = set(stop_ids)
        positions = torch.arange(start_position, start_position + len(prompt))
        logits = self.forward(torch.tensor(prompt), positions, cache, memory)
        out: list[int] = []
        seen: dict[tuple[int, ...], set[int]] = {}   # (n-1)-gram of the answer -> tokens that followed it
        position = start_position + len(prompt)
        while len(out) < max_new_tokens:
            if no_repeat_ngram and len(out) >= no_repeat_ngram - 1:
                banned = seen.get(tuple(out[len(out) - no_repeat_ngram + 1:]))
                if banned:
                    logits = logits.index_fill(0, torch.tensor(sorted(banned), device=logits.device), float("-inf"))
            token = int(logits.argmax())
            if token in stop:
                break
            if no_repeat_ngram and len(out) >= no_repeat_ngram - 1:
                seen.setdefault(tuple(out[len(out) - no_repeat_ngram + 1:]), set()).add(token)
            out.append(token)
            if on_token:
                on_token(token)
            logits = self.forward(torch.tensor([token]), torch.tensor([position]), cache, memory)
            position += 1
            if stop_when is not None and stop_when(out):
                break
        return out


def local_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal GQA attention of the last Tq tokens over the Tl cached ones (bottom-right aligned):
    q [Tq, Hq, d], k/v [Tl, Hk, d] -> [Tq, Hq, d]."""
    tq, tl = q.shape[0], k.shape[0]
    # Causal within the new tokens, whatever their number (a multi-token block fed after decoding included: the
    # reference's decode path lets such a block see its own future, digest §7 B6).
    mask = None if tq == 1 else causal_lower_right(tq, tl)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=mask, is_causal=False, enable_gqa=True)
    return out[0].transpose(0, 1)
