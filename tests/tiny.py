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


# --- a tiny checkpoint in the layout of the released MSA-4B (model/msa_checkpoint.py) --------------------------

QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>"]


def tiny_qwen_tokenizer():
    """Byte-level BPE with Qwen3's chat special tokens; "user" is one token, so the template head
    "<|im_start|>user\\n" is 3 tokens as in Qwen3. "<End-of-Retrieve>" is one ordinary (non-special) token, so a
    test model can write it in one step; MSA reads it from the decoded text either way."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    words = ["us", "use", "user"]
    vocab = {token: i for i, token in enumerate(QWEN_SPECIAL_TOKENS + alphabet + words)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[("u", "s"), ("us", "e"), ("use", "r")]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=QWEN_SPECIAL_TOKENS)
    tok.add_tokens([AddedToken("<End-of-Retrieve>", special=False, normalized=False)])
    tok.chat_template = CHAT_TEMPLATE
    return tok


MSA_CONFIG = {
    # MSA-4B's msa_config (digest §0) scaled down: router layers = the upper half, small top-k and chunks.
    "router_layer_idx": "2,3", "top_k_docs": 2, "pooling_kernel_size": 4, "decouple_router": True,
    "aux_loss_method": "INFONCE_DECOUPLE", "head_reduce_method": "mean", "query_reduce_method": "max",
    "chunk_reduce_method": "max", "decouple_pooling_mode": "mean", "infonce_loss_temp": 0.1, "aux_loss": True,
    "lmloss_weigth": 1.0, "auxloss_weight": 0.1, "recloss_weight": 0.0, "ansloss_weight": 1.0,
    "rewrite_position": True,
}


def save_tiny_msa_checkpoint(directory, seed: int = 0, msa_config: dict | None = None, tie: bool = True,
                             edit=None):
    """A tiny Qwen3 with router projections, saved exactly as MSA-4B is laid out: config.json with
    model_type "msa" and msa_config, weights with model.layers.{i}.self_attn.router_{q,k}_proj.0.weight in the
    router layers, a tokenizer with Qwen's special tokens. edit(state, tokenizer) may change weights first."""
    import json

    from safetensors.torch import save_file

    tok = tiny_qwen_tokenizer()
    torch.manual_seed(seed)
    config = Qwen3Config(**{**COMMON, "vocab_size": len(tok), "tie_word_embeddings": tie}, head_dim=16,
                         rope_theta=5e6)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    state = {name: t.detach().clone().contiguous() for name, t in model.state_dict().items()}
    if tie:
        del state["lm_head.weight"]   # tied, as in Qwen3-4B: the file holds the embedding only
    msa = {**MSA_CONFIG, **(msa_config or {})}
    d, hq, hk = 16, COMMON["num_attention_heads"], COMMON["num_key_value_heads"]
    for layer in [int(x) for x in str(msa["router_layer_idx"]).split(",")]:
        a = f"model.layers.{layer}.self_attn."
        state[a + "router_q_proj.0.weight"] = 0.1 * torch.randn(hq * d, COMMON["hidden_size"])
        state[a + "router_k_proj.0.weight"] = 0.1 * torch.randn(hk * d, COMMON["hidden_size"])
    if edit:
        edit(state, tok)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, directory / "model.safetensors")
    raw = config.to_dict()
    raw.update({"model_type": "msa", "architectures": ["MSAForCausalLM"], "msa_config": msa})
    (directory / "config.json").write_text(json.dumps(raw, indent=2))
    tok.save_pretrained(directory)
    config_file = directory / "tokenizer_config.json"   # Qwen3's tokenizer class, as in MSA-4B
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "tokenizer_class": "Qwen2Tokenizer"}))
    return directory
