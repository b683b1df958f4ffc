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
