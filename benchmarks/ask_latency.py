"""Time to first token and total time of `msa ask` on banks of 16K, 128K and 1M memory tokens.

    python benchmarks/ask_latency.py --eval-dir /tmp/eval --dev-sets /tmp/msa-router-recall [--questions 20]

The questions are NQ dev questions (1501 onwards). The 16K and 128K banks hold their gold passages plus 2wiki
paragraphs up to the size; the 1M bank is router_recall.py's nq-dev-1m (all NQ dev gold passages, 2wiki, the
Python docs) in the bank `msa eval` made for it (--dev-sets: router_recall.py's --work). Every bank answers the
same questions in one `msa ask - --json` process, as a script would run it (the model loads once, and that load
is not timed). Prints one JSON line per bank (medians and 90th percentiles of route, time to first token,
prefill and total, in ms) and a markdown table with the 1M / 16K ratio of time to first token.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from msa_cli.corpus.eval_set import load_set
from msa_cli.evaluation import default_eval_bank
from scaling_curve import grown_set   # the same banks: gold passages, then 2wiki up to a size

DEV_START = 1500


def ingest(corpus: Path, bank: Path) -> None:
    subprocess.run([sys.executable, "-m", "msa_cli.cli", "ingest", str(corpus), "--bank", str(bank), "--quiet"],
                   check=True, env=os.environ)


def ask_all(bank: Path, questions: list[str], max_tokens: int) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "msa_cli.cli", "ask", "-", "--json", "--bank", str(bank),
                          "--max-tokens", str(max_tokens)],
                         input="".join(q + "\n" for q in questions), capture_output=True, text=True, env=os.environ)
    if out.returncode not in (0, 7):
        sys.exit(out.stderr)
    return [json.loads(line) for line in out.stdout.splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval-dir", type=Path, required=True)
    ap.add_argument("--dev-sets", type=Path, required=True, help="router_recall.py's --work (nq-dev-1m)")
    ap.add_argument("--questions", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "msa-ask-latency")
    args = ap.parse_args()
    nq = args.eval_dir / "nq"
    lines = (nq / "questions.jsonl").read_text().splitlines()[DEV_START:DEV_START + args.questions]
    qs = [json.loads(line) for line in lines]
    banks = {}
    for name, tokens in (("16K", 16_384), ("128K", 131_072)):
        corpus = grown_set(nq, args.eval_dir / "2wiki" / "corpus", lines, tokens, args.work / name) / "corpus"
        banks[name] = args.work / f"bank-{name}"
        ingest(corpus, banks[name])
    big = load_set(args.dev_sets / "nq-dev-1m", None, 0)
    banks["1M"] = default_eval_bank(big)
    ingest(big.corpus, banks["1M"])

    rows = {}
    for name, bank in banks.items():
        answers = ask_all(bank, [q["question"] for q in qs], args.max_tokens)
        answered = [a for a in answers if not a["abstained"]]
        t = {k: np.array([a["timings"][k] for a in answered]) for k in ("route_ms", "first_token_ms", "total_ms")}
        t["prefill_ms"] = t["first_token_ms"] - t["route_ms"]
        tokens = json.loads(subprocess.run([sys.executable, "-m", "msa_cli.cli", "status", "--json", "--bank",
                                            str(bank)], capture_output=True, text=True, check=True).stdout)["tokens"]
        row = {"bank": name, "memory_tokens": tokens, "questions": len(answers), "answered": len(answered),
               "sources": float(np.mean([len(a["sources"]) for a in answered])),
               "hops": float(np.mean([len(a["hops"]) for a in answered])),
               "generated_tokens": float(np.mean([a["tokens"] for a in answered])),
               **{f"{k}_median": round(float(np.median(v)), 1) for k, v in t.items()},
               **{f"{k}_p90": round(float(np.percentile(v, 90)), 1) for k, v in t.items()}}
        print(json.dumps(row), flush=True)
        rows[name] = row
    print("\n| memory | tokens | route ms | prefill ms | first token ms (p90) | total ms | sources read | hops |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['memory_tokens']:,} | {r['route_ms_median']:.0f} | {r['prefill_ms_median']:.0f} | "
              f"{r['first_token_ms_median']:.0f} ({r['first_token_ms_p90']:.0f}) | {r['total_ms_median']:.0f} | "
              f"{r['sources']:.1f} | {r['hops']:.1f} |")
    print(f"\ntime to first token, 1M / 16K: {rows['1M']['first_token_ms_median'] / rows['16K']['first_token_ms_median']:.2f}")


if __name__ == "__main__":
    main()
