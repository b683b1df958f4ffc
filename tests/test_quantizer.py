"""Calibration statistics: H from its upper blocks, the token sample of the static scale search, and true-sequential
collection."""

import pytest
import torch

import dgq.calibrate as calibrate
from dgq.api import quantize
from dgq.config import preset
from dgq.nn import QuantLinear
from dgq.quantizer import TokenSample
from helpers import make_model


def test_token_sample_keeps_the_peak_tokens_and_stands_for_all_tokens():
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(500, 16, generator=g) for _ in range(4)]
    chunks[2][123] *= 50  # the token with the largest activation
    sample = TokenSample(total_tokens=2000, size=100, top=8)
    for c in chunks:
        sample.add(c)
    x, weights = sample.tokens_and_weights()
    assert any(torch.equal(row, chunks[2][123]) for row in x[:8])
    assert abs(float(weights.sum()) - 2000) < 1e-3
    assert x.shape[0] == 8 + 100
    smoothed = sample.scaled(torch.full((16,), 2.0)).tokens_and_weights()[0]
    torch.testing.assert_close(smoothed, x / 2)


def _sequences(n: int, seqlen: int, k: int = 8) -> list[torch.Tensor]:
    """Chunks of two ``seqlen``-token sequences whose first token (a stand-in attention sink) is marked by a
    channel 0 of exactly 100; no other token comes near it, nor is among the largest."""
    g = torch.Generator().manual_seed(0)
    chunks = []
    for _ in range(n // 2):
        x = torch.randn(2, seqlen, k, generator=g).clamp(-3, 3)
        x[:, 0] = 0.5
        x[:, 0, 0] = 100.0
        x[:, 5, 1] = 200.0  # the peaks: one token per sequence above the first
        chunks.append(x.reshape(-1, k))
    return chunks


def test_strided_token_sample_takes_every_sequences_first_token():
    """The sampling of the presets measured before ``act_sample_random``: a stride dividing the sequence length
    takes every first token and weighs it ``stride`` times (the bias that ``act_sample_random`` removes)."""
    sample = TokenSample(total_tokens=64 * 256, size=64 * 4, top=64)
    for c in _sequences(64, 256):
        sample.add(c)
    x, weights = sample.tokens_and_weights()
    first = x[:, 0] == 100
    assert int(first.sum()) == 64
    assert float(weights[first].sum()) > 0.2 * float(weights.sum())  # 64 of 16384 tokens stand for a quarter


def test_random_token_sample_is_stratified_and_not_aliased_with_the_sequence_length():
    chunks = _sequences(64, 256)
    twins = [c * 3 + 1 for c in chunks]
    sample = TokenSample(total_tokens=64 * 256, size=64 * 4, top=64, generator=torch.Generator().manual_seed(0))
    for c, t in zip(chunks, twins):
        sample.add(c, t)
    x, weights = sample.tokens_and_weights()
    peaks = (x[:, 1] == 200).nonzero().squeeze(1)
    assert torch.equal(peaks, torch.arange(64))  # all peaks kept exactly, at weight 1, and counted once
    assert torch.all(weights[:64] == 1)
    assert abs(float(weights.sum()) - 64 * 256) < 1e-2
    first = float(weights[x[:, 0] == 100].sum())
    assert first < 0.02 * 64 * 256  # the first tokens' true share is 1 / 256
    assert 150 < x.shape[0] - 64 < 370  # about size tokens besides the peaks
    torch.testing.assert_close(sample.float_tokens(), x * 3 + 1)
    smoothed = sample.scaled(torch.full((8,), 2.0))
    torch.testing.assert_close(smoothed.tokens_and_weights()[0], x / 2)
    torch.testing.assert_close(smoothed.float_tokens(), (x * 3 + 1) / 2)


def test_token_sample_follows_the_configs_sample_settings():
    from dgq.quantizer import token_sample

    legacy = token_sample(preset("dgq_static_gptaq"), 128 * 2048, 2048)
    assert (legacy.stride, legacy.top, legacy.generator) == (256, 64, None)
    fair = token_sample(preset("dgq_static_gptaq_rs"), 128 * 2048, 2048)
    assert (fair.stride, fair.top) == (128, 256) and fair.generator is not None


def test_sink_tokens_are_kept_exactly_with_their_extra_weight():
    """``sink=1``: every sequence's first token is added once more, exactly, at ``sink_weight``; the rest of the
    sample (and so its total weight, the token count) is what it was without them."""
    chunks = _sequences(64, 256)
    twins = [c * 3 + 1 for c in chunks]
    plain = TokenSample(64 * 256, 64 * 4, 64, torch.Generator().manual_seed(0))
    sink = TokenSample(64 * 256, 64 * 4, 64, torch.Generator().manual_seed(0), seqlen=256, sink=1, sink_weight=300)
    for c, t in zip(chunks, twins):
        plain.add(c, t)
        sink.add(c, t)
    x0, w0 = plain.tokens_and_weights()
    x, weights = sink.tokens_and_weights()
    n = x0.shape[0]
    torch.testing.assert_close(x[:n], x0, rtol=0, atol=0)
    torch.testing.assert_close(weights[:n], w0, rtol=0, atol=0)
    assert x.shape[0] == n + 64 and torch.all(x[n:, 0] == 100) and torch.all(weights[n:] == 300)
    first = torch.cat([c.reshape(2, 256, -1)[:, 0] for c in chunks])
    torch.testing.assert_close(x[n:], first, rtol=0, atol=0)  # in calibration order
    torch.testing.assert_close(sink.float_tokens(), x * 3 + 1)
    smoothed = sink.scaled(torch.full((8,), 2.0))
    torch.testing.assert_close(smoothed.tokens_and_weights()[0], x / 2)
    torch.testing.assert_close(smoothed.float_tokens(), (x * 3 + 1) / 2)


def test_sink_positions_follow_the_sequences_across_chunk_boundaries():
    """Positions count from the start of the calibration tokens, so a chunk may end inside a sequence."""
    tokens = torch.randn(5 * 40, 4, generator=torch.Generator().manual_seed(0))  # 5 sequences of 40
    sample = TokenSample(200, 20, 2, seqlen=40, sink=3, sink_weight=7.0)
    for part in tokens.split(33):
        sample.add(part)
    x, weights = sample.tokens_and_weights()
    expected = tokens.reshape(5, 40, 4)[:, :3].reshape(-1, 4)
    torch.testing.assert_close(x[-15:], expected, rtol=0, atol=0)
    assert torch.all(weights[-15:] == 7.0)
    with pytest.raises(ValueError):
        TokenSample(200, seqlen=0, sink=1)


def test_sink_weight_decides_whether_the_search_may_clip_the_first_token():
    """First tokens that hold the activation's maximum but are a small share of the tokens: with no extra weight
    the search clips them to refine everyone else's steps; weighted heavily it keeps their range."""
    from dgq.search import search_act_scale

    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1024, 64, generator=g)
    x[:, 0, 0] = 40.0  # 16 first tokens far above the rest
    w = torch.randn(16, 64, generator=g)
    absmax = x.abs().amax()
    scales = []
    for weight in (0.0, 1000.0):
        sample = TokenSample(16 * 1024, 1024, 4, torch.Generator().manual_seed(0), seqlen=1024, sink=1,
                             sink_weight=weight)
        for c in x.reshape(-1, 64).split(2048):
            sample.add(c)
        tokens, weights = sample.tokens_and_weights()
        scales.append(float(search_act_scale(tokens, weights, w, w, absmax, 48, 0.1)))
    assert scales[0] < 0.8 * float(absmax) / 127 and scales[1] > 0.95 * float(absmax) / 127


