"""The CUDA forward of :class:`dgq.nn.QuantLinear` as a pure function: activation quantization, then one of five
GEMM paths chosen by the number of tokens M and what the GPU and layer allow.

Each was measured against the others on an H100 (``benchmarks/gemm.py``, ``benchmarks/gemm_ws_probe.py``,
``benchmarks/gemv_probe.py``; cold-L2 CUDA-graph timing; BENCHMARKS.md, ``benchmarks/notes_gemm.md``):

* M = 1 on Hopper: the GEMV fed by bulk tensor copies (:mod:`dgq.kernels.gemv_tma`, ``dp4a`` on CUDA cores), after
  the act-quant kernel with a dynamic scale: its CTAs would otherwise each read the whole row for the absmax, and
  since the act-quant holds a row in registers (session 18) the two launches won on four of the five benchmark
  shapes (``benchmarks/gemv_probe.py --tma aq``; 28672 x 8192: 47.4 against 50.6 us).  Given the scale (static, or
  a row absmax computed by a compiled graph beside the row's producer) it quantizes the activation itself, one
  launch, reading only its own range.
* M = 1 elsewhere: the register-fed GEMV (:mod:`dgq.kernels.gemv`), quantizing inside on layers of few row blocks
  (:func:`dgq.kernels.gemv.quantizes_inside`).
* From :data:`dgq.kernels.gemm_pp.MIN_M` tokens on Hopper wherever its tiles fill the GPU, and at 17-256 tokens on
  layers of few tiles, split in K (:func:`dgq.kernels.gemm_pp.config_for`): the ping-pong kernel
  (:mod:`dgq.kernels.gemm_pp`), whose two MMA warpgroups widen into the tensor-core instruction's registers and take
  turns on the tensor cores.  In session 16 it beat the warp-specialized kernel and widen-once on all five benchmark
  shapes at M = 1024, 2048 and 4096 (1.06-1.58x the previous dispatch), on the three it takes at M = 256, on four of
  five at M = 8192 (8192 x 28672: 0-8% behind widen-once), and at M = 64 on three layers of few tiles; its K splits
  reduced by all splits at once (session 17) took the N = 4096 / 8192 layers at 17-256 tokens too.
* Other 1 < M <= :data:`dgq.kernels.gemm_ws.MAX_M` on Hopper: the warp-specialized kernel (:mod:`dgq.kernels.gemm_ws`),
  whose widening runs in its own warps beside the MMA.
* The same M on another GPU, or a layer that kernel does not take (:func:`dgq.kernels.gemm_ws.supported`: K tiles of
  64, odd groups, N not a multiple of 64), or a Triton without Gluon (warned once on Hopper): the in-register
  tensor-core kernel (:mod:`dgq.kernels.gemm`).
* M >= :data:`WIDEN_MIN_M` where neither Hopper kernel takes the layer (on Hopper only layers too narrow to fill
  the GPU with tiles): the weight is widened to int8 once per call (one pass over it) and the
  TMA-fed int8 kernel (:mod:`dgq.kernels.int8_gemm`) multiplies; a layer whose widened weight would pass
  :data:`WIDEN_CHUNK_BYTES` a chunk of output rows at a time (:func:`widen_once_matmul`).  At M = 2048 (int8 codes in, session 10) that
  took 0.0676 / 0.1944 / 0.1607 / 0.8893 / 0.8653 ms on the five benchmark shapes against 0.0700 / 0.2038 / 0.1498 /
  0.8949 / 0.7436 for the warp-specialized kernel's 256-token tiles of then, which widened each weight tile again
  per 256 tokens: widen-once won the K = 4096 shapes, the warp-specialized kernel the long-K ones (11008 x 4096,
  28672 x 8192); at M = 8192 widen-once won all five.  The ping-pong kernel beat both there (session 16).

The GEMMs launch while the act-quant kernel still runs (programmatic dependent launch) and wait for its codes inside.
"""

from __future__ import annotations

import torch

import importlib.util
import warnings

