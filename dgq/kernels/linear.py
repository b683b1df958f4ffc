"""The CUDA forward of :class:`dgq.nn.QuantLinear` as a pure function: activation quantization, then one of three
GEMM paths chosen by the number of tokens M alone.

Each was measured against the others on an H100 (``benchmarks/gemm.py`` and ``benchmarks/gemm_variants.py``,
median over the five benchmark shapes, time ratio vs cuBLAS FP16; BENCHMARKS.md, ``benchmarks/notes_gemm.md``):

* M = 1: the CUDA-core GEMV (:mod:`dgq.kernels.gemv`, ``dp4a``): 2.92x alone, 2.29x with the act-quant, against
  1.91x for the tensor-core kernel alone.  At M = 2 the GEMV re-reads the weight per token and lost (1.42x against
  1.58x, measured before the GEMV's prefetch).
* 1 < M < :data:`WIDEN_MIN_M`: the tensor-core kernel that widens int4 to int8 in registers (:mod:`dgq.kernels.gemm`).
* M >= :data:`WIDEN_MIN_M`: the weight is widened to int8 once per call (one pass over it) and the TMA-fed int8
  kernel (:mod:`dgq.kernels.int8_gemm`) multiplies: 1.30x / 1.55x / 1.77x at M = 1024 / 4096 / 8192 from int8
  activations, against 0.82x / 0.86x / 0.97x for in-register widening, whose widening work serializes with the
  tensor cores (a TMA-fed variant that widened into the MMA's shared-memory operand measured 0.83-0.89x).

The GEMMs launch while the act-quant kernel still runs (programmatic dependent launch) and wait for its codes inside.
"""

from __future__ import annotations

import torch

from dgq.kernels.act_quant import quantize_activations_triton
from dgq.kernels.gemm import KernelWeight, a8w4_matmul, widen_weight
from dgq.kernels.gemv import a8w4_gemv
from dgq.kernels.int8_gemm import int8_matmul

GEMV_MAX_M = 1  # measured: the GEMV wins at M = 1 only
WIDEN_MIN_M = 1024  # measured: in-register widening wins at M = 256 (0.76x vs 0.73x), widen-once at 1024


def a8w4_mm(x_s8: torch.Tensor, s_x: torch.Tensor, kw: KernelWeight, bias: torch.Tensor | None = None,
            out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """``O = (s_x * s1) * (X_s8 @ W_s8ᵀ) + b`` for int8 codes ``x_s8 [M, K]`` on CUDA: the path for M."""
    m = x_s8.shape[0]
    if m <= GEMV_MAX_M:
        return a8w4_gemv(x_s8, kw, s_x, bias, out_dtype)
    if m >= WIDEN_MIN_M:
        return int8_matmul(x_s8, widen_weight(kw), s_x, kw.s1, bias, out_dtype)
    return a8w4_matmul(x_s8, kw, s_x, bias, out_dtype)


def a8w4_linear(x: torch.Tensor, kw: KernelWeight, static_scale: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """``O = (s_x * s1) * (X_s8 @ W_s8ᵀ) + b`` for a 2-D float ``x`` on CUDA, dynamic per-row or static scale."""
    x_s8, s_x = quantize_activations_triton(x, static_scale)
    return a8w4_mm(x_s8, s_x, kw, bias, out_dtype)
