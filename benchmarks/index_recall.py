"""What routing through the coarse keys (memory/coarse.py) costs in recall, and what it saves in time, on a real
bank: for each question, the default routing's top 16 with every key scanned against the top 16 in two steps,
same process, same routing query.

    python benchmarks/index_recall.py --bank ~/.msa/eval/nq-dev-10m-* --eval-dir /tmp/eval [--questions 100]
        [--candidates 256 1024] [--sample 1024]

A version-1 bank is upgraded first (its coarse keys written: Bank.lock). The questions are NQ dev questions 1501
onwards, as the other benchmarks. Prints one JSON line per --candidates value: recall of the full scan's top 16
and top 5 (the share of them the two steps also return), whether the first hit is the same, the documents scored
exactly, and ms per question (p50, p95) of each way, BM25 and fusion included, the routing query's forward not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from msa_cli import settings
from msa_cli.engine import Engine
from msa_cli.memory import coarse
from msa_cli.memory.bank import Bank
from msa_cli.memory.search import search
from msa_cli.model.loading import load_model

DEV_START = 1500
TOP = 16


def timed_search(engine: Engine, q, text: str, exact: bool) -> tuple[list[int], float]:
    settings.EXACT_SCAN_KEYS = 10**15 if exact else 0
    start = time.perf_counter()
    hits = search(engine.bank, engine.router, q, text, TOP)
    return [h.document.doc_id for h in hits], 1e3 * (time.perf_counter() - start)


def p95(values: list[float]) -> float:
    return sorted(values)[int(0.95 * (len(values) - 1))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bank", type=Path, required=True)
    ap.add_argument("--eval-dir", type=Path, default=Path("/tmp/eval"))
    ap.add_argument("--questions", type=int, default=100)
    ap.add_argument("--candidates", type=int, nargs="+", default=[coarse.CANDIDATES])
    ap.add_argument("--sample", type=int, default=coarse.SAMPLE, help="documents sampled for the score statistics")
    args = ap.parse_args()
    coarse.SAMPLE = args.sample

    with Bank.open(args.bank).lock():   # upgrades a version-1 bank: writes its coarse keys
        pass
    engine = Engine.open(load_model(None), args.bank)
    lines = (args.eval_dir / "nq" / "questions.jsonl").read_text().splitlines()[DEV_START:DEV_START + args.questions]
    questions = [json.loads(line)["question"] for line in lines]
    queries = [engine.routing_query(text) for text in questions]
    segments = engine.bank.routing_segments()
    keys, coarse_keys = (sum(s.keys.shape[0] for s in segments),
                         sum(s.coarse.shape[0] for s in segments if s.coarse is not None))
    full = []
    for q, text in zip(queries, questions):
        timed_search(engine, q, text, exact=True)   # one warm pass per question: both ways read warm pages
        full.append(timed_search(engine, q, text, exact=True))
    for candidates in args.candidates:
        coarse.CANDIDATES = candidates
        two = [timed_search(engine, q, text, exact=False) for q, text in zip(queries, questions)]
        scored = [coarse.two_step_scores(engine.router, q, segments, engine.bank.lexical().scores(text),
                                         engine.bank.lexical().doc_ids)[0].numel()
                  for q, text in zip(queries[:10], questions[:10])]
        print(json.dumps({
            "documents": engine.bank.num_documents, "keys": keys, "coarse_keys": coarse_keys,
            "group": coarse.GROUP, "candidates": candidates, "sample": coarse.SAMPLE, "questions": len(questions),
            "recall_top16": statistics.mean(len(set(a) & set(b)) / len(a) for (a, _), (b, _) in zip(full, two)),
            "recall_top5": statistics.mean(len(set(a[:5]) & set(b[:5])) / 5 for (a, _), (b, _) in zip(full, two)),
            "same_first": statistics.mean(a[0] == b[0] for (a, _), (b, _) in zip(full, two)),
            "scored_exactly": statistics.median(scored),
            "full_scan_ms_p50": round(statistics.median(t for _, t in full), 1),
            "full_scan_ms_p95": round(p95([t for _, t in full]), 1),
            "two_steps_ms_p50": round(statistics.median(t for _, t in two), 1),
            "two_steps_ms_p95": round(p95([t for _, t in two]), 1),
        }), flush=True)


if __name__ == "__main__":
    main()
