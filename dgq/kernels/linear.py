"""The CUDA forward of :class:`dgq.nn.QuantLinear` as a pure function: activation quantization, then the A8W4 GEMM.

Two launch sequences, chosen by M alone (measured on an H100, BENCHMARKS.md "GEMM"): one act-quant pass writes the
int8 codes and scales, then

* M < :data:`WIDEN_MIN_M`: the A8W4 kernel (:mod:`dgq.kernels.gemm`) widens the packed int4 weight in registers;
* M >= :data:`WIDEN_MIN_M`: the weight is widened to int8 once (one pass, a few % of the GEMM's time there) and the
  same kernel runs on the int8 weight: at these M the in-register widening costs more ALU time per output than
  re-reading an int8 weight costs bandwidth (0.76x FP16 at M = 1024 in-register, 0.90x widen-once, median of five
  shapes; the in-register kernel wins up to M = 256).
"""

from __future__ import annotations

import torch

from dgq.kernels.act_quant import quantize_activations_triton
from dgq.kernels.gemm import KernelWeight, a8w4_matmul, w8a8_matmul, widen_weight

WIDEN_MIN_M = 1024  # measured: in-register widening wins at M = 256, widen-once at M = 1024 (nothing between measured)


def a8w4_linear(x: torch.Tensor, kw: KernelWeight, static_scale: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """``O = (s_x * s1) * (X_s8 @ W_s8ᵀ) + b`` for a 2-D float ``x`` on CUDA, dynamic per-row or static scale."""
    x_s8, s_x = quantize_activations_triton(x, static_scale)
    if x.shape[0] >= WIDEN_MIN_M:
        return w8a8_matmul(x_s8, widen_weight(kw), s_x, kw.s1, bias, out_dtype)
    return a8w4_matmul(x_s8, kw, s_x, bias, out_dtype)
