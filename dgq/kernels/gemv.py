"""The decode A8W4 GEMV: CUDA cores, four int8 products per ``dp4a``, no tensor-core padding.

At one token the tensor-core kernel (:mod:`dgq.kernels.gemm`) pads the token tile to 16 and holds a 93-register
program whose weight stream reaches 48-71% of the copy bandwidth (BENCHMARKS.md).  Here each program streams
``[BLOCK_N, TPI tiles]`` of the packed weight as 32-bit words (16-byte loads per thread), widens each word into two
words of four int8 weights with the same byte-lane identity as the GEMM (:data:`dgq.kernels.gemm._WIDEN_PTX`), and
multiplies each against the matching word of four int8 activation codes with one ``dp4a`` (int32 accumulation, so
the sum is exact in any order).  The activation words line up with the weight words because the kernel layout puts
``k = j`` and ``k = TILE_K/2 + j`` in byte ``j`` of a tile: weight word ``w`` of a tile holds the low nibbles of
``k = 4w..4w+3`` and the high nibbles of ``k = TILE_K/2 + 4w..+3``, which are activation words ``4w/4`` and
``(TILE_K/2 + 4w)/4`` of the tile.  Tokens are the grid's third axis (each re-reads the weight, mostly from L2),
so the path is for the first few tokens only (:data:`dgq.kernels.linear.GEMV_MAX_M`).

Long K is split across programs (``SPLIT_K``): each split stores its int32 partial sums to a buffer allocated per call
(a captured CUDA graph owns its own), then counts one arrival per program on its tile's counter; the split that
arrives last adds the others' partials (integer sums: exact in any order) and applies the epilogue.  One acq_rel
atomic per program, not per output: the per-output protocol cost the warp-specialized GEMM 2-5x
(benchmarks/notes_gemm.md).  The counters are the layer's own (:attr:`dgq.kernels.gemm.KernelWeight.split_scratch`),
which the last split rearms, so no zeroing kernel runs before the GEMV (it cost a launch, ~2.5 us, on a ~15 us call)
and nothing is ever reallocated under a captured CUDA graph.  The price: calls on one layer must be ordered on one
stream, as a model's forward is.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from dgq.kernels.act_quant import _dynamic_scale, _round_clamp_s8
from dgq.kernels.gemm import KernelWeight, _use_asm, widen_ptx
from dgq.kernels.pdl import launch_options

# pack=1: s2 / c * 0x01010101 of the low nibbles are $3 / $4, of the high $5 / $6 (see dgq.kernels.gemm.widen_ptx).
_WIDEN_WORD_PTX = tl.constexpr(widen_ptx("$3", "$4", "$5", "$6"))

# $0 = $3 + dot(int8x4 $1, int8x4 $2) + dot(int8x4 $4, int8x4 $5): two dp4a, one per nibble half.
_DP4A2_PTX = tl.constexpr("""{
.reg .s32 t;
dp4a.s32.s32 t, $1, $2, $3;
dp4a.s32.s32 $0, $4, $5, t;
}""")


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _weight_chunk(w_rows, s2_ptr, zp_ptr, offs_n, n_mask, tile, valid, N, GROUP: tl.constexpr,
                  TILE_K: tl.constexpr, N_TILES: tl.constexpr):
    """Packed words ``[BLOCK_N, TPI, TW]`` of K tiles ``tile`` and their groups' s2/zp as int32 ``[BLOCK_N, TPI, 1]``;
    tiles past K (or not ``valid``) read as s2 = zp = 0 and code 0: weight 0."""
    TW: tl.constexpr = TILE_K // 8
    in_k = (tile < N_TILES) & valid
    wm = n_mask[:, None, None] & in_k[None, :, None]
    p = tl.load(w_rows + (tile * TW)[None, :, None] + tl.arange(0, TW)[None, None, :], mask=wm, other=0)
    sm = n_mask[:, None] & in_k[None, :]
    g_lo = (tile * TILE_K) // GROUP
    g_hi = (tile * TILE_K + TILE_K // 2) // GROUP
    s_lo = tl.load(s2_ptr + g_lo[None, :] * N + offs_n[:, None], mask=sm, other=0).to(tl.int32)[:, :, None]
    z_lo = tl.load(zp_ptr + g_lo[None, :] * N + offs_n[:, None], mask=sm, other=0).to(tl.int32)[:, :, None]
    s_hi = tl.load(s2_ptr + g_hi[None, :] * N + offs_n[:, None], mask=sm, other=0).to(tl.int32)[:, :, None]
    z_hi = tl.load(zp_ptr + g_hi[None, :] * N + offs_n[:, None], mask=sm, other=0).to(tl.int32)[:, :, None]
    return p, s_lo, z_lo, s_hi, z_hi


@triton.jit
def _activation_words(x_row, tile, sx, N_TILES: tl.constexpr, TILE_K: tl.constexpr, FUSE_QUANT: tl.constexpr):
    """The activation words ``[1, TPI, TW]`` that meet a chunk's low and high nibbles: int8 codes read as words, or
    (``FUSE_QUANT``) float activations rounded here; tiles past K read as zeros."""
    TW: tl.constexpr = TILE_K // 8
    w_loc = tl.arange(0, TW)
    in_k = tile < N_TILES
    if FUSE_QUANT:
        x_lo = _code_words(x_row, tile * TILE_K, in_k, sx, TW)
        x_hi = _code_words(x_row, tile * TILE_K + TILE_K // 2, in_k, sx, TW)
    else:
        x_lo = tl.load(x_row + (tile * (TILE_K // 4))[None, :, None] + w_loc[None, None, :],
                       mask=in_k[None, :, None], other=0)
        x_hi = tl.load(x_row + (tile * (TILE_K // 4) + TILE_K // 8)[None, :, None] + w_loc[None, None, :],
                       mask=in_k[None, :, None], other=0)
    return x_lo, x_hi


@triton.jit
def _chunk_dot(acc, p, s_lo, z_lo, s_hi, z_hi, x_lo, x_hi, USE_ASM: tl.constexpr):
    """``acc`` plus one chunk's products: each packed word widened to two words of four int8 weights, each against
    its activation word with one ``dp4a`` (or byte by byte where PTX cannot run)."""
    if USE_ASM:
        c_lo = ((128 - s_lo * z_lo).to(tl.uint32, bitcast=True) * 0x01010101).to(tl.int32, bitcast=True)
        c_hi = ((128 - s_hi * z_hi).to(tl.uint32, bitcast=True) * 0x01010101).to(tl.int32, bitcast=True)
        w_lo, w_hi = tl.inline_asm_elementwise(_WIDEN_WORD_PTX, "=r,=r,r,r,r,r,r", [p, s_lo, c_lo, s_hi, c_hi],
                                               dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
        acc = tl.inline_asm_elementwise(_DP4A2_PTX, "=r,r,r,r,r,r", [w_lo, x_lo, acc, w_hi, x_hi],
                                        dtype=tl.int32, is_pure=True, pack=1)
    else:  # plain integer arithmetic, byte by byte (the CPU interpreter cannot run PTX)
        for b in tl.static_range(4):
            q = (p >> (8 * b)) & 0xFF
            xl = (x_lo << (24 - 8 * b)) >> 24
            xh = (x_hi << (24 - 8 * b)) >> 24
            acc += ((q & 15) * s_lo - s_lo * z_lo) * xl + ((q >> 4) * s_hi - s_hi * z_hi) * xh
    return acc


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s2_ptr, zp_ptr, sx_ptr, s1_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
                 M, N, stride_xw, stride_o, stride_sx,
                 K: tl.constexpr, GROUP: tl.constexpr, TILE_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                 USE_ASM: tl.constexpr, BLOCK_N: tl.constexpr, TPI: tl.constexpr, SPLIT_K: tl.constexpr,
                 FUSE_QUANT: tl.constexpr = False, DYNAMIC: tl.constexpr = True, X_BLOCK: tl.constexpr = 4096):
    """``x_ptr``: the int8 codes viewed as int32 words ``[M, K/4]``, or with ``FUSE_QUANT`` the float activations
    ``[M, K]`` (row stride ``stride_xw`` either way), quantized here; ``w_ptr``: the packed codes as int32 ``[N, K/8]``.

    The weight words of chunk i+1 are requested before chunk i is computed (two chunks in flight per program), and
    the first chunk's before waiting for the grid that produces the activations: the weight does not depend on it.
    """
    pid_n, pid_k, m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    TW: tl.constexpr = TILE_K // 8  # 32-bit weight words per row of one K tile
    N_TILES: tl.constexpr = K // TILE_K
    CHUNKS: tl.constexpr = (N_TILES + SPLIT_K * TPI - 1) // (SPLIT_K * TPI)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    t_loc = tl.arange(0, TPI)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None, None] * (K // 8)
    x_row = x_ptr + m.to(tl.int64) * stride_xw
    first = pid_k * CHUNKS * TPI
    # the first chunk's weight words before waiting for the activations
    p, s_lo, z_lo, s_hi, z_hi = _weight_chunk(w_rows, s2_ptr, zp_ptr, offs_n, n_mask, first + t_loc, True, N,
                                              GROUP, TILE_K, N_TILES)
    if USE_ASM:
        tl.extra.cuda.gdc_wait()  # launched early (programmatic dependent launch): wait for the activations
    if FUSE_QUANT:
        sx = _row_scale(x_row, K, X_BLOCK) if DYNAMIC else tl.load(sx_ptr)
    else:
        sx = tl.load(sx_ptr + m * stride_sx)
    acc = tl.full([BLOCK_N, TPI, TW], 0, tl.int32)
    for i in range(CHUNKS):  # chunk i + 1's weight words requested before chunk i is computed
        tile = first + i * TPI + t_loc  # [TPI]
        x_lo, x_hi = _activation_words(x_row, tile, sx, N_TILES, TILE_K, FUSE_QUANT)
        nxt = _weight_chunk(w_rows, s2_ptr, zp_ptr, offs_n, n_mask, tile + TPI, i + 1 < CHUNKS, N, GROUP, TILE_K,
                            N_TILES)
        acc = _chunk_dot(acc, p, s_lo, z_lo, s_hi, z_hi, x_lo, x_hi, USE_ASM)
        p, s_lo, z_lo, s_hi, z_hi = nxt
    total = tl.reduce(tl.reduce(acc, 2, _add), 1, _add)  # [BLOCK_N] (tl.reduce: see dgq.kernels.act_quant)
    mask = n_mask
    if SPLIT_K > 1:  # exact int32 reduction across splits: the split that arrives last adds the others' partials
        offs = m.to(tl.int64) * N + offs_n
        tl.store(ws_ptr + pid_k * M * N + offs, total, mask=mask)
        tl.debug_barrier()  # every thread's partial, then one arrival per program (release) on the tile's count
        tile = m * tl.num_programs(0) + pid_n
        last = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel") == SPLIT_K - 1
        mask = mask & last
        for j in tl.static_range(SPLIT_K):
            total += tl.load(ws_ptr + j * M * N + offs, mask=mask & (pid_k != j), other=0, cache_modifier=".cg")
        tl.atomic_xchg(cnt_ptr + tile, 0, mask=last, sem="relaxed")  # rearmed for the layer's next call
    s1 = tl.load(s1_ptr + offs_n, mask=n_mask, other=0.0)
    val = total.to(tl.float32) * sx * s1  # the reference's order: (acc * s_x) * s1 (+ bias)
    if HAS_BIAS:
        val += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    out_ptrs = out_ptr + m.to(tl.int64) * stride_o + offs_n
    tl.store(out_ptrs, val.to(out_ptrs.dtype.element_ty), mask=mask)


def _cfg(bn: int, tpi: int, split_k: int, warps: int, stages: int = 1) -> triton.Config:
    return triton.Config({"BLOCK_N": bn, "TPI": tpi, "SPLIT_K": split_k}, num_warps=warps, num_stages=stages)


@functools.cache  # asked twice per one-token call (quantizes_inside, then the launch): host time on decode
def config_for(n: int, k: int, tile_k: int) -> triton.Config:
    """The measured rule (H100, cold-L2 graph replays over the five benchmark shapes, benchmarks/notes_gemm.md): about
    512 programs (four per SM) of 128 weight rows and one K tile per chunk; 64 rows for wide layers (N > 16384, 4
    tiles per chunk) and long K (K >= 16384, 2 tiles).  It replaced an autotuner whose warm, launch-timed picks were
    up to 20% slower in a captured graph (4096 x 11008: 2.24x FP16 against 2.87x) and which timed six variants on a
    model's first call."""
    bn, tpi = (64, 2) if k >= 16384 else (64, 4) if n > 16384 else (128, 1)
    tiles, chunks = triton.cdiv(n, bn), k // tile_k // tpi
    split = 1
    while split < 16 and tiles * split * 2 <= 512 and split * 2 <= chunks:
        split *= 2
    return _cfg(bn, tpi, split, 4)


