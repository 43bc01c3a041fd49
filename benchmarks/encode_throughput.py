"""Stage-1 encoding throughput against plain transformers forwards over the same passages, in one run.

    python benchmarks/encode_throughput.py [--passages 200] [--repeats 3]

Passages: the gold passages of NQ dev questions 1501.. (../shared/eval). Baselines: the same weights in
transformers, bf16, length-sorted padded batches of 16, (a) the whole causal LM (logits, as a user of
transformers would run it) and (b) the bare decoder stack (no lm_head), the strongest plain forward.
Prints one JSON line per system and a summary line with the speed-up over the strongest baseline and MFU.
Also prints the bank size per memory token for the default model and the MSA-4B layout.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from msa_cli.engine import BANK_DTYPE, bank_settings
from msa_cli.memory.bank import Bank, NewDocument
from msa_cli.memory.encoder import encode, template_kv
from msa_cli.memory.mode import mode_for
from msa_cli.memory.router import Router
from msa_cli.model.loading import converted_gguf, default_gguf, load_model
from msa_cli.settings import PACK_TOKENS, POOLING

NQ = Path(__file__).resolve().parents[2] / "shared/eval/raw/nq-open-oracle.first2000.jsonl.gz"
# This CPU: 2 cores at 2.1 GHz; AVX-512 BF16 (VDPBF16PS: 32 bf16 pairs = 64 FLOP, 2 FMA ports) -> 128
# FLOP/cycle/core. AMX-BF16 tiles would allow 2048 FLOP/cycle/core; the figure below is against AVX-512.
PEAK_FLOPS = 2 * 2.1e9 * 128


def passages(n: int) -> list[str]:
    out = []
    with gzip.open(NQ, "rt") as f:
        for i, line in enumerate(f):
            if i < 1500:
                continue
            gold = next(c for c in json.loads(line)["ctxs"] if c.get("isgold"))
            out.append(gold["title"] + "\n\n" + gold["text"])
            if len(out) == n:
                break
    return out


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: oneDNN builds its kernels on first use
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def stage1_flops_per_token(cfg, content_last: int, mean_len: float) -> float:
    d, hq, hk, f = cfg.hidden, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.intermediate
    qkv = 2 * d * (hq + 2 * hk)
    layer = qkv + 2 * hq * d + 2 * 3 * d * f + 2 * 2 * hq * (mean_len / 2)  # + causal attention
    return content_last * layer + 2 * d * 2 * hk  # the last layer only projects K and V


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--passages", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()

    model = load_model(dtype=torch.bfloat16)
    cfg = model.backbone.cfg
    mode = mode_for(model)
    router = Router(mode.default_router())
    settings = bank_settings(mode, router.spec, content=True)
    texts = passages(args.passages)
    docs = [mode.document_tokens(t, 0) for t in texts]
    n_tokens = sum(map(len, docs))
    common = {"passages": len(docs), "tokens": n_tokens, "threads": torch.get_num_threads()}

    def ours():
        return encode(model.backbone, docs, settings["content_layers"], router, POOLING, BANK_DTYPE, PACK_TOKENS)

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(converted_gguf(default_gguf()), dtype=torch.bfloat16).eval()
    order = sorted(range(len(docs)), key=lambda i: len(docs[i]))
    batches = [order[i:i + args.batch] for i in range(0, len(order), args.batch)]
    padded = []
    for b in batches:
        width = max(len(docs[i]) for i in b)
        ids = torch.full((len(b), width), model.tokenizer.pad_token_id or 0)
        mask = torch.zeros((len(b), width), dtype=torch.long)
        for row, i in enumerate(b):
            ids[row, :len(docs[i])] = torch.tensor(docs[i])
            mask[row, :len(docs[i])] = 1
        padded.append((ids, mask))

    def hf_lm():
        with torch.inference_mode():
            for ids, mask in padded:
                hf(input_ids=ids, attention_mask=mask)

    def hf_stack():
        with torch.inference_mode():
            for ids, mask in padded:
                hf.model(input_ids=ids, attention_mask=mask)

    results = {}
    # Interleave the systems so load from other processes hits them alike.
    for name, fn in (("transformers_causal_lm", hf_lm), ("transformers_decoder_stack", hf_stack),
                     ("msa_stage1", ours)):
        seconds = timed(fn, args.repeats)
        results[name] = n_tokens / seconds
        print(json.dumps({"system": name, "tok_per_s": round(results[name], 1), "seconds": round(seconds, 2),
                          **common}))

    last = max(settings["content_layers"] + router.spec.layers)
    flops = stage1_flops_per_token(cfg, last, n_tokens / len(docs))
    best = max(results["transformers_causal_lm"], results["transformers_decoder_stack"])
    print(json.dumps({"summary": "stage-1 speed-up over the strongest plain transformers forward",
                      "speedup": round(results["msa_stage1"] / best, 3),
                      "stage1_gflops_per_s": round(results["msa_stage1"] * flops / 1e9, 1),
                      "mfu_vs_avx512_bf16_peak": round(results["msa_stage1"] * flops / PEAK_FLOPS, 3),
                      "peak_gflops": PEAK_FLOPS / 1e9}))

    # Bank size per memory token: write the encoded passages to a real bank and measure the files.
    enc = ours()
    with tempfile.TemporaryDirectory() as tmp:
        bank = Bank.create(Path(tmp) / "bank", settings, template_kv(model.backbone, model.tokenizer, BANK_DTYPE))
        with bank.lock():
            bank.append([NewDocument("nq", {"page": None, "line_start": 1, "line_end": 1}, "x", len(d), t)
                         for d, t in zip(docs, texts)], enc.content, enc.chunk_counts, enc.route_keys, enc.key_counts)
        disk = bank.stats()["bytes_on_disk"]
    print(json.dumps({"bank_bytes_per_token": {k: round(v / n_tokens, 1) for k, v in disk.items()},
                      "hot_plus_cold": round((disk["hot"] + disk["cold"]) / n_tokens, 1),
                      "router": router.spec.describe()}))
    # MSA-4B layout (digest §0): 18 router layers x (K, V, router K) x 8 KV heads x 128 dims x 2 bytes / 64.
    print(json.dumps({"msa_4b_bank_bytes_per_token": 18 * 3 * 8 * 128 * 2 / 64}))


if __name__ == "__main__":
    sys.exit(main())
