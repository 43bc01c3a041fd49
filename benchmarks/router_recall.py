"""Router recall on NQ-Open dev (questions 1501..2000, each with its one gold passage), in one run.

    python benchmarks/router_recall.py [--pools 200 500]

For a pool of the first N dev gold passages, every one of those N questions is routed over the pool through
the real pipeline (stage-1 encode, routing_query, the routing scan). Systems: MSA's own spec (upper-half
layers, all heads, 64-token chunks, no centring), the shipped calibrated native router (fitted on train
questions only), and BM25 (bm25s, plain lowercase words) when it is installed. Prints JSON lines.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import time
from pathlib import Path

import torch

from msa_cli.memory.encoder import document_ids, encode, routing_query
from msa_cli.memory.router import Router, default_router, msa_default_spec
from msa_cli.model.loading import load_model
from msa_kernels.routing import route_scores

NQ = Path(__file__).resolve().parents[2] / "shared/eval/raw/nq-open-oracle.first2000.jsonl.gz"
DEV_START = 1500


def dev(n: int) -> tuple[list[str], list[str]]:
    questions, passages = [], []
    with gzip.open(NQ, "rt") as f:
        for i, line in enumerate(f):
            if i < DEV_START:
                continue
            ex = json.loads(line)
            gold = next(c for c in ex["ctxs"] if c.get("isgold"))
            questions.append(ex["question"])
            passages.append(gold["title"] + "\n\n" + gold["text"])
            if len(questions) == n:
                break
    return questions, passages


def metrics(ranks: list[int]) -> dict:
    """ranks: 0-based rank of each question's gold passage."""
    n = len(ranks)
    out = {f"recall@{k}": round(sum(r < k for r in ranks) / n, 4) for k in (1, 5, 10)}
    out["mrr"] = round(sum(1 / (r + 1) for r in ranks) / n, 4)
    return out


def msa_ranks(model, router: Router, questions, passages) -> tuple[list[int], float]:
    docs = [document_ids(model.tokenizer, p) for p in passages]
    enc = encode(model.backbone, docs, [], router, 64, torch.bfloat16)
    key_doc = torch.repeat_interleave(torch.arange(len(docs)), torch.tensor(enc.key_counts)).to(torch.int32)
    ranks, seconds = [], 0.0
    for i, q in enumerate(questions):
        start = time.perf_counter()
        scores = route_scores(routing_query(model.backbone, model.tokenizer, router, q), enc.route_keys, key_doc,
                              len(docs))
        seconds += time.perf_counter() - start
        ranks.append(int((scores > scores[i]).sum()))
    return ranks, seconds / len(questions)


def bm25_ranks(questions, passages) -> list[int] | None:
    try:
        import bm25s
    except ImportError:
        return None
    words = lambda s: re.findall(r"\w+", s.lower())  # noqa: E731
    index = bm25s.BM25()
    index.index([words(p) for p in passages], show_progress=False)
    ranks = []
    for i, q in enumerate(questions):
        scores = torch.tensor(index.get_scores(words(q)))
        ranks.append(int((scores > scores[i]).sum()))
    return ranks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pools", type=int, nargs="+", default=[200, 500])
    args = ap.parse_args()
    model = load_model()
    cfg = model.backbone.cfg
    systems = {"msa-spec": Router(msa_default_spec(cfg.n_layers, cfg.n_heads, cfg.n_kv_heads)),
               "native-calibrated": Router(default_router(model))}
    for pool in args.pools:
        questions, passages = dev(pool)
        for name, router in systems.items():
            ranks, latency = msa_ranks(model, router, questions, passages)
            print(json.dumps({"pool": pool, "system": name, **metrics(ranks),
                              "route_ms_per_question": round(latency * 1e3, 1),
                              "router": router.spec.describe()}), flush=True)
        ranks = bm25_ranks(questions, passages)
        if ranks is not None:
            print(json.dumps({"pool": pool, "system": "bm25", **metrics(ranks)}), flush=True)
        print(json.dumps({"pool": pool, "system": "chance", "recall@5": round(min(5, pool) / pool, 4)}))


if __name__ == "__main__":
    main()
