"""GPTQ's error feedback on the searched grids: better than nearest rounding on H, always inside the format."""

import pytest
import torch
from torch import nn

from dgq.config import preset
from dgq.formats import DualGrainedWeight, fake_quant_groups, to_dual_grained
from dgq.gptq import CodeGrid, gptq_codes
from dgq.nn import QuantLinear
from dgq.quantizer import LinearStats, quantize_linear
from dgq.search import output_error, rtn_group_scales, search_channel_scale, search_group_clip

G = 32


def _layer(seed: int, rows: int = 64, k: int = 128):
    """A weight with outliers and an H from correlated, unevenly scaled inputs (as real activations are)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, k, generator=g) * 0.05
    w[torch.rand(w.shape, generator=g) < 0.02] *= 8
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    x = (torch.randn(1024, k, generator=g) @ mix) * (torch.rand(k, generator=g) * 4 + 0.1)
    return w, x.t() @ x


def _dgq(w, h):
    s1, gs = search_channel_scale(w, h, search_group_clip(w, h, G), G, fallback=rtn_group_scales(w, G))
    return to_dual_grained(w, s1, gs.scale, gs.lo, G)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_codes_beat_nearest_rounding_on_the_dual_grained_grid(act_order):
    for seed in range(3):
        w, h = _layer(seed)
        dg = _dgq(w, h)
        grid = CodeGrid.dual_grained(dg)
        assert torch.equal(grid.round(w), dg.u4.float()), "nearest codes on the grid are DGQ's own codes"
        codes = gptq_codes(w, h, grid, block_size=32, act_order=act_order)
        assert torch.all((codes >= grid.low.repeat_interleave(G, 1)) & (codes <= grid.high.repeat_interleave(G, 1)))
        DualGrainedWeight(codes.to(torch.uint8), dg.zp, dg.s2, dg.s1, G).validate()  # int8-safe by construction
        e_near = output_error(w, dg.dequantize(), h).sum()
        e_gptq = output_error(w, grid.dequantize(codes), h).sum()
        assert e_gptq < 0.8 * e_near, (seed, float(e_gptq / e_near))


def test_lazy_block_updates_equal_column_by_column_updates():
    w, h = _layer(3)
    grid = CodeGrid.dual_grained(_dgq(w, h))
    one = gptq_codes(w, h, grid, block_size=1)
    blocked = gptq_codes(w, h, grid, block_size=48)  # 128 columns: blocks of 48, 48, 32
    assert (one != blocked).float().mean() < 0.002  # only float-rounding ties may differ


def test_float_group_grid_rounds_like_fake_quant_groups():
    w, h = _layer(4)
    gs = search_group_clip(w, h, G)
    grid = CodeGrid.float_groups(gs.scale, gs.lo)
    torch.testing.assert_close(grid.dequantize(grid.round(w)), fake_quant_groups(w, gs.scale, gs.lo))
    codes = gptq_codes(w, h, grid, act_order=True)
    assert codes.min() >= 0 and codes.max() <= 15
    assert output_error(w, grid.dequantize(codes), h).sum() < 0.8 * output_error(w, grid.dequantize(grid.round(w)), h).sum()


def test_dead_input_channels_are_handled():
    w, h = _layer(5)
    h[:, 7] = 0
    h[7, :] = 0  # an input channel that never fires
    grid = CodeGrid.dual_grained(_dgq(w, h))
    codes = gptq_codes(w, h, grid, act_order=True)
    assert torch.isfinite(codes).all()
    assert output_error(w, grid.dequantize(codes), h).sum() < output_error(w, grid.dequantize(grid.round(w)), h).sum()


@pytest.mark.parametrize("method,plain", [("dgq_gptq", "dgq_dynamic"), ("w4a8_group_gptq", "w4a8_group")])
def test_quantize_linear_with_gptq_never_loses_to_plain_rounding_per_row(method, plain):
    w, h = _layer(6, rows=48)
    linear = nn.Linear(w.shape[1], w.shape[0], bias=False)
    linear.weight.data.copy_(w)
    stats = LinearStats(h, torch.ones(w.shape[1]), 1024)
    errors = {}
    for name in (method, plain):
        module, report = quantize_linear("l", linear, stats, preset(name, group_size=G))
        w_hat = module.dual_grained().dequantize() if isinstance(module, QuantLinear) else module.weight
        errors[name] = output_error(w, w_hat, h)
    assert torch.all(errors[method] <= errors[plain] * (1 + 1e-6))
    assert errors[method].sum() < 0.8 * errors[plain].sum()


def test_gptq_keeps_the_searched_scales():
    """GPTQ only changes codes: s1, s2 and zp are those of the two-phase search (act order or not)."""
    w, h = _layer(7, rows=32)
    linear = nn.Linear(w.shape[1], w.shape[0], bias=False)
    linear.weight.data.copy_(w)
    stats = LinearStats(h, torch.ones(w.shape[1]), 1024)
    plain = quantize_linear("l", linear, stats, preset("dgq_dynamic", group_size=G))[0].dual_grained()
    gptq = quantize_linear("l", linear, stats, preset("dgq_gptq", group_size=G))[0].dual_grained()
    for field in ("s1", "s2", "zp"):
        assert torch.equal(getattr(plain, field), getattr(gptq, field))
    assert not torch.equal(plain.u4, gptq.u4)
