"""`msa serve` under load, against the same questions through `msa ask -` in one process, same run.

    python benchmarks/serve_load.py [--bank B] [--clients 1 4 8] [--count 24] [--max-tokens 32]

The bank (default: sample_corpora/ ingested into a temporary bank by `msa ingest`) and the questions
(sample_corpora/questions.jsonl, cycled to --count) are the demo's; the model is the default one unless MSA_MODEL
says otherwise. First `msa ask - --json` answers them one after another in one process (its per-question
total_ms, and the rate over the answers' wall time, model loading excluded). Then one `msa serve` process (queue
= the most clients, so none is refused) gets the same questions from each client count in turn, through the real
openai client, C threads at once: requests/s, latency p50/p95 (client side), errors (must be 0) and the server's
peak RSS (VmHWM). Prints JSON lines; the last summarises.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parent.parent
MSA = [sys.executable, "-m", "msa_cli.cli"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one_process(bank: Path, questions: list[str], max_tokens: int) -> dict:
    """`msa ask -` over every question: per-question latency from its JSON, and the rate over the answers."""
    start = time.perf_counter()
    r = subprocess.run([*MSA, "ask", "-", "--json", "--bank", str(bank), "--max-tokens", str(max_tokens)],
                       input="\n".join(questions) + "\n", capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if r.returncode not in (0, 7):
        raise SystemExit(f"msa ask failed: {r.stderr}")
    answers = [json.loads(line) for line in r.stdout.splitlines()]
    latencies = [a["timings"]["total_ms"] for a in answers]
    answering = sum(latencies) / 1e3
    return {"system": "msa ask - (one process)", "questions": len(answers), "wall_s": round(wall, 1),
            "answers_s": round(answering, 1), "requests_per_s": round(len(answers) / answering, 2),
            "latency_ms_p50": round(statistics.median(latencies)), "latency_ms_p95": round(percentile(latencies, 0.95)),
            "errors": 0}


def start_server(bank: Path, queue: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([*MSA, "serve", "--bank", str(bank), "--port", "0", "--queue", str(queue)],
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    for line in proc.stderr:
        found = re.search(r"(http://127\.0\.0\.1:\d+/v1)", line)
        if found:
            return proc, found.group(1)
    raise SystemExit("msa serve did not start")


def load(url: str, questions: list[str], clients: int, max_tokens: int) -> dict:
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)

    def one(question: str) -> tuple[float, str | None]:
        t0 = time.perf_counter()
        try:
            client.chat.completions.create(model="msa", messages=[{"role": "user", "content": question}],
                                           max_tokens=max_tokens)
            return (time.perf_counter() - t0) * 1e3, None
        except openai.APIError as e:
            return (time.perf_counter() - t0) * 1e3, f"{type(e).__name__}: {e}"

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, questions))
    wall = time.perf_counter() - start
    latencies = [ms for ms, error in results if error is None]
    errors = [error for _, error in results if error]
    return {"system": f"msa serve, {clients} clients", "questions": len(results), "wall_s": round(wall, 1),
            "requests_per_s": round(len(results) / wall, 2), "latency_ms_p50": round(statistics.median(latencies)),
            "latency_ms_p95": round(percentile(latencies, 0.95)), "errors": len(errors),
            **({"first_error": errors[0]} if errors else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bank", type=Path, help="a bank to ask [default: sample_corpora/ ingested anew]")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--count", type=int, default=24, help="questions per run (the sample's, cycled)")
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        bank = args.bank or Path(tmp) / "bank"
        if args.bank is None:
            subprocess.run([*MSA, "ingest", str(ROOT / "sample_corpora"), "--bank", str(bank), "-q"], check=True,
                           cwd=ROOT)
        sample = [json.loads(line)["question"] for line in (ROOT / "sample_corpora/questions.jsonl").open()]
        questions = [sample[i % len(sample)] for i in range(args.count)]
        rows = [one_process(bank, questions, args.max_tokens)]
        print(json.dumps(rows[-1]), flush=True)
        proc, url = start_server(bank, max(args.clients))
        try:
            load(url, questions[:2], 1, args.max_tokens)   # warm up: the first answer pays one-time costs
            for clients in args.clients:
                rows.append(load(url, questions, clients, args.max_tokens))
                rows[-1]["server_peak_rss_mb"] = round(peak_rss_mb(proc.pid))
                print(json.dumps(rows[-1]), flush=True)
        finally:
            proc.terminate()
            code = proc.wait(timeout=120)
    print(json.dumps({"summary": "requests/s and latency by system, same questions, same run",
                      "rows": rows, "server_exit_code": code, "errors": sum(r["errors"] for r in rows),
                      "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
