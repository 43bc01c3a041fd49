"""Stage 2: which documents a question reads.

The router is pluggable: which (layer, query head) pairs route (their KV heads give the keys), at what
granularity (tokens per key: 64 is MSA's chunk, smaller is finer), and whether keys and queries are centred,
are its settings. They are recorded in the bank (`settings["router"]`) apart from the layers that keep pooled content K/V, so a new
router only recomputes the hot tier (`msa reindex`), never the content.

"native" routing uses the layer's own projections, as digest §8.2 recommends for an untrained model:
pre-RoPE q and k (after q_norm/k_norm), L2-normalised per head, question tokens only, and the document's
first token (an attention sink with an outsized key) left out of its chunk mean. Optional centring subtracts
a mean key and a mean query estimated on reference text: a few shared directions otherwise make a handful
of "hub" passages win every question.

Score (MSA Eq. 2): cosine per head, mean over the query heads, max over routing tokens, max over a
document's keys; then top-k. The scan itself is `msa_kernels.route_scores` (Triton on a GPU, torch here).
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

ROUTER_DIR = Path(__file__).resolve().parent.parent / "data"   # calibrated routers shipped in the package


@dataclass(frozen=True)
class RouterSpec:
    heads: tuple[tuple[int, int], ...]     # (layer, query head) pairs that route; their KV heads give the keys
    group: int                             # query heads per KV head (GQA): query head h reads KV head h // group
    granularity: int = 64                  # tokens per routing key
    kind: str = "native"
    # Centring vectors (fp32): mean_key [Hr, d] per key head (in `key_heads` order), mean_query [len(heads), d].
    mean_key: Tensor | None = field(default=None, compare=False)
    mean_query: Tensor | None = field(default=None, compare=False)

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
        for t in (self.mean_key, self.mean_query):
            if t is not None:
                h.update(t.float().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def describe(self, with_id: bool = True) -> dict:
        d = {"kind": self.kind, "heads": [list(p) for p in self.heads], "group": self.group,
             "granularity": self.granularity, "centred": self.mean_key is not None}
        if with_id:
            d["id"] = self.id
        return d


def msa_default_spec(n_layers: int, n_heads: int, n_kv_heads: int) -> RouterSpec:
    """MSA's own choice: every head of the upper half of the layers, 64-token chunks, no centring."""
    return RouterSpec(heads=tuple((layer, h) for layer in range(n_layers // 2, n_layers) for h in range(n_heads)),
                      group=n_heads // n_kv_heads)


def default_router(model) -> RouterSpec:
    """The calibrated native router shipped for this model's weights, else MSA's default."""
    shipped = ROUTER_DIR / f"router-{model.identity['weights_sha256'][:16]}.safetensors"
    if shipped.is_file():
        return load_spec(shipped)
    cfg = model.backbone.cfg
    return msa_default_spec(cfg.n_layers, cfg.n_heads, cfg.n_kv_heads)


def save_spec(spec: RouterSpec, path: Path, about: dict) -> None:
    """A router file: centring tensors plus the spec (and how it was made) as safetensors metadata."""
    tensors = {name: t.float().contiguous() for name, t in
               (("mean_key", spec.mean_key), ("mean_query", spec.mean_query)) if t is not None}
    meta = {"spec": json.dumps(spec.describe(with_id=False)), "about": json.dumps(about)}
    save_file(tensors, path, metadata=meta)


def load_spec(path: Path) -> RouterSpec:
    with safe_open(path, framework="pt") as f:
        d = json.loads(f.metadata()["spec"])
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    return RouterSpec(heads=tuple(tuple(p) for p in d["heads"]), group=d["group"], granularity=d["granularity"],
                      kind=d["kind"],
                      mean_key=tensors.get("mean_key"), mean_query=tensors.get("mean_query"))


class Router:
    def __init__(self, spec: RouterSpec):
        self.spec = spec
        # Which stored key head each routing query head reads.
        self.key_of_head = torch.tensor([spec.key_heads.index((layer, h // spec.group)) for layer, h in spec.heads])

    # --- keys (stage 1) -----------------------------------------------------------------------------------

    def keys(self, k_pre: dict[int, Tensor], token_doc: Tensor, n_docs: int) -> tuple[Tensor, list[int]]:
        """Routing keys of packed documents.

        k_pre: layer -> [T, Hk, d] pre-RoPE keys of the packed tokens; token_doc [T]: each token's document
        (0..n_docs-1, tokens of one document contiguous and in order). Returns keys [K, Hr, d] (fp32,
        centred, unit length per head) in document order and the number of keys of each document.
        """
        g = self.spec.granularity
        selected = torch.stack([k_pre[layer][:, head] for layer, head in self.spec.key_heads], 1).float()  # [T, Hr, d]
        rank = rank_in_doc(token_doc)
        # Token 0 of a document is a sink: leave it out; key j averages tokens 1 + g*j .. g*(j+1).
        lengths = torch.bincount(token_doc, minlength=n_docs)
        counts = ((lengths - 1).clamp(min=0) + g - 1) // g            # keys per document
        first_key = torch.cumsum(counts, 0) - counts
        keep = rank > 0
        key_of_token = first_key[token_doc[keep]] + (rank[keep] - 1) // g
        total = int(counts.sum())
        sums = torch.zeros(total, *selected.shape[1:]).index_add_(0, key_of_token, selected[keep])
        n = torch.zeros(total).index_add_(0, key_of_token, torch.ones(key_of_token.shape[0]))
        keys = sums / n[:, None, None]
        if self.spec.mean_key is not None:
            keys = keys - self.spec.mean_key
        return F.normalize(keys, dim=-1), counts.tolist()

    # --- queries (stage 2) --------------------------------------------------------------------------------

    def query(self, q_pre: dict[int, Tensor]) -> Tensor:
        """q_pre: layer -> [T, Hq, d] pre-RoPE queries of the routing tokens -> [T, Hr, d], one vector per key
        head for the kernels (with G = 1).

        The score is the mean over the routing query heads of cos(q_h, k_kv(h)). Because it is linear in the
        normalised q_h, each key head's query heads fold into one vector: Hr/len(heads) times their sum, so that
        the kernels' own mean over the Hr heads gives exactly that mean."""
        q = torch.stack([q_pre[layer][:, head] for layer, head in self.spec.heads], 1).float()  # [T, n, d]
        if self.spec.mean_query is not None:
            q = q - self.spec.mean_query
        q = F.normalize(q, dim=-1)
        n_keys = len(self.spec.key_heads)
        folded = torch.zeros(q.shape[0], n_keys, q.shape[2]).index_add_(1, self.key_of_head, q)
        return folded * (n_keys / len(self.spec.heads))

    def scores(self, q: Tensor, segments) -> tuple[Tensor, Tensor]:
        """Score every live document of the bank's routing segments -> (doc_ids [N], scores [N] fp32)."""
        ids, scores = [], []
        for seg in segments:
            s = route_scores(q, seg.keys, seg.key_doc, seg.doc_ids.shape[0])
            ids.append(seg.doc_ids[seg.live])
            scores.append(s[seg.live])
        if not ids:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0)
        return torch.cat(ids), torch.cat(scores)


def top_k(doc_ids: Tensor, scores: Tensor, k: int) -> list[tuple[int, float]]:
    """The k best documents, best first (fewer when the bank holds fewer)."""
    k = min(k, scores.shape[0])
    best = torch.topk(scores, k)
    return [(int(doc_ids[i]), float(s)) for s, i in zip(best.values, best.indices)]


def rank_in_doc(token_doc: Tensor) -> Tensor:
    """Each token's index inside its document, for packed, contiguous documents."""
    starts = torch.ones_like(token_doc, dtype=torch.bool)
    starts[1:] = token_doc[1:] != token_doc[:-1]
    start_pos = torch.cummax(torch.where(starts, torch.arange(len(token_doc)), 0), 0).values
    return torch.arange(len(token_doc)) - start_pos
