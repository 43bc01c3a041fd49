"""The cost of one small commit against the size of the bank it lands in.

Fills a bank with N documents (tiny tensors of the bank's shapes, appended in segments of up to 10,000 documents),
then, under one writer lock, times appends of 10 documents each: one commit = one new segment and a manifest
swap. Also times taking the lock (it re-reads the manifest) and the lock's release (where the writer refreshes
the bank's BM25 index, if this msa does). Prints one JSON line per size. Uses only the public Bank API, so it
measures any version of msa_cli/memory/bank.py.

    python benchmarks/bank_commit.py --sizes 1000 10000 100000
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from msa_cli.memory.bank import Bank, NewDocument

LAYERS, HK, D, HR, DR = [2, 3], 2, 4, 3, 5   # the toy shapes of tests/test_bank.py
SETTINGS = {"model": {"name": "toy", "weights_sha256": "1234abcd"}, "pooling": 64, "content_layers": LAYERS,
            "dtype": "bfloat16", "kv_heads": HK, "head_dim": D,
            "router": {"id": "native", "kind": "native", "granularity": 64}}
SEGMENT = 10_000


def batch(first: int, n: int):
    """n documents of one chunk and one key each, with their tensors: append's arguments."""
    docs = [NewDocument(source=f"corpus/file{(first + i) // 10}.txt",
                        span={"page": None, "line_start": 1 + i % 10 * 8, "line_end": 8 + i % 10 * 8},
                        content_hash=f"hash-{(first + i) // 10}", n_tokens=60,
                        text=f"passage {first + i} about topic {(first + i) % 997} and word{(first + i) % 89}")
            for i in range(n)]
    content = {layer: (torch.zeros(n, HK, D, dtype=torch.bfloat16), torch.zeros(n, HK, D, dtype=torch.bfloat16))
               for layer in LAYERS}
    return docs, content, [1] * n, torch.zeros(n, HR, DR, dtype=torch.bfloat16), [1] * n


def measure(root: Path, size: int, repeats: int) -> dict:
    template = {layer: (torch.zeros(3, HK, D, dtype=torch.bfloat16), torch.zeros(3, HK, D, dtype=torch.bfloat16))
                for layer in range(4)}
    bank = Bank.create(root / f"bank-{size}", SETTINGS, template)
    with bank.lock():
        for first in range(0, size, SEGMENT):
            bank.append(*batch(first, min(SEGMENT, size - first)))
    start = time.perf_counter()
    with bank.lock():
        lock_ms = (time.perf_counter() - start) * 1e3
        commits = []
        for i in range(repeats):
            small = batch(size + 10 * i, 10)
            start = time.perf_counter()
            bank.append(*small)
            commits.append((time.perf_counter() - start) * 1e3)
        start = time.perf_counter()
    release_ms = (time.perf_counter() - start) * 1e3
    return {"bank_documents": size, "segments": len(bank.routing_segments()), "commit_docs": 10,
            "commit_ms_median": round(statistics.median(commits), 2), "commit_ms_min": round(min(commits), 2),
            "lock_ms": round(lock_ms, 2), "release_ms": round(release_ms, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            print(json.dumps(measure(Path(tmp), size, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
