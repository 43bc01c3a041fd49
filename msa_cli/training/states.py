"""Router training's backbone pass: each text's normalised input to the candidate routing layers, computed once.

Only the router learns, so the backbone runs once. Question tokens are kept as they are, documents already averaged
over the router's granularity (a key is the projection of that mean, since the projection is linear). The cache
lives in memory and under $MSA_HOME/cache, so later runs with other settings skip the backbone; an epoch then
costs seconds.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..memory.router import chunk_means
from ..model.backbone import Backbone
from ..model.packing import Pack, packs
from ..model.protocol import document_tokens, question_tokens


@dataclass
class States:
    """One routing layer's inputs for a list of texts: x [N, D] rows, `counts` rows per text (in order)."""
    x: Tensor
    counts: Tensor

    def __post_init__(self):
        self.starts = torch.cumsum(self.counts, 0) - self.counts

    def rows(self, texts: list[int]) -> Tensor:
        """The rows of these texts, in this order."""
        return torch.cat([torch.arange(int(self.starts[t]), int(self.starts[t] + self.counts[t])) for t in texts])


@torch.inference_mode()
def layer_inputs(backbone: Backbone, sequences: list[list[int]], layers: list[int], skip: int,
                 granularity: int | None, pack_tokens: int = 2048,
                 on_tokens: Callable[[int], None] | None = None) -> dict[int, States]:
    """Each sequence runs alone (positions from 0, no attention across sequences), packed as stage 1 packs.
    Returns, per layer, the attention input of every token after the first `skip` of its sequence; with a
    granularity, documents' tokens averaged as Router.keys averages them (sink left out)."""
    parts: dict[int, list[tuple[Tensor, Tensor]]] = {layer: [] for layer in layers}
    for chosen in packs([len(s) for s in sequences], pack_tokens):
        pack = Pack.of([sequences[i] for i in chosen])

        def read(i: int, x: Tensor, q: Tensor, k: Tensor, v: Tensor) -> None:
            if i not in parts:
                return
            if granularity:
                means, counts = chunk_means(x, pack.token_doc, len(chosen), granularity)
                parts[i].append((means.to(torch.bfloat16), torch.tensor(counts)))
            else:
                keep = pack.positions >= skip
                parts[i].append((x[keep].to(torch.bfloat16),
                                 torch.bincount(pack.token_doc[keep], minlength=len(chosen))))

        backbone.forward(pack.ids, pack.positions, pack.attend, read=read, last=max(layers))
        if on_tokens:
            on_tokens(int(pack.lengths.sum()))
    return {layer: States(torch.cat([x for x, _ in p]), torch.cat([c for _, c in p])) for layer, p in parts.items()}


def cached_inputs(backbone: Backbone, tokenizer, model_hash: str, texts: list[str], questions: bool,
                  layers: list[int], granularity: int, cache_dir: Path | None,
                  on_tokens: Callable[[int], None] | None = None) -> dict[int, States]:
    """layer_inputs for questions (template head then text; question tokens kept) or documents (as stage 1 reads
    them; keys' granularity), loaded from the disk cache when this exact computation was done before."""
    kind = "questions" if questions else f"documents-g{granularity}"
    h = hashlib.sha256(json.dumps([model_hash, kind]).encode())
    for t in texts:
        h.update(t.encode() + b"\0")
    paths = {layer: cache_dir / f"{h.hexdigest()[:24]}-{kind}-layer{layer}.safetensors" if cache_dir else None
             for layer in layers}
    out = {}
    for layer, path in paths.items():
        if path and path.is_file():
            t = load_file(path)
            out[layer] = States(t["x"], t["counts"])
    missing = [layer for layer in layers if layer not in out]
    if not missing:
        return out
    if questions:
        tokens = [question_tokens(tokenizer, q) for q in texts]   # (template head, question) each
        computed = layer_inputs(backbone, [head + ids for head, ids in tokens], missing, skip=len(tokens[0][0]),
                                granularity=None, on_tokens=on_tokens)
    else:
        seqs = [document_tokens(tokenizer, t) for t in texts]
        computed = layer_inputs(backbone, seqs, missing, skip=0, granularity=granularity, on_tokens=on_tokens)
    for layer, st in computed.items():
        if paths[layer]:
            paths[layer].parent.mkdir(parents=True, exist_ok=True)
            tmp = paths[layer].with_suffix(".tmp")
            save_file({"x": st.x.contiguous(), "counts": st.counts.contiguous()}, tmp)
            tmp.replace(paths[layer])
    return {**out, **computed}
