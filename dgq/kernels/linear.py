"""The CUDA forward of :class:`dgq.nn.QuantLinear`: Triton activation quantization, then the A8W4 GEMM.

For large M the weight may instead be widened to int8 once per call and multiplied by the plain int8 GEMM
(``WIDEN_MIN_M``); the threshold comes from ``benchmarks/gemm.py`` on an H100 (see BENCHMARKS.md).
"""

from __future__ import annotations

from typing import Literal

import torch

from dgq.kernels.act_quant import quantize_activations_triton
from dgq.kernels.gemm import KernelWeight, a8w4_matmul, w8a8_matmul, widen_weight

WIDEN_MIN_M: int | None = None  # M from which widen-once + int8 GEMM beats the fused kernel; None: never


def a8w4_linear(x: torch.Tensor, kw: KernelWeight, static_scale: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16,
                path: Literal["auto", "fused", "widen"] = "auto") -> torch.Tensor:
    """``O = (s_x * s1) * (X_s8 @ W_s8ᵀ) + b`` for a 2-D ``x`` on CUDA: dynamic per-row or static activation scale.

    ``path`` forces the fused kernel or widen-once + int8 GEMM (the benchmark compares them); ``auto`` picks by M.
    """
    x_s8, s_x = quantize_activations_triton(x, static_scale)
    widen = WIDEN_MIN_M is not None and x.shape[0] >= WIDEN_MIN_M if path == "auto" else path == "widen"
    if widen:
        return w8a8_matmul(x_s8, widen_weight(kw), s_x, kw.s1, bias, out_dtype)
    return a8w4_matmul(x_s8, kw, s_x, bias, out_dtype)


def kernel_weight(layer: torch.nn.Module) -> KernelWeight:
    """The layer's :class:`KernelWeight`, cached on the layer until one of its buffers is moved or written."""
    bufs = (layer.qweight, layer.s2, layer.zp, layer.s1)
    key = tuple((t.data_ptr(), t._version) for t in bufs)
    cached = getattr(layer, "_kernel_weight", None)
    if cached is None or cached[0] != key:
        cached = (key, KernelWeight.from_format(*bufs, layer.group_size))
        layer._kernel_weight = cached
    return cached[1]


def quant_linear_forward(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Fast forward of a ``QuantLinear`` for CUDA inputs of any leading shape; same result as its reference."""
    x2 = x.reshape(-1, layer.in_features)
    static = layer.act_scale if layer.act_mode == "static" else None
    out = a8w4_linear(x2, kernel_weight(layer), static, layer.bias, x.dtype)
    return out.reshape(*x.shape[:-1], layer.out_features)