from dgq.kernels.act_quant import quantize_activations_triton
from dgq.kernels.gemm import KernelWeight, a8w4_matmul, widen_weight
from dgq.kernels.gemv import a8w4_gemv, a8w4_gemv_float, quantizes_inside
from dgq.kernels.int8_gemm import int8_matmul, whole_wave_rows

if importlib.util.find_spec("triton.experimental.gluon") is not None:
    from dgq.kernels import gemm_pp, gemm_ws, gemv_tma
else:  # Triton < 3.5: no Gluon, so no warp-specialized or ping-pong kernel and no TMA GEMV
    gemm_pp = gemm_ws = gemv_tma = None

GEMV_MAX_M = 1  # measured: the GEMV wins at M = 1 only
WIDEN_MIN_M = 2048  # measured: widen-once wins at M = 2048 on two shapes, ties on two (above); gemm_ws.MAX_M matches
WIDEN_CHUNK_BYTES = 64 << 20  # the most widened rows held at once, where whole waves allow (widen_chunk_rows)


def _hopper_kernels(kw: KernelWeight, device: torch.device) -> bool:
    """Whether the Gluon kernels (warp-specialized GEMM, TMA GEMV) serve this layer here: same descriptors' rules."""
    return gemm_ws is not None and gemm_ws.supported(kw, device)


