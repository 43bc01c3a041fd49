"""Tiny randomly initialised Llama / Qwen2 / Qwen3 models built inside the tests (no downloads)."""

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

from msa_cli.model.backbone import Backbone, ModelConfig

COMMON = dict(hidden_size=96, intermediate_size=128, num_hidden_layers=4, num_attention_heads=6,
              num_key_value_heads=2, vocab_size=101, max_position_embeddings=512, rms_norm_eps=1e-6,
              tie_word_embeddings=False)
CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON, head_dim=16, rope_theta=10000.0),
    "qwen2": lambda: Qwen2Config(**COMMON, rope_theta=1e6),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=16, rope_theta=5e6),
}


def tiny_hf_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[family](), dtype=torch.float32).eval()
    with torch.no_grad():  # norms initialise to ones and biases to zeros: perturb so the test sees them
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def tiny_backbone(family: str = "llama", seed: int = 0) -> Backbone:
    model = tiny_hf_model(family, seed)
    return Backbone(ModelConfig.from_hf(model.config), model.state_dict(), torch.float32)


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer():
    """A byte-level tokenizer with no merges (one token per byte) and SmolLM2's special tokens, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                  unk_token="<|endoftext|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=SPECIAL_TOKENS)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def save_tiny_model(directory, seed: int = 0):
    """A tiny Llama with the byte tokenizer, saved as a local Hugging Face directory that `--model` accepts."""
    import json

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(**{**COMMON, "vocab_size": len(tok)}, head_dim=16, rope_theta=10000.0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    (directory / "msa-model.json").write_text(json.dumps({"name": "tiny-test"}))
    return directory
