"""Triton int8 activation quantization, bit-exact with :func:`dgq.formats.quantize_activations`.

One program per row, in one of two kernels (:func:`config_for`): the whole row read once into registers, as up
to three power-of-two pieces (:func:`row_pieces`), every load in flight at once; or, for long rows at many rows,
two passes over it in chunks (:func:`row_block`: an absmax pass, then a quantizing pass that mostly hits L2).

Exactness needs the reference's fp32 operations: ``absmax / 127`` and ``x / s_x`` correctly rounded, and
round-half-to-even.  The scale is divided with ``div_rn`` (Triton's plain ``/`` may lower to an approximate
division).  The codes' divisions all share one divisor, so on the GPU each is computed as the fast path of
ptxas's own IEEE division (``div.rn.f32``): the hardware reciprocal refined by one Newton step once per row, then
three fp32 operations per element (:func:`_codes`) instead of ~10 and a branch.  ptxas guards that path with a
range check (``FCHK``) that sends operands at the ends of the exponent range to a slow path; in a row ``|x / s|
<= 127`` and ``s >= 1e-8``, so a quotient the check could reject is far below 0.5 (a denormal ``x``) and its code
is 0 either way, unless an activation is near fp32's largest values.  ``pytest -m cuda`` checks the codes against
the CPU definition on every finite fp16 value under 90 scales and on bf16 rows of magnitudes 1e-40 to 1e30.  The
CPU interpreter, which has no inline PTX, divides with ``div_rn``.

Rounding uses the fp32 magic number ``1.5 * 2**23``: ``v + 1.5 * 2**23`` holds round-half-even of ``v`` in its low
mantissa bits for ``|v| <= 2**22``, so the code is that sum's low byte; clamping to ±127 first keeps ``v`` in that
range and commutes with rounding (the bounds are integers).

Measured on the H100 (``benchmarks/act_quant_probe.py``, ``results/act_quant_s18.json``, cold-L2 graph replays;
every variant bit-exact): the fast division alone took M = 256, K = 28672 from 14.4 to 11.1 us (chunks), and the
row in registers by 8 warps to 9.8; K = 11008: 6.1 -> 4.6 us; M = 1, K = 28672: 5.6 -> 3.5 us.  At 1024 rows and
more the chunks keep more programs resident per SM and won on K >= 11008 (M = 1024, K = 28672: 36.3 us against
39.2 in registers).

Kernels here avoid Triton's standard-library helpers that are themselves ``@triton.jit`` functions (``tl.zeros``,
``tl.max``, ``tl.cdiv``): when triton was imported before ``TRITON_INTERPRET=1`` was set (the test suite's
conftest imports transformers, which imports triton), the interpreter cannot call them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from dgq.kernels.pdl import launch_options, wait_then_release

_RNE_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: adding it rounds an fp32 of magnitude <= 2**22 to even
_MIN_SCALE = tl.constexpr(1e-8)  # the reference's clamp of the dynamic scale
WHOLE_ROW_MAX = 4096  # rows up to this length are held whole at any M (config_for)
IN_REGISTERS_MAX = 32768  # the longest row held whole in registers (56 fp16 values a thread at 16 warps)
MIN_PIECE = 256  # the smallest second piece of a row in registers (row_pieces)


class AqConfig(NamedTuple):
    """How one launch quantizes its rows: the row whole in registers (else read twice in chunks), by how many warps,
    and with the GPU's division fast path (:func:`_codes`; the CPU interpreter divides exactly whatever it says)."""

    in_registers: bool
    warps: int
    fast: bool = True


