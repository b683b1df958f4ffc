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
        report = quantize_blocks(model, adapter_for(model), samples, config, device, progress)
    model.dgq_config = config
    return QuantizeResult(model, config, report, time.perf_counter() - start)
