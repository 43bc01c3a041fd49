"""Router recall on dev sets, every system in the same run: `msa eval --no-generate` as a user runs it.

    python benchmarks/router_recall.py --eval-dir /tmp/eval --debs linux-doc-6.1_*.deb [--tokens 1000000]

--eval-dir holds sets converted by shared/eval/tools/convert_eval.py (nq, 2wiki, musique, hotpot). The script
builds, under --work:
  - nq-dev: NQ-Open dev questions 1501..2000 over their own gold passages only;
  - nq-dev-1m: the same questions over a bank grown to --tokens with distractors the router never trained on:
    the 2wiki half kept out of training (wiki_split.py), then text files from the Debian documentation packages
    given (HTML and text, in path order; linux-doc-6.1: the router's inverse-cloze text is python3.11-doc's);
and evaluates nq-dev, nq-dev-1m, musique and hotpot with the default routing (and the learned router alone), and
with --routers native also the shipped calibrated native router; BM25 and all-MiniLM-L6-v2 ("dense") as
baselines. Prints one JSON line per (set, router),
then a markdown table. Nothing here is fitted: the routers were trained on NQ train questions and on other text
(BENCHMARKS.md, "How the shipped router was trained").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from wiki_split import distractor_half

DEV = (1500, 2000)   # NQ dev: questions 1501..2000 (0-based lines 1500..1999)
DOC_SUFFIXES = {".html", ".htm", ".txt", ".rst"}


def nq_dev(nq: Path, out: Path, questions: tuple[int, int] = DEV) -> Path:
    """NQ questions (0-based lines questions[0]..questions[1]-1) over their own gold passages."""
    lines = (nq / "questions.jsonl").read_text().splitlines()[questions[0]:questions[1]]
    (out / "corpus").mkdir(parents=True, exist_ok=True)
    (out / "questions.jsonl").write_text("\n".join(lines) + "\n")
    for q in map(json.loads, lines):
        for gold in q["gold_docs"]:
            link = out / "corpus" / f"{gold}.txt"
            if not link.exists():
                link.symlink_to(nq / "corpus" / f"{gold}.txt")
    return out


def grown(dev: Path, twowiki: Path, debs: list[str], tokens: int, out: Path) -> Path:
    """dev's questions over its corpus plus distractors, up to `tokens` tokens (counted with the default model's
    tokenizer over the text ingest extracts, as the bank counts them: HTML markup is not memory)."""
    from msa_cli.corpus.readers import read_file
    from msa_cli.errors import MsaError
    from msa_cli.model.loading import load_model

    tokenizer = load_model().tokenizer
    corpus = out / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    (out / "questions.jsonl").write_text((dev / "questions.jsonl").read_text())
    total = 0

    def add(path: Path, name: str) -> None:
        nonlocal total
        try:
            text = read_file(path).text
        except MsaError:   # ingest skips what it cannot read (and says so): it adds nothing to the bank
            return
        link = corpus / name
        if not link.exists():
            link.symlink_to(path.resolve())
        total += len(tokenizer(text, add_special_tokens=False).input_ids)

    for f in sorted((dev / "corpus").iterdir()):
        add(f, f.name)
    distractors = distractor_half(twowiki / "corpus")
    unpacked = Path(tempfile.mkdtemp(prefix="debs-"))
    for deb in debs:
        subprocess.run(["dpkg-deb", "-x", deb, str(unpacked)], check=True)
    distractors += sorted(p for p in unpacked.rglob("*") if p.is_file() and p.suffix in DOC_SUFFIXES
                          and not p.is_symlink())
    for n, f in enumerate(distractors):
        if total >= tokens:
            break
        add(f, f"d{n:06d}-{f.name}")
    if total < tokens:
        sys.exit(f"only {total} tokens of distractors: give more --debs")
    return out


def run_eval(set_dir: Path, router: str, baselines: bool) -> dict:
    cmd = [sys.executable, "-m", "msa_cli.cli", "eval", str(set_dir), "--no-generate", "--json", "--router", router]
    if baselines:
        cmd += ["--baseline", "bm25", "--baseline", "dense"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ)
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval-dir", type=Path, required=True)
    ap.add_argument("--debs", nargs="*", default=[])
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "msa-router-recall")
    ap.add_argument("--sets", nargs="*", default=["nq-dev", "nq-dev-1m", "musique", "hotpot"])
    ap.add_argument("--routers", nargs="*", default=["default"],
                    help="also 'native' (the shipped calibrated native router; its reindex runs to layer 18)")
    args = ap.parse_args()

    dev = args.work / "nq-dev"
    if not dev.exists():
        nq_dev(args.eval_dir / "nq", dev)
    sets = {"nq-dev": dev, "musique": args.eval_dir / "musique", "hotpot": args.eval_dir / "hotpot"}
    if "nq-dev-1m" in args.sets:
        big = args.work / "nq-dev-1m"
        sets["nq-dev-1m"] = big if big.exists() else grown(dev, args.eval_dir / "2wiki", args.debs, args.tokens, big)
    rows = []
    for name in args.sets:
        # Each router reindexes the set's bank (content untouched); the baselines run with the default.
        for router in args.routers:
            result = run_eval(sets[name], router, baselines=router == "default")
            print(json.dumps({"set": name, "router": router, **result}), flush=True)
            for system, r in result.items():
                if isinstance(r, dict) and "recall@5" in r:
                    label = "native" if router == "native" else system
                    rows.append((name, label, r, result["bank"]["tokens"]))
    print("\n| set | tokens | system | recall@1 | recall@5 | recall@10 | all-gold@5 | MRR | ms/question |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, system, r, tokens in rows:
        print(f"| {name} | {tokens:,} | {system} | {r['recall@1']:.3f} | {r['recall@5']:.3f} | {r['recall@10']:.3f} "
              f"| {r['all-gold@5']:.3f} | {r['mrr']:.3f} | {r['ms_per_question']:.1f} |")


if __name__ == "__main__":
    main()
