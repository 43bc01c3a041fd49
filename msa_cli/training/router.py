"""`msa train-router`: learn MSA's router projections on the frozen backbone (digest §5), from the pairs of
training/pairs.py over the routing-layer inputs of training/states.py.

Loss: decoupled InfoNCE (τ = 0.1; digest §5) over a batch's candidates: every query's positives, hard negatives
from BM25 and from the teacher (without one, from the router itself, re-mined each epoch with the current
weights), and random passages; all candidates are shared by the batch's queries. With a teacher
(training/distill.py), plus the KL from its scores over the same candidates. The score is the router's own:
cosine per head, mean over heads, max over a document's keys, then the mean (late interaction) or MSA's max over
question tokens.
"""

from __future__ import annotations

import datetime
import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from .. import errors, settings
from ..memory.lexical import LexicalIndex
from ..memory.router import RouterSpec, save_spec
from ..model.backbone import Backbone
from .distill import TEACHER_TAU, Teacher, distillation_loss, teacher_for
from .pairs import Pairs, ict_pairs, labelled_pairs, passages_in
from .states import States, cached_inputs

TAU = 0.1                    # MSA's InfoNCE temperature (fixed in the paper's code)
CUTOFFS = (1, 5, 10)
MINE_WITHOUT_LABELS = 512    # ICT queries the router mines hard negatives for, when there are no labelled ones


# --- the router being trained --------------------------------------------------------------------------------------