def test_zero_sink_weight_scores_as_no_sink():
    """``act_sample_sink_weight = 0`` adds rows that weigh nothing: every layer gets the scale of the sample without
    them (the ``dgq_static_gptaq_rs`` objective)."""
    ids = torch.randint(0, 96, (4, 64), generator=torch.Generator().manual_seed(0))
    scales = []
    for extra in ({}, dict(act_sample_sink=1, act_sample_sink_weight=0.0)):
        model = make_model("llama")
        config = preset("dgq_static_gptaq_rs", group_size=64, calib_batch=2, act_sample_tokens=32,
                        act_sample_peaks=8, **extra)
        report = quantize(model, ids, config, progress=False).report
        scales.append([r.act_scale for r in report.layers])
    assert scales[0] == scales[1] and len(scales[0]) == 2 * 7


def test_sink_settings_are_checked_and_reach_the_sample():
    from dgq.config import ConfigError
    from dgq.quantizer import token_sample

    for bad in (dict(act_sample_sink=-1), dict(act_sample_sink=4096), dict(act_sample_sink_weight=-1.0)):
        with pytest.raises(ConfigError):
            preset("dgq_static_gptaq", **bad)
    with pytest.raises(ConfigError):
        preset("dgq_static", act_sample_sink=1)  # no scale search, nothing to weigh
    sample = token_sample(preset("dgq_static_gptaq", act_sample_sink=2, act_sample_sink_weight=64.0), 4096, 512)
    assert (sample.seqlen, sample.sink, sample.sink_weight) == (512, 2, 64.0)
    for name in ("dgq_static_gptaq", "dgq_static_gptq", "dgq_static_gptaq_fine", "dgq_static_gptaq_rs"):
        assert preset(name).act_sample_sink == 0  # the measured presets' samples are unchanged


