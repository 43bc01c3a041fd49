"""Calibrate `msa ask`'s relevance test on the train split, then measure abstention on dev banks.

    python benchmarks/abstention.py --eval-dir /tmp/eval --debs sqlite3-doc_*.deb --dev-sets /tmp/msa-router-recall
        [--record msa_cli/data/ROUTER-learned.safetensors]

A question is answered when any of the k documents hop 1 finds is relevant (qa.interleave.Relevance: BM25 in
rare-word matches, or the router's cosine, at or above a threshold); otherwise msa abstains.

Calibration (train split only): NQ train questions 1-500 against an unrelated bank (SQLite's manual, from the
Debian package given), where nothing can be relevant. The BM25 threshold is the 90th percentile of the best
hop-1 BM25 those questions reach, the router threshold the 95th of the best router score: together, unrelated
text passes about one time in seven. Then, on the same thresholds:
  - train: NQ train questions 1-1000 over a bank of their gold passages plus 2,000 2wiki paragraphs (answerable)
    and questions 1001-1500 over that bank (their gold passages are not in it);
  - dev: sample_corpora/ with its 16 questions (answerable) and NQ dev questions (not about Python: unrelated);
    NQ dev questions over their gold passages (nq-dev) and over 1M tokens (nq-dev-1m): router_recall.py's sets
    and `msa eval`'s banks for them (--dev-sets: router_recall.py's --work),
    with MuSiQue and HotpotQA questions as the unanswerable ones (Wikipedia questions over a Wikipedia bank:
    related text, no answer).
Prints one JSON line per row and a markdown table.
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

ROOT = Path(__file__).resolve().parent.parent
K = 5


def link_all(files, corpus: Path, prefix: str = "") -> None:
    corpus.mkdir(parents=True, exist_ok=True)
    for f in files:
        link = corpus / f"{prefix}{f.name}"
        if not link.exists():
            link.symlink_to(f.resolve())


def ingest(corpus: Path, bank: Path) -> Path:
    subprocess.run([sys.executable, "-m", "msa_cli.cli", "ingest", str(corpus), "--bank", str(bank), "--quiet"],
                   check=True, env=os.environ)
    return bank


def questions(path: Path, start: int = 0, stop: int | None = None) -> list[str]:
    return [json.loads(line)["question"] for line in path.read_text().splitlines()[start:stop]]


def hop_one(bank: Path, qs: list[str]) -> np.ndarray:
    """Per question: the best relevance evidence among hop 1's k documents -> [N, 2] (BM25 matches, router)."""
    from msa_cli.engine import Engine
    from msa_cli.model.loading import load_model

    engine = Engine.open(load_model(), bank)
    rows = []
    for q in qs:
        hits = engine.route(q, K)
        rows.append([max(h.bm25 for h in hits), max(h.router for h in hits)])
    return np.array(rows)


def record(path: Path, threshold: float) -> None:
    """Write the router threshold into the router file: it travels with that router (RouterSpec.relevant), and
    its id, which names the keys, does not change."""
    import dataclasses

    from msa_cli.memory.router import load_spec, read_about, save_spec

    spec = load_spec(path)
    save_spec(dataclasses.replace(spec, relevant=threshold), path, read_about(path))
    manifest = path.with_suffix(".json")   # the manifest beside it says the same (tests/test_router.py checks)
    if manifest.exists():
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "relevant": threshold}, indent=1) + "\n")
    print(json.dumps({"recorded": str(path), "relevant": threshold, "router": spec.id}), flush=True)


