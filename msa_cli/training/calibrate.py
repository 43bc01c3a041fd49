"""Calibrate a native router for a model: pick the routing heads and granularity, estimate the centring vectors.

    python -m msa_cli.training.calibrate --nq PATH [--questions 800] [--out PATH]

PATH is the raw NQ-Open oracle file (gzipped JSON lines: a question and its contexts, the gold one marked
`isgold`), raw/nq-open-oracle.first2000.jsonl.gz of the shared eval data (see its SOURCES.md). Only its train split
is read, the first 1500 questions, each with its gold passage: the first half of the questions used selects, the
second half validates. For every (layer, query head): centre keys and queries (means over the selection passages'
and questions' tokens) and score it alone (recall@5); for each granularity the best heads are combined greedily
(scores averaged over heads, as the router does) within the hot-tier budget, and the combination with the best
validation recall@5 is written as the model's shipped router (memory/mode.py finds it by the weights' hash).
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..memory.mode import ROUTER_DIR
from ..memory.router import RouterSpec, chunk_means, save_spec
from ..model.backbone import Backbone, causal_attention
from ..model.loading import load_model
from ..model.packing import Pack, packs, rank_in_doc
from ..model.protocol import document_tokens, question_tokens

TRAIN_LINES = 1500                  # NQ questions 1..1500 are the train split; never read past them here
HOT_BYTES_PER_TOKEN = 100           # routing keys' budget: heads * head_dim * 2 bytes / granularity
GRANULARITIES = (2, 4, 8)          # 1 would be best, but even one key head then costs 128 bytes/token
SHORTLIST = 16                      # single heads kept for the greedy combination


def load_train(nq: Path, n: int) -> tuple[list[str], list[str]]:
    """The first n train questions of the NQ-Open oracle file and their gold passages (title, blank line, text)."""
    questions, passages = [], []
    with gzip.open(nq, "rt") as f:
        for i, line in enumerate(f):
            if i == min(n, TRAIN_LINES):
                break
            ex = json.loads(line)
            gold = next(c for c in ex["ctxs"] if c.get("isgold"))
            questions.append(ex["question"])
            passages.append(gold["title"] + "\n\n" + gold["text"])
    return questions, passages


@torch.inference_mode()
def document_keys(backbone: Backbone, docs: list[list[int]]) -> tuple[Tensor, Tensor]:
    """Pre-RoPE keys of every layer for documents encoded as stage 1 encodes them ->
    (k [L, T, Hk, d] bf16, token_doc [T])."""
    out, token_docs = [], []
    for chosen in packs([len(d) for d in docs], 2048):
        pack = Pack.of([docs[i] for i in chosen])
        ks: list[Tensor] = []
        backbone.forward(pack.ids, pack.positions, pack.attend, last=backbone.cfg.n_layers - 1,
                         read=lambda i, x, q, k, v: ks.append(k.to(torch.bfloat16)))
        out.append(torch.stack(ks))
        token_docs.append(pack.token_doc + chosen[0])   # packs hold consecutive documents
    return torch.cat(out, 1), torch.cat(token_docs)


@torch.inference_mode()
def question_queries(backbone: Backbone, tokenizer, questions: list[str]) -> tuple[Tensor, Tensor]:
    """Pre-RoPE queries of every layer for the question tokens (after the template head), as routing_query
    computes them -> (q [L, T, Hq, d] fp32, token_question [T])."""
    out, owners = [], []
    for n, question in enumerate(questions):
        head, tokens = question_tokens(tokenizer, question)
        ids = torch.tensor(head + tokens)
        qs: list[Tensor] = []
        backbone.forward(ids, torch.arange(len(ids)), lambda i, x, q, k, v: causal_attention(q, k, v),
                         read=lambda i, x, q, k, v: qs.append(q[len(head):].float()), last=backbone.cfg.n_layers - 1)
        out.append(torch.stack(qs))
        owners.append(torch.full((len(tokens),), n))
    return torch.cat(out, 1), torch.cat(owners)


class Candidates:
    """Centred, normalised keys of every (layer, KV head) and queries of every (layer, query head), at one
    granularity."""

    def __init__(self, k: Tensor, token_doc: Tensor, q: Tensor, token_q: Tensor, mean_k: Tensor, mean_q: Tensor,
                 granularity: int, group: int):
        n_docs = int(token_doc.max()) + 1
        # Pooled as the router pools its keys: the document's first token (a sink) left out.
        pooled, counts = chunk_means(k.transpose(0, 1), token_doc, n_docs, granularity)   # [K, L, Hk, d]
        self.key_doc = torch.repeat_interleave(torch.arange(n_docs), torch.tensor(counts))
        self.n_docs = n_docs
        self.keys = F.normalize(pooled - mean_k, dim=-1)                          # [K, L, Hk, d]
        self.queries = F.normalize(q - mean_q[:, None], dim=-1)                   # [L, T, Hq, d]
        self.token_q = token_q
        self.group = group

    def token_scores(self, head: tuple[int, int]) -> Tensor:
        """Cosine of every question token with every key for one (layer, query head): [T, K]."""
        layer, h = head
        return self.queries[layer, :, h] @ self.keys[:, layer, h // self.group].T

    def doc_scores(self, token_scores: Tensor) -> Tensor:
        """[T, K] (mean over heads already taken) -> [questions, docs]: max over tokens and over keys."""
        n_q = int(self.token_q.max()) + 1
        per_q = torch.full((n_q, token_scores.shape[1]), float("-inf")).index_reduce_(
            0, self.token_q, token_scores, "amax")
        return torch.full((n_q, self.n_docs), float("-inf")).index_reduce_(1, self.key_doc, per_q, "amax")

    def scores(self, heads: list[tuple[int, int]]) -> Tensor:
        return self.doc_scores(sum(self.token_scores(h) for h in heads) / len(heads))


def recall_at(scores: Tensor, k: int) -> float:
    """Question i's gold document is document i."""
    gold = scores.diagonal()[:, None]
    return float(((scores > gold).sum(1) < k).float().mean())


