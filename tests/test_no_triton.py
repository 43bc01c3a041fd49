"""Triton is installed on Linux only (pyproject): without it the CPU path must import and run, kernels and
models alike. A subprocess blocks the import (sys.modules["triton"] = None makes `import triton` fail, as on
macOS) before anything else is imported."""

import json
import os
import subprocess
import sys

from tiny import save_tiny_msa_checkpoint

WITHOUT_TRITON = """
import sys
sys.modules["triton"] = None   # before torch, transformers or msa: `import triton` now raises ImportError
import json
import torch
import msa_cli.engine, msa_cli.qa.generative, msa_kernels
from msa_kernels import memory_attention, memory_attention_torch, route_scores, route_scores_torch

g = torch.Generator().manual_seed(0)
q, keys = torch.randn(3, 4, 8, generator=g), torch.randn(10, 2, 8, generator=g)
key_doc = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 3])
routed = torch.equal(route_scores(q, keys, key_doc, 4), route_scores_torch(q, keys, key_doc, 4))
k, v, k_mem, v_mem = (torch.randn(n, 2, 8, generator=g) for n in (5, 5, 6, 6))
index = torch.tensor([4, 0, 2])
attended = torch.equal(memory_attention(q, k, v, k_mem, v_mem, index), memory_attention_torch(q, k, v, k_mem, v_mem, index))

from msa_cli.corpus.splitter import Passage
from msa_cli.engine import Engine
from msa_cli.model.loading import load_model
from msa_cli.qa.ask import Options, ask
model = load_model(sys.argv[1], dtype=torch.float32)
engine = Engine.open(model, sys.argv[2], create=True)
facts = ["Erik Watts is the son of Bill Watts.", "Bill Watts was born on May 5, 1939."]
passages = [Passage(path=f"/notes/{i}.txt", text=t, page=None, line_start=1, line_end=1,
                    n_tokens=len(model.tokenizer(t).input_ids)) for i, t in enumerate(facts)]
with engine.bank.lock():
    engine.commit([(p, "hash") for p in passages], engine.encode(passages))
answer = ask(engine, "When was Erik Watts' father born?", Options(hops=2, max_tokens=4))
print(json.dumps({"routed": routed, "attended": attended, "hops": len(answer.retrieval.hops),
                  "triton_blocked": sys.modules["triton"] is None}))
"""


def test_the_cpu_path_imports_and_answers_without_triton(tmp_path):
    checkpoint = save_tiny_msa_checkpoint(tmp_path / "ckpt")
    env = {k: v for k, v in os.environ.items() if k != "MSA_KERNELS"}   # the CPU path: no Triton asked for
    r = subprocess.run([sys.executable, "-c", WITHOUT_TRITON, str(checkpoint), str(tmp_path / "bank")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["routed"] and out["attended"] and out["triton_blocked"] and out["hops"] >= 1
