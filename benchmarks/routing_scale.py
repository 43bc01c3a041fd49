"""How MSA routing (stage 2) scales with the memory size, using the torch reference on this CPU.

One routing step per question = score every chunk + max per document + top-16 documents.
Prints one JSON line per size, then one summary line with the cost per million chunks at each size.

    python benchmarks/routing_scale.py --sizes 10000 100000 1000000 10000000
    python benchmarks/routing_scale.py --heads 1 --dim 48 --q-heads 1 --doc-chunks 127 --aggregate mean
        (the shipped learned router: one key a token, late interaction)
    ... --tiles 0 65536 --tokens 170   (the default tile, msa_kernels.routing.scan_tile, against a fixed one,
        same run; the summary is the first tile's)
"""

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from msa_kernels.routing import route_scores_torch, scan_tile

TOP_K = 16


def synthetic_keys(n_chunks, n_heads, dim, *, tile=1 << 16, seed=0) -> torch.Tensor:
    """L2-normalised bf16 keys [N, Hk, d], built tile by tile so no fp32 copy of the bank exists."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.empty(n_chunks, n_heads, dim, dtype=torch.bfloat16)
    for start in range(0, n_chunks, tile):
        block = torch.randn(min(tile, n_chunks - start), n_heads, dim, generator=gen)
        keys[start : start + tile] = F.normalize(block, dim=-1)
    return keys


def time_routing(q, keys, key_doc, n_docs, repeats, aggregate, tile) -> list[float]:
    times_ms = []
    for _ in range(repeats):
        start = time.perf_counter()
        doc_score = route_scores_torch(q, keys, key_doc, n_docs, aggregate=aggregate, tile=tile or None)
        torch.topk(doc_score, min(TOP_K, n_docs))
        times_ms.append((time.perf_counter() - start) * 1e3)
    return times_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10**4, 10**5, 10**6, 10**7], help="chunks")
    parser.add_argument("--heads", type=int, default=3, help="key heads Hk")
    parser.add_argument("--dim", type=int, default=64, help="head dim d")
    parser.add_argument("--q-heads", type=int, default=9, help="query heads Hq")
    parser.add_argument("--tokens", type=int, default=16, help="routing tokens T")
    parser.add_argument("--doc-chunks", type=int, default=5, help="chunks per document")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--aggregate", default="max", choices=["max", "mean"], help="over routing tokens")
    parser.add_argument("--tiles", type=int, nargs="+", default=[0], help="keys per tile (0: scan_tile's choice)")
    args = parser.parse_args()

    q = F.normalize(torch.randn(args.tokens, args.q_heads, args.dim), dim=-1)  # [T, Hq, d]
    medians_ms, per_million = {}, {}
    for n_chunks in args.sizes:
        keys = synthetic_keys(n_chunks, args.heads, args.dim)
        key_doc = torch.arange(n_chunks, dtype=torch.int32) // args.doc_chunks  # contiguous documents
        n_docs = -(-n_chunks // args.doc_chunks)
        for tile in args.tiles:
            times_ms = time_routing(q, keys, key_doc, n_docs, args.repeats, args.aggregate, tile)
            median_ms = statistics.median(times_ms)
            if tile == args.tiles[0]:
                medians_ms[n_chunks] = median_ms
                per_million[n_chunks] = median_ms / (n_chunks / 1e6)
            print(json.dumps({
                "chunks": n_chunks,
                "tile": tile or scan_tile(args.tokens),
                "docs": n_docs,
                "ms": round(median_ms, 2),
                "ms_min": round(min(times_ms), 2),
                "ms_per_million_chunks": round(median_ms / (n_chunks / 1e6), 2),
                "bytes_of_keys": keys.numel() * keys.element_size(),
                "tokens": args.tokens,
                "q_heads": args.q_heads,
                "heads": args.heads,
                "dim": args.dim,
                "aggregate": args.aggregate,
                "threads": torch.get_num_threads(),
                "load_avg_1m": os.getloadavg()[0],  # other work on the machine inflates the times
            }), flush=True)
        del keys, key_doc

    smallest, largest = min(per_million), max(per_million)
    summary = {
        "summary": "median ms per million chunks by size; ratio = largest size cost / smallest size cost",
        "ms_per_million_chunks": {str(n): round(v, 2) for n, v in per_million.items()},
        "ratio_largest_to_smallest": round(per_million[largest] / per_million[smallest], 3),
        "threads": torch.get_num_threads(),
    }
    if len(medians_ms) > 1:  # least squares: ms = intercept + slope * millions of chunks
        fit = statistics.linear_regression([n / 1e6 for n in medians_ms], list(medians_ms.values()))
        summary["fitted_ms_per_million_chunks"] = round(fit.slope, 2)
        summary["fitted_intercept_ms"] = round(fit.intercept, 2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