FUSE_MAX_ROW_BLOCKS = 32


def quantizes_inside(n: int, k: int, tile_k: int) -> bool:
    """Whether :func:`a8w4_gemv_float` (one launch) beats act-quant + :func:`a8w4_gemv` for this layer: each of the
    rule's row blocks re-reads the row for its absmax and rounds its own K range again, so the fused kernel's extra
    work grows with N / BLOCK_N.  Measured (H100, cold-L2 graphs, notes): with 32 row blocks (N = 4096) fused
    7.2 / 14.0 us against 7.9 / 16.3 us; with 86-448 (N = 8192..28672) 15.4 / 78.1 / 71.2 us against
    14.2 / 64.4 / 60.4 us."""
    return triton.cdiv(n, config_for(n, k, tile_k).kwargs["BLOCK_N"]) <= FUSE_MAX_ROW_BLOCKS


# Variants the tests pin (the rule's kinds of config, and narrower programs).
CONFIGS = [_cfg(*c) for c in [(128, 1, 16, 4), (64, 2, 4, 4), (64, 4, 1, 4), (64, 1, 16, 2), (32, 4, 8, 2)]]


@triton.jit
def _row_scale(x_row, K: tl.constexpr, X_BLOCK: tl.constexpr):
    """One row's dynamic scale, computed as :mod:`dgq.kernels.act_quant` does (fp32 absmax / 127, IEEE division):
    the same value in every program.  The steps are unrolled so their loads are independent (one L2 round trip, not
    K / X_BLOCK dependent ones: a loop of dependent loads made the first fused version 4x slower, notes)."""
    cols = tl.arange(0, X_BLOCK)
    amax = tl.full([X_BLOCK], 0.0, tl.float32)
    for i in tl.static_range((K + X_BLOCK - 1) // X_BLOCK):
        c = i * X_BLOCK + cols
        amax = tl.maximum(amax, tl.abs(tl.load(x_row + c, mask=c < K, other=0.0).to(tl.float32)))
    return _dynamic_scale(amax)


@triton.jit
def _code_words(x_row, k0, in_k, sx, TW: tl.constexpr):
    """Int8 codes of ``x[k0 + 4w .. k0 + 4w + 3]`` (per tile of ``k0 [TPI]``, ``w < TW``) packed four to an int32 word
    ``[1, TPI, TW]``, byte b = element 4w + b: the act-quant's rounding, in the layout the GEMV's ``dp4a`` reads."""
    b = tl.arange(0, 4)
    offs = k0[None, :, None, None] + (4 * tl.arange(0, TW))[None, None, :, None] + b[None, None, None, :]
    v = tl.load(x_row + offs, mask=in_k[None, :, None, None], other=0.0).to(tl.float32)
    q = _round_clamp_s8(tl.math.div_rn(v, sx)).to(tl.int32) & 0xFF
    return tl.reduce(q << (8 * b)[None, None, None, :], 3, _add)  # disjoint bytes: the sum is their OR


def a8w4_gemv(x_s8: torch.Tensor, kw: KernelWeight, s_x: torch.Tensor, bias: torch.Tensor | None = None,
              out_dtype: torch.dtype = torch.float16, config: triton.Config | None = None) -> torch.Tensor:
    """``(s_x * s1) * (x_s8 @ W_s8ᵀ) + bias`` for a few tokens ``x_s8`` int8 ``[M, K]`` (``s_x`` per token or static).

    Same result as :func:`dgq.kernels.gemm.a8w4_matmul` bit for bit in the accumulator.  ``config`` pins one
    configuration instead of the rule :func:`config_for` (tests).
    """
    if x_s8.dtype != torch.int8 or x_s8.dim() != 2 or x_s8.shape[1] != kw.in_features:
        raise ValueError(f"x_s8 must be int8 [M, {kw.in_features}], got {x_s8.dtype}{list(x_s8.shape)}")
    x_s8 = x_s8 if x_s8.stride(1) == 1 and x_s8.stride(0) % 4 == 0 else x_s8.contiguous()
    sx = s_x.reshape(-1).float()
    return _launch(x_s8.view(torch.int32), x_s8.stride(0) // 4, kw, sx, int(sx.numel() > 1), bias, out_dtype, config,
                   fuse_quant=False)


def a8w4_gemv_float(x: torch.Tensor, kw: KernelWeight, static_scale: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16,
                    config: triton.Config | None = None) -> torch.Tensor:
    """The GEMV from float activations ``x [M, K]``, quantized inside the kernel (per token, or by ``static_scale``)
    with :mod:`dgq.kernels.act_quant`'s arithmetic, so the result is :func:`a8w4_gemv`'s on that kernel's codes, bit
    for bit, in one launch instead of two.  Every program reads its row whole for the dynamic scale (K elements from
    L2, beside the weight it streams), which costs less at one token than the act-quant's launch (notes)."""
    if x.dim() != 2 or x.shape[1] != kw.in_features or not x.is_floating_point():
        raise ValueError(f"x must be a float [M, {kw.in_features}], got {x.dtype}{list(x.shape)}")
    x = x if x.stride(1) == 1 else x.contiguous()
    # dynamic: the kernel computes each row's scale itself and never reads sx_ptr (any fp32 tensor stands in)
    sx = kw.s1 if static_scale is None else static_scale.detach().to(device=x.device, dtype=torch.float32).reshape(1)
    return _launch(x, x.stride(0), kw, sx, 0, bias, out_dtype, config, fuse_quant=True,
                   dynamic=static_scale is None)


def _launch(x: torch.Tensor, stride_xw: int, kw: KernelWeight, sx: torch.Tensor, stride_sx: int,
            bias: torch.Tensor | None, out_dtype: torch.dtype, config: triton.Config | None, fuse_quant: bool,
            dynamic: bool = True) -> torch.Tensor:
    m, k = x.shape[0], kw.in_features
    n = kw.out_features
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m == 0:
        return out
    config = config or config_for(n, k, kw.tile_k)
    split = config.kwargs["SPLIT_K"]
    # Split-K partials per call (a captured CUDA graph owns its own); the per-program arrival counts are the layer's
    # scratch, left zeroed by every call.
    cnt = kw.split_scratch
    if split > 1 and triton.cdiv(n, config.kwargs["BLOCK_N"]) * m > cnt.numel():
        raise ValueError(f"the GEMV serves a few tokens; {m} rows exceed the layer's split-K count slots")
    ws = torch.empty((split, m, n), dtype=torch.int32, device=x.device) if split > 1 else cnt
    grid = (triton.cdiv(n, config.kwargs["BLOCK_N"]), split, m)
    _gemv_kernel[grid](x, kw.codes.view(torch.int32), kw.s2t, kw.zpt, sx, kw.s1, bias if bias is not None else cnt,
                       out, ws, cnt, m, n, stride_xw, out.stride(0), stride_sx, K=k, GROUP=kw.group_size,
                       TILE_K=kw.tile_k, HAS_BIAS=bias is not None, USE_ASM=_use_asm(x.device), FUSE_QUANT=fuse_quant,
                       DYNAMIC=dynamic, X_BLOCK=min(triton.next_power_of_2(k), 4096), **config.kwargs,
                       num_warps=config.num_warps, num_stages=config.num_stages, **launch_options(x.device))
    return out
