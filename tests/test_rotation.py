"""The offline Hadamard rotation: orthogonal, function-preserving, and quantizable through the same pipeline."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import dgq
from dgq.api import quantize
from dgq.config import ConfigError, preset
from dgq.rotation import random_hadamard, rotate_model
from helpers import make_model


@pytest.mark.parametrize("n", [64, 576, 96])
def test_random_hadamard_is_orthogonal_and_spreads_every_channel(n):
    q = random_hadamard(n)
    torch.testing.assert_close(q @ q.t(), torch.eye(n, dtype=q.dtype))
    assert q.abs().max() < 0.75  # no input channel stays concentrated in one output channel


def _ids(n=2, seqlen=16):
    return torch.randint(0, 96, (n, seqlen), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@torch.no_grad()
def test_rotation_keeps_the_float_function(family):
    model = make_model(family)
    ref = model(_ids()).logits
    rotate_model(model)
    torch.testing.assert_close(model(_ids()).logits, ref, rtol=1e-4, atol=1e-5)
    assert all(torch.all(b.input_layernorm.weight == 1) for b in model.model.layers)


@torch.no_grad()
def test_rotation_unties_embeddings_and_the_checkpoint_reloads(tmp_path):
    model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=True)).eval()
    ids = _ids(4, 32)
    quantize(model, ids, preset("dgq_rot", group_size=64, calib_batch=2), progress=False)
    assert model.lm_head.weight is not model.model.embed_tokens.weight and not model.config.tie_word_embeddings
    out = model(ids).logits
    dgq.save(model, tmp_path / "rot")
    torch.testing.assert_close(dgq.load(tmp_path / "rot")(ids).logits, out)


def test_rotation_refuses_other_layouts():
    with pytest.raises(ConfigError, match="rotation supports the Llama-family"):
        rotate_model(make_model("opt"))
