"""Fused projections (dgq.fuse): bit-identical accumulators and logits, one GEMM per shared input, refusals that
leave the model untouched, and no checkpoint in the fused layout."""

from __future__ import annotations

import copy

import pytest
import torch

from dgq.api import load
from dgq.checkpoint import CheckpointError, save
from dgq.formats import int_matmul, quantize_activations
from dgq.fuse import SWIGLU_MIN_TOKENS, FusionError, ProjectionSlice, fuse_projections, is_fused
from dgq.nn import QuantLinear
from helpers import make_tokenizer
from test_checkpoint import logits, quantized

# dgq_static: q/k/v (and gate/up) share one calibrated scale; Qwen2's q/k/v carry biases; Mistral is Llama-like.
CASES = [("llama", "dgq"), ("llama", "dgq_static"), ("qwen2", "dgq"), ("mistral", "w4a8_rtn_dg")]


def fused_copy(family: str, method: str) -> torch.nn.Module:
    return fuse_projections(copy.deepcopy(quantized(family, method)))


@pytest.mark.parametrize("family,method", CASES)
def test_fused_logits_are_bit_identical(family, method):
    """The same quantized input (a token's scale depends on the token alone, or on the one shared static scale),
    the same integer weights and the same per-channel epilogue: equality holds exactly, not to a tolerance."""
    model = quantized(family, method)
    fused = fused_copy(family, method)
    assert torch.equal(logits(fused), logits(model))
    assert torch.equal(logits(fused.half()), logits(copy.deepcopy(model).half()))  # fp16 activations too


def test_fused_accumulator_is_the_concatenation_of_the_parts():
    model = quantized("qwen2", "dgq")
    attn = model.model.layers[0].self_attn
    parts = [attn.q_proj, attn.k_proj, attn.v_proj]
    fused = fused_copy("qwen2", "dgq").model.layers[0].self_attn
    x = torch.randn(5, parts[0].in_features)
    x_q, _ = quantize_activations(x)
    acc = int_matmul(x_q, fused.qkv_proj._int8_weight())
    assert torch.equal(acc, torch.cat([int_matmul(x_q, p._int8_weight()) for p in parts], dim=1))
    assert torch.equal(fused.qkv_proj(x), torch.cat([p(x) for p in parts], dim=-1))
    assert torch.equal(fused.qkv_proj.bias, torch.cat([p.bias for p in parts]))


def test_one_gemm_per_shared_input():
    """Each block runs two fused layers before o_proj and down_proj: four QuantLinear calls instead of seven."""
    fused = fused_copy("llama", "dgq")
    calls: list[str] = []
    for name, m in fused.named_modules():
        if isinstance(m, QuantLinear):
            m.register_forward_hook(lambda mod, args, out, name=name: calls.append(name.split(".")[-1]))
    logits(fused)
    assert calls == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"] * len(fused.model.layers)
    attn = fused.model.layers[0].self_attn
    assert isinstance(attn.k_proj, ProjectionSlice) and attn.qkv_proj.out_features == 128 + 2 * 64


@pytest.mark.parametrize("tokens", [3, SWIGLU_MIN_TOKENS])
def test_down_projection_forms_the_swiglu_product_on_long_inputs(tokens):
    """From SWIGLU_MIN_TOKENS tokens on, the fused MLP hands the gate/up output to down_proj, which forms
    silu(gate) * up in the kernel that quantizes its input; below, the MLP's SiLU-and-product runs first.  Either
    way the same output as the unfused MLP, and a deep copy's MLP runs its own layers."""
    model = quantized("llama", "dgq")
    fused = fused_copy("llama", "dgq")
    mlp, ref = fused.model.layers[0].mlp, model.model.layers[0].mlp
    assert mlp.down_proj.swiglu_input and "swiglu_input=True" in repr(mlp.down_proj)
    x = torch.randn(tokens, ref.gate_proj.in_features)
    seen: list[int] = []
    mlp.down_proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[-1]))
    assert torch.equal(mlp(x), ref(x))
    assert seen == [ref.down_proj.in_features * (2 if tokens >= SWIGLU_MIN_TOKENS else 1)]
    twin = copy.deepcopy(fused).model.layers[0].mlp
    assert twin.forward.__self__ is twin and torch.equal(twin(x), ref(x))


def test_an_mlp_that_is_not_a_swiglu_is_refused_before_anything_changes():
    model = copy.deepcopy(quantized("llama", "dgq"))
    model.model.layers[1].mlp.act_fn = torch.nn.GELU()
    with pytest.raises(FusionError, match="block 1 mlp has activation GELU"):
        fuse_projections(model)
    assert not is_fused(model) and not model.model.layers[0].mlp.down_proj.swiglu_input


def test_a_slice_called_on_a_hidden_state_is_refused():
    attn = fused_copy("llama", "dgq").model.layers[0].self_attn
    with pytest.raises(FusionError, match="fused output"):
        attn.q_proj(torch.randn(2, 128))


@pytest.mark.parametrize("family,method,match", [
    ("opt", "w4a8_rtn", "supports llama, mistral, qwen2"),
    ("llama", "w8a8_smoothquant", "FakeQuantLinear; only dgq A8W4 layers"),
])
def test_unsupported_models_are_refused(family, method, match):
    with pytest.raises(FusionError, match=match):
        fused_copy(family, method)


def test_different_static_scales_are_refused_before_anything_changes():
    model = copy.deepcopy(quantized("llama", "dgq_static"))
    model.model.layers[1].mlp.up_proj.act_scale.mul_(1.5)
    with pytest.raises(FusionError, match="block 1 mlp.up_proj and gate_proj have different static"):
        fuse_projections(model)
    assert not is_fused(model)  # block 0 passed its checks but was not fused either
    with pytest.raises(FusionError, match="already fused"):
        fuse_projections(fused_copy("llama", "dgq"))


def test_load_fuse_and_save_refusal(tmp_path):
    model = quantized("llama", "dgq")
    path = save(model, tmp_path / "ckpt", tokenizer=make_tokenizer())
    fused = load(path, fuse=True)
    assert is_fused(fused) and not is_fused(load(path))
    assert torch.equal(logits(fused), logits(model))
    with pytest.raises(CheckpointError, match="fused projections"):
        save(fused, tmp_path / "out")
    with pytest.raises(CheckpointError, match="fused projections"):
        fused.save_pretrained(tmp_path / "raw")
    assert not (tmp_path / "out").exists()
