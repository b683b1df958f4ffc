"""A second static activation scale for each sequence's first position (``act_first_scale``): the token sample
that keeps those tokens apart, the layer that picks its scale per row by position, the block hooks that say which
rows are first, and the model-level path (calibration, decoding with a cache, checkpoints, fusion, export)."""

import copy
import functools

import pytest
import torch

from dgq import positions
from dgq.api import quantize
from dgq.config import ConfigError, preset
from dgq.formats import INT8_MAX, quantize_activations
from dgq.nn import QuantLinear
from dgq.positions import PositionError
from dgq.quantizer import TokenSample
from helpers import make_model

SEQ = 16


def _sequences(n: int, k: int = 8, sink: float = 50.0, seed: int = 0) -> torch.Tensor:
    """``n`` sequences of ``SEQ`` tokens laid end to end, whose first tokens are ``sink`` times the others."""
    x = torch.randn(n, SEQ, k, generator=torch.Generator().manual_seed(seed))
    x[:, 0] *= sink
    return x.reshape(n * SEQ, k)


def test_separate_sample_keeps_first_tokens_apart_from_everything_else():
    x = _sequences(6)
    sample = TokenSample(x.shape[0], size=24, top=4, seqlen=SEQ, sink=1, separate=True)
    for chunk in x.split(20):  # chunk edges inside sequences: positions are counted across chunks
        sample.add(chunk)
    first, first_fp = sample.sink_tokens()
    torch.testing.assert_close(first, x[::SEQ], rtol=0, atol=0)
    assert first_fp is None
    rest = x.reshape(6, SEQ, -1)[:, 1:].reshape(-1, x.shape[1])
    torch.testing.assert_close(sample.rest_absmax, rest.abs().amax(0), rtol=0, atol=0)
    tokens, weights = sample.tokens_and_weights()
    assert not any(torch.equal(t, s) for t in tokens for s in first)  # no first token in the shared sample
    assert float(weights.sum()) == pytest.approx(rest.shape[0])  # it stands for the other tokens only
    k = torch.rand(x.shape[1]) + 0.5
    torch.testing.assert_close(sample.scaled(k).rest_absmax, rest.abs().amax(0) / k)
    torch.testing.assert_close(sample.scaled(k).sink_tokens()[0], x[::SEQ] / k)


def test_separate_sample_needs_sink_positions():
    with pytest.raises(ValueError, match="sink positions"):
        TokenSample(100, seqlen=SEQ, separate=True)


@functools.lru_cache(maxsize=1)
def _quantized_once():
    model = make_model("llama", layers=2)
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    result = quantize(model, ids, preset("dgq_static_gptaq_first", group_size=64, calib_batch=2), progress=False)
    return model, ids, result


def _quantized():
    """A quantized tiny llama (made once per session, copied per test, since tests change its scales)."""
    return copy.deepcopy(_quantized_once())


def _layer() -> QuantLinear:
    return _quantized()[0].model.layers[0].mlp.down_proj


def test_layer_quantizes_first_rows_with_their_own_scale():
    layer = _layer()
    layer.act_scale.fill_(0.01)
    layer.act_scale_first.fill_(0.5)
    x = torch.randn(2, 5, layer.in_features)
    hidden = torch.zeros(2, 5, 4)
    ids = torch.tensor([[0, 1, 2, 3, 4], [2, 3, 4, 5, 6]])  # the second row continues a cached sequence
    token = positions._FIRST_ROWS.set(positions.first_rows({"position_ids": ids}, hidden))
    try:
        out = layer(x)
    finally:
        positions._FIRST_ROWS.reset(token)
    scales = torch.full((10, 1), 0.01)
    scales[0] = 0.5
    x_q, s_x = quantize_activations(x.reshape(10, -1), scales)
    assert s_x.shape == (10, 1)
    ref = (x_q.float() * s_x) @ layer.dual_grained().dequantize(torch.float32).t()
    torch.testing.assert_close(out.reshape(10, -1), ref, rtol=1e-4, atol=1e-4)


def test_layer_kernels_quantize_first_rows_with_their_own_scale():
    """The kernel path (Triton in the CPU interpreter here; the same act-quant kernel and GEMM paths on CUDA) gets
    the per-row static scales as one array and equals the exact reference bit for bit: prefill rows, and one decode
    row at position 0 and elsewhere (the one-token GEMV's path)."""
    layer = _layer()
    layer.act_scale.fill_(0.01)
    layer.act_scale_first.fill_(0.5)
    for ids, rows in ((torch.tensor([[0, 1, 2, 3, 4], [2, 3, 4, 5, 6]]), 10), (torch.tensor([[0]]), 1),
                      (torch.tensor([[7]]), 1)):
        x = torch.randn(rows, layer.in_features)
        token = positions._FIRST_ROWS.set(positions.first_rows({"position_ids": ids}, torch.zeros(*ids.shape, 4)))
        try:
            got, want = layer.forward_kernels(x), layer.forward_reference(x)
        finally:
            positions._FIRST_ROWS.reset(token)
        assert torch.equal(got, want), f"position ids {ids.tolist()}"