def config_for(m: int, k: int, swiglu: bool = False) -> AqConfig:
    """Whether ``m`` rows of ``k`` are held whole in registers (else read twice in chunks), and by how many warps.

    Measured (module docstring; ``results/act_quant_s18.json``, ``act_quant_swiglu_s18.json``,
    ``act_quant_warps_s18.json``): in registers up to 512 rows (at M = 256 by 8 warps: K = 11008 4.6 us against 5.4
    by 16 and 4.7 by 4; below 256 rows 16 warps, a latency-bound program per row), at every M for K <= 4096
    (M = 4096: 17.9 us against 17.6 for 4-warp chunks), and at every measured M (64-2048) for a gate/up row, whose
    product the chunks would form twice (M = 2048, K = 11008: 45.6 against 59.3 us); chunks by 16 warps beyond
    (M = 1024, K = 28672: 36.3 against 39.2 / 48.2 us in registers by 8 / 16 warps).  Rows shorter than 4096 keep
    session 5's 32 elements per thread."""
    if k > IN_REGISTERS_MAX or (m > 512 and k > WHOLE_ROW_MAX and not swiglu):
        return AqConfig(False, 16)
    if k < 4096:
        return AqConfig(True, max(1, min(16, triton.next_power_of_2(k) // 1024)))
    return AqConfig(True, 16 if m < 256 else 8)


def row_pieces(k: int) -> tuple[int, int, int]:
    """A row of ``k`` as at most three power-of-two pieces (Triton's blocks), the last one masked: the largest
    power of two in ``k``, the largest in the rest (if at least :data:`MIN_PIECE`), and the rest rounded up.
    11008 = 8192 + 2048 + 768 (in 1024), 28672 = 16384 + 8192 + 4096: the row in registers in 1-1.02x its length,
    where one power of two would take 1.14-1.49x (16384 for 11008: idle lanes that still issue every instruction)."""
    if k < 1:
        raise ValueError(f"a row of {k} elements has no pieces")
    p0 = 1 << (k.bit_length() - 1)
    rest = k - p0
    p1 = 1 << (rest.bit_length() - 1) if rest >= MIN_PIECE else 0
    rest -= p1
    return p0, p1, triton.next_power_of_2(rest) if rest else 0


def row_block(k: int) -> int:
    """Elements per chunk for rows of ``k`` read in two passes: 2048 up to K = 16384, 4096 beyond (session 5,
    ``results/act_quant_probe_h100.json``: M = 1024, K = 28672: 46.2 us in 4096-chunks against 52.1 in 2048)."""
    return 2048 if k <= 16384 else 4096


@triton.jit
def _round_clamp_s8(v):
    """Round-half-even of fp32 ``v`` clamped to [-127, 127], as int8: the low byte of ``v + 1.5 * 2**23`` (module
    docstring).  The one rounding of every activation quantizer: the act-quant's codes (:func:`_codes`), the GEMVs'
    and the int8 KV cache's."""
    v = tl.minimum(tl.maximum(v, -127.0), 127.0) + _RNE_MAGIC
    return v.to(tl.int32, bitcast=True).to(tl.int8)


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def _scale_of(amax):
    """A row's scale from its absmax: absmax / 127 with IEEE division, clamped as the reference does.  Every kernel
    that quantizes activations computes it here, so they agree bit for bit."""
    return tl.maximum(tl.math.div_rn(amax, 127.0), _MIN_SCALE)


@triton.jit
def _dynamic_scale(abs_x):
    """:func:`_scale_of` a row's magnitudes ``abs_x`` (1-D, zeros where masked)."""
    return _scale_of(tl.reduce(abs_x, 0, _maximum))


@triton.jit
def _refined_rcp(s):
    """``1 / s`` as ptxas's ``div.rn.f32`` computes it before its quotient: the hardware reciprocal
    (``rcp.approx``, which ``div.rn`` lowers to ``MUFU.RCP`` too) and one Newton step."""
    r0 = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [s.to(tl.int32, bitcast=True)],
                                   dtype=tl.int32, is_pure=True, pack=1).to(tl.float32, bitcast=True)
    return tl.fma(r0, tl.fma(-s, r0, 1.0), r0)


@triton.jit
def _codes(x, scale, rcp, FAST: tl.constexpr):
    """Int8 codes of ``x / scale``, rounded half-to-even and clamped to [-127, 127].  ``FAST`` (the GPU): the
    quotient as ``div.rn.f32``'s fast path computes it from ``rcp`` (:func:`_refined_rcp`): ``q = x r``, then
    ``q + r (x - s q)``, both steps fused multiply-adds; else IEEE division (module docstring)."""
    x = x.to(tl.float32)
    if FAST:
        q = x * rcp
        q = tl.fma(rcp, tl.fma(-scale, q, x), q)
    else:
        q = tl.math.div_rn(x, scale)
    return _round_clamp_s8(q)


@triton.jit
def _row_scale(s_ptr, row, amax, DYNAMIC: tl.constexpr, STATIC_ROWS: tl.constexpr, FAST: tl.constexpr):
    """The row's scale (stored when dynamic; else the one static scale, or the row's own) and its reciprocal for
    :func:`_codes` (the scale itself where unused)."""
    if DYNAMIC:
        scale = _scale_of(amax)
        tl.store(s_ptr + row, scale)
    else:
        scale = tl.load(s_ptr + row * STATIC_ROWS)
    rcp = scale
    if FAST:
        rcp = _refined_rcp(scale)
    return scale, rcp


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
def _load(x_row, c, K: tl.constexpr, SWIGLU: tl.constexpr, MASKED: tl.constexpr):
    """Elements ``c`` of a row in its own dtype (masked past ``K`` if ``MASKED``): the row itself, or with
    ``SWIGLU`` the product of its gate half (the first ``K`` elements) and its up half."""
    if MASKED:
        v = tl.load(x_row + c, mask=c < K, other=0.0)
        if SWIGLU:
            v = _swiglu(v, tl.load(x_row + K + c, mask=c < K, other=0.0))
    else:
        v = tl.load(x_row + c)
        if SWIGLU:
            v = _swiglu(v, tl.load(x_row + K + c))
    return v


@triton.jit
def _piece_max(v):
    """A piece's largest magnitude, in fp32 (the piece stays in registers in its own dtype: half the registers of
    fp32 for fp16/bf16)."""
    return tl.reduce(tl.abs(v.to(tl.float32)), 0, _maximum)


@triton.jit
def _store_piece(q_row, v, scale, rcp, OFF: tl.constexpr, P: tl.constexpr, K: tl.constexpr, FAST: tl.constexpr):
    c = OFF + tl.arange(0, P)
    if OFF + P <= K:
        tl.store(q_row + c, _codes(v, scale, rcp, FAST))
    else:
        tl.store(q_row + c, _codes(v, scale, rcp, FAST), mask=c < K)


@triton.jit
def _act_quant_row_kernel(x_ptr, q_ptr, s_ptr, stride_x, stride_q, K: tl.constexpr, DYNAMIC: tl.constexpr,
                          STATIC_ROWS: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
                          ON_GPU: tl.constexpr, FAST: tl.constexpr, SWIGLU: tl.constexpr = False):
    """The row whole in registers as pieces ``P0, P1, P2`` (:func:`row_pieces`; 0: absent), read once."""
    wait_then_release(ON_GPU)  # launched dependent on x's producer; the GEMM that consumes the codes launches early
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * stride_q
    v0 = _load(x_row, tl.arange(0, P0), K, SWIGLU, P0 > K)  # every piece requested before the first reduction,
    if P1 > 0:  # whose barriers no load may pass
        v1 = _load(x_row, P0 + tl.arange(0, P1), K, SWIGLU, P0 + P1 > K)
    if P2 > 0:
        v2 = _load(x_row, P0 + P1 + tl.arange(0, P2), K, SWIGLU, P0 + P1 + P2 > K)
    amax = _piece_max(v0)
    if P1 > 0:
        amax = tl.maximum(amax, _piece_max(v1))
    if P2 > 0:
        amax = tl.maximum(amax, _piece_max(v2))
    scale, rcp = _row_scale(s_ptr, row, amax, DYNAMIC, STATIC_ROWS, FAST)
    _store_piece(q_row, v0, scale, rcp, 0, P0, K, FAST)
    if P1 > 0:
        _store_piece(q_row, v1, scale, rcp, P0, P1, K, FAST)
    if P2 > 0:
        _store_piece(q_row, v2, scale, rcp, P0 + P1, P2, K, FAST)


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, stride_x, stride_q, K: tl.constexpr, DYNAMIC: tl.constexpr,
                      STATIC_ROWS: tl.constexpr, BLOCK: tl.constexpr, ON_GPU: tl.constexpr, FAST: tl.constexpr,
                      SWIGLU: tl.constexpr = False):
    """The row in ``BLOCK``-element chunks, two passes: the absmax (when dynamic), then the codes (mostly from L2)."""
    wait_then_release(ON_GPU)
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * stride_q
    cols = tl.arange(0, BLOCK)
    amax = 0.0
    if DYNAMIC:
        acc = tl.full([BLOCK], 0.0, tl.float32)
        for i in range((K + BLOCK - 1) // BLOCK):
            acc = tl.maximum(acc, tl.abs(_load(x_row, i * BLOCK + cols, K, SWIGLU, True).to(tl.float32)))
        amax = tl.reduce(acc, 0, _maximum)
    scale, rcp = _row_scale(s_ptr, row, amax, DYNAMIC, STATIC_ROWS, FAST)
    for i in range((K + BLOCK - 1) // BLOCK):
        c = i * BLOCK + cols
        tl.store(q_row + c, _codes(_load(x_row, c, K, SWIGLU, True), scale, rcp, FAST), mask=c < K)


def quantize_activations_triton(x: torch.Tensor, static_scale: torch.Tensor | None = None, swiglu: bool = False,
                                config: AqConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Int8 codes ``[M, K]`` and fp32 scales of a 2-D ``x`` (fp16/bf16/fp32), as the reference computes them.

    ``swiglu``: ``x`` is a fused gate/up output ``[M, 2K]`` and the codes are those of
    :func:`dgq.formats.swiglu` of it, formed as the kernel reads ``x`` (no ``[M, K]`` product in memory).
    Its SiLU's exponential and division are the GPU's fast ones (:func:`_swiglu`), so a code may differ by one from
    the reference's where a product lands within a few fp32 ulps of an fp16 rounding boundary.

    Dynamic mode (``static_scale is None``) returns per-row scales ``[M, 1]``; static mode returns the given
    scale as ``[1, 1]``, or, given one static scale per row (``[M, 1]``: a layer whose first positions have their
    own, :attr:`dgq.nn.QuantLinear.first_scale`), those, matching :func:`dgq.formats.quantize_activations`' shapes.

    ``config`` pins the kernel instead of :func:`config_for`'s rule (tests and probes reach every variant with it).
    """
    if x.dim() != 2:
        raise ValueError(f"expected a 2-D activation, got shape {list(x.shape)}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    m, k = x.shape
    if swiglu:
        if k % 2:
            raise ValueError(f"a fused gate/up input has an even width, got {k}")
        k //= 2
    if k == 0:
        raise ValueError("expected an activation with at least one column, got shape "
                         f"{list(x.shape)}")
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    per_row = static_scale is not None and static_scale.numel() > 1
    if static_scale is None:
        s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    elif per_row and static_scale.shape != (m, 1):
        raise ValueError(f"a static activation scale is one value or one per row ([{m}, 1]), got shape "
                         f"{list(static_scale.shape)}")
    else:
        s = static_scale.detach().to(device=x.device, dtype=torch.float32).reshape(-1, 1).contiguous()
    if m:
        _launch(x, q, s, k, static_scale is None, per_row, swiglu, config or config_for(m, k, swiglu))
    return q, s


def _launch(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, k: int, dynamic: bool, per_row: bool, swiglu: bool,
            cfg: AqConfig) -> None:
    """One act-quant launch, one program per row of ``x``, as ``cfg`` says."""
    on_gpu = x.device.type == "cuda"
    args = (x, q, s, x.stride(0), q.stride(0))
    common = dict(K=k, DYNAMIC=dynamic, STATIC_ROWS=int(per_row), ON_GPU=on_gpu, FAST=cfg.fast and on_gpu,
                  SWIGLU=swiglu, num_warps=cfg.warps, **launch_options(x.device))
    if cfg.in_registers:
        p0, p1, p2 = row_pieces(k)
        _act_quant_row_kernel[(x.shape[0],)](*args, P0=p0, P1=p1, P2=p2, **common)
    else:
        _act_quant_kernel[(x.shape[0],)](*args, BLOCK=row_block(k), **common)

