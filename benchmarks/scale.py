"""A memory of N tokens on this machine: build (or reuse) a bank of N memory tokens in the real on-disk format,
through the project's own writer, then measure it as a user runs it.

    python benchmarks/scale.py --tokens 10M --bank /tmp/scale-10m --keys-from ~/.msa/eval/BANK [--questions 10]

The bank (`--content none`: routing keys, text and the BM25 index; no pooled K/V) is built from a real bank
made by the default model and router (--keys-from, e.g. one `msa eval` made). Its documents are cycled: copy c of
real document i has document i's text and citation, tagged with a word of its own ("scalecopyC") so that every
copy is a distinct document to BM25 and to its citation, and document i's own keys plus Gaussian noise of
--noise times the real keys' per-dimension spread, renormalised. So keys per document, and the keys' statistics,
are real ones; the keys are not what stage 1 would compute for the tagged text, so no recall is measured here
(100M tokens of stage 1 would take about 2.4 h on this CPU without the cold tier, 8 h with it, at the rates in
BENCHMARKS.md). A bank that exists is reused (upgraded to the current format), and grown if it is smaller.

Then, each in a fresh process: opening the bank (Bank.open, then its BM25 index); `msa search` (wall, peak RSS);
`msa ask - --json` over --questions NQ dev questions in one process (route_ms: every hop's routing, BM25 and
fusion included; first_token_ms; peak RSS); and, in this process, the router's scan alone over the bank's keys
for one question, every key scanned (scan_gbs: the routing keys' bytes over its time) against this machine's
memory read bandwidth (read_gbs: an fp32 sum over 2 GiB in RAM) and bf16 GEMM rate in the scan's shape
(gemm_gflops), same run.
Prints JSON lines; the last holds every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from msa_cli.memory.bank import Bank, NewDocument
from msa_cli.memory.format import router_weights_file

SEGMENT_TOKENS = 65_536   # tokens per commit, as ingest's batches
DEV_START = 1500          # NQ dev questions, as the other benchmarks


def tokens_arg(text: str) -> int:
    scale = {"K": 1_000, "M": 1_000_000}.get(text[-1].upper(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


# ----- building -----

def create_like(path: Path, source: Bank) -> Bank:
    """A new bank with the source's settings, template and router, keeping no pooled K/V."""
    settings = dict(source.settings, content_layers=[])
    weights = source.path / router_weights_file(settings["router"]["id"])
    with safe_open(weights, framework="pt") as f:
        router = ({name: f.get_tensor(name) for name in f.keys()}, f.metadata())
    return Bank.create(path, settings, source.template_kv(), router)


def build(path: Path, source: Bank, tokens: int, noise: float, seed: int) -> dict:
    """Grow the bank at `path` to at least `tokens` memory tokens of tagged copies of the source's documents."""
    bank = Bank.open(path) if Bank.exists(path) else create_like(path, source)
    have = bank.stats()["tokens"]
    if have >= tokens:
        with bank.lock():   # upgrades a bank of an older format in place (Bank.lock)
            pass
        return {"built": False, "tokens": have}
    real = source.documents()
    keys = [source.document_keys(d.doc_id).float() for d in real]
    spread = torch.cat(keys).std(dim=0)                      # [Hr, d]: the real keys' per-dimension spread
    gen = torch.Generator().manual_seed(seed)
    start, made, commits = time.perf_counter(), bank.num_documents, 0
    with bank.lock():
        while have < tokens:
            docs, doc_keys = [], []
            while sum(d.n_tokens for d in docs) < SEGMENT_TOKENS and have < tokens:
                copy, i = divmod(made, len(real))
                d = real[i]
                tag = f"scalecopy{copy}"
                docs.append(NewDocument(source=f"{d.source}#{tag}", span=d.span, n_tokens=d.n_tokens,
                                        content_hash=f"{tag}-{d.content_hash}", text=f"{d.text} {tag}"))
                noisy = keys[i] + noise * spread * torch.randn(keys[i].shape, generator=gen)
                doc_keys.append(F.normalize(noisy, dim=-1))
                made, have = made + 1, have + d.n_tokens
            route_keys = torch.cat(doc_keys).to(torch.bfloat16)
            bank.append(docs, {}, [0] * len(docs), route_keys, [k.shape[0] for k in doc_keys])
            commits += 1
            if commits % 20 == 0:
                emit({"building": have, "documents": made, "s": round(time.perf_counter() - start, 1)})
    # Releasing the lock saved the BM25 index of every document: part of the build.
    return {"built": True, "tokens": have, "build_s": round(time.perf_counter() - start, 1)}


# ----- measuring -----