def test_layer_outside_a_hooked_block_is_refused():
    layer = _layer()
    with pytest.raises(PositionError, match="outside a hooked decoder block"):
        layer(torch.randn(1, 3, layer.in_features))


def test_first_rows_follow_the_position_ids():
    hidden = torch.zeros(2, 3, 4)
    shared = positions.first_rows({"position_ids": torch.arange(3)[None]}, hidden)
    assert shared.tolist() == [True, False, False, True, False, False]
    padded = positions.first_rows({"position_ids": torch.tensor([[1, 1, 0], [0, 1, 2]])}, hidden)  # left padding
    assert padded.tolist() == [False, False, True, True, False, False]
    decode = positions.first_rows({"cache_position": torch.tensor([7])}, torch.zeros(2, 1, 4))
    assert decode.tolist() == [False, False]
    with pytest.raises(PositionError, match="position_ids or cache_position"):
        positions.first_rows({}, hidden)
    with pytest.raises(PositionError, match="do not match"):
        positions.first_rows({"position_ids": torch.arange(4)[None]}, hidden)


def test_config_checks_and_preset():
    base, first = preset("dgq_static_gptaq"), preset("dgq_static_gptaq_first")
    changed = {k for k, v in first.to_dict().items() if base.to_dict()[k] != v}
    assert changed == {"method", "act_first_scale"}
    for bad in (dict(act="dynamic", act_clip_grid=1), dict(act_clip_grid=1), dict(weight="group"),
                dict(act_sample_sink=1, act_sample_sink_weight=1.0), dict(quantize_head=True)):
        with pytest.raises(ConfigError, match="act_first_scale"):
            preset("dgq_static_gptaq_first", **bad)


def test_every_layer_gets_a_first_scale_and_decoding_with_a_cache_matches_one_pass():
    model, ids, result = _quantized()
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14 and all(m.first_scale for m in layers)
    assert all(r.act_first_scale is not None and r.act_first_scale > 0 for r in result.report.layers)
    with torch.no_grad():
        full = model(ids[:, :8]).logits
        prefix = model(ids[:, :7], use_cache=True)
        step = model(ids[:, 7:8], past_key_values=prefix.past_key_values, use_cache=True).logits
    torch.testing.assert_close(step[:, -1], full[:, -1], rtol=1e-5, atol=1e-5)


def test_first_scale_is_used_only_at_position_zero():
    """Making every first-position scale useless (all codes clipped to one step) changes position 0's logits and,
    through attention, later ones; making it the shared scale gives the one-scale model's logits exactly."""
    model, ids, _ = _quantized()
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    with torch.no_grad():
        for m in layers:
            m.act_scale_first.copy_(m.act_scale)
        same = model(ids).logits
        for m in layers:
            m.first_scale = False
        one = model(ids).logits
        torch.testing.assert_close(same, one, rtol=0, atol=0)
        for m in layers:
            m.first_scale = True
            m.act_scale_first.fill_(1e3)
        broken = model(ids).logits
    assert not torch.allclose(broken[:, 0], one[:, 0])


def test_searched_first_scale_covers_a_sink_far_above_the_other_tokens():
    """On a layer whose first tokens are 50x the others, the shared scale follows the others' maximum and the first
    tokens get a scale near theirs, so neither is clipped away nor rounded coarsely."""
    from dgq.quantizer import LinearStats, _static_scale

    x = _sequences(16, k=64)
    sample = TokenSample(x.shape[0], size=64, top=8, seqlen=SEQ, sink=1, separate=True)
    sample.add(x)
    stats = LinearStats(x.t() @ x, x.abs().amax(0), x.shape[0], sample)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    config = preset("dgq_static_gptaq_first", seqlen=SEQ)
    shared, first = _static_scale(stats, w, w, config)
    rest_max = float(sample.rest_absmax.max())
    first_max = float(x[::SEQ].abs().max())
    assert config.act_clip_min * rest_max / INT8_MAX <= float(shared) <= rest_max / INT8_MAX * (1 + 1e-6)
    assert float(first) > 10 * float(shared)
    assert float(first) <= first_max / INT8_MAX * (1 + 1e-6)


def test_checkpoint_round_trip_keeps_the_first_scales_and_the_hooks(tmp_path):
    from dgq.api import load, save

    model, ids, _ = _quantized()
    with torch.no_grad():
        before = model(ids).logits
    save(model, tmp_path / "ckpt")
    loaded = load(tmp_path / "ckpt")
    layers = [m for m in loaded.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.first_scale for m in layers)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, before, rtol=0, atol=0)


def test_fused_model_matches_and_export_is_refused(tmp_path):
    from dgq.export import ExportError, export
    from dgq.fuse import fuse_projections

    model, ids, _ = _quantized()
    with pytest.raises(ExportError, match="first position"):
        export(model, tmp_path / "out", "compressed-tensors")
    with torch.no_grad():
        for block in model.model.layers:  # fusion needs shared scales; give each group its first member's
            attn, mlp = block.self_attn, block.mlp
            for group in ((attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)):
                for m in group[1:]:
                    m.act_scale.copy_(group[0].act_scale)
                    m.act_scale_first.copy_(group[0].act_scale_first)
        before = model(ids).logits
        fuse_projections(model)
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
