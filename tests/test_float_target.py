"""Asymmetric calibration (``float_target``): each linear is fitted to the float model's outputs on the quantized
model's inputs, with the float activations propagated beside the quantized ones."""

import pytest
import torch

import dgq.calibrate as calibrate
from dgq.api import quantize
from dgq.config import ConfigError, preset
from dgq.gptq import float_output_target
from dgq.search import output_error
from helpers import make_model


def _inputs(seed: int, tokens: int = 4096, k: int = 64, noise: float = 0.1):
    """Float activations with uneven channels and a quantized-model twin carrying upstream error: a systematic
    distortion (which a linear layer can undo) plus unpredictable noise (which it cannot)."""
    g = torch.Generator().manual_seed(seed)
    x_fp = torch.randn(tokens, k, generator=g) * (torch.rand(k, generator=g) * 3 + 0.2)
    distortion = torch.eye(k) + noise * torch.randn(k, k, generator=g) / k ** 0.5
    x = x_fp @ distortion + 0.2 * noise * torch.randn(tokens, k, generator=g) * x_fp.std(0)
    w = torch.randn(32, k, generator=g) * 0.05
    return w, x, x_fp


def test_target_is_the_weight_itself_when_inputs_agree():
    w, x, _ = _inputs(0)
    h = x.t() @ x
    torch.testing.assert_close(float_output_target(w, h, torch.zeros_like(h), damp=0.01), w)


def test_target_reproduces_float_outputs_better_than_the_weight():
    w, x, x_fp = _inputs(1)
    h, drift = x.t() @ x, x.t() @ (x_fp - x)
    target = float_output_target(w, h, drift, damp=1e-4)
    ref = x_fp @ w.t()
    err_w = (x @ w.t() - ref).pow(2).sum()
    err_target = (x @ target.t() - ref).pow(2).sum()
    assert err_target < 0.5 * err_w, float(err_target / err_w)
    # the score every search and GPTQ step uses, (w* - q)ᵀ H (w* - q), differs from the float-output error by a
    # constant: two candidate weights rank the same under both
    q1, q2 = w + 0.01 * torch.randn_like(w), w - 0.02 * torch.randn_like(w)
    exact = [(x @ q.t() - ref).pow(2).sum() for q in (q1, q2)]
    proxy = [output_error(target, q, h).sum() for q in (q1, q2)]
    torch.testing.assert_close(exact[0] - exact[1], proxy[0] - proxy[1], rtol=1e-3, atol=1e-3)


def test_first_block_sees_identical_inputs_so_its_drift_is_zero(monkeypatch):
    """Block 0 gets the same inputs in both models: the drift of its first pass must be 0; once its q/k/v are
    quantized the later activations drift, and in block 2 even the first pass does (upstream error)."""
    seen = []
    real = calibrate.collect_stats

    def spy(block, pairs, hidden, kwargs, sample=False, reference=None, gram=None):
        stats = real(block, pairs, hidden, kwargs, sample, reference, gram)
        seen.append(stats)
        return stats

    monkeypatch.setattr(calibrate, "collect_stats", spy)
    model = make_model("llama", layers=3)
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    quantize(model, ids, preset("dgq_gptaq", group_size=64, calib_batch=2), progress=False)
    assert len(seen) == 3 * 4  # per block: the full pass, then one pass per later activation (true-sequential)
    assert torch.count_nonzero(seen[0][0].drift) == 0
    assert all(st.drift is None for st in seen[0][1:])  # true-sequential collects these again: no H, no drift
    assert all(torch.count_nonzero(later[0].drift) > 0 for later in seen[1:4])  # after q/k/v are quantized
    assert seen[8][0].drift.abs().max() > 1e-3 * seen[8][0].h.abs().max()


