"""Probe: an A8W4 GEMM whose two MMA warpgroups widen their own weight rows into the ``wgmma`` register operand and
take turns on the tensor cores (ping-pong), so one widens while the other's MMAs run.

Why: at M >= 1024 the warp-specialized kernel (:mod:`dgq.kernels.gemm_ws`) is bound by shared memory (ncu, session
10: L1/TEX 64-70% busy, tensor pipe about half): per 128-wide K tile of a 128 x 256 tile its widen warps write the
int8 weight to shared memory and the MMAs read it back (32 KB of 160).  Widening into registers removes that
traffic, but in session 10 one warpgroup could not overlap its widening with its own MMAs exactly: nothing keeps an
asynchronous MMA's A registers live until its wait, and ptxas reused them (``gemm_rs`` at df6fa75: a race).  Here
each warpgroup waits for its own MMAs before it widens again (exact by construction), and the overlap comes from the
other warpgroup: an order barrier makes them issue their MMAs in turn, so while warpgroup 0's MMAs run, warpgroup 1
widens, and the other way round.

Partitions: warpgroup 0 (the default partition) and warpgroup 1 (a worker) each own 64 of the tile's 128 weight rows
and a ``[64, BM]`` int32 accumulator; one load warp fills :func:`dgq.kernels.gemm_ws._load_part`'s ring (both
warpgroups release each slot: its barriers count two arrivals).  Persistent grid of one CTA per SM, no K split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from dgq.kernels.gemm import KernelWeight, prepare_call
from dgq.kernels.gemm_ws import (
    HALF, WsConfig, _epilogue, _gdc_wait, _load_part, _sm_count, _unit, _widen, descriptors,
)
from dgq.kernels.pdl import launch_options

ROWS = gl.constexpr(64)  # weight rows per warpgroup: one wgmma's M


@gluon.jit
def _pp_unit(w_bufs, s2v, zpv, xlo_bufs, xhi_bufs, load_ready, w_empty, x_empty, my_turn, their_turn, sx_ptr,
             s1_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, stride_sx, u, c, n_tiles, m_tiles, tiles,
             BM: gl.constexpr, EPILOGUE: gl.constexpr, HAS_BIAS: gl.constexpr, PDL: gl.constexpr,
             HI_ROW: gl.constexpr, WG: gl.constexpr):
    """Unit ``u``'s K tiles (the rings' ``c``-th on) for this warpgroup's 64 weight rows, then its epilogue."""
    stages: gl.constexpr = xlo_bufs.shape[0]
    srows: gl.constexpr = s2v.shape[0] // stages
    bn: gl.constexpr = w_bufs.shape[1]
    INSTR_N: gl.constexpr = min(BM, 128)
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, INSTR_N, 32])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=4)
    rows: gl.constexpr = gl.SliceLayout(1, a_layout)
    r0: gl.constexpr = WG * ROWS
    n_tile, m_tile, sid, kt0, k_tiles = _unit(u, n_tiles, m_tiles, tiles, 1, True)
    acc = gl.zeros((ROWS, BM), gl.int32, acc_layout)
    for i in range(k_tiles):
        j = c + i
        s = j % stages
        mbarrier.wait(load_ready.index(s), (j // stages) & 1)
        p = w_bufs.index(s).slice(r0, ROWS, 0).load(a_layout)
        s_lo = s2v.index(s * srows).slice(r0, ROWS).load(rows).to(gl.int32)
        z_lo = zpv.index(s * srows).slice(r0, ROWS).load(rows).to(gl.int32)
        s_hi = s2v.index(s * srows + HI_ROW).slice(r0, ROWS).load(rows).to(gl.int32)
        z_hi = zpv.index(s * srows + HI_ROW).slice(r0, ROWS).load(rows).to(gl.int32)
        fence_async_shared()  # these generic-proxy reads, then the slot's next bulk copy
        mbarrier.arrive(w_empty.index(s), count=1)
        w_lo, w_hi = _widen(p, s_lo, z_lo, s_hi, z_hi, False)
        # my turn: the other warpgroup has issued its MMAs of the tile before (warpgroup 1: of this one)
        mbarrier.wait(my_turn, (j & 1) ^ (1 - WG))
        acc = warpgroup_mma(w_lo, xlo_bufs.index(s).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma(w_hi, xhi_bufs.index(s).permute((1, 0)), acc, is_async=True)
        mbarrier.arrive(their_turn, count=1)
        acc = warpgroup_mma_wait(0, deps=[acc])  # retired before this warpgroup's next widening writes registers
        mbarrier.arrive(x_empty.index(s), count=1)
    if PDL:
        _gdc_wait()  # the epilogue reads the act-quant's scales
    if EPILOGUE:
        _scaled_epilogue(acc, sx_ptr, s1_ptr, bias_ptr, out_ptr, M, N, stride_sx, n_tile * bn + r0, m_tile * BM,
                         HAS_BIAS)
    else:
        _epilogue(acc, sx_ptr, s1_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, stride_sx, n_tile * bn + r0,
                  m_tile * BM, sid, m_tile * n_tiles + n_tile, BM, 1, EPILOGUE, HAS_BIAS)
    return c + k_tiles


@gluon.jit
def _scaled_epilogue(acc, sx_ptr, s1_ptr, bias_ptr, out_ptr, M, N, stride_sx, n0, m0, HAS_BIAS: gl.constexpr):
    """``(acc * s_x) * s1 (+ bias)`` in fp32 in the accumulator's own layout (in place: no second register copy of
    the tile), rounded to the output dtype, and only then moved to a store-friendly layout (half the bytes)."""
    bn: gl.constexpr = acc.shape[0]
    BM: gl.constexpr = acc.shape[1]
    acc_rows: gl.constexpr = gl.SliceLayout(1, acc.type.layout)
    acc_cols: gl.constexpr = gl.SliceLayout(0, acc.type.layout)
    an = n0 + gl.arange(0, bn, layout=acc_rows)
    am = m0 + gl.arange(0, BM, layout=acc_cols)
    sx = gl.load(sx_ptr + am * stride_sx, mask=am < M, other=0.0)
    s1 = gl.load(s1_ptr + an, mask=an < N, other=0.0)
    val = acc.to(gl.float32) * gl.expand_dims(sx, 0) * gl.expand_dims(s1, 1)
    if HAS_BIAS:
        val += gl.expand_dims(gl.load(bias_ptr + an, mask=an < N, other=0.0).to(gl.float32), 1)
    out_layout: gl.constexpr = gl.BlockedLayout([1, 1], [32, 1], [4, 1], [0, 1])  # n fastest: coalesced out[m, n]
    res = gl.convert_layout(val.to(out_ptr.dtype.element_ty), out_layout)
    offs_n = n0 + gl.arange(0, bn, layout=gl.SliceLayout(1, out_layout))
    offs_m = m0 + gl.arange(0, BM, layout=gl.SliceLayout(0, out_layout))
    mask = gl.expand_dims(offs_m < M, 0) & gl.expand_dims(offs_n < N, 1)
    gl.store(out_ptr + gl.expand_dims(offs_m, 0) * N + gl.expand_dims(offs_n, 1), res, mask=mask)


@gluon.jit
def _pp_mma_part(w_bufs, s2_bufs, zp_bufs, xlo_bufs, xhi_bufs, load_ready, w_empty, x_empty, turns, sx_ptr, s1_ptr,
                 bias_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, stride_sx, n_tiles, m_tiles, tiles, units,
                 BM: gl.constexpr, EPILOGUE: gl.constexpr, HAS_BIAS: gl.constexpr, PDL: gl.constexpr,
                 HI_ROW: gl.constexpr, WG: gl.constexpr):
    stages: gl.constexpr = w_bufs.shape[0]
    srows: gl.constexpr = s2_bufs.shape[1]
    bn: gl.constexpr = w_bufs.shape[1]
    plain: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
    s2v = s2_bufs._reinterpret(gl.int8, [stages * srows, bn], plain)
    zpv = zp_bufs._reinterpret(gl.uint8, [stages * srows, bn], plain)
    c = 0
    for u in range(gl.program_id(0), units, gl.num_programs(0)):
        c = _pp_unit(w_bufs, s2v, zpv, xlo_bufs, xhi_bufs, load_ready, w_empty, x_empty, turns.index(WG),
                     turns.index(1 - WG), sx_ptr, s1_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, stride_sx, u, c,
                     n_tiles, m_tiles, tiles, BM, EPILOGUE, HAS_BIAS, PDL, HI_ROW, WG)


@gluon.jit
def _pp_a8w4_kernel(w_desc, x_desc, s2_desc, zp_desc, sx_ptr, s1_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K,
                    stride_sx, GROUP: gl.constexpr, BN: gl.constexpr, BM: gl.constexpr, STAGES: gl.constexpr,
                    EPILOGUE: gl.constexpr, HAS_BIAS: gl.constexpr, PDL: gl.constexpr, MMA_REGS: gl.constexpr):
    gl.static_assert(BN == 2 * ROWS, "two warpgroups of 64 weight rows")
    n_tiles = gl.cdiv(N, BN)
    m_tiles = gl.cdiv(M, BM)
    tiles = K // (2 * HALF)
    units = n_tiles * m_tiles
    srows: gl.constexpr = s2_desc.block_type.shape[0]
    w_bufs = gl.allocate_shared_memory(gl.uint8, [STAGES, BN, HALF], w_desc.layout)
    xlo_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BM, HALF], x_desc.layout)
    xhi_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BM, HALF], x_desc.layout)
    s2_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, srows, BN], s2_desc.layout)
    zp_bufs = gl.allocate_shared_memory(gl.uint8, [STAGES, srows, BN], zp_desc.layout)
    load_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    w_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    x_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(load_ready.index(i), count=1)
        mbarrier.init(w_empty.index(i), count=2)  # both warpgroups read each slot
        mbarrier.init(x_empty.index(i), count=2)
    for i in gl.static_range(2):
        mbarrier.init(turns.index(i), count=1)
    hi_row: gl.constexpr = 1 if GROUP == 64 else 0
    gl.warp_specialize([
        (_pp_mma_part, (w_bufs, s2_bufs, zp_bufs, xlo_bufs, xhi_bufs, load_ready, w_empty, x_empty, turns, sx_ptr,
                        s1_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, stride_sx, n_tiles, m_tiles, tiles, units,
                        BM, EPILOGUE, HAS_BIAS, PDL, hi_row, 0)),
        (_pp_mma_part, (w_bufs, s2_bufs, zp_bufs, xlo_bufs, xhi_bufs, load_ready, w_empty, x_empty, turns, sx_ptr,
                        s1_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, stride_sx, n_tiles, m_tiles, tiles, units,
                        BM, EPILOGUE, HAS_BIAS, PDL, hi_row, 1)),
        (_load_part, (w_desc, x_desc, s2_desc, zp_desc, w_bufs, xlo_bufs, xhi_bufs, s2_bufs, zp_bufs, load_ready,
                      w_empty, x_empty, n_tiles, m_tiles, tiles, units, BN, BM, 1, GROUP, PDL, True)),
    ], [4, 1], [MMA_REGS, 24])