def abstains(features: np.ndarray, bm25: float, router: float) -> np.ndarray:
    return (features[:, 0] < bm25) & (features[:, 1] < router)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval-dir", type=Path, required=True)
    ap.add_argument("--debs", nargs="+", required=True, help="sqlite3-doc_*.deb")
    ap.add_argument("--dev-sets", type=Path, required=True, help="router_recall.py's --work (nq-dev, nq-dev-1m)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "msa-abstention")
    ap.add_argument("--record", type=Path, help="router file (the default's, msa_cli/data/*-learned.safetensors) "
                                                "to write the calibrated router threshold into")
    args = ap.parse_args()
    work, nq = args.work, args.eval_dir / "nq"
    nq_questions = nq / "questions.jsonl"

    # Banks.
    unpacked = work / "sqlite-doc"
    work.mkdir(parents=True, exist_ok=True)   # dpkg-deb -x makes only the last folder
    if not unpacked.exists():
        for deb in args.debs:
            subprocess.run(["dpkg-deb", "-x", deb, str(unpacked)], check=True)
    pages = sorted(p for p in unpacked.rglob("*.html") if 8_000 < p.stat().st_size < 60_000)[3::4][:60]
    link_all(pages, work / "sqlite" / "corpus")
    gold_train = {g for line in nq_questions.read_text().splitlines()[:1000] for g in json.loads(line)["gold_docs"]}
    link_all([nq / "corpus" / f"{g}.txt" for g in sorted(gold_train)], work / "nq-train" / "corpus")
    link_all(sorted((args.eval_dir / "2wiki" / "corpus").iterdir())[:2000], work / "nq-train" / "corpus", "w-")
    # Calibration on the train split first (it needs only the unrelated bank), so --record lands early.
    unrelated = hop_one(ingest(work / "sqlite" / "corpus", work / "bank-sqlite"), questions(nq_questions, 0, 500))
    bm25, router = float(np.percentile(unrelated[:, 0], 90)), float(np.percentile(unrelated[:, 1], 95))
    print(json.dumps({"calibration": {"bm25": round(bm25, 3), "router": round(router, 3),
                                      "unrelated_passing": round(1 - float(abstains(unrelated, bm25, router).mean()), 3)}}),
          flush=True)
    if args.record:
        record(args.record, round(router, 3))
    banks = {"nq-train": ingest(work / "nq-train" / "corpus", work / "bank-nq-train"),
             "sample": ingest(ROOT / "sample_corpora", work / "bank-sample")}
    for name in ("nq-dev", "nq-dev-1m"):   # the banks `msa eval` made for router_recall.py
        s = load_set(args.dev_sets / name, None, 0)
        banks[name] = ingest(s.corpus, default_eval_bank(s))

    multi_hop = questions(args.eval_dir / "musique" / "questions.jsonl") + questions(args.eval_dir / "hotpot" / "questions.jsonl")
    sample_qs = questions(ROOT / "sample_corpora" / "questions.jsonl")
    cases = [("train", "nq-train", questions(nq_questions, 0, 1000), questions(nq_questions, 1000, 1500),
              "NQ train 1001-1500 (gold absent)"),
             ("dev", "sample", sample_qs, questions(nq_questions, 1500, 2000), "NQ dev (unrelated)"),
             ("dev", "nq-dev", questions(nq_questions, 1500, 2000), multi_hop, "MuSiQue+HotpotQA (related)"),
             ("dev", "nq-dev-1m", questions(nq_questions, 1500, 2000), multi_hop, "MuSiQue+HotpotQA (related)")]
    rows = []
    for split, bank, answerable, unanswerable, label in cases:
        a = abstains(hop_one(banks[bank], answerable), bm25, router)
        u = abstains(hop_one(banks[bank], unanswerable), bm25, router)
        row = {"split": split, "bank": bank, "answerable": len(a), "false_abstention": round(float(a.mean()), 3),
               "unanswerable": label, "n_unanswerable": len(u), "abstained": round(float(u.mean()), 3)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(f"\ncalibrated: BM25 >= {bm25:.2f} rare-word matches, or router >= {router:.3f}\n")
    print("| split | bank | answerable questions | wrongly abstained | unanswerable questions | abstained |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['split']} | {r['bank']} | {r['answerable']} | {r['false_abstention']:.1%} | "
              f"{r['n_unanswerable']} {r['unanswerable']} | {r['abstained']:.1%} |")


if __name__ == "__main__":
    main()