class Projections(torch.nn.Module):
    """router_q_proj and router_k_proj of one layer, as [Hr, d, D] over standardised inputs."""

    def __init__(self, hidden: int, heads: int, head_dim: int, generator: torch.Generator):
        super().__init__()
        bound = hidden ** -0.5   # nn.Linear's init, as the paper's fresh projections
        self.q = torch.nn.Parameter((torch.rand(heads, head_dim, hidden, generator=generator) * 2 - 1) * bound)
        self.k = torch.nn.Parameter((torch.rand(heads, head_dim, hidden, generator=generator) * 2 - 1) * bound)

    @torch.no_grad()
    def start_from_attention(self, backbone: Backbone, layer: int, st: "Standardiser") -> None:
        """Start from the layer's own attention projections: router head h from KV head h (its k projection,
        and the mean of its group's q projections), rescaled for standardised inputs. That is the centred
        native router; from a random start, 1,350 NQ questions teach nothing beyond telling NQ passages
        from 2wiki ones (held-out recall@5 0.013 vs 0.50 from here, layer 8, 300 steps). Heads the layer
        lacks, or wider than its heads, keep the random start."""
        cfg = backbone.cfg
        size = self.q.shape[1]
        if size > cfg.head_dim:
            return
        w = backbone.layers[layer].w_qkv.float()
        hq, hk, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        wq = w[:hq * d].view(hk, hq // hk, d, -1).mean(1)
        wk = w[hq * d:(hq + hk) * d].view(hk, d, -1)
        n = min(hk, self.q.shape[0])
        self.q[:n] = wq[:n, :size] * st.scale   # a smaller head starts from the first dimensions of one
        self.k[:n] = wk[:n, :size] * st.scale

    def queries(self, x: Tensor) -> Tensor:
        return F.normalize(torch.einsum("tD,hdD->thd", x.float(), self.q), dim=-1)

    def keys(self, x: Tensor) -> Tensor:
        return F.normalize(torch.einsum("tD,hdD->thd", x.float(), self.k), dim=-1)


def scores(q: Tensor, q_counts: Tensor, k: Tensor, k_counts: Tensor, aggregate: str) -> Tensor:
    """The router's score for every (query, document), as msa_kernels/routing.py computes it: q [Tq, H, d] and
    k [K, H, d] unit vectors, each query's tokens and each document's keys contiguous (q_counts, k_counts rows
    each) -> [queries, documents]."""
    sim = q.flatten(1) @ k.flatten(1).T / q.shape[1]                                  # [Tq, K]: mean over heads
    per_token = torch.segment_reduce(sim.T.contiguous(), "max", lengths=k_counts, axis=0).T   # [Tq, docs]
    return torch.segment_reduce(per_token, aggregate, lengths=q_counts, axis=0)       # over question tokens


def decoupled_infonce(s: Tensor, positive: Tensor) -> Tensor:
    """s [B, N] scores, positive [B, N] bool (each row has at least one). Each positive is scored against the
    row's negatives only: other positives are not in its denominator (digest §5, INFONCE_DECOUPLE)."""
    logits = s / TAU
    negatives = torch.logsumexp(logits.masked_fill(positive, float("-inf")), dim=1, keepdim=True)   # [B, 1]
    per_positive = torch.logaddexp(logits, negatives) - logits                                      # -log p
    return ((per_positive * positive).sum(1) / positive.sum(1)).mean()


@torch.no_grad()
def rank_pool(proj: Projections, q_states: States, queries: list[int], d_states: States, aggregate: str,
              block: int = 16) -> Tensor:
    """Scores of the given queries against the whole pool -> [len(queries), pool]; in blocks of queries."""
    keys = proj.keys(d_states.x)
    out = []
    for i in range(0, len(queries), block):
        chosen = queries[i:i + block]
        out.append(scores(proj.queries(q_states.x[q_states.rows(chosen)]), q_states.counts[chosen],
                          keys, d_states.counts, aggregate))
    return torch.cat(out)


def recall(s: Tensor, positives: list[list[int]]) -> dict[str, float]:
    """recall@k (share of a query's positives in its top k, averaged) and MRR@100 of a [Q, pool] score matrix."""
    top = torch.topk(s, min(100, s.shape[1]), dim=1).indices.tolist()
    out = {f"recall@{k}": sum(len(set(t[:k]) & set(p)) / len(p) for t, p in zip(top, positives)) / len(top)
           for k in CUTOFFS}
    out["mrr"] = sum(next((1 / (r + 1) for r, d in enumerate(t) if d in p), 0.0)
                     for t, p in zip(top, positives)) / len(top)
    return {k: round(v, 4) for k, v in out.items()}


def bm25_negatives(pairs: Pairs, depth: int) -> list[list[int]]:
    """Per query, the pool passages BM25 ranks highest that are not its positives (the bank's BM25, over the pool)."""
    index = LexicalIndex.build(pairs.pool, list(range(len(pairs.pool))))
    out = []
    for query, positives in zip(pairs.queries, pairs.positives):
        s = index.scores(query)
        s[positives] = float("-inf")
        out.append(torch.topk(s, min(depth, len(s) - len(positives))).indices.tolist())
    return out


@dataclass
class Config:
    layer: int
    heads: int = 1
    head_dim: int = 48
    granularity: int = 1
    aggregate: str = "mean"
    distill: float = 1.0     # weight of the teacher's KL term, when there is a teacher
    epochs: int = 6
    batch: int = 64
    lr: float = 1e-3
    hard: int = 2            # hard negatives per query from BM25, as many from the teacher (or, without one, the router)
    hard_depth: int = 10     # drawn from this many of each ranker's best non-positives
    random: int = 1
    seed: int = 0


def train(pairs: Pairs, q_states: States, d_states: States, proj: Projections, cfg: Config,
          teacher: Teacher | None = None, log: Callable[[str], None] = print) -> list[dict]:
    """Train one layer's projections in place, leaving the epoch with the best held-out recall@5; returns every
    epoch's figures."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    optimiser = torch.optim.AdamW(proj.parameters(), lr=cfg.lr, weight_decay=0.01)
    held = set(pairs.held_out)
    train_ids = [i for i in range(len(pairs.queries)) if i not in held]
    steps = cfg.epochs * ((len(train_ids) + cfg.batch - 1) // cfg.batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, cfg.lr, total_steps=steps, pct_start=0.1)
    bm25 = bm25_negatives(pairs, cfg.hard_depth)
    taught = teacher.negatives(pairs.positives, cfg.hard_depth) if teacher else []
    # Without a teacher the router mines its own hard negatives each epoch for the labelled queries only (ICT
    # queries, lexical by construction, get BM25's): scanning the pool for thousands of ICT queries took 150 of
    # an epoch's 180 s. Without labelled queries, it mines for a sample of ICT ones. A teacher's negatives
    # replace the router's: they are better, and the scan over per-token keys takes minutes an epoch.
    mining = [] if teacher else [i for i in pairs.labelled if i not in held] or train_ids[:MINE_WITHOUT_LABELS]
    history, best, best_state = [], -1.0, None
    if pairs.held_out:   # where training starts from
        history.append({"epoch": 0, **held_out_recall(proj, pairs, q_states, d_states, cfg.aggregate)})
        log("  ".join(f"{k} {v}" for k, v in history[0].items()))
        best, best_state = history[0]["recall@5"], {k: v.detach().clone() for k, v in proj.state_dict().items()}
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        mined = {}
        if mining:
            top = torch.topk(rank_pool(proj, q_states, mining, d_states, cfg.aggregate),
                             min(cfg.hard_depth + 8, len(pairs.pool)), dim=1).indices.tolist()
            mined = {j: [d for d in row if d not in pairs.positives[j]][:cfg.hard_depth] for j, row in zip(mining, top)}
        rng.shuffle(train_ids)
        total = 0.0
        for b in range(0, len(train_ids), cfg.batch):
            batch = train_ids[b:b + cfg.batch]
            cand: dict[int, int] = {}
            for j in batch:
                picks = list(pairs.positives[j])
                for source in (bm25[j], mined.get(j, []), taught[j] if teacher else []):
                    picks += rng.sample(source, min(cfg.hard, len(source)))
                picks += [rng.randrange(len(pairs.pool)) for _ in range(cfg.random)]
                for d in picks:
                    cand.setdefault(d, len(cand))
            docs = list(cand)
            s = scores(proj.queries(q_states.x[q_states.rows(batch)]), q_states.counts[batch],
                       proj.keys(d_states.x[d_states.rows(docs)]), d_states.counts[docs], cfg.aggregate)
            positive = torch.zeros_like(s, dtype=torch.bool)
            for r, j in enumerate(batch):
                positive[r, [cand[d] for d in pairs.positives[j]]] = True
            loss = decoupled_infonce(s, positive)
            if teacher and cfg.distill:
                loss = loss + cfg.distill * distillation_loss(s / TAU, teacher.logits(batch, docs))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            total += float(loss.detach()) * len(batch)
        figures = {"epoch": epoch, "loss": round(total / len(train_ids), 4),
                   "seconds": round(time.perf_counter() - t0, 1)}
        if pairs.held_out:
            figures.update(held_out_recall(proj, pairs, q_states, d_states, cfg.aggregate))
        history.append(figures)
        log("  ".join(f"{k} {v}" for k, v in figures.items()))
        score = figures.get("recall@5", -figures["loss"])
        if score > best:
            best, best_state = score, {k: v.detach().clone() for k, v in proj.state_dict().items()}
    proj.load_state_dict(best_state)
    return history


def held_out_recall(proj: Projections, pairs: Pairs, q_states: States, d_states: States,
                    aggregate: str) -> dict[str, float]:
    s = rank_pool(proj, q_states, pairs.held_out, d_states, aggregate)
    return recall(s, [pairs.positives[j] for j in pairs.held_out])


@dataclass
class Standardiser:
    """Per-dimension standardisation of a layer's inputs before the projections. Hidden states carry a few
    huge, nearly constant dimensions (at layer 12 of SmolLM2 one dimension's mean is 7.9 with a spread of
    0.03, and any two passages' states have cosine 0.92), which would drown what the projections must learn.
    Mean from documents (resp. questions), spread from documents. It folds into the router file exactly:
    W (x - mu) / sigma = (W / sigma) x - (W / sigma) mu, i.e. scaled projections plus the centring
    vectors (mean_key, mean_query) the router already applies."""
    mean_doc: Tensor
    mean_question: Tensor
    scale: Tensor

    @classmethod
    def fit(cls, q_states: "States", d_states: "States") -> "Standardiser":
        x = d_states.x.float()
        return cls(x.mean(0), q_states.x.float().mean(0), x.std(0).clamp(min=1e-4))

    def apply(self, s: "States", questions: bool) -> "States":
        mean = self.mean_question if questions else self.mean_doc
        return States((s.x.float() - mean) / self.scale, s.counts)


def learned_spec(layers: dict[int, tuple[Projections, Standardiser]], granularity: int, aggregate: str) -> RouterSpec:
    """The router file's spec: projections with the standardisation folded in (see Standardiser)."""
    heads = tuple((layer, h) for layer, (p, _) in sorted(layers.items()) for h in range(p.q.shape[0]))
    proj, mean_key, mean_query = {}, [], []
    for layer, (p, st) in sorted(layers.items()):
        wq, wk = (w.detach().float() / st.scale for w in (p.q, p.k))
        proj[layer] = (wq.contiguous(), wk.contiguous())
        mean_key.append(torch.einsum("hdD,D->hd", wk, st.mean_doc))
        mean_query.append(torch.einsum("hdD,D->hd", wq, st.mean_question))
    return RouterSpec(heads=heads, group=1, granularity=granularity, kind="learned", proj=proj,
                      mean_key=torch.cat(mean_key), mean_query=torch.cat(mean_query), aggregate=aggregate)


# --- the whole job: pairs, cached states, layer choice, training ---------------------------------------------------

def choose_and_train(backbone: Backbone, tokenizer, model_hash: str, pairs: Pairs, layers: list[int], cfg: Config,
                     select_epochs: int, cache_dir: Path | None, teacher: Teacher | None = None,
                     log: Callable[[str], None] = print,
                     progress: Callable[[str, int], Callable[[int], None]] | None = None,
                     ) -> tuple[tuple[Projections, "Standardiser"], int, dict]:
    """Cache the candidate layers' inputs, train briefly on each to pick the layer with the best held-out recall@5
    (when there is more than one), then train the chosen one fully. Returns (projections, layer, report)."""
    def states(texts, questions):
        total = sum(len(t) for t in texts) // 4
        tick = progress("questions" if questions else "passages", total) if progress else None
        return cached_inputs(backbone, tokenizer, model_hash, texts, questions, layers, cfg.granularity,
                             cache_dir, on_tokens=tick)

    t0 = time.perf_counter()
    q_raw, d_raw = states(pairs.queries, True), states(pairs.pool, False)
    report = {"backbone_seconds": round(time.perf_counter() - t0, 1), "selection": {}}

    def run(layer: int, epochs: int) -> tuple[Projections, Standardiser, list[dict]]:
        st = Standardiser.fit(q_raw[layer], d_raw[layer])
        proj = Projections(backbone.cfg.hidden, cfg.heads, cfg.head_dim, torch.Generator().manual_seed(cfg.seed))
        proj.start_from_attention(backbone, layer, st)
        history = train(pairs, st.apply(q_raw[layer], True), st.apply(d_raw[layer], False), proj,
                        Config(**{**cfg.__dict__, "layer": layer, "epochs": epochs}), teacher, log)
        return proj, st, history

    best = layers[0]
    if len(layers) > 1:
        for layer in layers:
            log(f"layer {layer}: {select_epochs} epochs")
            report["selection"][layer] = max(h.get("recall@5", 0.0) for h in run(layer, select_epochs)[2])
        best = max(layers, key=lambda layer: report["selection"][layer])
    log(f"layer {best}: {cfg.epochs} epochs")
    proj, st, report["history"] = run(best, cfg.epochs)
    return (proj, st), best, report


def train_router_file(model, out: Path, qa: list[Path], qa_limit: int | None, ict: list[Path],
                      ict_limit: int | None, layers: list[int], base: Config, select_epochs: int, held_out: float,
                      teacher: bool, command: list[str], progress: bool, log: Callable[[str], None]) -> dict:
    """`msa train-router`: gather pairs, train (distilling from all-MiniLM-L6-v2 with `teacher`), and write the
    router file plus its manifest (out.json). base: the settings, its layer aside (chosen from `layers`)."""
    cfg = model.backbone.cfg
    bad = [layer for layer in layers if not 0 <= layer < cfg.n_layers]
    if bad:
        raise errors.MsaError(f"layer {bad[0]} is not in this model (0..{cfg.n_layers - 1})", errors.USAGE)
    for path in [*qa, *ict]:
        if not path.exists():
            raise errors.MsaError(f"{path} does not exist", errors.USAGE)
    rng = random.Random(base.seed)
    tokenizer = model.tokenizer
    pairs, sources = Pairs(), []
    cache: dict[Path, list[str]] = {}

    def passages_of(file: Path) -> list[str]:
        if file not in cache:
            cache[file] = passages_in(file, tokenizer, settings.PASSAGE_TOKENS) if file.is_file() else []
        return cache[file]

    for set_dir in qa:
        sources.append(labelled_pairs(pairs, set_dir, qa_limit, held_out, passages_of))
    for path in ict:
        sources.append(ict_pairs(pairs, str(path), passages_in(path, tokenizer, settings.PASSAGE_TOKENS),
                                 ict_limit, rng))
    if not pairs.queries:
        raise errors.MsaError("no training pairs: the sets hold no questions and the --ict passages no usable "
                              "sentences", errors.USAGE)
    if not pairs.held_out:   # no labelled questions: validate on ICT pairs instead
        pairs.held_out = rng.sample(range(len(pairs.queries)), max(1, round(len(pairs.queries) * held_out)))
    log(f"{len(pairs.queries)} queries ({len(pairs.labelled)} labelled, {len(pairs.held_out)} held out), "
        f"{len(pairs.pool)} passages")

    def bar(what: str, total: int):
        b = tqdm(total=total, desc=f"reading {what}", unit=" tok", unit_scale=True, disable=not progress,
                 file=sys.stderr, leave=False)
        return b.update

    cache_dir = settings.msa_home() / "cache" / "router-train"
    t0 = time.perf_counter()
    taught = teacher_for(pairs.queries, pairs.pool, cache_dir) if teacher else None
    teacher_seconds = round(time.perf_counter() - t0, 1)
    proj, layer, report = choose_and_train(model.backbone, tokenizer, model.identity["weights_sha256"], pairs,
                                           layers, base, select_epochs, cache_dir, taught, log, bar)
    spec = learned_spec({layer: proj}, base.granularity, base.aggregate)
    about = {"model": model.identity, "layers": [layer], "heads": base.heads, "head_dim": base.head_dim,
             "granularity": base.granularity, "aggregate": base.aggregate, "data": sources, "seed": base.seed,
             "epochs": base.epochs, "tau": TAU, "batch": base.batch, "lr": base.lr,
             "teacher": {"model": "all-MiniLM-L6-v2", "weight": base.distill, "tau": TEACHER_TAU,
                         "seconds": teacher_seconds} if teacher else None,
             "negatives": {"bm25": base.hard, "router": 0 if teacher else base.hard,
                           "teacher": base.hard if teacher else 0,
                           "random": base.random, "depth": base.hard_depth},
             **report, "command": " ".join(["msa", *command[1:]]),
             "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_spec(spec, out, about)
    out.with_suffix(".json").write_text(json.dumps({"router": spec.describe(), **about}, indent=1) + "\n")
    return about
