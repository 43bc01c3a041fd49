"""Stage 2: which documents a question reads.

A router turns each routing layer's token states into unit vectors in a few heads: keys for document tokens
(stage 1, stored in the bank's hot tier) and queries for question tokens. Two kinds:

- "native" uses the layer's own attention projections, as digest §8.2 recommends for an untrained model:
  pre-RoPE q and k (after q_norm/k_norm) of chosen (layer, query head) pairs; the KV head of each query head
  gives its keys. Optional centring subtracts a mean key and a mean query estimated on reference text: a few
  shared directions otherwise make a handful of "hub" passages win every question.
- "learned" is MSA's router (digest §1.4, §5): per routing layer, `router_q_proj` / `router_k_proj` map the
  layer's normalised input [T, D] to Hr heads of size d; trained by `msa train-router` (training/router.py).

- "msa" is an MSA checkpoint's own router (model/msa_checkpoint.py): its `router_q_proj` / `router_k_proj` in
  every router layer, with Hq query heads over Hk key heads (GQA). Each layer routes on its own (digest §1.5),
  and keys pool the same 64-token chunks as the content K/V, first token included. `score` is "dot", the
  released inference (scaled dot product, digest §1.4 D1), or "cosine", the paper's and the training's.

Native and learned keys average `granularity` tokens (a document's first token, an attention sink with an
outsized state, left out) and the score is cosine per head, mean over heads, max over a document's keys, then
over question tokens either MSA's max (Eq. 2) or, for a learned router, the mean (late interaction); then
top-k. The scan itself is `msa_kernels.route_scores` (Triton on a GPU, torch here). The settings and weights
are recorded with the bank, apart from the layers that keep pooled content K/V, so a new router only recomputes
the hot tier (`msa reindex`), never the content.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from msa_kernels.routing import route_scores

from ..model.packing import rank_in_doc

@dataclass(frozen=True)
class RouterSpec:
    heads: tuple[tuple[int, int], ...]     # (layer, query head) pairs that route; their KV heads give the keys
    group: int                             # query heads per KV head (GQA): query head h reads KV head h // group
    granularity: int = 64                  # tokens per routing key
    kind: str = "native"                   # "learned": heads are (layer, router head), group 1; or "msa"
    # Projections: layer -> (router_q_proj [Hq, d, D], router_k_proj [Hk, d, D]); Hq = Hk (group 1) if learned.
    proj: dict[int, tuple[Tensor, Tensor]] | None = field(default=None, compare=False)
    score: str = "cosine"                  # kind "msa" only: "dot" (MSA-4B's inference) or "cosine"
    checkpoint: str = ""                   # kind "msa" only: the checkpoint's weights hash (its weights stay there)
    # Centring vectors (fp32): mean_key [Hr, d] per key head (in `key_heads` order), mean_query [len(heads), d].
    mean_key: Tensor | None = field(default=None, compare=False)
    mean_query: Tensor | None = field(default=None, compare=False)
    # The router score at or above which a document counts as relevant (qa.interleave.Relevance), calibrated for
    # this router on train questions (benchmarks/abstention.py); None: not calibrated, BM25 alone decides. It
    # travels in the router's file (and the bank's copy of it), so a new router never inherits another's.
    relevant: float | None = field(default=None, compare=False)
    # Over question tokens: "max" is MSA's Eq. 2 (native and MSA routers); "mean" is late interaction, each
    # question token's best key averaged (ColBERT's MaxSim), what a learned router is trained and scored with.
    aggregate: str = "max"

    @property
    def key_heads(self) -> list[tuple[int, int]]:
        """The (layer, KV head) pairs stored in the bank: each once, however many of its query heads route."""
        return sorted({(layer, h // self.group) for layer, h in self.heads})

    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.heads})

    @property
    def id(self) -> str:
        """Identifies the keys this router produces: the bank refuses to be read with another."""
        h = hashlib.sha256(json.dumps(self.describe(with_id=False), sort_keys=True).encode())
        for t in self.tensors().values():
            h.update(t.numpy().tobytes())
        return h.hexdigest()[:16]

    def tensors(self) -> dict[str, Tensor]:
        """The router's weights by name (what its file holds), fp32 and contiguous. An MSA checkpoint's router
        (0.9 GB in fp32 for MSA-4B) is part of the checkpoint: its hash, in describe(), stands for it."""
        if self.kind == "msa":
            return {}
        out = {}
        for layer, (q, k) in sorted((self.proj or {}).items()):
            out[f"q_proj.{layer}"], out[f"k_proj.{layer}"] = q, k
        for name, t in (("mean_key", self.mean_key), ("mean_query", self.mean_query)):
            if t is not None:
                out[name] = t
        return {name: t.float().contiguous() for name, t in out.items()}

    def describe(self, with_id: bool = True) -> dict:
        d = {"kind": self.kind, "heads": [list(p) for p in self.heads], "group": self.group,
             "granularity": self.granularity, "centred": self.mean_key is not None}
        if self.kind == "msa":
            d |= {"score": self.score, "checkpoint": self.checkpoint}
        if self.aggregate != "max":   # only then, so routers made before there was a choice keep their ids
            d["aggregate"] = self.aggregate
        if with_id:
            d["id"] = self.id
        return d


def msa_default_spec(n_layers: int, n_heads: int, n_kv_heads: int) -> RouterSpec:
    """MSA's own choice: every head of the upper half of the layers, 64-token chunks, no centring."""
    return RouterSpec(heads=tuple((layer, h) for layer in range(n_layers // 2, n_layers) for h in range(n_heads)),
                      group=n_heads // n_kv_heads)


def router_file_contents(spec: RouterSpec, about: dict) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A router file's tensors and metadata: the spec, its relevance threshold if calibrated, and how the router
    was made (`about`)."""
    meta = {"spec": json.dumps(spec.describe(with_id=False)), "about": json.dumps(about)}
    if spec.relevant is not None:
        meta["relevant"] = json.dumps(spec.relevant)
    return spec.tensors(), meta


def save_spec(spec: RouterSpec, path: Path, about: dict) -> None:
    tensors, meta = router_file_contents(spec, about)
    save_file(tensors, path, metadata=meta)


def load_spec(path: Path) -> RouterSpec:
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        d = json.loads(meta["spec"])
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    proj = {int(name.split(".")[1]): (tensors[name], tensors[name.replace("q_proj", "k_proj")])
            for name in tensors if name.startswith("q_proj.")}
    return RouterSpec(heads=tuple(tuple(p) for p in d["heads"]), group=d["group"], granularity=d["granularity"],
                      kind=d["kind"], proj=proj or None, score=d.get("score", "cosine"),
                      checkpoint=d.get("checkpoint", ""), aggregate=d.get("aggregate", "max"),
                      mean_key=tensors.get("mean_key"), mean_query=tensors.get("mean_query"),
                      relevant=json.loads(meta["relevant"]) if "relevant" in meta else None)


def read_about(path: Path) -> dict:
    """How a router file was made (training data, seed, figures), as `save_spec` recorded it."""
    with safe_open(path, framework="pt") as f:
        return json.loads(f.metadata().get("about", "{}"))


class Router:
    def __init__(self, spec: RouterSpec, device: str | torch.device = "cpu"):
        self.spec = spec
        self.device = torch.device(device)
        # Projections in fp32 where the model computes.
        self.proj = {layer: (q.to(self.device, torch.float32), k.to(self.device, torch.float32))
                     for layer, (q, k) in (spec.proj or {}).items()}
        self._keys_on_device: dict[str, Tensor] = {}   # segment name -> its keys, when the model is not on the CPU

    # --- per-token vectors of a routing layer --------------------------------------------------------------

    def key_input(self, layer: int, x: Tensor, k: Tensor) -> Tensor:
        """What a routing layer contributes to document keys: x [T, D] is the layer's normalised input, k
        [T, Hk, d] its pre-RoPE keys. Native routers read k; learned and MSA ones project x -> [T, Hk, d]."""
        return k if not self.proj else self._project(x, self.proj[layer][1])

    def query_input(self, layer: int, x: Tensor, q: Tensor | None) -> Tensor:
        """As key_input, for question tokens: q [T, Hq, d] is the layer's pre-RoPE queries."""
        return q if not self.proj else self._project(x, self.proj[layer][0])

    @staticmethod
    def _project(x: Tensor, w: Tensor) -> Tensor:
        """x [T, D], w [H, d, D] -> [T, H, d] in fp32."""
        return F.linear(x.float(), w.flatten(0, 1)).view(x.shape[0], w.shape[0], w.shape[1])

    # --- keys (stage 1) -----------------------------------------------------------------------------------

    def keys(self, k_pre: dict[int, Tensor], token_doc: Tensor, n_docs: int) -> tuple[Tensor, list[int]]:
        """Routing keys of packed documents.

        k_pre: layer -> [T, H, d] its key_input for the packed tokens; token_doc [T]: each token's document
        (0..n_docs-1, tokens of one document contiguous and in order). Returns keys [K, Hr, d] (fp32) in
        document order and the number of keys of each document. Cosine routers store unit keys (centred first,
        if the router centres); an MSA router scoring with the dot product stores the raw chunk means.
        """
        selected = torch.stack([k_pre[layer][:, head] for layer, head in self.spec.key_heads], 1)  # [T, Hr, d]
        keys, counts = chunk_means(selected, token_doc, n_docs, self.spec.granularity,
                                   skip_first=self.spec.kind != "msa")
        if self.spec.mean_key is not None:
            keys = keys - self.spec.mean_key.to(keys.device)
        return (keys if self.spec.score == "dot" else F.normalize(keys, dim=-1)), counts

    # --- queries (stage 2) --------------------------------------------------------------------------------

    def query(self, q_pre: dict[int, Tensor], layer: int | None = None) -> Tensor:
        """q_pre: layer -> [T, H, d] its query_input for the routing tokens -> [T, Hr, d], one vector per key
        head for the kernels (with G = 1). layer: only that layer's heads (an MSA router routes per layer).

        The score is the mean over the routing query heads of s(q_h, k_kv(h)), with s the cosine, or for an MSA
        router scoring as released, the dot product scaled by d^-1/2. Because it is linear in q_h (normalised
        for the cosine), each key head's query heads fold into one vector: Hr/len(heads) times their sum, so
        that the kernels' own mean over the Hr heads gives exactly that mean."""
        heads = [p for p in self.spec.heads if layer is None or p[0] == layer]
        key_heads = [p for p in self.spec.key_heads if layer is None or p[0] == layer]
        q = torch.stack([q_pre[lay][:, head] for lay, head in heads], 1).float()  # [T, n, d]
        if self.spec.mean_query is not None:
            if layer is not None:
                raise ValueError("a centred router routes all its layers together")
            q = q - self.spec.mean_query.to(q.device)
        q = q * q.shape[-1] ** -0.5 if self.spec.score == "dot" else F.normalize(q, dim=-1)
        key_of_head = torch.tensor([key_heads.index((lay, h // self.spec.group)) for lay, h in heads],
                                   device=q.device)
        folded = torch.zeros(q.shape[0], len(key_heads), q.shape[2], device=q.device).index_add_(1, key_of_head, q)
        return folded * (len(key_heads) / len(heads))

    def key_starts(self, token_starts: list[int]) -> list[int]:
        """Where each of a document's keys starts, given where each of its tokens starts (as `keys` groups them:
        the first token left out unless the router is an MSA checkpoint's)."""
        skip = int(self.spec.kind != "msa")
        return token_starts[skip::self.spec.granularity]

    def similarity(self, q: Tensor, keys: Tensor) -> Tensor:
        """Each routing token's score against each key, mean over heads as the scan computes it:
        q [T, Hr, d], keys [K, Hr, d] -> [T, K] fp32."""
        return torch.einsum("thd,khd->tk", q.float(), keys.to(q.device).float()) / q.shape[1]

    def scores(self, q: Tensor, segments, layer: int | None = None) -> tuple[Tensor, Tensor]:
        """Score every live document of the bank's routing segments -> (doc_ids [N], scores [N] fp32, on the
        CPU). layer: only that layer's keys (q from query(..., layer))."""
        heads = slice(None)
        if layer is not None:
            at = [i for i, (lay, _) in enumerate(self.spec.key_heads) if lay == layer]
            heads = slice(at[0], at[-1] + 1)
        ids, scores = [], []
        for seg in segments:
            s = route_scores(q, self._keys(seg)[:, heads], seg.key_doc, seg.doc_ids.shape[0],
                             aggregate=self.spec.aggregate).cpu()
            ids.append(seg.doc_ids[seg.live])
            scores.append(s[seg.live])
        if not ids:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0)
        return torch.cat(ids), torch.cat(scores)

    def _keys(self, seg) -> Tensor:
        """A segment's keys where the model computes: the memory-mapped file on the CPU; on a GPU, a copy made
        once (the hot tier lives there, as in the paper), while content K/V stay in host memory."""
        if self.device.type == "cpu":
            return seg.keys
        if seg.name not in self._keys_on_device:
            self._keys_on_device[seg.name] = seg.keys.to(self.device)
        return self._keys_on_device[seg.name]


def chunk_means(x: Tensor, token_doc: Tensor, n_docs: int, g: int,
                skip_first: bool = True) -> tuple[Tensor, list[int]]:
    """Means of packed documents' tokens x [T, ...] over runs of g tokens, in fp32 -> ([K, ...], keys per document).
    With skip_first, token 0 of a document (an attention sink with an outsized state) is left out, so key j
    averages tokens 1 + g*j .. g*(j+1); without, key j averages tokens g*j .. g*j + g-1, MSA's content chunks.
    The last key may be shorter. x may live on any device; token_doc is on the CPU."""
    skip = int(skip_first)
    rank = rank_in_doc(token_doc)
    lengths = torch.bincount(token_doc, minlength=n_docs)
    counts = ((lengths - skip).clamp(min=0) + g - 1) // g
    first_key = torch.cumsum(counts, 0) - counts
    keep = rank >= skip
    key_of_token = (first_key[token_doc[keep]] + (rank[keep] - skip) // g).to(x.device)
    total = int(counts.sum())
    sums = torch.zeros(total, *x.shape[1:], device=x.device).index_add_(0, key_of_token, x[keep.to(x.device)].float())
    n = torch.zeros(total, device=x.device).index_add_(0, key_of_token,
                                                        torch.ones(key_of_token.shape[0], device=x.device))
    return sums / n.view(-1, *([1] * (x.dim() - 1))), counts.tolist()
