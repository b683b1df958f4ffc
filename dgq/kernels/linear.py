"""The CUDA forward of :class:`dgq.nn.QuantLinear` as a pure function: activation quantization, then one of four
GEMM paths chosen by the number of tokens M and what the GPU and layer allow.

Each was measured against the others on an H100 (``benchmarks/gemm.py``, ``benchmarks/gemm_ws_probe.py``,
``benchmarks/gemv_probe.py``; median over the five benchmark shapes, time ratio vs cuBLAS FP16; BENCHMARKS.md,
``benchmarks/notes_gemm.md``):

* M = 1: the CUDA-core GEMV (:mod:`dgq.kernels.gemv`, ``dp4a``): 2.93x alone, against 2.44x for the
  warp-specialized kernel, which pads one token to a 16-token MMA tile.  On layers of few row blocks it quantizes
  the activation itself (:func:`dgq.kernels.gemv.quantizes_inside`), one launch instead of two.
* 1 < M <= :data:`dgq.kernels.gemm_ws.MAX_M` on Hopper: the warp-specialized kernel (:mod:`dgq.kernels.gemm_ws`),
  whose widening runs in its own warps beside the MMA: 2.25x / 1.73x / 1.27x at M = 16 / 64 / 256 from int8
  activations, against 1.30x / 1.09x / 0.77x for the in-register kernel in the same run.
* The same M on another GPU, or a layer that kernel does not take (:func:`dgq.kernels.gemm_ws.supported`: K tiles of
  64, odd groups, N not a multiple of 64), or a Triton without Gluon (warned once on Hopper): the in-register
  tensor-core kernel (:mod:`dgq.kernels.gemm`).
* M >= :data:`WIDEN_MIN_M`: the weight is widened to int8 once per call (one pass over it) and the TMA-fed int8
  kernel (:mod:`dgq.kernels.int8_gemm`) multiplies: at M = 1024, 0.0390 / 0.1109 / 0.0927 / 0.5074 / 0.4845 ms
  against 0.0440 / 0.1281 / 0.0990 / 0.5378 / 0.4873 for the warp-specialized kernel's 6-stage 128 x 128 tiles, which
  widen each weight tile again per 128 tokens.

The GEMMs launch while the act-quant kernel still runs (programmatic dependent launch) and wait for its codes inside.
"""

from __future__ import annotations

import torch

import importlib.util
import warnings

from dgq.kernels.act_quant import quantize_activations_triton
from dgq.kernels.gemm import KernelWeight, a8w4_matmul, widen_weight
from dgq.kernels.gemv import a8w4_gemv, a8w4_gemv_float, quantizes_inside
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
    """``O = (s_x * s1) * (X_s8 @ W_s8ᵀ) + b`` for a 2-D float ``x`` on CUDA, dynamic per-row or static scale.

    One token on a layer of few row blocks (:func:`dgq.kernels.gemv.quantizes_inside`): the GEMV quantizes the
    activation itself, one launch; otherwise the act-quant kernel, then the GEMM path for M."""
    if x.shape[0] <= GEMV_MAX_M and quantizes_inside(kw.out_features, kw.in_features, kw.tile_k):
        return a8w4_gemv_float(x, kw, static_scale, bias, out_dtype)
    x_s8, s_x = quantize_activations_triton(x, static_scale)
    return a8w4_mm(x_s8, s_x, kw, bias, out_dtype)
