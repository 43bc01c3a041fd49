"""Does Memory Interleave find scattered evidence that reading deeper in one ranking does not?

    python benchmarks/interleave_recall.py /tmp/eval/musique /tmp/eval/hotpot /tmp/msa-router-recall/nq-dev

For every question of the sets (MuSiQue, HotpotQA: 2-4 gold passages each; NQ: one) it retrieves as `msa ask`
does (qa.interleave.retrieve with the default router, k, the shipped relevance test) with 1, 2 and 3 hops, and
compares the documents read with the same number of documents taken from hop 1's ranking alone. Reported: the
mean number of documents read, gold recall over them, and all-gold (every gold passage read). Uses the banks
`msa eval` makes for the sets (ingesting them if needed). Prints JSON lines and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from msa_cli import settings
from msa_cli.corpus.eval_set import load_set
from msa_cli.engine import Engine
from msa_cli.evaluation import default_eval_bank
from msa_cli.ingest import ingest
from msa_cli.model.loading import load_model
from msa_cli.qa.ask import read_back, relevance
from msa_cli.qa.interleave import retrieve

def scores(read: list[str], gold: list[str]) -> tuple[float, bool]:
    found = set(read) & set(gold)
    return len(found) / len(gold), len(found) == len(gold)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sets", nargs="+", type=Path, help="eval sets (convert_eval.py's layout)")
    ap.add_argument("-k", type=int, default=settings.TOP_K, help="documents hop 1 reads")
    ap.add_argument("--read-back", type=int, nargs="+", default=[settings.READ_BACK_SENTENCES],
                    help="what later hops route on of the document just read: its N best sentences (0: all); "
                         "one run per value")
    args = ap.parse_args()
    model = load_model()
    rows = []
    for path in args.sets:
        s = load_set(path)
        name = s.name
        engine = Engine.open(model, default_eval_bank(s), create=True)
        ingest(engine, [s.corpus], progress=sys.stderr.isatty())
        test = relevance(engine)
        for n, hops in [(n, hops) for n in args.read_back for hops in (1, 2, 3) if hops > 1 or n == args.read_back[0]]:
            settings.READ_BACK_SENTENCES = n
            interleave, deeper, read = [], [], []
            for q in s.questions:
                r = retrieve(engine.route, q["question"], args.k, hops, test, abstain=False,
                             read_back=read_back(engine, q["question"]))
                files = [Path(h.document.source).stem for h in r.hits]
                ranking = [Path(h.document.source).stem for h in engine.route(q["question"], len(files))]
                interleave.append(scores(files, q["gold_docs"]))
                deeper.append(scores(ranking, q["gold_docs"]))
                read.append(len(files))
            row = {"set": name, "k": args.k, "read_back": n, "hops": hops, "questions": len(s.questions),
                   "documents_read": float(np.mean(read)),
                   "interleave_recall": float(np.mean([x[0] for x in interleave])),
                   "interleave_all_gold": float(np.mean([x[1] for x in interleave])),
                   "hop1_ranking_recall": float(np.mean([x[0] for x in deeper])),
                   "hop1_ranking_all_gold": float(np.mean([x[1] for x in deeper]))}
            print(json.dumps(row), flush=True)
            rows.append(row)
    print("\n| set | read back | hops | documents read | recall: interleave | recall: hop 1 only | "
          "all-gold: interleave | all-gold: hop 1 only |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['set']} | {r['read_back']} | {r['hops']} | {r['documents_read']:.2f} | "
              f"{r['interleave_recall']:.3f} | {r['hop1_ranking_recall']:.3f} | {r['interleave_all_gold']:.3f} | "
              f"{r['hop1_ranking_all_gold']:.3f} |")


if __name__ == "__main__":
    main()
