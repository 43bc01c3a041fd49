"""Checkpoints in the layout of the released MSA model (`EverMind-AI/MSA-4B`) and any checkpoint like it.

Such a directory is a Qwen3 checkpoint whose `config.json` says `"model_type": "msa"` and carries an
`msa_config` (digest §0): the router layers, top-k, the pooling kernel, how scores are reduced, and whether the
router is decoupled. Each router layer's attention holds two extra projections,
`model.layers.{i}.self_attn.router_q_proj.0.weight` [Hq*d, D] and `router_k_proj.0.weight` [Hk*d, D] (a
one-layer `nn.Sequential` in the reference, hence the `.0`; a bare `.weight` is accepted too).

transformers does not know the "msa" model type, so the config is read here and handed to transformers as the
Qwen3 config it extends. Only what the released model uses is supported; anything else is a clear error rather
than a silent approximation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from ..errors import ModelUnavailable

MODEL_TYPE = "msa"
# The reductions the released model was trained with (digest §0); other values would need other kernels.
SUPPORTED_REDUCTIONS = {"head_reduce_method": "mean", "query_reduce_method": "max", "chunk_reduce_method": "max"}
SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|object_ref_end|>")


@dataclass(frozen=True)
class MsaSettings:
    """What an MSA checkpoint adds to its Qwen3 backbone."""
    router_layers: tuple[int, ...]
    top_k: int                      # documents per router layer (16 in MSA-4B)
    pooling: int                    # tokens per pooled chunk (64)
    aux_loss_method: str            # "INFONCE_DECOUPLE" in MSA-4B: its inference scores with a scaled dot product
    # layer -> (router_q_proj [Hq, d, D], router_k_proj [Hk, d, D]), as stored (the checkpoint's dtype).
    router_proj: dict[int, tuple[Tensor, Tensor]]

    @property
    def routing_score(self) -> str:
        """How the reference's inference scores this checkpoint (digest §1.4): it normalises the router vectors
        only when aux_loss_method is exactly "INFONCE" (a cosine); otherwise, as for MSA-4B, a scaled dot product."""
        return "cosine" if self.aux_loss_method == "INFONCE" else "dot"


def is_msa_checkpoint(directory: Path) -> bool:
    try:
        return json.loads((directory / "config.json").read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False


def read_config(directory: Path):
    """config.json -> (a transformers Qwen3Config for the backbone, the raw msa_config dict)."""
    from transformers import Qwen3Config

    try:
        raw = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelUnavailable(f"cannot read {directory / 'config.json'}: {e}") from None
    msa_config = raw.pop("msa_config", None)
    if not isinstance(msa_config, dict):
        raise ModelUnavailable(f"{directory / 'config.json'} has model_type 'msa' but no msa_config")
    raw["model_type"] = "qwen3"
    raw.pop("architectures", None)
    return Qwen3Config.from_dict(raw), msa_config


def msa_settings(msa_config: dict, n_layers: int, n_heads: int, n_kv_heads: int, head_dim: int, hidden: int,
                 state: dict[str, Tensor], where: Path) -> MsaSettings:
    """Validate msa_config against what we implement and collect the router projections from the weights."""
    def bad(message: str) -> ModelUnavailable:
        return ModelUnavailable(f"{where}: {message}")

    layers = msa_config.get("router_layer_idx", "all")
    try:
        if layers == "all":
            router_layers = tuple(range(n_layers))
        elif isinstance(layers, str):
            router_layers = tuple(sorted(int(x) for x in layers.split(",") if x.strip()))
        else:
            router_layers = tuple(sorted(int(x) for x in layers))
    except (TypeError, ValueError):
        raise bad(f"msa_config.router_layer_idx {layers!r} is not 'all' or a list of layers") from None
    if not router_layers or not all(0 <= i < n_layers for i in router_layers):
        raise bad(f"msa_config.router_layer_idx {layers!r} names no layers of this {n_layers}-layer model")
    for key, wanted in SUPPORTED_REDUCTIONS.items():
        if msa_config.get(key, wanted) != wanted:
            raise bad(f"msa_config.{key} = {msa_config[key]!r} is not supported (only {wanted!r}, as in MSA-4B)")
    if not msa_config.get("decouple_router", False):
        raise bad("msa_config.decouple_router is false: only checkpoints with router_q_proj/router_k_proj "
                  "(a decoupled router, as in MSA-4B) are supported")
    if msa_config.get("decouple_pooling_mode", "mean") != "mean":
        raise bad(f"msa_config.decouple_pooling_mode {msa_config['decouple_pooling_mode']!r} is not supported")
    top_k, pooling = int(msa_config.get("top_k_docs", 16)), int(msa_config.get("pooling_kernel_size", 64))
    if top_k < 1 or pooling < 1:
        raise bad("msa_config.top_k_docs and pooling_kernel_size must be positive")

    proj = {}
    for i in router_layers:
        pair = []
        for name, heads in (("router_q_proj", n_heads), ("router_k_proj", n_kv_heads)):
            prefix = f"model.layers.{i}.self_attn.{name}"
            w = state.get(f"{prefix}.0.weight", state.get(f"{prefix}.weight"))
            if w is None:
                raise bad(f"the weights lack {prefix}.0.weight (router layer {i})")
            if tuple(w.shape) != (heads * head_dim, hidden):
                raise bad(f"{prefix} has shape {tuple(w.shape)}, expected {(heads * head_dim, hidden)}")
            pair.append(w.view(heads, head_dim, hidden))
        proj[i] = (pair[0], pair[1])
    return MsaSettings(router_layers=router_layers, top_k=top_k, pooling=pooling,
                       aux_loss_method=str(msa_config.get("aux_loss_method", "INFONCE")), router_proj=proj)


def check_tokenizer(tokenizer, where: Path) -> None:
    """The protocol's markers must be single tokens, as in Qwen3's vocabulary."""
    for token in SPECIAL_TOKENS:
        ids = tokenizer(token, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ModelUnavailable(f"{where}: the tokenizer has no special token {token}, which MSA's protocol needs")