def a8w4_mm(x_s8: torch.Tensor, s_x: torch.Tensor, kw: KernelWeight, bias: torch.Tensor | None = None,
            out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """``O = (s_x * s1) * (X_s8 @ W_s8ᵀ) + b`` for int8 codes ``x_s8 [M, K]`` on CUDA: the path for M."""
    m = x_s8.shape[0]
    ws = _hopper_kernels(kw, x_s8.device)
    if m <= GEMV_MAX_M:
        return (gemv_tma.tma_gemv if ws else a8w4_gemv)(x_s8, kw, s_x, bias, out_dtype)
    pp = gemm_pp.rule(m, kw.out_features, x_s8.device) if ws else None
    if pp is not None:
        return gemm_pp.pp_a8w4_matmul(x_s8, kw, s_x, bias, out_dtype, config=pp)
    if m >= WIDEN_MIN_M and not (ws and gemm_ws.takes(m, kw.in_features, kw.out_features)):
        return widen_once_matmul(x_s8, s_x, kw, bias, out_dtype)
    if ws:
        return gemm_ws.ws_a8w4_matmul(x_s8, kw, s_x, bias, out_dtype)
    if gemm_ws is None and torch.cuda.get_device_capability(x_s8.device)[0] == 9:
        warnings.warn("this Triton has no Gluon: A8W4 layers with 2..2047 tokens run the in-register kernel, about "
                      "0.7x the speed of the warp-specialized one on Hopper (install triton>=3.6)", stacklevel=2)
    return a8w4_matmul(x_s8, kw, s_x, bias, out_dtype)


def widen_chunk_rows(n: int, k: int, wave_rows: int, chunk_bytes: int | None = None) -> int:
    """Output rows per widening chunk: the whole layer (``n``) if its int8 ``[n, k]`` fits ``chunk_bytes`` (default
    :data:`WIDEN_CHUNK_BYTES`); else the most multiples of ``wave_rows`` (:func:`whole_wave_rows`) that fit, at
    least one, and the whole layer if that is not fewer rows.

    Whole waves because every chunk is a launch of its own: in ``benchmarks/widen_chunks_probe.py`` (commit a6967dc,
    H100) chunks of a fixed byte size made Llama-2-7B's gate/up 3-9% slower at 2048 and 8192 tokens, each chunk's
    last partial wave costing a full one; a multiple of whole waves leaves only the extra launches."""
    budget = (chunk_bytes or WIDEN_CHUNK_BYTES) // k
    if n <= budget:
        return n
    return min(n, max(1, budget // wave_rows) * wave_rows)


def widen_once_matmul(x_s8: torch.Tensor, s_x: torch.Tensor, kw: KernelWeight, bias: torch.Tensor | None = None,
                      out_dtype: torch.dtype = torch.float16, chunk_bytes: int | None = None) -> torch.Tensor:
    """The large-M path: the weight widened to int8 and multiplied by the int8 GEMM, in chunks of output rows
    (:func:`widen_chunk_rows`) where the whole widened weight would pass ``chunk_bytes``, every chunk widened into
    the same buffer.

    Why chunks: the widened weight is a transient as large as the layer's int8 weight, 86 MiB for Llama-2-7B's fused
    gate/up, the largest of a DGQ prefill once the int8 GEMM's autotuner is gone (issue 12's peak memory); in chunks
    of whole waves it is 33 MiB there, for two more launch pairs."""
    n, k = kw.out_features, kw.in_features
    rows = widen_chunk_rows(n, k, whole_wave_rows(x_s8.shape[0], x_s8.device), chunk_bytes)
    out = torch.empty((x_s8.shape[0], n), dtype=out_dtype, device=x_s8.device)
    buffer = torch.empty((rows, k), dtype=torch.int8, device=x_s8.device)
    for start in range(0, n, rows):
        chunk = range(start, min(start + rows, n))
        w_s8 = widen_weight(kw, rows=chunk, out=buffer[:len(chunk)])
        int8_matmul(x_s8, w_s8, s_x, kw.s1[chunk.start:chunk.stop],
                    None if bias is None else bias[chunk.start:chunk.stop], out_dtype,
                    out=out[:, chunk.start:chunk.stop])
    return out


def takes_row_absmax(m: int, kw: KernelWeight, device: torch.device, dynamic: bool, swiglu: bool) -> bool:
    """Whether :func:`a8w4_linear` runs the TMA GEMV quantizing inside, which can take each row's absmax from the
    caller (``row_absmax``): one dynamic token on Hopper, not a gate/up output."""
    return m <= GEMV_MAX_M and dynamic and not swiglu and _hopper_kernels(kw, device)


def a8w4_linear(x: torch.Tensor, kw: KernelWeight, static_scale: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16,
                swiglu: bool = False, row_absmax: torch.Tensor | None = None) -> torch.Tensor:
    """``O = (s_x * s1) * (X_s8 @ W_s8ᵀ) + b`` for a 2-D float ``x`` on CUDA, dynamic per-row or static scale;
    ``swiglu``: ``x`` is a fused gate/up output ``[M, 2K]`` and ``X`` is :func:`dgq.formats.swiglu` of it.

    One token: on Hopper the TMA-fed GEMV, after the act-quant kernel or, given a static scale or ``row_absmax``,
    quantizing the activation itself (module docstring); elsewhere the register-fed GEMV does so on layers of few
    row blocks (:func:`dgq.kernels.gemv.quantizes_inside`).  Otherwise, and always
    with ``swiglu`` (a fused MLP passes the gate/up output only from :data:`dgq.fuse.SWIGLU_MIN_TOKENS` tokens on),
    the act-quant kernel, which forms the SwiGLU product as it reads, then the GEMM path for M.

    ``row_absmax``: each row's :func:`dgq.formats.row_absmax_bits`, given only where :func:`takes_row_absmax`
    says the TMA GEMV runs (a compiled graph computes it beside the row's producer); the result is the same."""
    if row_absmax is not None and not takes_row_absmax(x.shape[0], kw, x.device, static_scale is None, swiglu):
        raise ValueError("row_absmax is taken only by the TMA GEMV (one dynamic token on Hopper, no gate/up "
                         "input): see dgq.kernels.linear.takes_row_absmax")
    if x.shape[0] <= GEMV_MAX_M and not swiglu:
        if _hopper_kernels(kw, x.device):
            if static_scale is not None or row_absmax is not None:  # no whole-row read inside
                return gemv_tma.tma_gemv_float(x, kw, static_scale, bias, out_dtype, row_absmax=row_absmax)
        elif quantizes_inside(kw.out_features, kw.in_features, kw.tile_k):
            return a8w4_gemv_float(x, kw, static_scale, bias, out_dtype)
    x_s8, s_x = quantize_activations_triton(x, static_scale, swiglu)  # a dynamic token on Hopper: then the TMA GEMV
    return a8w4_mm(x_s8, s_x, kw, bias, out_dtype)
