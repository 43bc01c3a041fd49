"""Recall@5 and answer accuracy against memory size: the MSA paper's scaling claim, measured from 16K to 10M.

    python benchmarks/scaling_curve.py --eval-dir /tmp/eval --dev-sets /tmp/msa-router-recall [--questions 100]
        [--sizes 16K 64K 256K 1M] [--full-questions 30 --full-sizes 16K 1M | --no-generate] [--results runs.jsonl]
        [--plot BENCHMARKS-scaling.png]

The same NQ dev questions (1501 onwards) at every size. 16K, 64K and 256K: their gold passages plus the
2wiki paragraphs kept out of router training, up to the size; 1M: router_recall.py's nq-dev-1m (all NQ dev gold
passages, that 2wiki half, linux-doc-6.1); 10M: nq-dev-10m, grown the same way with linux-doc-6.1 and
sqlite3-doc (--dev-sets is router_recall.py's --work, where `router_recall.grown` makes them; 10M only when
asked for in --sizes). Each size is one `msa eval --json` run (MSA with the default router
and hops, BM25-RAG and dense-RAG reading as many documents) and, for the first --full-questions questions, one
with "full" (the whole bank in a fixed shuffled order, as much as fits the model's window, beside MSA on the same
questions), so every figure is what a user's `msa eval` prints. On this 2-core CPU a size takes about 15
minutes, and full context about 40 s per answer (8K-token prompts). Prints one JSON line per run, a markdown
table, the relative change from the smallest to the largest size with a straight-line projection in log(tokens)
to 100M (a projection, not a measurement), and writes the plot (matplotlib). With --results, runs already in
the file are read instead of repeated, so a cut-short run resumes and the table and plot can be redrawn.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from wiki_split import distractor_half

import numpy as np

DEV_START = 1500
SIZES = {"16K": 16_384, "64K": 65_536, "256K": 262_144, "1M": None, "10M": None}   # None: a set in --dev-sets
SYSTEMS = ("msa", "msa-learned", "bm25", "dense", "full", "msa-subset")   # msa-learned: the router alone, no answers
COUNTS = ("questions", "first_token_ms_p50", "answer_ms_p50")   # table cells printed as whole numbers
PROJECT_TO = 100_000_000   # the paper's largest memory: projected from the measured sizes, not measured


def grown_set(nq: Path, twowiki: Path, questions: list[str], tokens: int, out: Path) -> Path:
    """An eval set: these questions over their gold passages, then 2wiki paragraphs the router never trained on
    (wiki_split.py) in name order, up to `tokens`
    tokens (counted with the default model's tokenizer, as the bank counts them)."""
    from msa_cli.model.loading import load_model

    tokenizer = load_model().tokenizer
    corpus = out / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    (out / "questions.jsonl").write_text("".join(line + "\n" for line in questions))
    gold = [nq / "corpus" / f"{g}.txt" for line in questions for g in json.loads(line)["gold_docs"]]
    total = 0
    for f in [*dict.fromkeys(gold), *distractor_half(twowiki)]:
        if total >= tokens:
            break
        link = corpus / f.name
        if not link.exists():
            link.symlink_to(f.resolve())
        total += len(tokenizer(f.read_text(), add_special_tokens=False).input_ids)
    return out


def run_eval(set_dir: Path, limit: int, baselines: list[str], generate: bool = True) -> dict:
    cmd = [sys.executable, "-m", "msa_cli.cli", "eval", str(set_dir), "--json", "--limit", str(limit),
           *(arg for b in baselines for arg in ("--baseline", b)), *([] if generate else ["--no-generate"])]
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
    ap.add_argument("--sizes", nargs="+", default=["16K", "64K", "256K", "1M"], choices=list(SIZES))
    ap.add_argument("--full-questions", type=int, default=30,
                    help="the full-context baseline (the slowest: a whole window per answer) answers only the first "
                         "N questions, in a second run that also reports MSA on them; 0 skips it")
    ap.add_argument("--full-sizes", nargs="+", choices=list(SIZES), help="sizes for full context [default: --sizes]")
    ap.add_argument("--no-generate", action="store_true",
                    help="retrieval only (recall@5 per size, minutes instead of an hour a size); skips full context")
    ap.add_argument("--results", type=Path, help="JSON lines file: each finished run is appended to it, and a run "
                                                  "already in it is not repeated (resume a cut-short run)")
    ap.add_argument("--plot", type=Path, default=Path("BENCHMARKS-scaling.png"))
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "msa-scaling")
    args = ap.parse_args()
    nq = args.eval_dir / "nq"
    questions = (nq / "questions.jsonl").read_text().splitlines()[DEV_START:DEV_START + args.questions]
    done = [json.loads(line) for line in args.results.read_text().splitlines()] \
        if args.results and args.results.exists() else []
    rows = {size: {} for size in args.sizes}
    for line in done:
        if line["size"] in rows:
            rows[line["size"]] |= {k: v for k, v in line.items() if k != "size"}

    def record(size: str, result: dict) -> None:
        rows[size] |= result
        line = json.dumps({"size": size, **result})
        print(line, flush=True)
        if args.results:
            with open(args.results, "a") as f:
                f.write(line + "\n")

    @functools.cache   # a size's set is built (and its files tokenised) once, though two runs may use it
    def set_dir(size: str) -> Path:
        if SIZES[size] is None:
            return args.dev_sets / f"nq-dev-{size.lower()}"   # their questions start at 1501 too
        return grown_set(nq, args.eval_dir / "2wiki" / "corpus", questions, SIZES[size], args.work / size)

    for size in args.sizes:
        if "msa" not in rows[size]:
            record(size, run_eval(set_dir(size), args.questions, ["bm25", "dense"], generate=not args.no_generate))
    # Full context last: the curve of the others is complete even if this (the slowest) is cut short.
    for size in (args.full_sizes or args.sizes) if args.full_questions and not args.no_generate else []:
        if "full" not in rows[size]:
            subset = run_eval(set_dir(size), args.full_questions, ["full"])
            record(size, {"full": subset["full"], "msa-subset": subset["msa"]})

    present = [s for s in SYSTEMS if any(s in r for r in rows.values())]

    columns = ("questions", "recall@5", "contains_answer", "f1", "exact_match", "abstained", "gold_read",
               "evidence_contains", "first_token_ms_p50", "answer_ms_p50")
    print("\n| memory tokens | system | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for size, r in rows.items():
        for s in present:
            if s in r:
                cells = ["-" if key not in r[s] else f"{r[s][key]:,.0f}" if key in COUNTS else f"{r[s][key]:.3f}"
                         for key in columns]
                print(f"| {size} ({r['bank']['tokens']:,}) | {s} | " + " | ".join(cells) + " |")
    print("(full answers the first --full-questions questions, and msa-subset is MSA on those same questions)")
    for s in present:
        for metric in ("recall@5", "contains_answer"):
            points = [(rows[size]["bank"]["tokens"], rows[size][s][metric]) for size in args.sizes
                      if metric in rows[size].get(s, {})]
            if len(points) < 2 or not points[0][1]:
                continue
            (t0, first), (t1, last) = points[0], points[-1]
            line = f"{s} {metric}: {first:.3f} at {t0:,} tokens -> {last:.3f} at {t1:,} ({last / first - 1:+.1%})"
            if len(points) >= 3:   # a projection, not a measurement: a straight line in log(tokens)
                slope, intercept = np.polyfit(np.log10([t for t, _ in points]), [v for _, v in points], 1)
                projected = intercept + slope * np.log10(PROJECT_TO)
                line += f"; projected at {PROJECT_TO:,}: {projected:.3f} ({projected / first - 1:+.1%})"
            print(line)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = [rows[s]["bank"]["tokens"] for s in args.sizes]
    colour = {s: f"C{n}" for n, s in enumerate(SYSTEMS)}   # one colour per system in both panels
    panels = [(metric, title, top) for metric, title, top in (
        ("recall@5", "gold document in the top 5", 1.0), ("contains_answer", "answer contains a gold answer", 0.5))
        if any(metric in r.get(s, {}) for r in rows.values() for s in present)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (metric, title, top) in zip(axes[0], panels):
        for s in present:
            points = [(t, rows[size][s][metric]) for t, size in zip(tokens, args.sizes)
                      if metric in rows[size].get(s, {})]
            if points:
                n = next(rows[size][s]["questions"] for size in args.sizes if "questions" in rows[size].get(s, {}))
                ax.plot(*zip(*points), marker="o", color=colour[s], linestyle=":" if s == "msa-subset" else "-",
                        label=f"{s} ({n} questions)" if n != args.questions else s)
        ax.set_xscale("log")
        ax.set_xlabel("memory tokens")
        ax.set_title(title)
        ax.set_ylim(0, top)
        ax.legend(fontsize="small")
    fig.suptitle(f"NQ dev ({args.questions} questions), SmolLM2-135M-Instruct")
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