@dataclass(frozen=True)
class PpConfig:
    """Tokens per tile (two 128-wide MMAs at 256) and ring slots; the tile always has 128 weight rows."""

    bm: int = 256
    stages: int = 4


BN = 128  # weight rows per CTA: two warpgroups of ROWS
MAXNREG = 168  # at launch: 12 warps (two MMA warpgroups, the load warp's warpgroup) x 32 x 168 <= 64K registers
MMA_REGS = 240  # then each MMA warpgroup takes 240 (its 64 x 256 int32 accumulator is 128) and the load warp 24
MIN_M = 65  # up to 64 tokens the warp-specialized kernel's small tiles (gemm_ws.config_for) serve
BIG_TILE_MIN_CTAS = 80  # measured (session 16): 86 tiles of 256 tokens won at M = 256 (4096 x 11008), 64 lost
SMALL_TILE_MIN_CTAS = 100  # 128-token tiles: 128 won at M = 256 (28672 x 8192), 64 lost (the N = 4096 layers)


def config_for(m: int, n: int) -> PpConfig | None:
    """The measured rule (``benchmarks/gemm_pp_probe.py``, session 16, notes): from :data:`MIN_M` tokens, 256-token
    tiles where they make at least :data:`BIG_TILE_MIN_CTAS` CTAs, else 128-token tiles (6 slots) where those make
    :data:`SMALL_TILE_MIN_CTAS`; else ``None``: too few tiles to fill the GPU, where the warp-specialized kernel's
    64-row tiles won (M = 256 on 4096 x 4096: 17.1 against 19.7 us)."""
    if m < MIN_M:
        return None
    if triton.cdiv(m, 256) * (n // BN) >= BIG_TILE_MIN_CTAS:
        return PpConfig(256, 4)
    if triton.cdiv(m, 128) * (n // BN) >= SMALL_TILE_MIN_CTAS:
        return PpConfig(128, 6)
    return None


def pp_a8w4_matmul(x_s8: torch.Tensor, kw: KernelWeight, s_x: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = torch.float16,
                   config: PpConfig | None = None) -> torch.Tensor:
    """A8W4 GEMM of int8 codes ``x_s8 [M, K]`` with scales ``s_x``, as :func:`dgq.kernels.gemm_ws.ws_a8w4_matmul`
    (same layers: :func:`dgq.kernels.gemm_ws.supported`; ``out_dtype=None``: the raw int32 accumulator).
    ``config`` pins a variant instead of :func:`config_for`'s (256-token tiles where the rule has none)."""
    x, out = prepare_call(x_s8, kw, out_dtype)
    if not x.is_contiguous() or x.data_ptr() % 16:  # TMA: dense rows and a 16-byte-aligned start
        x = x.clone(memory_format=torch.contiguous_format)
    m, k = x.shape
    n = kw.out_features
    epilogue = out_dtype is not None
    if m == 0:
        return out
    cfg = config or config_for(m, n) or PpConfig()
    dummy = kw.split_scratch  # stands in for the pointers an unsplit kernel does not read
    sx = s_x.reshape(-1).float() if epilogue else dummy
    units = triton.cdiv(n, BN) * triton.cdiv(m, cfg.bm)
    options = launch_options(x.device)
    _pp_a8w4_kernel[(min(units, _sm_count(x.device)),)](
        *descriptors(x, kw, WsConfig(BN, cfg.bm, cfg.stages, 1)), sx, kw.s1, bias if bias is not None else dummy,
        out, dummy, dummy, m, n, k, int(epilogue and sx.numel() > 1), GROUP=kw.group_size, BN=BN, BM=cfg.bm,
        STAGES=cfg.stages, EPILOGUE=epilogue, HAS_BIAS=bias is not None, PDL=bool(options), MMA_REGS=MMA_REGS,
        num_warps=4, maxnreg=MAXNREG, **options)
    return out
