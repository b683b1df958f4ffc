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

Long K is split across programs (``SPLIT_K``) with the GEMM's exact int32 atomic reduction.  At one token the
reduction slots are the layer's own (:attr:`dgq.kernels.gemm.KernelWeight.gemv_scratch`, ``2 N`` int32), which the
split that completes an output leaves zeroed again, so no zeroing kernel runs before the GEMV (it cost a launch,
~2.5 us, on a ~15 us call) and nothing is ever reallocated under a captured CUDA graph.  The price: calls on one
layer must be ordered on one stream, as a model's forward is.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dgq.kernels.gemm import KernelWeight, _use_asm, launch, launch_options, widen_ptx

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
def _gemv_kernel(x_ptr, w_ptr, s2_ptr, zp_ptr, sx_ptr, s1_ptr, bias_ptr, out_ptr, ws_ptr,
                 M, N, stride_xw, stride_o, stride_sx,
                 K: tl.constexpr, GROUP: tl.constexpr, TILE_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                 USE_ASM: tl.constexpr, BLOCK_N: tl.constexpr, TPI: tl.constexpr, SPLIT_K: tl.constexpr):
    """``x_ptr``: the int8 codes viewed as int32 words ``[M, K/4]``; ``w_ptr``: the packed codes as int32 ``[N, K/8]``.

    The weight words of chunk i+1 are requested before chunk i is computed (two chunks in flight per program), and
    the first chunk's before waiting for the act-quant grid: the weight does not depend on it.
    """
    pid_n, pid_k, m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    TW: tl.constexpr = TILE_K // 8  # 32-bit weight words per row of one K tile
    N_TILES: tl.constexpr = K // TILE_K
    CHUNKS: tl.constexpr = (N_TILES + SPLIT_K * TPI - 1) // (SPLIT_K * TPI)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    t_loc = tl.arange(0, TPI)
    w_loc = tl.arange(0, TW)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None, None] * (K // 8)
    x_row = x_ptr + m.to(tl.int64) * stride_xw
    first = pid_k * CHUNKS * TPI
    p, s_lo, z_lo, s_hi, z_hi = _weight_chunk(w_rows, s2_ptr, zp_ptr, offs_n, n_mask, first + t_loc, True, N,
                                              GROUP, TILE_K, N_TILES)
    if USE_ASM:
        tl.extra.cuda.gdc_wait()  # launched early (programmatic dependent launch): wait for the act-quant's codes
    acc = tl.full([BLOCK_N, TPI, TW], 0, tl.int32)
    for i in range(CHUNKS):
        tile = first + i * TPI + t_loc  # [TPI]
        in_k = tile < N_TILES
        x_lo = tl.load(x_row + (tile * (TILE_K // 4))[None, :, None] + w_loc[None, None, :], mask=in_k[None, :, None],
                       other=0)
        x_hi = tl.load(x_row + (tile * (TILE_K // 4) + TILE_K // 8)[None, :, None] + w_loc[None, None, :],
                       mask=in_k[None, :, None], other=0)
        nxt = _weight_chunk(w_rows, s2_ptr, zp_ptr, offs_n, n_mask, tile + TPI, i + 1 < CHUNKS, N, GROUP, TILE_K,
                            N_TILES)
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
        p, s_lo, z_lo, s_hi, z_hi = nxt
    total = tl.reduce(tl.reduce(acc, 2, _add), 1, _add)  # [BLOCK_N] (tl.reduce: see dgq.kernels.act_quant)
    mask = n_mask
    if SPLIT_K > 1:  # exact int32 reduction across splits; the last split to arrive applies the epilogue
        offs = m.to(tl.int64) * N + offs_n
        tl.atomic_add(ws_ptr + offs, total, mask=mask, sem="relaxed")
        arrived = tl.atomic_add(ws_ptr + M * N + offs, 1, mask=mask, sem="acq_rel")
        mask = mask & (arrived == SPLIT_K - 1)
        total = tl.atomic_xchg(ws_ptr + offs, 0, mask=mask, sem="acquire")  # the sum; its slot is left zeroed,
        tl.atomic_xchg(ws_ptr + M * N + offs, 0, mask=mask, sem="relaxed")  # and the count (the layer's scratch)
    sx = tl.load(sx_ptr + m * stride_sx)
    s1 = tl.load(s1_ptr + offs_n, mask=n_mask, other=0.0)
    val = total.to(tl.float32) * sx * s1  # the reference's order: (acc * s_x) * s1 (+ bias)
    if HAS_BIAS:
        val += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    out_ptrs = out_ptr + m.to(tl.int64) * stride_o + offs_n
    tl.store(out_ptrs, val.to(out_ptrs.dtype.element_ty), mask=mask)


def _cfg(bn: int, tpi: int, split_k: int, warps: int, stages: int = 1) -> triton.Config:
    return triton.Config({"BLOCK_N": bn, "TPI": tpi, "SPLIT_K": split_k}, num_warps=warps, num_stages=stages)


# The configs the autotuner chose in benchmarks/gemm_variants.py over the five benchmark shapes (plus one spare).
CONFIGS = [_cfg(*c) for c in [(64, 4, 8, 4), (64, 2, 4, 4), (64, 2, 8, 4), (64, 1, 16, 2), (32, 4, 8, 2),
                              (128, 1, 8, 4)]]


_tuned = triton.autotune(CONFIGS, key=["N", "K", "GROUP", "HAS_BIAS"], reset_to_zero=["ws_ptr"])(_gemv_kernel)
_chosen_split: dict[tuple, int] = {}


def a8w4_gemv(x_s8: torch.Tensor, kw: KernelWeight, s_x: torch.Tensor, bias: torch.Tensor | None = None,
              out_dtype: torch.dtype = torch.float16, config: triton.Config | None = None) -> torch.Tensor:
    """``(s_x * s1) * (x_s8 @ W_s8ᵀ) + bias`` for a few tokens ``x_s8`` int8 ``[M, K]`` (``s_x`` per token or static).

    Same result as :func:`dgq.kernels.gemm.a8w4_matmul` bit for bit in the accumulator.  ``config`` pins one
    configuration instead of autotuning (tests).
    """
    if x_s8.dtype != torch.int8 or x_s8.dim() != 2 or x_s8.shape[1] != kw.in_features:
        raise ValueError(f"x_s8 must be int8 [M, {kw.in_features}], got {x_s8.dtype}{list(x_s8.shape)}")
    x_s8 = x_s8 if x_s8.stride(1) == 1 and x_s8.stride(0) % 4 == 0 else x_s8.contiguous()
    m, k = x_s8.shape
    n = kw.out_features
    out = torch.empty((m, n), dtype=out_dtype, device=x_s8.device)
    if m == 0:
        return out
    sx = s_x.reshape(-1).float()
    key = (n, k, kw.group_size, bias is not None, out_dtype)
    split = config.kwargs["SPLIT_K"] if config else _chosen_split.get(key, 0)
    if m == 1:  # the layer's own slots, left zeroed by every call: no zeroing launch before this one
        ws = kw.gemv_scratch
    else:
        ws = torch.zeros(2 * m * n if split != 1 else 1, dtype=torch.int32, device=x_s8.device)
    args = (x_s8.view(torch.int32), kw.codes.view(torch.int32), kw.s2t, kw.zpt, sx, kw.s1,
            bias if bias is not None else ws, out, ws, m, n, x_s8.stride(0) // 4, out.stride(0), int(sx.numel() > 1))
    meta = dict(K=k, GROUP=kw.group_size, TILE_K=kw.tile_k, HAS_BIAS=bias is not None,
                USE_ASM=_use_asm(x_s8.device), **launch_options(x_s8.device))

    def grid(c: dict) -> tuple[int, int, int]:
        return triton.cdiv(n, c["BLOCK_N"]), c["SPLIT_K"], m

    _chosen_split[key] = launch(_tuned, _gemv_kernel, grid, args, meta, config).kwargs["SPLIT_K"]
    return out
