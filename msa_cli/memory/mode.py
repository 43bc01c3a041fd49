"""What differs when the model is an MSA checkpoint, chosen once per model: `mode_for(model)`.

A plain model (SmolLM2, any Llama / Qwen) reads each memory document between its own start and end tokens, keeps
pooled content K/V in the upper half of its layers, routes with a shipped or trained router, and answers by Memory
Interleave with a relevance test (qa/interleave.py). An MSA checkpoint (model/msa_checkpoint.py) writes each
document's id at both ends, keeps content in its router layers with its own pooling, routes in every router layer
with its own projections, and answers by its generative retrieval (qa/generative.py). The engine and the bank
settings read these differences from the mode; nothing else asks which kind of model it has.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError

from .. import settings as defaults
from ..errors import USAGE, MsaError
from ..model.loading import Model
from ..model.protocol import MSA_DOCUMENT, PLAIN_DOCUMENT, document_tokens
from .router import RouterSpec, load_spec, msa_default_spec

ROUTER_DIR = Path(__file__).resolve().parent.parent / "data"   # routers shipped in the package: <weights>-<kind>


@dataclass(frozen=True)
class Mode:
    model: Model
    document_template: str        # how stage 1 writes a document ({id} and {text}); recorded in the bank
    pooling: int                  # tokens per pooled content chunk
    content_layers: tuple[int, ...]
    generative: bool              # answers by its own generative retrieval (qa/generative.py), not by hops

    def document_tokens(self, text: str, doc_id: int) -> list[int]:
        """A memory document's tokens as stage 1 encodes them."""
        return document_tokens(self.model.tokenizer, text, self.document_template, doc_id)

    @property
    def ids_in_text(self) -> bool:
        """Whether a document's tokens depend on its id: stage 1 must then know the ids the bank will give."""
        return "{id}" in self.document_template

    def default_router(self) -> RouterSpec:
        """An MSA checkpoint's own router (scoring as the reference's inference does); for other models the best
        router measured (BENCHMARKS.md): the shipped learned one, else the shipped native one, else MSA's default."""
        if self.generative:
            return checkpoint_spec(self.model)
        shipped = shipped_routers(self.model)
        for kind in ("learned", "native"):
            if kind in shipped:
                return load_spec(shipped[kind])
        return self._msa_default()

    def named_router(self, name: str) -> RouterSpec:
        """A router by name: 'default', a shipped kind ('learned', 'native'), 'msa' (MSA's own native choice) or a
        router file (from `msa train-router`); for an MSA checkpoint, 'dot' or 'cosine' (its router, scored so)."""
        cfg = self.model.backbone.cfg
        shipped = shipped_routers(self.model)
        if name == "default":
            return self.default_router()
        if self.generative and name in ("dot", "cosine"):
            return checkpoint_spec(self.model, name)
        if name == "msa":
            return self._msa_default()
        if name in shipped:
            return load_spec(shipped[name])
        path = Path(name)
        if not path.is_file():
            raise MsaError(f"no router {name!r}: give a router file, 'default', 'msa' or one of the shipped kinds "
                           f"({', '.join(shipped) or 'none for this model'})", USAGE)
        try:
            spec = load_spec(path)
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
            raise MsaError(f"{path} is not a router file: {e}", USAGE) from None
        if spec.layers and max(spec.layers) >= cfg.n_layers or any(
                q.shape[-1] != cfg.hidden for q, _ in (spec.proj or {}).values()):
            raise MsaError(f"{path} was trained for another model (layers {spec.layers})", USAGE)
        return spec

    def router_candidates(self, stored_weights: Path | None) -> list[RouterSpec]:
        """Routers a bank's keys may come from, to be matched by id: an MSA checkpoint's own (its weights are the
        model's); else the shipped ones (which carry their calibration, when a bank's older copy may not), the
        bank's stored copy, and MSA's default (banks made before routers were stored with them)."""
        if self.generative:
            candidates = [checkpoint_spec(self.model, score) for score in ("dot", "cosine")]
        else:
            candidates = [load_spec(p) for p in shipped_routers(self.model).values()]
            candidates += [load_spec(stored_weights)] if stored_weights else []
        return [*candidates, self._msa_default()]

    def _msa_default(self) -> RouterSpec:
        cfg = self.model.backbone.cfg
        return msa_default_spec(cfg.n_layers, cfg.n_heads, cfg.n_kv_heads)


def mode_for(model: Model) -> Mode:
    msa, cfg = model.msa, model.backbone.cfg
    if msa:
        return Mode(model, MSA_DOCUMENT, msa.pooling, tuple(msa.router_layers), generative=True)
    # MSA's content layers for a model never trained for it: the upper half
    return Mode(model, PLAIN_DOCUMENT, defaults.POOLING, tuple(range(cfg.n_layers // 2, cfg.n_layers)),
                generative=False)


def checkpoint_spec(model: Model, score: str | None = None) -> RouterSpec:
    """An MSA checkpoint's router: every query head of every router layer, keys in the content's chunks; scored
    as the reference's inference scores that checkpoint unless `score` says otherwise."""
    msa, cfg = model.msa, model.backbone.cfg
    return RouterSpec(heads=tuple((layer, h) for layer in msa.router_layers for h in range(cfg.n_heads)),
                      group=cfg.n_heads // cfg.n_kv_heads, granularity=msa.pooling, kind="msa",
                      proj=msa.router_proj, score=score or msa.routing_score,
                      checkpoint=model.identity["weights_sha256"])


def shipped_routers(model: Model) -> dict[str, Path]:
    """The routers shipped for this model's weights, by kind ("learned", "native")."""
    prefix = model.identity["weights_sha256"][:16]
    return {p.stem.removeprefix(prefix + "-"): p for p in sorted(ROUTER_DIR.glob(f"{prefix}-*.safetensors"))}
