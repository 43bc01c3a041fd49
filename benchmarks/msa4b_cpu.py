"""What MSA-4B costs on this machine's CPU, through msa's own code: stage 1 (ingest) tokens/s, one generative-
retrieval round (prefill over memory with per-layer routing, then decoding) against plain decoding measured in
the same run, and the bank's bytes per token against digest §0's 1,728 B/token.

The checkpoint has MSA-4B's exact shapes (Qwen3-4B-Instruct-2507: 36 layers, hidden 2560, 32 query and 8 KV heads
of 128, FFN 9728, vocab 151936, tied embeddings; router_q_proj/router_k_proj in layers 18-35; top-16, 64-token
chunks) and random bf16 weights: the arithmetic, and so the time and memory, are the real model's; the answers
are not. Its weights cannot be downloaded here. The tokenizer is the default model's with Qwen's
<|object_ref_end|> added (token counts of English text are close to Qwen's). Prints JSON lines.

    python benchmarks/msa4b_cpu.py --documents 24
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from msa_cli.corpus.splitter import Passage
from msa_cli.engine import Engine
from msa_cli.model.backbone import Backbone, ModelConfig
from msa_cli.model.loading import Model, load_model
from msa_cli.model.decode import Decoder, KVCache
from msa_cli.model.msa_checkpoint import MsaSettings
from msa_cli.qa import generative

LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 36, 2560, 32, 8, 128, 9728, 151936
ROUTER_LAYERS = tuple(range(18, 36))
SAMPLE = Path(__file__).resolve().parent.parent / "sample_corpora" / "python" / "tutorial"


def msa4b_shaped_model() -> Model:
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    def ones(n):
        return torch.ones(n, dtype=torch.bfloat16)

    state = {"model.embed_tokens.weight": rand(VOCAB, HIDDEN), "model.norm.weight": ones(HIDDEN)}
    proj = {}
    for i in range(LAYERS):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        state |= {a + "q_proj.weight": rand(HEADS * HEAD_DIM, HIDDEN),
                  a + "k_proj.weight": rand(KV_HEADS * HEAD_DIM, HIDDEN),
                  a + "v_proj.weight": rand(KV_HEADS * HEAD_DIM, HIDDEN),
                  a + "o_proj.weight": rand(HIDDEN, HEADS * HEAD_DIM),
                  a + "q_norm.weight": ones(HEAD_DIM), a + "k_norm.weight": ones(HEAD_DIM),
                  p + "input_layernorm.weight": ones(HIDDEN), p + "post_attention_layernorm.weight": ones(HIDDEN),
                  p + "mlp.gate_proj.weight": rand(FFN, HIDDEN), p + "mlp.up_proj.weight": rand(FFN, HIDDEN),
                  p + "mlp.down_proj.weight": rand(HIDDEN, FFN)}
        if i in ROUTER_LAYERS:
            proj[i] = (rand(HEADS, HEAD_DIM, HIDDEN), rand(KV_HEADS, HEAD_DIM, HIDDEN))
    cfg = ModelConfig(family="qwen3", n_layers=LAYERS, hidden=HIDDEN, n_heads=HEADS, n_kv_heads=KV_HEADS,
                      head_dim=HEAD_DIM, intermediate=FFN, vocab=VOCAB, rope_theta=5e6, rms_eps=1e-6,
                      qkv_bias=False, qk_norm=True, tie_embeddings=True, max_positions=262144)
    backbone = Backbone(cfg, state, torch.bfloat16)
    del state
    tokenizer = load_model().tokenizer
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|object_ref_end|>"]})
    msa = MsaSettings(router_layers=ROUTER_LAYERS, top_k=16, pooling=64, aux_loss_method="INFONCE_DECOUPLE",
                      router_proj=proj)
    identity = {"name": "msa4b-shaped-random", "family": "msa", "weights_sha256": "random-seed-0"}
    return Model(backbone, tokenizer, identity, msa)


def passages(tokenizer, n: int) -> list[Passage]:
    """Real text: the sample corpus' Python tutorial, cut into passages of about 320 tokens."""
    words = " ".join(f.read_text() for f in sorted(SAMPLE.glob("*.rst"))).split()
    out, i = [], 0
    while len(out) < n:
        text = " ".join(words[i % len(words):i % len(words) + 240])
        i += 240
        out.append(Passage(path=f"/bench/{len(out)}.txt", text=text, page=None, line_start=1, line_end=1,
                           n_tokens=len(tokenizer(text).input_ids)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=24, help="passages of ~320 tokens to ingest")
    parser.add_argument("--decode-tokens", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)

    t0 = time.perf_counter()
    model = msa4b_shaped_model()
    b = model.backbone
    params = b.embed.numel() + b.norm.numel() + sum(t.numel() for layer in b.layers for t in vars(layer).values()
                                                    if isinstance(t, torch.Tensor))
    router = sum(q.numel() + k.numel() for q, k in model.msa.router_proj.values())
    print(json.dumps({"what": "model", "backbone_params_b": round(params / 1e9, 3),
                      "router_params_m": round(router / 1e6, 1), "load_s": round(time.perf_counter() - t0, 1),
                      "threads": torch.get_num_threads()}), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine.open(model, Path(tmp) / "bank", create=True)
        docs = passages(model.tokenizer, args.documents)
        with engine.bank.lock():
            t0 = time.perf_counter()
            encoded = engine.encode(docs)
            seconds = time.perf_counter() - t0
            engine.commit([(p, "x") for p in docs], encoded)
        stats = engine.bank.stats()
        # What stage 1 encodes: each passage in its id wrapper (model.protocol.MSA_DOCUMENT).
        wrapped = sum(len(engine.mode.document_tokens(d.text, d.doc_id)) for d in engine.bank.documents())
        print(json.dumps({"what": "stage 1 (ingest)", "documents": len(docs), "tokens_encoded": wrapped,
                          "tokens_per_s": round(wrapped / seconds, 1), "seconds": round(seconds, 1)}), flush=True)
        hot, cold = stats["bytes_on_disk"]["hot"], stats["bytes_on_disk"]["cold"]
        print(json.dumps({"what": "bank bytes per token", "chunks": stats["chunks"],
                          "routing_keys_per_token": round(hot / wrapped), "content_kv_per_token": round(cold / wrapped),
                          "total_per_token": round((hot + cold) / wrapped),
                          "per_full_chunk_token": (len(ROUTER_LAYERS) * 3 * KV_HEADS * HEAD_DIM * 2) // 64,
                          "note": "a document's last chunk is partial, so real text costs more than 1,728 B/token"}),
              flush=True)

        question = "How do I create a virtual environment with a specific version of Python?"
        tok = model.tokenizer
        routed = tok(generative.INSTRUCTION + question + generative.RETURN_DOCUMENTS, add_special_tokens=False).input_ids
        rest = tok(generative.TEMPLATE_TAIL + generative.RESPONSE_HEAD, add_special_tokens=False).input_ids
        current = generative.Round(engine, [generative.Piece(routed, True), generative.Piece(rest, False)])
        t0 = time.perf_counter()
        current.write(1)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        current.write(args.decode_tokens, feed=[tok.convert_tokens_to_ids("<|object_ref_end|>")])
        memory_decode = (time.perf_counter() - t0) / (args.decode_tokens + 1)
        chunks = sorted(len(v) for v in current.memory.selected.values())

        # Baseline, same run: the same prompt decoded with no memory at all (template head only).
        backbone = model.backbone
        cache = KVCache.from_prefix(engine.bank.template_kv(), LAYERS, backbone.dtype)
        t0 = time.perf_counter()
        Decoder(backbone).generate(routed + rest, cache=cache, start_position=19, max_new_tokens=1, stop_ids=())
        plain_prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        Decoder(backbone).generate([1], cache=cache, start_position=19 + len(routed + rest) + 1,
                                   max_new_tokens=args.decode_tokens, stop_ids=())
        plain_decode = (time.perf_counter() - t0) / (args.decode_tokens + 1)
        print(json.dumps({"what": "one generative-retrieval round", "query_tokens": len(routed + rest),
                          "documents_per_layer": chunks[-1], "prefill_s": round(prefill, 2),
                          "plain_prefill_s": round(plain_prefill, 2),
                          "decode_tokens_per_s": round(1 / memory_decode, 2),
                          "plain_decode_tokens_per_s": round(1 / plain_decode, 2)}), flush=True)


if __name__ == "__main__":
    main()
