import pytest
import torch

from msa_cli.model.backbone import Backbone, ModelConfig
from tiny import tiny_hf_model


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_our_forward_reproduces_transformers_logits(family):
    model = tiny_hf_model(family)
    ours = Backbone(ModelConfig.from_hf(model.config), model.state_dict(), torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (37,))
    with torch.no_grad():
        expected = model(ids[None]).logits[0]
    torch.testing.assert_close(ours.logits(ids), expected, atol=1e-4, rtol=1e-4)


def test_family_features_are_read_from_the_config():
    assert ModelConfig.from_hf(tiny_hf_model("qwen2").config).qkv_bias
    qwen3 = ModelConfig.from_hf(tiny_hf_model("qwen3").config)
    assert qwen3.qk_norm and not qwen3.qkv_bias
    llama = ModelConfig.from_hf(tiny_hf_model("llama").config)
    assert not llama.qk_norm and not llama.qkv_bias and llama.rope_theta == 10000.0


def test_unsupported_rope_scaling_is_refused():
    config = tiny_hf_model("llama").config
    config.rope_parameters = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    with pytest.raises(ValueError, match="RoPE"):
        ModelConfig.from_hf(config)