def _held_out_errors(configs: dict) -> dict:
    """Mean squared logit error against the float model on 4096 held-out tokens, per config, each quantizing a fresh
    copy of one 4-block model on 4096 calibration tokens (enough for widths 128/256 at the presets' ridge).

    Why 4096 held-out tokens: on 256 (before session 20) the comparison was noise: over random models 0-5 the dynamic
    preset's float target came out 12-32% worse on four and 7-14% better on two, and model 0, this test's, passed on
    earlier machines and failed on session 20's (AMD, AVX2); on 4096 it is 2-17% better on all six."""
    model = make_model("llama", layers=4)  # seeded: every make_model below is a copy of it
    ids = torch.randint(0, model.config.vocab_size, (64, 64), generator=torch.Generator().manual_seed(0))
    test = torch.randint(0, model.config.vocab_size, (64, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(test).logits
    errors = {}
    for key, config in configs.items():
        m = make_model("llama", layers=4)
        quantize(m, ids, config, progress=False)
        with torch.no_grad():
            errors[key] = float((m(test).logits - ref).pow(2).mean())
    return errors


def test_float_target_brings_the_quantized_model_closer_to_float():
    """On held-out tokens, with enough calibration tokens and the preset's ridge."""
    errors = _held_out_errors({ft: preset("dgq_gptaq", group_size=64, calib_batch=16, float_target=ft)
                               for ft in (False, True)})
    assert errors[True] < errors[False], errors


def test_float_target_needs_a_weight_format():
    with pytest.raises(ConfigError):
        preset("fp", float_target=True)
    with pytest.raises(ConfigError):
        preset("dgq_gptaq", float_target_damp=0)
    with pytest.raises(ConfigError):  # each linear must see what the fitted linears before it produce
        preset("dgq_gptaq", true_sequential=False)


def test_cached_float_activations_equal_a_pass_of_the_smoothed_float_block():
    """The true-sequential passes read the float activations from the first pass's cache, divided by the smoothing
    scales: that must be what the smoothed float block computes."""
    from dgq.calibrate import FloatReference, _consumer_inputs, capture_block_inputs, collect_stats, smooth_block
    from dgq.models.adapters import adapter_for

    model = make_model("llama")
    adapter = adapter_for(model)
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    inputs = capture_block_inputs(model, adapter, ids, 2, torch.device("cpu"))
    block, kwargs = adapter.blocks(model)[0], inputs.kwargs[0]
    reference = FloatReference(block, inputs.hidden, cache=[])
    with torch.no_grad():
        stats = collect_stats(block, adapter.pairs, inputs.hidden, kwargs, reference=reference)
        smooth_block(block, adapter.pairs, stats, preset("dgq_gptaq", group_size=64), reference)
        for chunk, (h, kw) in enumerate(zip(inputs.hidden, kwargs)):
            fresh, _ = _consumer_inputs(block, adapter.pairs, h, kw)
            for pair, x in zip(adapter.pairs, fresh):
                torch.testing.assert_close(reference.cache[chunk][pair.consumers[0]], x, rtol=1e-4, atol=1e-5)


def test_static_gptaq_is_static_gptq_fitted_to_the_float_outputs():
    static, fitted = preset("dgq_static_gptq"), preset("dgq_static_gptaq")
    assert fitted.act == "static" and fitted.act_clip_grid == static.act_clip_grid > 1
    assert fitted.float_target and fitted.true_sequential and not static.float_target
    changed = {k for k, v in fitted.to_dict().items() if static.to_dict()[k] != v}
    assert changed == {"method", "float_target", "true_sequential", "float_target_tokens"}
    assert fitted.float_target_tokens == preset("dgq_gptaq").float_target_tokens == 128 * 2048


def test_token_sample_keeps_each_tokens_float_twin_row_for_row():
    from dgq.quantizer import TokenSample

    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(300, 8, generator=g) for _ in range(3)]
    chunks[1][7] *= 40
    twins = [c * 3 + 1 for c in chunks]  # any function of the token, to check the pairing
    sample = TokenSample(total_tokens=900, size=50, top=4)
    for c, t in zip(chunks, twins):
        sample.add(c, t)
    x, _ = sample.tokens_and_weights()
    torch.testing.assert_close(sample.float_tokens(), x * 3 + 1)
    smoothed = sample.scaled(torch.full((8,), 2.0))
    torch.testing.assert_close(smoothed.float_tokens(), (x * 3 + 1) / 2)
    with pytest.raises(ValueError):
        sample.add(chunks[0])  # twins for some tokens only would misalign the rows
    assert TokenSample(10).float_tokens() is None


def test_static_scale_search_scores_against_the_float_models_outputs(monkeypatch):
    """Under dgq_static_gptaq every layer's scale search is given the float model's outputs ``x_fp W_fpᵀ`` on its
    sample tokens; in block 0's q/k/v (identical inputs in both models) those are the layer's own ``x Wᵀ``."""
    import dgq.quantizer as quantizer

    seen = []
    real = quantizer.search_act_scale

    def spy(x, weights, w, w_hat, absmax, grid, clip_min, target=None):
        seen.append((x, w, target))
        return real(x, weights, w, w_hat, absmax, grid, clip_min, target=target)

    monkeypatch.setattr(quantizer, "search_act_scale", spy)
    model = make_model("llama", layers=2)
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    quantize(model, ids, preset("dgq_static_gptaq", group_size=64, calib_batch=2), progress=False)
    assert len(seen) == 2 * 7 and all(t is not None for _, _, t in seen)
    for x, w, target in seen[:3]:  # q, k, v of block 0: X = X_fp, so the fitted weight is the float weight
        torch.testing.assert_close(target, x @ w.t(), rtol=1e-4, atol=1e-4)
    seen.clear()
    quantize(make_model("llama", layers=2), ids, preset("dgq_static_gptq", group_size=64, calib_batch=2),
             progress=False)
    assert len(seen) == 2 * 7 and all(t is None for _, _, t in seen)


def test_static_float_target_brings_the_quantized_model_closer_to_float():
    """As for the dynamic preset: dgq_static_gptaq against dgq_static_gptq on held-out tokens."""
    errors = _held_out_errors({m: preset(m, group_size=64, calib_batch=16)
                               for m in ("dgq_static_gptq", "dgq_static_gptaq")})
    assert errors["dgq_static_gptaq"] < errors["dgq_static_gptq"], errors


def test_token_scaled_ridge_grows_as_tokens_shrink_and_is_the_plain_ridge_at_its_anchor():
    from dgq.quantizer import LinearStats, float_target_ridge

    def stats(tokens):
        return LinearStats(torch.eye(4), torch.ones(4), tokens)

    plain = preset("dgq_gptaq", float_target_damp=2.0, float_target_tokens=0)
    scaled = preset("dgq_gptaq", float_target_damp=2.0, float_target_tokens=1000)
    assert float_target_ridge(stats(100), plain) == float_target_ridge(stats(1000), plain) == 2.0
    assert float_target_ridge(stats(1000), scaled) == 2.0  # exactly the plain ridge at the anchor
    assert float_target_ridge(stats(100), scaled) == 20.0
    assert float_target_ridge(stats(4000), scaled) == 0.5
    with pytest.raises(ConfigError):
        preset("dgq_gptaq", float_target_tokens=-1)


def test_static_gptaq_fine_only_widens_and_refines_the_clipping_grid():
    base, fine = preset("dgq_static_gptaq"), preset("dgq_static_gptaq_fine")
    changed = {k for k, v in fine.to_dict().items() if base.to_dict()[k] != v}
    assert changed == {"method", "act_clip_grid", "act_clip_min"}
    assert fine.act_clip_min < base.act_clip_min
    step = lambda c: (1 - c.act_clip_min) / (c.act_clip_grid - 1)  # noqa: E731
    assert step(fine) < step(base)


def test_static_gptaq_rs_only_changes_the_token_sample_of_the_fine_grid():
    fine, fair = preset("dgq_static_gptaq_fine"), preset("dgq_static_gptaq_rs")
    changed = {k for k, v in fair.to_dict().items() if fine.to_dict()[k] != v}
    assert changed == {"method", "act_sample_tokens", "act_sample_peaks", "act_sample_random"}
    assert fair.act_sample_random and fair.act_sample_peaks >= 128  # SmolLM2's 128 first tokens fit among the peaks


def test_static_gptaq_rs_quantizes_a_model_with_a_searched_scale_per_layer():
    model = make_model("llama", layers=2)
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    result = quantize(model, ids, preset("dgq_static_gptaq_rs", group_size=64, calib_batch=2), progress=False)
    scales = [r.act_scale for r in result.report.layers]
    assert len(scales) == 2 * 7 and all(s is not None and s > 0 for s in scales)


def test_static_gptaq_w0_is_static_gptaq_on_the_unaliased_sample_with_the_first_token_weighed():
    base, w0, fair = preset("dgq_static_gptaq"), preset("dgq_static_gptaq_w0"), preset("dgq_static_gptaq_rs")
    changed = {k for k, v in w0.to_dict().items() if base.to_dict()[k] != v}
    assert changed == {"method", "act_sample_tokens", "act_sample_peaks", "act_sample_random", "act_sample_sink",
                       "act_sample_sink_weight"}
    assert w0.act_sample_sink == 1 and w0.act_sample_sink_weight > 0
    sample = ("act_sample_tokens", "act_sample_peaks", "act_sample_random")
    assert all(getattr(w0, f) == getattr(fair, f) for f in sample)  # the _rs sample, plus the first tokens
