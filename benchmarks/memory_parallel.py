"""Memory Parallel on this machine: the same memory as one bank and sharded over 1, 2 and 4 gloo ranks, in one run.

    python benchmarks/memory_parallel.py --eval-dir /tmp/eval [--tokens 400000] [--ranks 1 2 4] [--questions 50]

--eval-dir holds nq and 2wiki as shared/eval/tools/convert_eval.py converts them. The memory: NQ-Open dev questions
1501..2000's gold passages grown to --tokens with the 2wiki half the router never trained on (router_recall.py's
sets). It is ingested once as one bank (`msa ingest`) and once per rank count as a sharded bank (`torchrun
--nproc-per-node N -m msa_cli ingest`), then each is measured in a fresh job (this script with --measure, under
torchrun for the sharded ones), every process on one thread (OMP_NUM_THREADS=1, as torchrun sets it): 4 ranks on
this 2-core machine share the cores, so their figures show the protocol's cost, not a 4-machine speed-up.

Per question, measured on rank 0 over the first --questions dev questions (after one warm-up):
  - route ms: one routing step of the default router, top 16 (the routing query's forward, every rank's scan
    and BM25, the statistics' all-reduce, the candidates' gather and merge): what `msa search` does;
  - scan ms: the same step over rank 0's shard alone, as one bank, its routing query given: a rank's share;
  - route bytes: payload rank 0 sent and received (group.moved): the command with the query vectors, the
    statistics, the candidates (score, id, passage text and citation of every rank's local top 16);
  - ask bytes and ask ms: a whole `msa ask` to its first token (all hops, the evidence's routing keys fetched
    from their owners, the reader's prefill).
Prints one JSON line per configuration, then a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from router_recall import grown, nq_dev

K = 16


def measure(bank: Path, questions: Path, limit: int) -> None:
    """One configuration, in this job: prints its JSON line on rank 0."""
    from msa_cli.model.loading import load_model
    from msa_cli.parallel.launch import open_engine
    from msa_cli.memory.search import search
    from msa_cli.qa.ask import Options, ask

    texts = [json.loads(line)["question"] for line in questions.read_text().splitlines()][:limit + 1]
    engine = open_engine(load_model(), bank)   # the other ranks serve their shards in here, then exit
    group = getattr(engine, "group", None)
    local = engine.shard.engine if group else engine

    def moved() -> int:
        return group.moved if group else 0

    rows = []
    for n, text in enumerate(texts):
        t0, b0 = time.perf_counter(), moved()
        engine.route(text, K)
        t1, b1 = time.perf_counter(), moved()
        search(local.bank, local.router, engine.routing_query(text), text, K)   # the query's forward cached
        t2 = time.perf_counter()
        ask(engine, text, Options(max_tokens=1))
        t3, b3 = time.perf_counter(), moved()
        if n:   # the first is the warm-up
            rows.append(((t1 - t0) * 1e3, (t2 - t1) * 1e3, b1 - b0, (t3 - t2) * 1e3, b3 - b1))
    route_ms, scan_ms, route_bytes, ask_ms, ask_bytes = zip(*rows)
    stats = engine.bank.stats()
    print(json.dumps({"bank": str(bank), "ranks": group.world if group else 0, "questions": len(rows),
                      "documents": stats["documents"], "tokens": stats["tokens"],
                      "route_ms_p50": statistics.median(route_ms), "route_ms_p95": _p95(route_ms),
                      "scan_ms_p50": statistics.median(scan_ms),
                      "route_bytes_mean": statistics.mean(route_bytes), "ask_ms_p50": statistics.median(ask_ms),
                      "ask_bytes_mean": statistics.mean(ask_bytes)}), flush=True)


def _p95(values) -> float:
    return sorted(values)[max(0, round(0.95 * len(values)) - 1)]


def run(cmd: list[str], env: dict) -> tuple[str, float]:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return out.stdout, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval-dir", type=Path)
    ap.add_argument("--tokens", type=int, default=400_000)
    ap.add_argument("--ranks", type=int, nargs="*", default=[1, 2, 4])
    ap.add_argument("--questions", type=int, default=50)
    ap.add_argument("--work", type=Path, default=Path("/tmp/msa-memory-parallel"))
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)   # a bank: measure it in this job
    args = ap.parse_args()
    if args.measure:
        return measure(args.measure, args.work / "set" / "questions.jsonl", args.questions)

    dev, memory = args.work / "nq-dev", args.work / "set"
    if not memory.exists():
        grown(dev if dev.exists() else nq_dev(args.eval_dir / "nq", dev), args.eval_dir / "2wiki", [], args.tokens,
              memory)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MSA_BANK": ""}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    me = [str(Path(__file__).resolve()), "--work", str(args.work), "--questions", str(args.questions), "--measure"]
    configs = [(0, args.work / "one")] + [(n, args.work / f"sharded-{n}") for n in args.ranks]
    results = []
    for ranks, bank in configs:
        ingest = ["-m", "msa_cli", "ingest", str(memory / "corpus"), "--bank", str(bank), "-q"]
        seconds = None
        if not bank.exists():
            _, seconds = run([sys.executable, *ingest] if not ranks else [*torchrun, str(ranks), *ingest], env)
        line, _ = run([sys.executable, *me, str(bank)] if not ranks else [*torchrun, str(ranks), *me, str(bank)],
                      env)
        result = {**json.loads(line.strip().splitlines()[-1]), "ingest_s": seconds}
        print(json.dumps(result), flush=True)
        results.append(result)
    print("\n| memory | route ms p50 (p95) | scan of rank 0's shard ms | bytes / route | ask to 1st token ms "
          "| bytes / ask | ingest s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        name = f"{r['ranks']} rank{'s' if r['ranks'] > 1 else ''}" if r["ranks"] else "one bank, one process"
        ingest = f"{r['ingest_s']:.0f}" if r["ingest_s"] else "–"
        print(f"| {name} | {r['route_ms_p50']:.1f} ({r['route_ms_p95']:.1f}) | {r['scan_ms_p50']:.1f} "
              f"| {r['route_bytes_mean']:,.0f} | {r['ask_ms_p50']:.0f} | {r['ask_bytes_mean']:,.0f} | {ingest} |")


if __name__ == "__main__":
    main()
