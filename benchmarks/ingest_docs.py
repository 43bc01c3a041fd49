"""Ingest benchmark on the Python 3.11 documentation sources (Debian package python3.11-doc).

Runs `msa ingest` as a user would (a fresh process each time, default model) on a copy of the package's
`_sources` tree, and prints:
  1. first ingest: files/s, tokens/s end to end, against stage 1 alone (the encoder's own time in the same run),
     the share parsing + writing add on top of stage 1, peak RSS, bank size;
  2. re-ingest of the unchanged tree, as a share of the first run's time;
  3. re-ingest after changing 1% of the files.
With --content kv none, run 1 is repeated into a fresh bank for each (`msa ingest --content`), in the same run, and
runs 2 and 3 use the first one's bank.

    python benchmarks/ingest_docs.py                      # downloads the .deb with apt-get (Debian mirror)
    python benchmarks/ingest_docs.py --deb python3.11-doc_*.deb --only tutorial howto --content kv none
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SOURCES = "usr/share/doc/python3.11/html/_sources"


def sources_tree(deb: str | None, work: Path) -> Path:
    if deb is None:
        subprocess.run(["apt-get", "download", "python3.11-doc"], cwd=work, check=True, capture_output=True)
        deb = glob.glob(str(work / "python3.11-doc_*.deb"))[0]
    subprocess.run(["dpkg-deb", "-x", deb, str(work / "deb")], check=True)
    return work / "deb" / SOURCES


def run_ingest(tree: Path, bank: Path, content: str | None = None) -> dict:
    """One `msa ingest` process: wall seconds, peak RSS (MiB), and the bank's record of the ingest."""
    start = time.perf_counter()
    extra = ["--content", content] if content else []
    proc = subprocess.Popen([sys.executable, "-m", "msa_cli.cli", "ingest", str(tree), "--bank", str(bank), "-q",
                             *extra], stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"msa ingest failed: {proc.stderr.read()}")
    out = subprocess.run([sys.executable, "-m", "msa_cli.cli", "status", "--bank", str(bank), "--json"],
                         capture_output=True, text=True, check=True)
    return {"wall": wall, "rss_mib": usage.ru_maxrss / 1024, "status": json.loads(out.stdout),
            "warnings": proc.stderr.read().count("warning")}


def report_first(first: dict, content: str | None) -> None:
    last, st = first["status"]["last_ingest"], first["status"]
    tokens, ingest_s, encode_s = last["tokens"], last["seconds"], last["encode_seconds"]
    bank_bytes = sum(st["bytes_on_disk"].values())
    print(f"\n1. first ingest{f' (--content {content})' if content else ''}: {last['ingested']} files, "
          f"{st['documents']} documents, {tokens:,} tokens, {first['warnings']} warnings")
    print(f"   process wall      {first['wall']:8.1f} s   (includes starting Python and loading the model)")
    print(f"   ingest            {ingest_s:8.1f} s   {last['ingested'] / ingest_s:6.2f} files/s   "
          f"{tokens / ingest_s:7.0f} tok/s end to end")
    print(f"   stage 1 alone     {encode_s:8.1f} s   {'':17}{tokens / encode_s:7.0f} tok/s")
    print(f"     scan (read, parse, split) {last['scan_seconds']:.1f} s, write {last['write_seconds']:.1f} s, "
          f"other {ingest_s - last['scan_seconds'] - encode_s - last['write_seconds']:.1f} s")
    print(f"   on top of stage 1 {100 * (ingest_s - encode_s) / encode_s:7.1f} %   (target <= 10%)")
    print(f"   peak RSS          {first['rss_mib']:8.0f} MiB")
    print(f"   bank              {bank_bytes / 1e6:8.1f} MB   {bank_bytes / tokens:.0f} B/token  "
          + ", ".join(f"{k} {v / tokens:.1f}" for k, v in st["bytes_on_disk"].items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deb", help="python3.11-doc .deb (default: apt-get download it)")
    ap.add_argument("--only", nargs="*", help="top-level folders of _sources to keep (default: all)")
    ap.add_argument("--touch", type=float, default=0.01, help="share of files changed for the third run")
    ap.add_argument("--content", nargs="+", choices=["kv", "none"], default=[None],
                    help="what the banks keep (msa ingest --content); several: run 1 once for each")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tree = sources_tree(args.deb, work)
        if args.only:
            for entry in tree.iterdir():
                if entry.name not in args.only:
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        files = sorted(p for p in tree.rglob("*") if p.is_file())
        size = sum(p.stat().st_size for p in files)
        print(f"corpus: {len(files)} files, {size / 1e6:.1f} MB of reStructuredText ({', '.join(args.only or ['all'])})")
        runs = []
        for content in args.content:
            bank = work / f"bank-{content or 'default'}"
            runs.append((bank, run_ingest(tree, bank, content)))
            report_first(runs[-1][1], content)
        bank, first = runs[0]
        ingest_s = first["status"]["last_ingest"]["seconds"]

        second = run_ingest(tree, bank)
        last2 = second["status"]["last_ingest"]
        print(f"\n2. unchanged re-ingest: {last2['unchanged']} unchanged, {last2['ingested']} encoded")
        print(f"   ingest {last2['seconds']:.2f} s = {100 * last2['seconds'] / ingest_s:.2f}% of the first "
              f"(target <= 2%); process wall {second['wall']:.1f} s = {100 * second['wall'] / first['wall']:.1f}%")

        touched = files[:: max(1, round(1 / args.touch))]
        for p in touched:
            with open(p, "a", encoding="utf-8") as f:
                f.write("\n.. changed by the ingest benchmark\n")
        third = run_ingest(tree, bank)
        last3 = third["status"]["last_ingest"]
        print(f"\n3. {len(touched)} files changed ({100 * len(touched) / len(files):.1f}%): {last3['ingested']} "
              f"re-encoded ({last3['tokens']:,} tokens), {last3['unchanged']} unchanged")
        print(f"   ingest {last3['seconds']:.1f} s = {100 * last3['seconds'] / ingest_s:.1f}% of the first; "
              f"process wall {third['wall']:.1f} s")


if __name__ == "__main__":
    main()
