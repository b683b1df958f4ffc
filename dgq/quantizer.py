"""Quantize one Linear from its calibration statistics: the method, apart from any model traversal.

Given the (already smoothed) weight, ``H = XᵀX`` and the per-channel max of its input, build the module that
replaces the Linear: a :class:`~dgq.nn.QuantLinear` for the dual-grained format, a
:class:`~dgq.nn.FakeQuantLinear` for every other format.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dgq.config import QuantConfig
from dgq.errors import DGQError
from dgq.formats import INT8_MAX, fake_quant_groups, to_dual_grained
from dgq.nn import FakeQuantLinear, QuantLinear
from dgq.search import (
    int8_channel_fake_quant, naive_channel_scale, output_error, rtn_group_scales, search_channel_scale,
    search_group_clip,
)


class LayerError(DGQError, ValueError):
    """A layer that cannot be quantized as asked (non-finite weights, indivisible group size)."""


@dataclass
class LinearStats:
    """Calibration statistics of one activation: ``H = XᵀX`` and ``max|x_j|`` over all tokens."""

    h: torch.Tensor
    absmax: torch.Tensor
    tokens: int


@dataclass
class LayerReport:
    """What quantizing one layer did; ``rel_error`` is ``||X(W-Ŵ)ᵀ||² / ||XWᵀ||²`` over the calibration set."""

    name: str
    rel_error: float
    act_scale: float | None


def check_layer_shape(name: str, linear: nn.Module, config: QuantConfig) -> None:
    """Fail early, naming the layer, on a shape the format cannot hold; needs no weights (works on meta models)."""
    k = linear.in_features
    if config.weight in ("dual", "group") and k % config.group_size:
        raise LayerError(f"layer {name}: group size {config.group_size} does not divide in_features {k} "
                         f"(choose a group size that divides it, e.g. 64)")
    if config.weight in ("dual", "group", "channel") and k % 2:
        raise LayerError(f"layer {name}: in_features {k} is odd; 4-bit codes are packed in pairs")


def check_layer(name: str, linear: nn.Linear, config: QuantConfig) -> None:
    """:func:`check_layer_shape`, and finite weights: a NaN would otherwise surface as a wrong quantization."""
    check_layer_shape(name, linear, config)
    if not torch.isfinite(linear.weight).all():
        raise LayerError(f"layer {name}: weight contains NaN or Inf")


def _group_scales(w: torch.Tensor, h: torch.Tensor, g: int, config: QuantConfig):  # noqa: ANN202
    if config.search:
        return search_group_clip(w, h, g, config.clip_grid, config.clip_min)
    return rtn_group_scales(w, g)


@torch.no_grad()
def quantize_linear(name: str, linear: nn.Linear, stats: LinearStats, config: QuantConfig,
                    ) -> tuple[nn.Module, LayerReport]:
    """The quantized replacement of ``linear`` and a report of its calibration output error."""
    check_layer(name, linear, config)
    w = linear.weight.detach().float()
    h = stats.h.to(w.device, torch.float32)
    bias = None if linear.bias is None else linear.bias.detach().clone()
    act_scale = stats.absmax.max().float().reshape(()) / INT8_MAX if config.act == "static" else None
    if config.weight == "dual":
        g = config.group_size
        rtn = rtn_group_scales(w, g)
        if config.search:
            s1, gs = search_channel_scale(w, h, _group_scales(w, h, g, config), g, config.s1_grid,
                                          config.s2_range, fallback=rtn)
        else:
            s1, gs = naive_channel_scale(rtn), rtn
        dg = to_dual_grained(w, s1, gs.scale, gs.lo, g)
        w_hat = dg.dequantize()
        module: nn.Module = QuantLinear.from_weight(dg, bias, config.act, act_scale)
    else:
        if config.weight == "int8":
            w_hat = int8_channel_fake_quant(w)
        else:
            g = w.shape[1] if config.weight == "channel" else config.group_size
            gs = _group_scales(w, h, g, config)
            w_hat = fake_quant_groups(w, gs.scale, gs.lo)
        module = FakeQuantLinear(w_hat.to(linear.weight.dtype), bias, config.act, act_scale)
    ref = output_error(w, torch.zeros_like(w), h).sum().clamp(min=1e-30)
    rel = float(output_error(w, w_hat, h).sum() / ref)
    return module, LayerReport(name, rel, None if act_scale is None else float(act_scale))
