"""Smoothing moves scale between activations and weights without changing the float model's function."""

import pytest
import torch

from dgq.calibrate import capture_block_inputs, collect_stats, smooth_block
from dgq.config import preset
from dgq.models import adapter_for
from dgq.smooth import percentile_scales
from helpers import FAMILIES, make_model


def _plant_outliers(model, adapter):
    """Give a few activation channels large magnitudes so smoothing factors differ from 1."""
    with torch.no_grad():
        for block in adapter.blocks(model):
            for pair in adapter.pairs:
                producer = block.get_submodule(pair.producer)
                producer.weight[:3] *= 20.0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("smoothing", ["percentile", "smoothquant"])
def test_smoothed_model_reproduces_logits(family, smoothing):
    model = make_model(family)
    adapter = adapter_for(model)
    _plant_outliers(model, adapter)
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    before = model(ids).logits
    config = preset("dgq", smoothing=smoothing, percentile=10.0)
    inputs = capture_block_inputs(model, adapter, ids, batch=2, device=torch.device("cpu"))
    factors = []
    for i, block in enumerate(adapter.blocks(model)):
        stats = collect_stats(block, adapter.pairs, inputs.hidden, inputs.kwargs[i])
        smoothed = smooth_block(block, adapter.pairs, stats, config)
        factors += [(s.absmax / t.absmax.clamp(min=1e-12)).max() for s, t in zip(stats, smoothed)]
        inputs.hidden = [block(h, **kw) for h, kw in zip(inputs.hidden, inputs.kwargs[i])]
        inputs.hidden = [h[0] if isinstance(h, tuple) else h for h in inputs.hidden]
    assert max(factors) > 2.0, "the planted outliers must actually be smoothed"
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-4, atol=1e-4)


def test_percentile_scales_touch_only_the_top_channels():
    z = torch.cat([torch.ones(995), torch.linspace(2, 50, 5)])
    k = percentile_scales(z, 0.5)
    assert torch.all(k[:995] == 1)
    assert torch.all(k[995:] > 1)
    p = torch.quantile(z, 0.995)
    torch.testing.assert_close(z / k, torch.minimum(z, p))
