"""Triton int8 activation quantization, bit-exact with :func:`dgq.formats.quantize_activations`.

One program per row, which holds the whole row in registers when K <= 4096 (one read), else reads it twice in chunks
(:func:`row_block`).
Exactness needs the same fp32 operations as the reference: ``absmax / 127`` and ``x / s_x`` with IEEE division (``div_rn``; Triton's plain ``/`` may lower to an approximate division) and round-half-to-even.
Rounding uses the fp32 magic-number trick ``(v + 1.5 * 2**23) - 1.5 * 2**23``, exact round-half-even for
``|v| <= 2**22``; clamping to ±127 first keeps ``v`` in that range and commutes with rounding (the bounds are
integers).  (``libdevice.rint`` would do the same on the GPU, but the CPU interpreter cannot run it.)

Kernels here avoid Triton's standard-library helpers that are themselves ``@triton.jit`` functions (``tl.zeros``,
``tl.max``, ``tl.cdiv``): when triton was imported before ``TRITON_INTERPRET=1`` was set (the test suite's
conftest imports transformers, which imports triton), the interpreter cannot call them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dgq.kernels.pdl import launch_options, wait_then_release

_RNE_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: adding and subtracting it rounds an fp32 of magnitude <= 2**22 to even
_MIN_SCALE = tl.constexpr(1e-8)  # the reference's clamp of the dynamic scale
WHOLE_ROW_MAX = 4096  # rows up to this length are read once, whole; longer ones in chunks (row_block)


def row_block(k: int) -> int:
    """Elements one program handles per step for rows of ``k``: the whole row up to :data:`WHOLE_ROW_MAX`
    (one read), else 2048-element chunks up to K = 16384 and 4096-element ones beyond, in two passes (the second
    mostly from L2), by 16 warps (:func:`_warps`).

    Measured on the H100 (``benchmarks/act_quant_probe.py``, ``results/act_quant_probe_h100*.json``; every variant
    bit-exact): at every M from 1 to 4096, chunks by 16 warps beat the whole row in registers for K = 11008 and 28672
    (M = 1, K = 11008: 3.9 us in 2048-chunks against 5.7 us for the whole row; M = 1024: 18.0 against 29.3 us;
    M = 1024, K = 28672: 46.2 us in 4096-chunks, 52.1 in 2048-chunks, 66.5 whole) and the 4-warp chunks used before
    (M = 1024, K = 11008: 24.3 us).
    """
    if k <= WHOLE_ROW_MAX:
        return triton.next_power_of_2(k)
    return 2048 if k <= 16384 else 4096


@triton.jit
def _round_clamp_s8(v):
    """Round-half-even of fp32 ``v`` clamped to [-127, 127], as int8."""
    v = tl.minimum(tl.maximum(v, -127.0), 127.0)
    return ((v + _RNE_MAGIC) - _RNE_MAGIC).to(tl.int8)


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def _dynamic_scale(abs_x):
    """A row's scale from its magnitudes ``abs_x`` (1-D, zeros where masked): absmax / 127 with IEEE division,
    clamped as the reference does.  Every kernel that quantizes activations calls this one, so they agree bit for
    bit."""
    return tl.maximum(tl.math.div_rn(tl.reduce(abs_x, 0, _maximum), 127.0), _MIN_SCALE)


@triton.jit
def _swiglu(gate, up):
    """``silu(gate) * up`` rounded as :func:`dgq.formats.swiglu`: fp32 arithmetic, the SiLU rounded to the
    operands' dtype, then the product.  The exponential and the division are the GPU's fast ones (a few fp32 ulps
    from torch's, which the rounding to fp16/bf16 hides but for a product within those ulps of a rounding
    boundary): with IEEE division a 2048-token Llama-2-7B prefill spent 3.70 ms in its quantizers, with these 3.14
    (H100; 2.01 before the fusion, beside a 1.38 ms SiLU kernel; benchmarks/notes_e2e.md, session 11)."""
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    return (silu.to(tl.float32) * up.to(tl.float32)).to(gate.dtype)


@triton.jit
def _load_row(x_row, c, K: tl.constexpr, SWIGLU: tl.constexpr):
    """Elements ``c`` of a row as fp32: the row itself, or with ``SWIGLU`` the product of its gate half (the first
    ``K`` elements) and its up half."""
    v = tl.load(x_row + c, mask=c < K, other=0.0)
    if SWIGLU:
        v = _swiglu(v, tl.load(x_row + K + c, mask=c < K, other=0.0))
    return v.to(tl.float32)


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, stride_x, stride_q, K: tl.constexpr, DYNAMIC: tl.constexpr,
                      STATIC_ROWS: tl.constexpr, BLOCK: tl.constexpr, ON_GPU: tl.constexpr,
                      SWIGLU: tl.constexpr = False):
    wait_then_release(ON_GPU)  # launched dependent on x's producer; the GEMM that consumes the codes launches early
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * stride_q
    cols = tl.arange(0, BLOCK)
    if BLOCK >= K:  # the whole row fits in registers: one read
        x = _load_row(x_row, cols, K, SWIGLU)
        if DYNAMIC:
            scale = _dynamic_scale(tl.abs(x))
            tl.store(s_ptr + row, scale)
        else:
            scale = tl.load(s_ptr + row * STATIC_ROWS)  # one static scale, or the row's own
        tl.store(q_row + cols, _round_clamp_s8(tl.math.div_rn(x, scale)), mask=cols < K)
    else:  # absmax pass, then a quantize pass that mostly hits L2
        if DYNAMIC:
            amax = tl.full([BLOCK], 0.0, tl.float32)
            for i in range((K + BLOCK - 1) // BLOCK):
                c = i * BLOCK + cols
                amax = tl.maximum(amax, tl.abs(_load_row(x_row, c, K, SWIGLU)))
            scale = _dynamic_scale(amax)
            tl.store(s_ptr + row, scale)
        else:
            scale = tl.load(s_ptr + row * STATIC_ROWS)  # one static scale, or the row's own
        for i in range((K + BLOCK - 1) // BLOCK):
            c = i * BLOCK + cols
            x = _load_row(x_row, c, K, SWIGLU)
            tl.store(q_row + c, _round_clamp_s8(tl.math.div_rn(x, scale)), mask=c < K)


@triton.jit
def _segment_absmax_kernel(x_ptr, amax_ptr, stride_x, K: tl.constexpr, SEG: tl.constexpr, SEGS: tl.constexpr,
                           ON_GPU: tl.constexpr, SWIGLU: tl.constexpr):
    """Split rows, first launch: the absmax of segment ``program_id(1)`` of row ``program_id(0)``."""
    wait_then_release(ON_GPU)
    row = tl.program_id(0).to(tl.int64)
    seg = tl.program_id(1)
    c = seg * SEG + tl.arange(0, SEG)
    x = _load_row(x_ptr + row * stride_x, c, K, SWIGLU)
    tl.store(amax_ptr + row * SEGS + seg, tl.reduce(tl.abs(x), 0, _maximum))


@triton.jit
def _segment_quant_kernel(x_ptr, q_ptr, s_ptr, amax_ptr, stride_x, stride_q, K: tl.constexpr, SEG: tl.constexpr,
                          SEGS: tl.constexpr, SEGS_P2: tl.constexpr, ON_GPU: tl.constexpr, SWIGLU: tl.constexpr):
    """Split rows, second launch: the row's scale from its segments' absmax (the max of maxima is the row's absmax,
    so the scale is :func:`_dynamic_scale`'s bit for bit), then segment ``program_id(1)``'s codes."""
    wait_then_release(ON_GPU)
    row = tl.program_id(0).to(tl.int64)
    seg = tl.program_id(1)
    parts = tl.arange(0, SEGS_P2)
    scale = _dynamic_scale(tl.load(amax_ptr + row * SEGS + parts, mask=parts < SEGS, other=0.0))
    tl.store(s_ptr + row, scale, mask=seg == 0)
    c = seg * SEG + tl.arange(0, SEG)
    x = _load_row(x_ptr + row * stride_x, c, K, SWIGLU)
    tl.store(q_ptr + row * stride_q + c, _round_clamp_s8(tl.math.div_rn(x, scale)), mask=c < K)


def quantize_split_rows(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, k: int, seg: int, warps: int,
                        swiglu: bool) -> None:
    """Dynamic codes and scales of ``x`` into ``q`` and ``s`` with each row split into ``seg``-element segments
    over programs of their own, in two launches (absmax, then codes): for few long rows, where one program per row
    keeps one chunk of it in flight at a time (:func:`segments`)."""
    m = x.shape[0]
    segs = triton.cdiv(k, seg)
    amax = torch.empty((m, segs), dtype=torch.float32, device=x.device)
    on_gpu = x.device.type == "cuda"
    _segment_absmax_kernel[(m, segs)](x, amax, x.stride(0), K=k, SEG=seg, SEGS=segs, ON_GPU=on_gpu, SWIGLU=swiglu,
                                      num_warps=warps, **launch_options(x.device))
    _segment_quant_kernel[(m, segs)](x, q, s, amax, x.stride(0), q.stride(0), K=k, SEG=seg, SEGS=segs,
                                     SEGS_P2=triton.next_power_of_2(segs), ON_GPU=on_gpu, SWIGLU=swiglu,
                                     num_warps=warps, **launch_options(x.device))


def _warps(m: int, k: int, block: int) -> int:
    """16 warps for chunks (:func:`row_block`) and for fewer than 1024 rows of >= 4096 elements (decode: one program
    per row, latency-bound; on the H100 at M = 1, K = 4096 took 2.50 us with 4 warps and 2.02 us with 16), else 32
    elements per thread (at M = 4096, K = 4096: 20.2 us with 4 warps, 22.1 with 8, 23.6 with 16)."""
    if block < k or (m < 1024 and block >= 4096):
        return 16
    return max(1, min(16, block // 1024))


def quantize_activations_triton(x: torch.Tensor, static_scale: torch.Tensor | None = None, swiglu: bool = False
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Int8 codes ``[M, K]`` and fp32 scales of a 2-D ``x`` (fp16/bf16/fp32), as the reference computes them.

    ``swiglu``: ``x`` is a fused gate/up output ``[M, 2K]`` and the codes are those of
    :func:`dgq.formats.swiglu` of it, formed as the kernel reads ``x`` (no ``[M, K]`` product in memory).
    Its SiLU's exponential and division are the GPU's fast ones (:func:`_swiglu`), so a code may differ by one from
    the reference's where a product lands within a few fp32 ulps of an fp16 rounding boundary.

    Dynamic mode (``static_scale is None``) returns per-row scales ``[M, 1]``; static mode returns the given
    scale as ``[1, 1]``, or, given one static scale per row (``[M, 1]``: a layer whose first positions have their
    own, :attr:`dgq.nn.QuantLinear.first_scale`), those, matching :func:`dgq.formats.quantize_activations`' shapes.
    """
    if x.dim() != 2:
        raise ValueError(f"expected a 2-D activation, got shape {list(x.shape)}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    m, k = x.shape
    if swiglu:
        if k % 2:
            raise ValueError(f"a fused gate/up input has an even width, got {k}")
        k //= 2
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    per_row = static_scale is not None and static_scale.numel() > 1
    if static_scale is None:
        s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    elif per_row and static_scale.shape != (m, 1):
        raise ValueError(f"a static activation scale is one value or one per row ([{m}, 1]), got shape "
                         f"{list(static_scale.shape)}")
    else:
        s = static_scale.detach().to(device=x.device, dtype=torch.float32).reshape(-1, 1).contiguous()
    block = row_block(k)
    if m:
        _act_quant_kernel[(m,)](x, q, s, x.stride(0), q.stride(0), K=k, DYNAMIC=static_scale is None,
                                STATIC_ROWS=int(per_row), BLOCK=block, ON_GPU=x.device.type == "cuda",
                                num_warps=_warps(m, k, block), SWIGLU=swiglu, **launch_options(x.device))
    return q, s