def run(args: list[str], stdin: str = "") -> tuple[subprocess.CompletedProcess, float, float]:
    """A fresh process: (result, wall seconds, its peak RSS in MB). Its streams go through files so that
    os.wait4 can reap it and report its own rusage."""
    with tempfile.TemporaryFile("w+") as fin, tempfile.TemporaryFile("w+") as fout, \
            tempfile.TemporaryFile("w+") as ferr:
        fin.write(stdin)
        fin.seek(0)
        start = time.perf_counter()
        proc = subprocess.Popen(args, stdin=fin, stdout=fout, stderr=ferr, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        fout.seek(0), ferr.seek(0)
        result = subprocess.CompletedProcess(args, os.waitstatus_to_exitcode(status), fout.read(), ferr.read())
    return result, wall, usage.ru_maxrss / 1024


def open_times(path: Path) -> dict:
    code = ("import json, sys, time; t0 = time.perf_counter(); from msa_cli.memory.bank import Bank; "
            "t1 = time.perf_counter(); b = Bank.open(sys.argv[1]); t2 = time.perf_counter(); b.lexical(); "
            "t3 = time.perf_counter(); print(json.dumps({'open_ms': 1e3 * (t2 - t1), 'lexical_ms': 1e3 * (t3 - t2)}))")
    r, _, rss = run([sys.executable, "-c", code, str(path)])
    if r.returncode:
        sys.exit(r.stderr)
    return json.loads(r.stdout) | {"open_peak_rss_mb": rss}


def read_gbs() -> float:
    """Sequential read of 2 GiB in RAM, best of 3: what a scan of keys already in memory can reach."""
    x = torch.ones(2**29, dtype=torch.float32)
    x.sum()
    best = min(timed(lambda: x.sum()) for _ in range(3))
    return x.numel() * 4 / best / 1e9


def gemm_gflops(rows: int, dim: int, tokens: int) -> float:
    """bf16 GEMM in the scan's shape ([rows, dim] x [dim, tokens]), best of 3."""
    a, b = torch.randn(rows, dim).bfloat16(), torch.randn(dim, tokens).bfloat16()
    a @ b
    best = min(timed(lambda: a @ b) for _ in range(3))
    return 2 * rows * dim * tokens / best / 1e9


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def scan(path: Path, question: str) -> dict:
    """The router's scan alone over the bank's keys, for one question (best of 3, after one warm pass)."""
    from msa_cli.engine import Engine
    from msa_cli.model.loading import load_model

    engine = Engine.open(load_model(None), path)
    q = engine.routing_query(question)
    segments = engine.bank.routing_segments()
    engine.router.scores(q, segments)
    best = min(timed(lambda: engine.router.scores(q, segments)) for _ in range(3))
    hot = sum(s.keys.numel() * s.keys.element_size() for s in segments)
    return {"scan_ms": 1e3 * best, "scan_gbs": hot / best / 1e9, "routing_tokens": q.shape[0],
            "keys": sum(s.keys.shape[0] for s in segments), "key_dim": int(q.shape[1] * q.shape[2])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=tokens_arg, required=True, help="memory tokens, e.g. 10M or 100M")
    ap.add_argument("--bank", type=Path, required=True, help="the bank to build or reuse")
    ap.add_argument("--keys-from", type=Path, required=True, help="a real bank of the default model and router")
    ap.add_argument("--eval-dir", type=Path, default=Path("/tmp/eval"), help="convert_eval.py's output (nq)")
    ap.add_argument("--questions", type=int, default=10)
    ap.add_argument("--noise", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--build-only", action="store_true", help="build or grow the bank, measure nothing")
    args = ap.parse_args()

    built = build(args.bank, Bank.open(args.keys_from), args.tokens, args.noise, args.seed)
    emit(built)
    if args.build_only:
        return
    stats = Bank.open(args.bank).stats()
    lines = (args.eval_dir / "nq" / "questions.jsonl").read_text().splitlines()
    questions = [json.loads(line)["question"] for line in lines[DEV_START:DEV_START + args.questions]]
    msa = [sys.executable, "-m", "msa_cli.cli"]

    opened = open_times(args.bank)
    emit(opened)
    r, search_s, search_rss = run([*msa, "search", questions[0], "--bank", str(args.bank), "--json"])
    if r.returncode:
        sys.exit(r.stderr)
    emit({"search_s": round(search_s, 2), "search_peak_rss_mb": round(search_rss)})
    r, ask_s, ask_rss = run([*msa, "ask", "-", "--json", "--bank", str(args.bank), "--max-tokens", "16"],
                            "".join(q + "\n" for q in questions))
    if r.returncode not in (0, 7):
        sys.exit(r.stderr)
    answers = [json.loads(line) for line in r.stdout.splitlines()]
    route = [a["timings"]["route_ms"] for a in answers]
    first = [a["timings"]["first_token_ms"] for a in answers if "first_token_ms" in a["timings"]]
    emit({"asked": len(answers), "ask_peak_rss_mb": round(ask_rss)})
    scanned = scan(args.bank, questions[0])
    emit(scanned)
    summary = {
        "tokens": stats["tokens"], "documents": stats["documents"],
        "bytes_on_disk": sum(stats["bytes_on_disk"].values()), "bytes_by_tier": stats["bytes_on_disk"],
        "bytes_per_token": round(sum(stats["bytes_on_disk"].values()) / stats["tokens"], 1),
        "build_s": built.get("build_s"), "open_ms": round(opened["open_ms"]), "lexical_ms": round(opened["lexical_ms"]),
        "route_ms_p50": statistics.median(route), "route_ms_p95": sorted(route)[int(0.95 * (len(route) - 1))],
        "first_token_ms_p50": statistics.median(first) if first else None,
        "peak_rss_mb": round(max(search_rss, ask_rss)), "search_peak_rss_mb": round(search_rss),
        "read_gbs": round(read_gbs(), 1), "scan_gbs": round(scanned["scan_gbs"], 2),
        "scan_ms": round(scanned["scan_ms"]),
        "gemm_gflops": round(gemm_gflops(1 << 21, scanned["key_dim"], scanned["routing_tokens"]), 1),
        "threads": torch.get_num_threads(),
    }
    emit(summary)


if __name__ == "__main__":
    main()
