"""The CUDA forward of :class:`dgq.nn.QuantLinear` as a pure function: activation quantization, then one of four
GEMM paths chosen by the number of tokens M and what the GPU and layer allow.

Each was measured against the others on an H100 (``benchmarks/gemm.py``, ``benchmarks/gemm_ws_probe.py``, median
over the five benchmark shapes, time ratio vs cuBLAS FP16; BENCHMARKS.md, ``benchmarks/notes_gemm.md``):

* M = 1: the CUDA-core GEMV (:mod:`dgq.kernels.gemv`, ``dp4a``): 2.80x alone, against 2.08x for the
  warp-specialized kernel, which pads one token to a 16-token MMA tile.
* 1 < M <= :data:`dgq.kernels.gemm_ws.MAX_M` on Hopper: the warp-specialized kernel (:mod:`dgq.kernels.gemm_ws`),
  whose widening runs in its own warps beside the MMA: 1.90x / 1.65x / 0.91x at M = 16 / 64 / 256 from int8
  activations, against 1.42x / 1.09x / 0.76x for the in-register kernel in the same run.
* The same M on another GPU, or a layer that kernel does not take (:func:`dgq.kernels.gemm_ws.supported`: K tiles of
  64, odd groups, N not a multiple of 64), or a Triton without Gluon (warned once on Hopper): the in-register
  tensor-core kernel (:mod:`dgq.kernels.gemm`).
* M >= :data:`WIDEN_MIN_M`: the weight is widened to int8 once per call (one pass over it) and the TMA-fed int8
  kernel (:mod:`dgq.kernels.int8_gemm`) multiplies: at M = 1024, 1.15-1.32x against 0.94-1.12x for the
  warp-specialized kernel (probe run), whose 128 x 128 tiles widen each weight tile again per 128 tokens.

The GEMMs launch while the act-quant kernel still runs (programmatic dependent launch) and wait for its codes inside.
"""

from __future__ import annotations

import torch

import importlib.util
import warnings

from dgq.kernels.act_quant import quantize_activations_triton
from dgq.kernels.gemm import KernelWeight, a8w4_matmul, widen_weight
from dgq.kernels.gemv import a8w4_gemv
from dgq.kernels.int8_gemm import int8_matmul

if importlib.util.find_spec("triton.experimental.gluon") is not None:
    from dgq.kernels import gemm_ws
else:  # Triton < 3.5: no Gluon, so no warp-specialized kernel
    gemm_ws = None

GEMV_MAX_M = 1  # measured: the GEMV wins at M = 1 only
WIDEN_MIN_M = 1024  # measured: widen-once wins at M = 1024 (above); gemm_ws.MAX_M is 1023 to match


def a8w4_mm(x_s8: torch.Tensor, s_x: torch.Tensor, kw: KernelWeight, bias: torch.Tensor | None = None,
            out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """``O = (s_x * s1) * (X_s8 @ W_s8ᵀ) + b`` for int8 codes ``x_s8 [M, K]`` on CUDA: the path for M."""
    m = x_s8.shape[0]
    if m <= GEMV_MAX_M:
        return a8w4_gemv(x_s8, kw, s_x, bias, out_dtype)
    if m >= WIDEN_MIN_M:
        return int8_matmul(x_s8, widen_weight(kw), s_x, kw.s1, bias, out_dtype)
    if gemm_ws is not None and gemm_ws.supported(kw, x_s8.device):
        return gemm_ws.ws_a8w4_matmul(x_s8, kw, s_x, bias, out_dtype)
    if gemm_ws is None and torch.cuda.get_device_capability(x_s8.device)[0] == 9:
        warnings.warn("this Triton has no Gluon: A8W4 layers with 2..1023 tokens run the in-register kernel, about "
                      "0.7x the speed of the warp-specialized one on Hopper (install triton>=3.6)", stacklevel=2)
    return a8w4_matmul(x_s8, kw, s_x, bias, out_dtype)


def a8w4_linear(x: torch.Tensor, kw: KernelWeight, static_scale: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """``O = (s_x * s1) * (X_s8 @ W_s8ᵀ) + b`` for a 2-D float ``x`` on CUDA, dynamic per-row or static scale."""
    x_s8, s_x = quantize_activations_triton(x, static_scale)
    return a8w4_mm(x_s8, s_x, kw, bias, out_dtype)