def greedy(cands: Candidates, shortlist: list[tuple[int, int]], max_key_heads: int) -> list[tuple[int, int]]:
    """Add the query head that most improves recall@5 (then recall@1) until none does; the KV heads they read
    (what the bank stores) stay within the budget."""
    chosen: list[tuple[int, int]] = []
    total = None     # sum over chosen heads of their token scores
    best = (-1.0, -1.0)
    key_heads = lambda heads: {(layer, h // cands.group) for layer, h in heads}  # noqa: E731
    while True:
        trials = []
        for c in shortlist:
            if c in chosen or len(key_heads(chosen + [c])) > max_key_heads:
                continue
            s = cands.token_scores(c) if total is None else total + cands.token_scores(c)
            doc = cands.doc_scores(s / (len(chosen) + 1))
            trials.append(((recall_at(doc, 5), recall_at(doc, 1)), c))
        if not trials:
            break
        score, c = max(trials)
        if score <= best:
            break
        chosen.append(c)
        total = cands.token_scores(c) if total is None else total + cands.token_scores(c)
        best = score
    return chosen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nq", type=Path, required=True, help="the raw NQ-Open oracle file (.jsonl.gz)")
    ap.add_argument("--questions", type=int, default=800, help="train questions used (half select, half validate)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.manual_seed(0)

    model = load_model()
    b, cfg = model.backbone, model.backbone.cfg
    group = cfg.n_heads // cfg.n_kv_heads
    questions, passages = load_train(args.nq, args.questions)
    half = len(questions) // 2
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731

    log(f"encoding {len(passages)} train passages and questions ...")
    sets = []
    for qs, ps in ((questions[:half], passages[:half]), (questions[half:], passages[half:])):
        k, token_doc = document_keys(b, [document_tokens(model.tokenizer, p) for p in ps])
        q, token_q = question_queries(b, model.tokenizer, qs)
        sets.append((k, token_doc, q, token_q))
    k, token_doc, q, token_q = sets[0]
    keep = rank_in_doc(token_doc) > 0
    mean_k = k[:, keep].float().mean(1)        # [L, Hk, d], from selection passages only
    mean_q = q.mean(1)                          # [L, Hq, d], from selection questions only

    results = []
    for g in GRANULARITIES:
        select = Candidates(*sets[0], mean_k, mean_q, g, group)
        single = {(layer, h): recall_at(select.scores([(layer, h)]), 5)
                  for layer in range(cfg.n_layers) for h in range(cfg.n_heads)}
        shortlist = sorted(single, key=single.get, reverse=True)[:SHORTLIST]
        log(f"granularity {g}: best single heads (recall@5, selection half):",
            [(c, round(single[c], 3)) for c in shortlist[:6]])
        max_key_heads = HOT_BYTES_PER_TOKEN * g // (cfg.head_dim * 2)
        heads = greedy(select, shortlist, max_key_heads)
        del select
        val = Candidates(*sets[1], mean_k, mean_q, g, group).scores(heads)
        n_key_heads = len({(layer, h // group) for layer, h in heads})
        results.append({"granularity": g, "heads": heads, "validation_recall@1": round(recall_at(val, 1), 4),
                        "validation_recall@5": round(recall_at(val, 5), 4),
                        "hot_bytes_per_token": n_key_heads * cfg.head_dim * 2 / g})
        log(json.dumps(results[-1]))
    best = max(results, key=lambda r: (r["validation_recall@5"], r["validation_recall@1"]))
    heads = tuple(tuple(h) for h in best["heads"])
    spec = RouterSpec(heads=heads, group=group, granularity=best["granularity"])
    spec = RouterSpec(heads=heads, group=group, granularity=best["granularity"],
                      mean_key=torch.stack([mean_k[layer, h] for layer, h in spec.key_heads]),
                      mean_query=torch.stack([mean_q[layer, h] for layer, h in heads]))
    out = args.out or ROUTER_DIR / f"{model.identity['weights_sha256'][:16]}-native.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_spec(spec, out, about={"model": model.identity, "data": "NQ-Open train questions 1-%d" % len(questions),
                                "selection": f"questions 1-{half}",
                                "validation": f"questions {half + 1}-{len(questions)}",
                                "results": results, "made": datetime.date.today().isoformat(),
                                "command": " ".join(["python -m msa_cli.training.calibrate", *sys.argv[1:]])})
    print(json.dumps({"router": spec.describe(), "file": str(out), "results": results}))


if __name__ == "__main__":
    main()
