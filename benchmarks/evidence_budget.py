"""What `msa ask` reads, chosen on NQ train: whole passages or the best sentences (how many, with how many
neighbours), and whether the answer stops at its first sentence. Nothing here sees dev.

    python benchmarks/evidence_budget.py --eval-dir /tmp/eval [--questions 100] [--variants passages/long ...]

The set is NQ train questions 1..500 over their own gold passages (as nq-dev is built from dev: router_recall.py),
answered by `msa ask`'s path (default routing, 3 + 1 + 1 documents, abstention, 32-token greedy answers) for the
first --questions of them. A variant is `read/stop`: read is `passages` or `evidence-B-N[-wW]` (B sentences, N
neighbours on either side; ranked by BM25, or with -wW fused with the router's keys at weight W); stop is `long`
(to the token budget) or `first` (the first sentence); an optional third part names the system prompt (PROMPTS:
`cite`, msa's, by default). Prints one JSON line per variant, then a markdown table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from router_recall import nq_dev

from msa_cli import settings
from msa_cli.corpus.eval_set import load_set
from msa_cli.evaluation import default_eval_bank, evaluate
from msa_cli.engine import Engine
from msa_cli.ingest import ingest
from msa_cli.model.loading import load_model
from msa_cli.qa import answer
from msa_cli.qa.ask import Options

TRAIN = (0, 500)
VARIANTS = ["passages/long", "passages/first", "evidence-3-1/first", "evidence-5-1/first", "evidence-8-1/first",
            "evidence-5-0/first", "evidence-8-0/first", "evidence-5-1-w0.5/first", "evidence-5-1-w1/first",
            "evidence-5-1/long"]


# System prompts tried: msa's (answer.SYSTEM when this ran), and one that asks for the answer alone.
PROMPTS = {"cite": answer.SYSTEM,
           "short": "Answer the question with a short phrase taken from the numbered sources given, not a whole "
                    "sentence. If the sources do not contain the answer, say that you do not know."}


def options(variant: str) -> tuple[Options, int, float]:
    """A variant's Options for `ask`, its neighbours and its router weight (settings.NEIGHBOURS and
    settings.EVIDENCE_ROUTER_WEIGHT while it runs)."""
    read, stop = variant.split("/")[:2]
    if read == "passages":
        return Options(max_tokens=32, read="passages", long=stop == "long"), 0, 0.0
    _, budget, neighbours, *weight = read.split("-")
    return (Options(max_tokens=32, read="evidence", evidence=int(budget), long=stop == "long"), int(neighbours),
            float(weight[0].removeprefix("w")) if weight else 0.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval-dir", type=Path, required=True)
    ap.add_argument("--questions", type=int, default=100)
    ap.add_argument("--variants", nargs="+", default=VARIANTS)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "msa-evidence")
    args = ap.parse_args()
    set_dir = args.work / "nq-train"
    if not set_dir.exists():
        nq_dev(args.eval_dir / "nq", set_dir, TRAIN)
    s = load_set(set_dir, args.questions, 0)
    engine = Engine.open(load_model(), default_eval_bank(s), create=True)
    ingest(engine, [s.corpus])
    rows = []
    for variant in args.variants:
        opts, settings.NEIGHBOURS, settings.EVIDENCE_ROUTER_WEIGHT = options(variant)
        answer.SYSTEM = PROMPTS[(variant.split("/") + ["cite"])[2]]
        r = evaluate(engine, s, [], opts)["msa"]
        print(json.dumps({"variant": variant, **r}), flush=True)
        rows.append((variant, r))
    print("\n| read / stop | contains | F1 | EM | best evidence contains | gold read | first token ms (p50) |")
    print("|---|---|---|---|---|---|---|")
    for variant, r in rows:
        quoted = f"{r['evidence_contains']:.2f}" if "evidence_contains" in r else "–"
        print(f"| {variant} | {r['contains_answer']:.2f} | {r['f1']:.3f} | {r['exact_match']:.2f} | {quoted} "
              f"| {r['gold_read']:.2f} | {r['first_token_ms_p50']:.0f} |")


if __name__ == "__main__":
    main()
