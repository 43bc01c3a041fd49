"""Peak memory of `msa ingest` against corpus size: it must not grow with the corpus.

Ingests growing prefixes of the Python 3.11 documentation sources (Debian package python3.11-doc), each into a fresh
bank, one fresh `msa ingest` process per size (default model), and prints one JSON line per size: files, tokens,
peak RSS, wall time; then the growth of peak RSS per 100K tokens between the smallest and the largest size.
`--checkout DIR` runs the msa of another source tree (e.g. a `git worktree` of an older commit) on the same
corpora, for a baseline measured in the same run.

    python benchmarks/ingest_memory.py --deb python3.11-doc_*.deb --files 20 80 200
    python benchmarks/ingest_memory.py --deb python3.11-doc_*.deb --files 20 80 200 --checkout /tmp/msa-old
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ingest_docs import sources_tree


def corpus(tree: Path, n_files: int, out: Path) -> Path:
    """The first n_files .txt sources (sorted), copied flat."""
    files = sorted(tree.rglob("*.txt"))[:n_files]
    out.mkdir(parents=True)
    for f in files:
        shutil.copy(f, out / f.relative_to(tree).as_posix().replace("/", "__"))
    return out


def ingest(folder: Path, bank: Path, checkout: Path | None) -> dict:
    env = dict(os.environ)
    if checkout:   # its msa_cli comes first on the path (msa_kernels stays the installed one)
        env["PYTHONPATH"] = str(checkout)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "msa_cli.cli", "ingest", str(folder), "--bank", str(bank)],
                            stderr=subprocess.PIPE, text=True, env=env, cwd=checkout or None)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"msa ingest failed: {err}")
    summary = err.strip().splitlines()[-1]   # "ingested N files (D documents, T tokens) in ..."
    tokens = int(summary.split(" documents, ")[1].split(" tokens")[0].replace(",", ""))
    return {"tokens": tokens, "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "wall_s": round(wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deb", help="python3.11-doc .deb (default: apt-get download it)")
    ap.add_argument("--files", type=int, nargs="+", default=[20, 80, 200])
    ap.add_argument("--checkout", type=Path, help="run the msa of this source tree instead")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="msa-ingest-memory-") as tmp:
        work = Path(tmp)
        tree = sources_tree(args.deb and str(Path(args.deb).resolve()), work)
        rows = []
        for n in sorted(args.files):
            folder = corpus(tree, n, work / f"corpus-{n}")
            row = {"files": n, **ingest(folder, work / f"bank-{n}", args.checkout),
                   "code": str(args.checkout or "this checkout")}
            print(json.dumps(row), flush=True)
            rows.append(row)
        first, last = rows[0], rows[-1]
        growth = (last["peak_rss_mib"] - first["peak_rss_mib"]) / max(1, last["tokens"] - first["tokens"]) * 1e5
        print(json.dumps({"rss_growth_mib_per_100k_tokens": round(growth, 1),
                          "from_tokens": first["tokens"], "to_tokens": last["tokens"]}))


if __name__ == "__main__":
    main()
