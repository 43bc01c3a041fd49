"""Our own decoder forward over a Llama / Qwen2 / Qwen3 checkpoint's weights.

We do not call the transformers model at run time: MSA needs control over positions (document-wise RoPE),
attention masks (documents never see each other) and what each layer keeps (pooled K/V, routing keys).
`Backbone.forward` is the one layer walk every stage runs (stage 1 in memory/encoder.py, routing queries, the
decoder of model/decode.py, router training): what differs between them, the attention and what is read of each
layer, are its arguments. `logits()` is the ordinary forward, what the tests compare with transformers.

Shapes: T tokens, Hq query heads, Hk key/value heads, d head_dim, D hidden size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

FAMILIES = ("llama", "qwen2", "qwen3")

# A layer's attention given its normalised input x [T, D] and q [T, Hq, d], k, v [T, Hk, d] (q, k after RoPE).
Attend = Callable[[int, Tensor, Tensor, Tensor, Tensor], Tensor]
# What a stage keeps of a layer: its x [T, D] and q, k, v before RoPE.
Read = Callable[[int, Tensor, Tensor, Tensor, Tensor], None]


@dataclass(frozen=True)
class ModelConfig:
    family: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rope_theta: float
    rms_eps: float
    qkv_bias: bool      # Qwen2 (and Llama with attention_bias)
    qk_norm: bool       # Qwen3's per-head RMSNorm on q and k
    tie_embeddings: bool
    max_positions: int  # the context the model was trained for: prompts are fitted into it

    @classmethod
    def from_hf(cls, config) -> "ModelConfig":
        family = config.model_type
        if family not in FAMILIES:
            raise ValueError(f"unsupported model type {family!r} (supported: {', '.join(FAMILIES)})")
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"unsupported RoPE scaling {rope.get('rope_type')!r}: only plain RoPE is implemented")
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            family=family,
            n_layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            n_heads=config.num_attention_heads,
            n_kv_heads=config.num_key_value_heads,
            head_dim=head_dim,
            intermediate=config.intermediate_size,
            vocab=config.vocab_size,
            rope_theta=float(theta),
            rms_eps=float(config.rms_norm_eps),
            qkv_bias=family == "qwen2" or bool(getattr(config, "attention_bias", False)),
            qk_norm=family == "qwen3",
            tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            max_positions=int(getattr(config, "max_position_embeddings", None) or 2048),
        )


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # As transformers does it: normalise in fp32, cast back, then scale.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


@dataclass
class Layer:
    ln_attn: Tensor
    w_qkv: Tensor        # [(Hq + 2 Hk) d, D]: q, k and v projections fused into one matmul
    b_qkv: Tensor | None
    q_norm: Tensor | None
    k_norm: Tensor | None
    w_o: Tensor          # [D, Hq d]
    ln_mlp: Tensor
    w_gate_up: Tensor    # [2 F, D]: gate and up fused
    w_down: Tensor       # [D, F]


class Backbone:
    """The weights of a decoder-only LM and the forward pieces MSA composes."""

    def __init__(self, cfg: ModelConfig, state: dict[str, Tensor], dtype: torch.dtype, device: str = "cpu"):
        self.cfg = cfg
        self.dtype = dtype
        self.device = torch.device(device)

        def w(name: str) -> Tensor:
            return state[name].to(device=self.device, dtype=dtype).contiguous()

        def maybe(name: str) -> Tensor | None:
            return w(name) if name in state else None

        self.embed = w("model.embed_tokens.weight")
        self.norm = w("model.norm.weight")
        self.lm_head = self.embed if cfg.tie_embeddings or "lm_head.weight" not in state else w("lm_head.weight")
        self.layers: list[Layer] = []
        for i in range(cfg.n_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            biases = [maybe(a + f"{x}_proj.bias") for x in "qkv"]
            self.layers.append(Layer(
                ln_attn=w(p + "input_layernorm.weight"),
                w_qkv=torch.cat([w(a + f"{x}_proj.weight") for x in "qkv"]),
                b_qkv=torch.cat(biases) if all(b is not None for b in biases) else None,
                q_norm=maybe(a + "q_norm.weight"),
                k_norm=maybe(a + "k_norm.weight"),
                w_o=w(a + "o_proj.weight"),
                ln_mlp=w(p + "post_attention_layernorm.weight"),
                w_gate_up=torch.cat([w(p + "mlp.gate_proj.weight"), w(p + "mlp.up_proj.weight")]),
                w_down=w(p + "mlp.down_proj.weight"),
            ))
        d = cfg.head_dim
        self.inv_freq = (1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))).to(self.device)

    # --- pieces -------------------------------------------------------------------------------------------

    def embed_tokens(self, ids: Tensor) -> Tensor:
        """ids [T] (on any device: bookkeeping stays on the CPU) -> hidden [T, D] on the model's device"""
        return self.embed[ids.to(self.device)]

    def attn_input(self, i: int, h: Tensor) -> Tensor:
        """hidden [T, D] -> what layer i's attention projections read (after its input RMSNorm) [T, D]."""
        return rms_norm(h, self.layers[i].ln_attn, self.cfg.rms_eps)

    def qkv(self, i: int, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [T, D], layer i's normalised input (attn_input) -> q [T, Hq, d], k [T, Hk, d], v [T, Hk, d]: after
        q_norm/k_norm, before RoPE."""
        cfg, layer = self.cfg, self.layers[i]
        qkv = F.linear(x, layer.w_qkv, layer.b_qkv)
        hq, hk, d = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.head_dim
        q = qkv[:, :hq].view(-1, cfg.n_heads, d)
        k = qkv[:, hq:hq + hk].view(-1, cfg.n_kv_heads, d)
        v = qkv[:, hq + hk:].view(-1, cfg.n_kv_heads, d)
        if layer.q_norm is not None:
            q = rms_norm(q, layer.q_norm, cfg.rms_eps)
            k = rms_norm(k, layer.k_norm, cfg.rms_eps)
        return q, k, v

    def rope(self, x: Tensor, positions: Tensor) -> Tensor:
        """Rotate x [T, H, d] by each token's position [T] (rotate-half convention, fp32 angles)."""
        freqs = positions.to(x.device).float()[:, None] * self.inv_freq[None, :]   # [T, d/2]
        cos = torch.cat([freqs.cos(), freqs.cos()], -1)[:, None, :].to(x.dtype)  # [T, 1, d]
        sin = torch.cat([freqs.sin(), freqs.sin()], -1)[:, None, :].to(x.dtype)
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos + rotated * sin

    def finish_layer(self, i: int, h: Tensor, attn: Tensor) -> Tensor:
        """Residual stream after layer i, given its attention output attn [T, Hq, d]."""
        layer = self.layers[i]
        h = h + F.linear(attn.reshape(attn.shape[0], -1), layer.w_o)
        x = rms_norm(h, layer.ln_mlp, self.cfg.rms_eps)
        gate, up = F.linear(x, layer.w_gate_up).chunk(2, dim=-1)
        return h + F.linear(F.silu(gate) * up, layer.w_down)

    def head(self, h: Tensor) -> Tensor:
        """hidden [T, D] -> logits [T, vocab]"""
        return F.linear(rms_norm(h, self.norm, self.cfg.rms_eps), self.lm_head)

    # --- the layer walk every stage runs --------------------------------------------------------------------

    def forward(self, ids: Tensor, positions: Tensor, attend: Attend, *, read: Read | None = None,
                last: int | None = None) -> Tensor | None:
        """The decoder over ids [T] at RoPE positions [T] -> the final hidden states [T, D] (no head).

        What differs between stages is explicit:
        - attend(i, x, q, k, v) -> [T, Hq, d]: layer i's attention, given q, k after RoPE (causal, per document,
          over a KV cache, over memory);
        - read(i, x, q, k, v): sees each layer's normalised input x [T, D] and its q, k, v before RoPE (what
          routers and stage 1 keep);
        - last: the last layer anything is read from; the walk stops after reading it (no attention, no MLP)
          and returns None."""
        h = self.embed_tokens(ids)                                  # (T, D)
        for i in range(self.cfg.n_layers if last is None else last + 1):
            x = self.attn_input(i, h)                               # (T, D)
            q, k, v = self.qkv(i, x)                                # (T, Hq, d), (T, Hk, d), (T, Hk, d)
            if read is not None:
                read(i, x, q, k, v)
            if i == last:
                return None
            q, k = self.rope(q, positions), self.rope(k, positions)
            h = self.finish_layer(i, h, attend(i, x, q, k, v))
        return h

    def logits(self, ids: Tensor) -> Tensor:
        """Plain causal forward over one sequence ids [T] at positions 0..T-1 -> logits [T, vocab] (fp32): what
        transformers computes, and what the tests compare with it."""
        h = self.forward(ids, torch.arange(ids.shape[0]), lambda i, x, q, k, v: causal_attention(q, k, v))
        return self.head(h).float()


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal GQA attention within one sequence: q [T, Hq, d], k/v [T, Hk, d] -> [T, Hq, d]."""
    # SDPA's fast CPU kernel needs 4-D inputs; 3-D ones fall back to the math path, 5x slower
    # (measured at 330 tokens in bf16). Hence the batch axis.
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], is_causal=True, enable_gqa=True)
    return out[0].transpose(0, 1)
