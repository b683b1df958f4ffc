"""The Python entry points: ``quantize(model, tokenizer, config)``, and what the CLI builds on."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from dgq.calibrate import CalibrationReport, quantize_blocks
from dgq.config import QuantConfig
from dgq.models import adapter_for
from dgq.quantizer import check_layer
from dgq.rotation import rotate_model


@dataclass
class QuantizeResult:
    model: nn.Module
    config: QuantConfig
    report: CalibrationReport
    seconds: float


def check_model(model: nn.Module, config: QuantConfig) -> None:
    """Validate every layer that will be quantized before any work starts, so errors come in seconds."""
    adapter = adapter_for(model)
    for i, block in enumerate(adapter.blocks(model)):
        for name in adapter.linear_names():
            check_layer(f"block {i} {name}", block.get_submodule(name), config)


@torch.no_grad()
def quantize(model: nn.Module, samples: torch.Tensor, config: QuantConfig,
             device: torch.device | str | None = None, progress: bool = True) -> QuantizeResult:
    """Quantize ``model`` in place with ``config``, calibrating on token ids ``samples`` ``[n, seqlen]``.

    ``device`` is where each block is calibrated (default: CUDA if available); the rest of the model stays put.
    The method name and settings are attached as ``model.dgq_config``.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    start = time.perf_counter()
    report = CalibrationReport()
    if config.quantizes_weights:
        check_model(model, config)
        if config.rotate:
            rotate_model(model, config.seed)
        report = quantize_blocks(model, adapter_for(model), samples, config, device, progress)
    model.dgq_config = config
    return QuantizeResult(model, config, report, time.perf_counter() - start)


def quantize_model(model: nn.Module, tokenizer, config: QuantConfig | None = None,  # noqa: ANN001
                   calib_data: str | None = None, device: torch.device | str | None = None,
                   progress: bool = True) -> nn.Module:
    """``dgq.quantize(model, tokenizer, config) -> model``: draw the calibration samples ``config`` asks for with
    ``tokenizer`` (default: the C4 calibration half, or ``calib_data``) and quantize ``model`` in place."""
    from dgq.config import preset
    from dgq.data import calibration_samples

    config = config or preset("dgq")
    samples = calibration_samples(tokenizer, path=calib_data or config.calib_data, nsamples=config.nsamples,
                                  seqlen=config.seqlen, seed=config.seed)
    return quantize(model, samples, config, device=device, progress=progress).model
