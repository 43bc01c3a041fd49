"""The shipped learned router (msa_cli/data/*-learned.safetensors), reproduced: one command, seeded.

    python benchmarks/train_router.py --eval-dir /tmp/eval --debs python3.11-doc_*.deb [--out FILE]

--eval-dir holds sets converted by shared/eval/tools/convert_eval.py (nq, 2wiki). The router learns from:
  - NQ train questions 1..1500 with their gold passages (the last 150 held out to choose the epoch);
  - inverse-cloze pairs from the 2wiki half kept for training (wiki_split.py; the other half is only ever a
    distractor) and from python3.11-doc's pages (linux-doc-6.1 is left for the scaling banks' distractors);
  - all-MiniLM-L6-v2's scores over the same candidates as soft targets (training only).
It runs `msa train-router` with the shipped router's settings and prints its log; the router file's manifest (.json
beside it) records the data's hashes, the settings and every epoch's held-out figures. Nothing here reads a
dev question.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from wiki_split import training_half

ICT_PASSAGES = 3000   # per --ict source: the two sources weigh alike, and an epoch stays near 4 minutes here
SETTINGS = ["--qa-limit", "1500", "--layers", "8", "--heads", "1", "--head-dim", "48", "--granularity", "1",
           "--aggregate", "mean", "--teacher", "--epochs", "6", "--seed", "0"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval-dir", type=Path, required=True)
    ap.add_argument("--debs", nargs="+", required=True, help="python3.11-doc's .deb (apt-get download)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "msa-train-router")
    ap.add_argument("--out", type=Path, default=Path("router-learned.safetensors"))
    args = ap.parse_args()

    wiki = args.work / "2wiki-train"
    wiki.mkdir(parents=True, exist_ok=True)
    for f in training_half(args.eval_dir / "2wiki" / "corpus"):
        if not (wiki / f.name).exists():
            (wiki / f.name).symlink_to(f.resolve())
    docs = args.work / "python3.11-doc"
    if not docs.exists():
        for deb in args.debs:
            subprocess.run(["dpkg-deb", "-x", deb, str(docs)], check=True)
    html = docs / "usr" / "share" / "doc" / "python3.11" / "html"
    cmd = [sys.executable, "-m", "msa_cli.cli", "train-router", "--out", str(args.out),
           "--qa", str(args.eval_dir / "nq"), "--ict", str(wiki), "--ict", str(html),
           "--ict-limit", str(ICT_PASSAGES), *SETTINGS]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
