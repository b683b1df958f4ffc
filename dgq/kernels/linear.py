"""The CUDA forward of :class:`dgq.nn.QuantLinear`: Triton activation quantization, then the A8W4 GEMM.

Two GEMM paths, chosen by M (measured on an H100, BENCHMARKS.md "GEMM"):

* M <= 16 (decode): the fused kernel reads the packed int4 weight directly: memory-bound, half the bytes of int8;
* M > 16 (prefill): the whole weight is widened to int8 once (one pass over it) and the int8 GEMM runs; the fused
  kernel's in-register widening made the compute-bound tiles 5x slower than FP16 there (run 1 in BENCHMARKS.md).
"""

from __future__ import annotations

from typing import Literal

import torch

from dgq.kernels.act_quant import quantize_activations_triton
from dgq.kernels.gemm import SMALL_M, KernelWeight, a8w4_matmul, w8a8_matmul, widen_weight

WIDEN_MIN_M = SMALL_M + 1  # from this M on, widen-once + int8 GEMM beats the fused kernel
Path = Literal["auto", "fused", "widen"]


def a8w4_gemm(x_s8: torch.Tensor, s_x: torch.Tensor, kw: KernelWeight, bias: torch.Tensor | None = None,
              out_dtype: torch.dtype = torch.float16, path: Path = "auto") -> torch.Tensor:
    """``(s_x * s1) * (x_s8 @ W_s8ᵀ) (+ bias)`` by the path for this M (``path`` forces one, for benchmarks)."""
    widen = x_s8.shape[0] >= WIDEN_MIN_M if path == "auto" else path == "widen"
    if widen:
        return w8a8_matmul(x_s8, widen_weight(kw), s_x, kw.s1, bias, out_dtype)
    return a8w4_matmul(x_s8, kw, s_x, bias, out_dtype)


def a8w4_linear(x: torch.Tensor, kw: KernelWeight, static_scale: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16,
                path: Path = "auto") -> torch.Tensor:
    """``O = (s_x * s1) * (X_s8 @ W_s8ᵀ) + b`` for a 2-D ``x`` on CUDA: dynamic per-row or static activation scale."""
    x_s8, s_x = quantize_activations_triton(x, static_scale)
    return a8w4_gemm(x_s8, s_x, kw, bias, out_dtype, path)


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
