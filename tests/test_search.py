"""The two-phase search on quadratic forms of H = XᵀX."""

import torch

from dgq.formats import fake_quant_groups, to_dual_grained
from dgq.search import (
    diagonal_blocks, naive_channel_scale, output_error, rtn_group_scales, search_act_scale, search_channel_scale,
    search_group_clip,
)

G = 32


def _layer(seed: int = 0, rows: int = 48, k: int = 128):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, k, generator=g) * 0.05
    w[torch.rand(w.shape, generator=g) < 0.02] *= 8  # weight outliers make clipping matter
    x = torch.randn(512, k, generator=g) * (torch.rand(k, generator=g) * 4 + 0.1)
    return w, x, x.t() @ x


def test_quadratic_form_equals_explicit_output_error():
    w, x, h = _layer()
    w_hat = fake_quant_groups(w, *rtn_group_scales(w, G).__dict__.values())
    explicit = ((x @ (w - w_hat).t()) ** 2).sum(0)
    torch.testing.assert_close(output_error(w, w_hat, h), explicit, rtol=1e-4, atol=1e-6)


def test_diagonal_blocks_are_the_group_blocks_of_h():
    _, _, h = _layer()
    blocks = diagonal_blocks(h, G)
    for j in range(h.shape[0] // G):
        assert torch.equal(blocks[j], h[j * G:(j + 1) * G, j * G:(j + 1) * G])


def _group_errors(w, w_hat, h):
    d = (w - w_hat).reshape(w.shape[0], -1, G)
    return torch.einsum("ngi,gij,ngj->ng", d, diagonal_blocks(h, G), d)


def test_phase1_never_worse_than_rtn_per_group_and_better_overall():
    w, _, h = _layer(1)
    rtn = rtn_group_scales(w, G)
    best = search_group_clip(w, h, G, grid=20, clip_min=0.5)
    e_rtn = _group_errors(w, fake_quant_groups(w, rtn.scale, rtn.lo), h)
    e_best = _group_errors(w, fake_quant_groups(w, best.scale, best.lo), h)
    assert torch.all(e_best <= e_rtn * (1 + 1e-5))
    assert e_best.sum() < 0.9 * e_rtn.sum()


def test_phase2_never_worse_than_rtn_dg_and_close_to_group_wise():
    for seed in range(4):
        w, _, h = _layer(seed)
        rtn = rtn_group_scales(w, G)
        naive = to_dual_grained(w, naive_channel_scale(rtn), rtn.scale, rtn.lo, G)
        phase1 = search_group_clip(w, h, G)
        s1, gs = search_channel_scale(w, h, phase1, G, fallback=rtn)
        dgq = to_dual_grained(w, s1, gs.scale, gs.lo, G)
        e_naive = output_error(w, naive.dequantize(), h)
        e_dgq = output_error(w, dgq.dequantize(), h)
        assert torch.all(e_dgq <= e_naive * (1 + 1e-5)), "phase 2 must never lose to RTN-DG on any row"
        e_group = output_error(w, fake_quant_groups(w, phase1.scale, phase1.lo), h).sum()
        assert e_dgq.sum() < 1.15 * e_group, "dual-grained should stay close to its fp-scale upper bound"
        assert e_dgq.sum() < e_naive.sum()


def test_phase2_scores_against_original_weights_not_phase1_result():
    w, _, h = _layer(5)
    phase1 = search_group_clip(w, h, G)
    s1, gs = search_channel_scale(w, h, phase1, G, grid=12)
    chosen = output_error(w, to_dual_grained(w, s1, gs.scale, gs.lo, G).dequantize(), h)
    for t in torch.linspace(8, 24, 12):  # every grid point scored against the original w is no better
        cand = phase1.scale.amax(1) / t
        other = output_error(w, to_dual_grained(w, cand, phase1.scale, phase1.lo, G).dequantize(), h)
        assert torch.all(chosen <= other * (1 + 1e-4))


def _act_error(x, weights, w, w_hat, s):
    xq = torch.clamp(torch.round(x / s), -127, 127) * s
    return float((((xq @ w_hat.t()) - x @ w.t()) ** 2).sum(1) @ weights)


def test_static_scale_search_clips_rare_outlier_tokens():
    """One huge token among many ordinary ones: clipping it costs less than coarse steps for all the others."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g)
    x = torch.randn(256, 64, generator=g)
    x[0] *= 3  # the peak token (kept exactly in a TokenSample, weight 1)
    weights = torch.cat([torch.ones(1), torch.full((255,), 50.0)])  # the ordinary tokens stand for many
    absmax = x.abs().max()
    s = search_act_scale(x, weights, w, w, absmax, grid=16, clip_min=0.2)
    assert s < 0.7 * absmax / 127
    assert _act_error(x, weights, w, w, s) < 0.7 * _act_error(x, weights, w, w, absmax / 127)


def test_static_scale_search_keeps_the_max_when_every_token_reaches_it():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 64, generator=g)
    x = torch.sign(torch.randn(256, 64, generator=g))  # every entry is +-max: any clipping hurts every token
    s = search_act_scale(x, torch.ones(256), w, w, x.abs().max(), grid=16, clip_min=0.2)
    assert torch.isclose(s, torch.tensor(1 / 127))
