"""Recall@5 and answer accuracy against memory size: the MSA paper's scaling claim, measured from 16K to 1M.

    python benchmarks/scaling_curve.py --eval-dir /tmp/eval --dev-sets /tmp/msa-router-recall [--questions 100]
        [--sizes 16K 64K 256K 1M] [--plot BENCHMARKS-scaling.png]

The same NQ dev questions (1501 onwards) at every size. 16K, 64K and 256K: their gold passages plus 2wiki
paragraphs up to the size; 1M: router_recall.py's nq-dev-1m (all NQ dev gold passages, 2wiki, python3.11-doc;
--dev-sets is router_recall.py's --work). Each size is one `msa eval --json` run (MSA with the default router
and hops, BM25-RAG and dense-RAG reading as many documents) and, for the first --full-questions questions, one
with "full" (the whole bank in a fixed shuffled order, as much as fits the model's window, beside MSA on the same
questions), so every figure is what a user's `msa eval` prints. Prints one JSON line per size, a
markdown table, the relative change from the smallest to the largest size, and writes the plot (matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

DEV_START = 1500
SIZES = {"16K": 16_384, "64K": 65_536, "256K": 262_144, "1M": None}
SYSTEMS = ("msa", "bm25", "dense", "full")


def grown_set(nq: Path, twowiki: Path, questions: list[str], tokens: int, out: Path) -> Path:
    """An eval set: these questions over their gold passages, then 2wiki paragraphs in name order, up to `tokens`
    tokens (counted with the default model's tokenizer, as the bank counts them)."""
    from msa_cli.model.loading import load_model

    tokenizer = load_model().tokenizer
    corpus = out / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    (out / "questions.jsonl").write_text("".join(line + "\n" for line in questions))
    gold = [nq / "corpus" / f"{g}.txt" for line in questions for g in json.loads(line)["gold_docs"]]
    total = 0
    for f in [*dict.fromkeys(gold), *sorted(twowiki.iterdir())]:
        if total >= tokens:
            break
        link = corpus / f.name
        if not link.exists():
            link.symlink_to(f.resolve())
        total += len(tokenizer(f.read_text(), add_special_tokens=False).input_ids)
    return out


def run_eval(set_dir: Path, limit: int, baselines: list[str]) -> dict:
    cmd = [sys.executable, "-m", "msa_cli.cli", "eval", str(set_dir), "--json", "--limit", str(limit),
           *(arg for b in baselines for arg in ("--baseline", b))]
    # stderr passes through: msa eval says when each system is done (a size takes tens of minutes here).
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=os.environ)
    if out.returncode:
        sys.exit(f"msa eval {set_dir} failed (exit {out.returncode})")
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval-dir", type=Path, required=True)
    ap.add_argument("--dev-sets", type=Path, required=True, help="router_recall.py's --work (nq-dev-1m)")
    ap.add_argument("--questions", type=int, default=100)
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--full-questions", type=int, default=30,
                    help="the full-context baseline (the slowest: a whole window per answer) answers only the first "
                         "N questions, in a second run that also reports MSA on them; 0 skips it")
    ap.add_argument("--plot", type=Path, default=Path("BENCHMARKS-scaling.png"))
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "msa-scaling")
    args = ap.parse_args()
    nq = args.eval_dir / "nq"
    questions = (nq / "questions.jsonl").read_text().splitlines()[DEV_START:DEV_START + args.questions]
    rows, sets = {}, {}
    for size in args.sizes:
        if SIZES[size] is None:
            sets[size] = args.dev_sets / "nq-dev-1m"   # its questions start at 1501 too
        else:
            sets[size] = grown_set(nq, args.eval_dir / "2wiki" / "corpus", questions, SIZES[size], args.work / size)
        rows[size] = run_eval(sets[size], args.questions, ["bm25", "dense"])
        print(json.dumps({"size": size, **rows[size]}), flush=True)
    # Full context last: the curve of the others is complete even if this (the slowest) is cut short.
    for size in args.sizes if args.full_questions else []:
        subset = run_eval(sets[size], args.full_questions, ["full"])
        rows[size] |= {"full": subset["full"], f"msa@{args.full_questions}": subset["msa"]}
        print(json.dumps({"size": size, "full": subset["full"], f"msa@{args.full_questions}": subset["msa"]}),
              flush=True)

    present = [s for s in (*SYSTEMS, f"msa@{args.full_questions}") if any(s in r for r in rows.values())]
    print("\n| memory | tokens | " + " | ".join(f"{s} recall@5 | {s} contains | {s} F1" for s in present) + " |")
    print("|---|---|" + "---|---|---|" * len(present))
    for size, r in rows.items():
        cells = [(f"{r[s]['recall@5']:.3f}" if "recall@5" in r[s] else "-")
                 + f" | {r[s]['contains_answer']:.3f} | {r[s]['f1']:.3f}" if s in r else "- | - | -" for s in present]
        print(f"| {size} | {r['bank']['tokens']:,} | " + " | ".join(cells) + " |")
    first, last = rows[args.sizes[0]], rows[args.sizes[-1]]
    for s in present:
        for metric in ("recall@5", "contains_answer"):
            if metric in first.get(s, {}) and first[s][metric]:
                change = last[s][metric] / first[s][metric] - 1
                print(f"{s} {metric}: {first[s][metric]:.3f} at {args.sizes[0]} -> {last[s][metric]:.3f} at "
                      f"{args.sizes[-1]} ({change:+.1%})")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = [rows[s]["bank"]["tokens"] for s in args.sizes]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, title in ((axes[0], "recall@5", "gold document in the top 5"),
                              (axes[1], "contains_answer", "answer contains a gold answer")):
        for s in present:
            points = [(t, rows[size][s][metric]) for t, size in zip(tokens, args.sizes)
                      if metric in rows[size].get(s, {})]
            if points:
                ax.plot(*zip(*points), marker="o", label=s)
        ax.set_xscale("log")
        ax.set_xlabel("memory tokens")
        ax.set_title(title)
        ax.set_ylim(0, 1)
        ax.legend()
    fig.suptitle(f"NQ dev ({args.questions} questions), SmolLM2-135M-Instruct")
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
