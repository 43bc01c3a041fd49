"""What `msa ask` reads, chosen on NQ train: whole passages or the best sentences (how many, with how many
neighbours), and whether the answer stops at its first sentence. Nothing here sees dev.

    python benchmarks/evidence_budget.py --eval-dir /tmp/eval [--questions 100] [--variants passages/long ...]

The set is NQ train questions 1..500 over their own gold passages (as nq-dev is built from dev: router_recall.py),
answered by `msa ask`'s path (default routing, 3 + 1 + 1 documents, abstention, 32-token greedy answers) for the
first --questions of them. A variant is `read/stop`: read is `passages` or `evidence-B-N[-wW][-bX]` (B sentences,
N neighbours on either side; ranked by BM25, or with -wW fused with the router's keys at weight W; -bX: a
sentence holding the kind of answer asked for is quoted first, by X: settings.ANSWER_TYPE_BONUS); stop is `long`
(to the token budget) or `first` (the first sentence); an optional third part names the prompt (PROMPTS: `cite`,
msa's, by default; `few`, which asks for a few words after the question). Prints one JSON line per variant, then
a markdown table.
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
from msa_cli.qa import ask as ask_module
from msa_cli.qa.ask import Options

TRAIN = (0, 500)
VARIANTS = ["evidence-3-1-w0.5-b2/first/cite", "evidence-3-1-w0.5-b2/first/few"]


# Prompts tried: (system prompt, what is asked after the question). "short" asks for a short phrase in the system
# prompt instead; "few" asks after the question (appended to it, so the user turn ends "Question: ...\nAnswer in
# a few words.").
PROMPTS = {"cite": (answer.SYSTEM, ""), "few": (answer.SYSTEM, "Answer in a few words."),
           "short": ("Answer the question with a short phrase taken from the numbered sources given, not a whole "
                     "sentence. If the sources do not contain the answer, say that you do not know.", "")}


def options(variant: str) -> tuple[Options, int, float, float]:
    """A variant's Options for `ask`, its neighbours, router weight and answer-type bonus (settings.NEIGHBOURS,
    EVIDENCE_ROUTER_WEIGHT and ANSWER_TYPE_BONUS while it runs)."""
    read, stop = variant.split("/")[:2]
    if read == "passages":
        return Options(max_tokens=32, read="passages", long=stop == "long"), 0, 0.0, 0.0
    _, budget, neighbours, *rest = read.split("-")
    knobs = {part[0]: float(part[1:]) for part in rest}
    return (Options(max_tokens=32, read="evidence", evidence=int(budget), long=stop == "long"), int(neighbours),
            knobs.get("w", 0.0), knobs.get("b", 0.0))


def asking(after: str):
    """answer.text_prompt with `after` on a line after the question."""
    return lambda tokenizer, question, sources: answer.text_prompt(
        tokenizer, f"{question}\n{after}" if after else question, sources)


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
        opts, settings.NEIGHBOURS, settings.EVIDENCE_ROUTER_WEIGHT, settings.ANSWER_TYPE_BONUS = options(variant)
        answer.SYSTEM, after = PROMPTS[(variant.split("/") + ["cite"])[2]]
        ask_module.text_prompt = asking(after)
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
