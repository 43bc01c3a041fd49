"""How the default routing score weighs the learned router against BM25 (settings.FUSION_WEIGHT), on train data.

    python benchmarks/fusion_weight.py --nq /tmp/eval/nq [--router PATH]

Questions 1351..1500 of NQ-Open's train split (the ones `msa train-router` held out), ranked over the gold
passages of all 1,500 train questions: nothing from dev. For each weight w the score is
w * z(router) + (1 - w) * z(bm25) (lexical.fused); w = 0 is BM25 alone, w = 1 the learned router alone; reciprocal
rank fusion (k = 60) is the usual alternative. Prints one line per variant.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from msa_cli.corpus.eval_set import load_set
from msa_cli.engine import Engine
from msa_cli.evaluation import metrics, ranked_files
from msa_cli.ingest import ingest
from msa_cli.memory import lexical
from msa_cli.memory.encoder import routing_query
from msa_cli.memory.mode import mode_for
from msa_cli.memory.router import load_spec
from msa_cli.model.loading import load_model

TRAIN, HELD_OUT = 1500, 150


def held_out_set(nq: Path, out: Path) -> Path:
    lines = (nq / "questions.jsonl").read_text().splitlines()[:TRAIN]
    (out / "corpus").mkdir(parents=True, exist_ok=True)
    (out / "questions.jsonl").write_text("\n".join(lines[TRAIN - HELD_OUT:]) + "\n")
    for gold in {g for line in lines for g in json.loads(line)["gold_docs"]}:
        link = out / "corpus" / f"{gold}.txt"
        if not link.exists():
            link.symlink_to((nq / "corpus" / f"{gold}.txt").resolve())
    return out


def ranks(scores: torch.Tensor) -> torch.Tensor:
    r = torch.empty_like(scores)
    r[torch.argsort(scores, descending=True)] = torch.arange(len(scores), dtype=scores.dtype)
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nq", type=Path, required=True, help="convert_eval.py nq_oracle output")
    ap.add_argument("--router", type=Path, help="router file [default: the shipped default]")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "msa-fusion-weight")
    args = ap.parse_args()

    model = load_model()
    s = load_set(held_out_set(args.nq, args.work / "set"))
    spec = load_spec(args.router) if args.router else mode_for(model).default_router()
    engine = Engine.open(model, args.work / f"bank-{spec.id}", create=True, new_router=spec)
    ingest(engine, [s.corpus])
    docs = engine.bank.documents()
    index = {d.doc_id: i for i, d in enumerate(docs)}
    bm25 = engine.bank.lexical()
    learned, lex, order = [], [], None
    for q in s.questions:
        ids, scores = engine.router.scores(routing_query(model.backbone, model.tokenizer, engine.router,
                                                         q["question"]), engine.bank.routing_segments())
        learned.append(scores)
        lex.append(bm25.scores(q["question"])[torch.searchsorted(bm25.doc_ids, ids)])
        order = [index[int(i)] for i in ids]
    golds = [q["gold_docs"] for q in s.questions]

    def report(name: str, fused: list[torch.Tensor]) -> None:
        rankings = [ranked_files([(order[i], 0.0) for i in torch.topk(f, min(400, len(f))).indices.tolist()], docs)
                    for f in fused]
        m = metrics(rankings, golds)
        print(json.dumps({"variant": name, **{k: round(v, 3) for k, v in m.items()}}))

    for w in (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0):
        report(f"z w={w}", [lexical.fused(a, b, w) for a, b in zip(learned, lex)])
    report("rrf k=60", [1 / (60 + ranks(a)) + 1 / (60 + ranks(b)) for a, b in zip(learned, lex)])


if __name__ == "__main__":
    main()