def _ids(model, n=4, seqlen=32):
    return torch.randint(0, model.config.vocab_size, (n, seqlen), generator=torch.Generator().manual_seed(0))


def test_true_sequential_collects_each_activation_after_the_linears_before_it_are_quantized(monkeypatch):
    calls = []
    real = calibrate.collect_stats

    def spy(block, pairs, hidden, kwargs, sample=False, reference=None, gram=None):
        quantized = sorted(n for n, m in block.named_modules() if isinstance(m, QuantLinear))
        calls.append(([p.consumers[0] for p in pairs], quantized))
        return real(block, pairs, hidden, kwargs, sample, reference, gram)

    monkeypatch.setattr(calibrate, "collect_stats", spy)
    model = make_model("llama")
    quantize(model, _ids(model), preset("dgq_gptq_seq", group_size=64, calib_batch=2), progress=False)
    assert len(calls) == 2 * 4  # per block: the full float pass, then one pass per later activation
    first, o_proj, mlp, down = calls[:4]
    assert first[1] == [] and len(first[0]) == 4
    assert o_proj == (["self_attn.o_proj"], ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"])
    assert mlp[0] == ["mlp.gate_proj"] and "self_attn.o_proj" in mlp[1]
    assert down[0] == ["mlp.down_proj"] and {"mlp.gate_proj", "mlp.up_proj"} <= set(down[1])


def test_searched_static_scale_is_never_above_the_max():
    model = make_model("llama")
    ids = _ids(model)
    scales = {}
    for method in ("dgq_static", "dgq_static_clip"):
        m = make_model("llama")
        result = quantize(m, ids, preset(method, group_size=64, calib_batch=2), progress=False)
        first_block = [r for r in result.report.layers if r.name.startswith("model.layers.0.")]
        scales[method] = torch.tensor([r.act_scale for r in first_block])  # later blocks see other inputs
    assert len(scales["dgq_static"]) == 7
    assert torch.all(scales["dgq_static_clip"] <= scales["dgq_static"] * (1 + 1e-6))
    assert torch.any(scales["dgq_static_clip"] < scales["dgq_static"] * 0.99)


@pytest.mark.parametrize("k", [40, 576, 1100])  # one column block, two, three
def test_gram_from_upper_blocks_is_xtx(k):
    """``H`` accumulated on and above the block diagonal over several chunks, then mirrored, is ``XᵀX``."""
    chunks = [torch.randn(300, k, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    h = torch.zeros(k, k)
    for x in chunks:
        calibrate.add_gram_upper(h, x)
    h = calibrate.mirror_upper(h)
    x = torch.cat(chunks).double()
    assert torch.equal(h, h.t())
    torch.testing.assert_close(h.double(), x.t() @ x, rtol=1e-5, atol=1e-3)
