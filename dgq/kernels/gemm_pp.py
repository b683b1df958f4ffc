"""The A8W4 GEMM on Hopper from 65 tokens (and at 17-256 on layers of few tiles, split in K): two MMA warpgroups widen
their own weight rows into the ``wgmma`` register operand and take turns on the tensor cores (ping-pong), so one
widens while the other's MMAs run.

Why: at M >= 1024 the warp-specialized kernel (:mod:`dgq.kernels.gemm_ws`) was bound by shared memory (ncu, session
10: L1/TEX 64-70% busy, tensor pipe about half): per 128-wide K tile of a 128 x 256 tile its widen warps write the
int8 weight to shared memory and the MMAs read it back (32 KB of 160).  Widening into registers removes that
traffic, but in session 10 one warpgroup could not overlap its widening with its own MMAs exactly: nothing keeps an
asynchronous MMA's A registers live until its wait, and ptxas reused them (``gemm_rs`` at df6fa75: a race).  Here
each warpgroup waits for its own MMAs before it widens again (exact by construction), and the overlap comes from the
other warpgroup: an order barrier makes them issue their MMAs in turn, so while warpgroup 0's MMAs run, warpgroup 1
widens, and the other way round.  Measured on the H100 (``benchmarks/gemm_pp_probe.py``, BENCHMARKS.md GEMM runs 9
and 10): 1.16-1.43x the earlier dispatch at M = 1024, 1.06-1.58x at 2048-4096; alone 1.83-1.99x cuBLAS FP16 at
M >= 1024 (FP8 row-wise 1.66-1.74x), 1.57-1.79x with the act-quant in front (before: 1.30-1.57x).

Partitions: warpgroup 0 (the default partition) and warpgroup 1 (a worker) each own 64 of the tile's 128 weight rows
and a ``[64, BM]`` int32 accumulator (240 registers each, taken from the load warp's); one load warp fills
:func:`dgq.kernels.gemm_ws._load_part`'s ring (both warpgroups release each slot: its barriers count two arrivals).
Persistent grid of one CTA per SM over units of an output tile and a K split (weight rows fastest).  The epilogue
scales in the accumulator's layout, writes the rounded fp16 / bf16 tile once into its warpgroup's staging buffer and
leaves the stores to the copy engine (:func:`_scaled_epilogue`), which overlaps them with the CTA's next unit:
1.02-1.18x at M >= 1024 over converting the tile for 16-byte stores from registers (session 19, BENCHMARKS.md run
14); fp32 outputs, twice the bytes, keep that register path.

K splits (2 or 4, one wave of CTAs at most) are reduced by all splits at once (:func:`_scatter_epilogue`): each owns
a share of the tile's columns, stores the rest, waits for its partners and adds their partials of its share.  In
session 16 the split that arrived last added every other split's whole tile, in one CTA, after everything else, and
its second 64 x 256 int32 tile in registers spilled: K splits lost at M = 256.  Reduced at once, they took M = 256
on 11008 x 4096 from 35.6 to 28.0 us and M = 128 from 35.8 to 20.6 (session 17, BENCHMARKS.md run 11).  Stream-K
(even shares of all tiles' K tiles, partial tiles fixed up by the last to arrive) was built and lost at M >= 256
(notes).  Same layers as the warp-specialized kernel (:func:`dgq.kernels.gemm_ws.supported`); ``pytest -m cuda``
checks it bit-exact, the CPU suite builds the rule's configs for sm_90a.
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
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from dgq.kernels.gemm import KernelWeight
from dgq.kernels.gemm_ws import (
    HALF,
    WsConfig,
    _epilogue,
    _gdc_wait,
    _load_part,
    _load_ring,
    _scale_row_views,
    _sm_count,
    _unit,
    _widen,
    call_buffers,
    descriptors,
    tma_call,
)
from dgq.kernels.pdl import launch_options

ROWS = gl.constexpr(64)  # weight rows per warpgroup: one wgmma's M


@gluon.jit
def _pp_unit(w_bufs, s2v, zpv, xlo_bufs, xhi_bufs, load_ready, w_empty, x_empty, my_turn, their_turn, sx_ptr,
             s1_ptr, bias_ptr, out_ptr, out_desc, stage, ws_ptr, cnt_ptr, M, N, stride_sx, u, c, n_tiles, m_tiles,
             tiles, BM: gl.constexpr, SPLIT: gl.constexpr, EPILOGUE: gl.constexpr, HAS_BIAS: gl.constexpr,
             PDL: gl.constexpr, HI_ROW: gl.constexpr, WG: gl.constexpr):
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
    n_tile, m_tile, sid, _, k_tiles = _unit(u, n_tiles, m_tiles, tiles, SPLIT, True)  # (the loader reads K)
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
        # (no proxy fence between these generic reads and the slot's next bulk copy: a write after a read, ordered
        # by this arrival's release and the load warp's wait, as CUTLASS's pipelines release a slot read into
        # registers; the fence's MEMBAR sat on the loop's path: 1-2% at M = 256, session 20)
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
    n0 = n_tile * bn + r0
    if SPLIT > 1:
        _scatter_epilogue(acc, sx_ptr, s1_ptr, bias_ptr, out_ptr, out_desc, stage, ws_ptr, cnt_ptr, M, N, stride_sx,
                          n0, m_tile * BM, sid, m_tile * n_tiles + n_tile, SPLIT, EPILOGUE, HAS_BIAS, WG)
    else:
        _piece_epilogue(acc, sx_ptr, s1_ptr, bias_ptr, out_ptr, out_desc, stage, M, N, stride_sx, n0, m_tile * BM,
                        0, EPILOGUE, HAS_BIAS)
    return c + k_tiles


@gluon.jit
def _piece_epilogue(acc, sx_ptr, s1_ptr, bias_ptr, out_ptr, out_desc, stage, M, N, stride_sx, n0, m0,
                    SLOT: gl.constexpr, EPILOGUE: gl.constexpr, HAS_BIAS: gl.constexpr):
    """Rows ``n0 +`` and tokens ``m0 +`` of the output from an int32 tile or piece of one in the accumulator's
    layout: :func:`_scaled_epilogue`, or the raw int32 (``EPILOGUE`` false) through the warp-specialized kernel's
    epilogue."""
    if EPILOGUE:
        _scaled_epilogue(acc, sx_ptr, s1_ptr, bias_ptr, out_ptr, out_desc, stage, M, N, stride_sx, n0, m0, SLOT,
                         HAS_BIAS)
    else:
        # (unsplit, so its partial and count pointers are never read: the output stands in for them)
        _epilogue(acc, sx_ptr, s1_ptr, bias_ptr, out_ptr, out_ptr, out_ptr, M, N, stride_sx, n0, m0, 0, 0,
                  acc.shape[1], 1, False, HAS_BIAS)


@gluon.jit
def _scaled_epilogue(acc, sx_ptr, s1_ptr, bias_ptr, out_ptr, out_desc, stage, M, N, stride_sx, n0, m0,
                     SLOT: gl.constexpr, HAS_BIAS: gl.constexpr):
    """``(acc * s_x) * s1 (+ bias)`` in fp32 in the accumulator's own layout (in place: no second register copy of
    the tile), rounded to the output dtype.  A 16-bit output is written transposed (tokens as rows, as the output
    holds them) into rows ``SLOT * tokens`` on of this warpgroup's staging buffer ``stage`` and stored from there by
    bulk tensor copies of ``out_desc``'s box (which drop the tokens past ``M``); an fp32 tile, twice the bytes, has
    no room beside the ring and goes through a layout conversion to 16-byte stores.

    Why: session 19's clock stamps put the converted epilogue at 3.5 us of a 256-token tile's 24 us (4096 x 11008):
    the activation scales loaded one column at a time (64 4-byte loads per thread, a latency chain of 1.5 us) and
    the transposition through a 3 KB scratch in 16 rounds of barriers (1.5 us).  Staged, the scales arrive in two
    coalesced loads per thread, the tile crosses shared memory once, and the copy engine stores it."""
    BM: gl.constexpr = acc.shape[1]
    staged: gl.constexpr = out_desc.dtype.primitive_bitwidth == 16
    acc_rows: gl.constexpr = gl.SliceLayout(1, acc.type.layout)
    acc_cols: gl.constexpr = gl.SliceLayout(0, acc.type.layout)
    an = n0 + gl.arange(0, acc.shape[0], layout=acc_rows)
    s1 = gl.load(s1_ptr + an, mask=an < N, other=0.0)
    if staged:
        flat: gl.constexpr = gl.BlockedLayout([max(BM // 128, 1)], [32], [4], [0])
        am = m0 + gl.arange(0, BM, layout=flat)
        sx_flat = gl.load(sx_ptr + am * stride_sx, mask=am < M, other=0.0)
        rows = stage.slice(SLOT * BM, BM)
        if SLOT == 0:
            tma.store_wait(0)  # this warpgroup's bulk copies of its last tile have read the buffer
        # the scales into the accumulator's column layout through the buffer's first bytes (a layout conversion's
        # own scratch would not fit beside the ring and a 256-token tile's buffers)
        sx_rows = rows._reinterpret(gl.float32, [BM], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        sx_rows.store(sx_flat)
        gl.thread_barrier()
        sx = sx_rows.load(acc_cols)
        gl.thread_barrier()  # every thread has its scales before the tile overwrites them
    else:
        am = m0 + gl.arange(0, BM, layout=acc_cols)
        sx = gl.load(sx_ptr + am * stride_sx, mask=am < M, other=0.0)
    val = acc.to(gl.float32) * gl.expand_dims(sx, 0) * gl.expand_dims(s1, 1)
    if HAS_BIAS:
        val += gl.expand_dims(gl.load(bias_ptr + an, mask=an < N, other=0.0).to(gl.float32), 1)
    if staged:
        box: gl.constexpr = out_desc.block_type.shape[0]
        rows.store(val.to(out_desc.dtype).permute((1, 0)))
        fence_async_shared()  # these writes, then the copy engine's reads
        gl.thread_barrier()  # every thread's part written before one thread issues the copies
        for i in gl.static_range(BM // box):
            tma.async_copy_shared_to_global(out_desc, [m0 + i * box, n0], rows.slice(i * box, box))
    else:
        # n fastest, 8 outputs of one token per thread: 16-byte stores of out[m, n], a warp writing 4 tokens x 128
        # bytes (one output per thread made 2-byte stores: ~30% of the kernel at M = 1024, ncu session 16)
        out_layout: gl.constexpr = gl.BlockedLayout([8, 1], [8, 4], [1, 4], [0, 1])
        res = gl.convert_layout(val, out_layout)
        offs_n = n0 + gl.arange(0, acc.shape[0], layout=gl.SliceLayout(1, out_layout))
        offs_m = m0 + gl.arange(0, BM, layout=gl.SliceLayout(0, out_layout))
        mask = gl.expand_dims(offs_m < M, 0) & gl.expand_dims(offs_n < N, 1)
        gl.store(out_ptr + gl.expand_dims(offs_m, 0) * N + gl.expand_dims(offs_n, 1), res, mask=mask)


@gluon.jit
def _halves(x):
    """Columns ``[0, n/2)`` and ``[n/2, n)`` of a 2-D register tensor whose column bit ``n/2`` is a register bit (the
    MMA layout's repeat along N): a renaming of registers, no data moves."""
    return x.reshape([x.shape[0], 2, x.shape[1] // 2]).permute((0, 2, 1)).split()


@gluon.jit
def _piece_offsets(piece, row_stride):
    """Row-major offsets of a ``[rows, cols]`` register tensor's elements in its own layout."""
    rows = gl.arange(0, piece.shape[0], layout=gl.SliceLayout(1, piece.type.layout))
    cols = gl.arange(0, piece.shape[1], layout=gl.SliceLayout(0, piece.type.layout))
    return gl.expand_dims(rows, 1) * row_stride + gl.expand_dims(cols, 0)


@gluon.jit
def _meet(cnt_ptr, SPLIT: gl.constexpr):
    """Wait until all ``SPLIT`` CTAs of a tile have stored their partials (after this warpgroup's barrier: one
    acq_rel arrival each, then acquire reads of the count)."""
    gl.thread_barrier()
    arrived = gl.atomic_add(cnt_ptr, 1, sem="acq_rel") + 1
    while arrived < SPLIT:
        arrived = gl.atomic_add(cnt_ptr, 0, sem="acquire")


@gluon.jit
def _finish_piece(piece, base, col0, sid, sx_ptr, s1_ptr, bias_ptr, out_ptr, out_desc, stage, M, N, stride_sx, n0,
                  m0, SLOT: gl.constexpr, BM: gl.constexpr, SPLIT: gl.constexpr, EPILOGUE: gl.constexpr,
                  HAS_BIAS: gl.constexpr):
    """Columns ``col0 +`` of split ``sid``'s own piece: the other splits' partials of it added, then its output."""
    offs = _piece_offsets(piece, BM) + col0
    for j in gl.static_range(SPLIT):
        piece += gl.load(base + j * 2 * ROWS * BM + offs, mask=(offs >= 0) & (sid != j), other=0,
                         cache_modifier=".cg")
    _piece_epilogue(piece, sx_ptr, s1_ptr, bias_ptr, out_ptr, out_desc, stage, M, N, stride_sx, n0, m0 + col0, SLOT,
                    EPILOGUE, HAS_BIAS)


@gluon.jit
def _scatter_epilogue(acc, sx_ptr, s1_ptr, bias_ptr, out_ptr, out_desc, stage, ws_ptr, cnt_ptr, M, N, stride_sx, n0,
                      m0, sid, t, SPLIT: gl.constexpr, EPILOGUE: gl.constexpr, HAS_BIAS: gl.constexpr,
                      WG: gl.constexpr):
    """K splits reduced by all of them at once: split ``sid`` owns columns ``sid * BM / SPLIT`` on of the tile.  It
    stores the columns it does not own (row-major, 8-byte stores), meets the others (:func:`_meet`), adds their
    partials of its own columns (integer sums, exact in any order) and stores those; the last to leave rearms the
    count (arrivals and departures on one counter, ``2 * SPLIT`` in all).

    Why: the split that arrives last adding every other split's whole tile (:func:`dgq.kernels.gemm_ws._reduce_splits`)
    reads ``SPLIT - 1`` tiles in one CTA, after everything else; here each CTA reads ``(SPLIT - 1) / SPLIT`` of one
    tile, and the pieces of the 64 x 256 accumulator (:func:`_halves`) keep a second whole tile out of the registers.
    The wait needs every split of a tile resident at once: the host launches one wave at most (:func:`pp_a8w4_matmul`).
    """
    BM: gl.constexpr = acc.shape[1]
    W: gl.constexpr = BM // SPLIT
    plane: gl.constexpr = 2 * ROWS * BM  # one split's partial tile: both warpgroups' rows
    base = ws_ptr + t * SPLIT * plane + WG * ROWS * BM
    own = base + sid * plane
    if SPLIT == 2:
        a, b = _halves(acc)
        offs = _piece_offsets(a, BM)  # (every piece has the same layout)
        gl.store(own + offs, a, mask=(offs >= 0) & (sid != 0))
        gl.store(own + offs + W, b, mask=(offs >= 0) & (sid != 1))
        _meet(cnt_ptr + t * 2 + WG, SPLIT)
        mine = gl.where(sid == 0, a, b)
    else:
        h0, h1 = _halves(acc)
        a, b = _halves(h0)
        c, d = _halves(h1)
        offs = _piece_offsets(a, BM)
        gl.store(own + offs, a, mask=(offs >= 0) & (sid != 0))
        gl.store(own + offs + W, b, mask=(offs >= 0) & (sid != 1))
        gl.store(own + offs + 2 * W, c, mask=(offs >= 0) & (sid != 2))
        gl.store(own + offs + 3 * W, d, mask=(offs >= 0) & (sid != 3))
        _meet(cnt_ptr + t * 2 + WG, SPLIT)
        mine = gl.where(sid == 0, a, gl.where(sid == 1, b, gl.where(sid == 2, c, d)))
    if W > 64:  # the owned half of a 256-token tile in two: its partners' 64 x 128 int32 partial beside it spilled
        lo, hi = _halves(mine)
        _finish_piece(lo, base, sid * W, sid, sx_ptr, s1_ptr, bias_ptr, out_ptr, out_desc, stage, M, N, stride_sx,
                      n0, m0, 0, BM, SPLIT, EPILOGUE, HAS_BIAS)
        _finish_piece(hi, base, sid * W + W // 2, sid, sx_ptr, s1_ptr, bias_ptr, out_ptr, out_desc, stage, M, N,
                      stride_sx, n0, m0, 1, BM, SPLIT, EPILOGUE, HAS_BIAS)  # (the staging buffer's second rows)
    else:
        _finish_piece(mine, base, sid * W, sid, sx_ptr, s1_ptr, bias_ptr, out_ptr, out_desc, stage, M, N, stride_sx,
                      n0, m0, 0, BM, SPLIT, EPILOGUE, HAS_BIAS)
    if gl.atomic_add(cnt_ptr + t * 2 + WG, 1, sem="relaxed") == 2 * SPLIT - 1:  # every split has left the wait
        gl.atomic_xchg(cnt_ptr + t * 2 + WG, 0, sem="relaxed")


@gluon.jit
def _pp_mma_part(w_bufs, s2_bufs, zp_bufs, xlo_bufs, xhi_bufs, load_ready, w_empty, x_empty, turns, sx_ptr, s1_ptr,
                 bias_ptr, out_ptr, out_desc, staging, ws_ptr, cnt_ptr, M, N, stride_sx, n_tiles, m_tiles, tiles,
                 units,
                 BM: gl.constexpr, SPLIT: gl.constexpr, EPILOGUE: gl.constexpr, HAS_BIAS: gl.constexpr,
                 PDL: gl.constexpr, HI_ROW: gl.constexpr, WG: gl.constexpr):
    s2v, zpv = _scale_row_views(s2_bufs, zp_bufs)
    c = 0
    for u in range(gl.program_id(0), units, gl.num_programs(0)):
        c = _pp_unit(w_bufs, s2v, zpv, xlo_bufs, xhi_bufs, load_ready, w_empty, x_empty, turns.index(WG),
                     turns.index(1 - WG), sx_ptr, s1_ptr, bias_ptr, out_ptr, out_desc, staging.index(WG), ws_ptr,
                     cnt_ptr, M, N, stride_sx, u, c, n_tiles, m_tiles, tiles, BM, SPLIT, EPILOGUE, HAS_BIAS, PDL,
                     HI_ROW, WG)
    if EPILOGUE:
        tma.store_wait(0)  # the staging buffer stays until the copy engine has read it


@gluon.jit
def _pp_a8w4_kernel(w_desc, x_desc, s2_desc, zp_desc, sx_ptr, s1_ptr, bias_ptr, out_ptr, out_desc, ws_ptr, cnt_ptr,
                    M, N, K, stride_sx, GROUP: gl.constexpr, BN: gl.constexpr, BM: gl.constexpr, STAGES: gl.constexpr,
                    SPLIT: gl.constexpr, EPILOGUE: gl.constexpr, HAS_BIAS: gl.constexpr, PDL: gl.constexpr,
                    MMA_REGS: gl.constexpr):
    gl.static_assert(BN == 2 * ROWS, "two warpgroups of 64 weight rows")
    gl.static_assert(SPLIT == 1 or SPLIT == 2 or SPLIT == 4, "K splits: 1, 2 or 4 (one piece of columns each)")
    n_tiles = gl.cdiv(N, BN)
    m_tiles = gl.cdiv(M, BM)
    tiles = K // (2 * HALF)
    units = n_tiles * m_tiles * SPLIT  # a CTA takes units pid, pid + grid, ... (weight rows fastest)
    w_bufs, xlo_bufs, xhi_bufs, s2_bufs, zp_bufs, load_ready, w_empty, x_empty = _load_ring(
        w_desc, x_desc, s2_desc, zp_desc, STAGES, 2)  # both warpgroups release each slot
    # each MMA warpgroup's staging buffer for the epilogue's bulk stores of a 16-bit output: the tokens it writes
    # per unit (a split owns BM / SPLIT of them) x its 64 weight rows; 32-bit outputs are stored from registers
    stage_rows: gl.constexpr = BM // SPLIT if EPILOGUE and out_desc.dtype.primitive_bitwidth == 16 else 8
    staging = gl.allocate_shared_memory(out_desc.dtype, [2, stage_rows, out_desc.block_type.shape[1]], out_desc.layout)
    turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(turns.index(i), count=1)
    hi_row: gl.constexpr = 1 if GROUP == 64 else 0
    gl.warp_specialize([
        (_pp_mma_part, (w_bufs, s2_bufs, zp_bufs, xlo_bufs, xhi_bufs, load_ready, w_empty, x_empty, turns, sx_ptr,
                        s1_ptr, bias_ptr, out_ptr, out_desc, staging, ws_ptr, cnt_ptr, M, N, stride_sx, n_tiles, m_tiles,
                        tiles, units,
                        BM, SPLIT, EPILOGUE, HAS_BIAS, PDL, hi_row, 0)),
        (_pp_mma_part, (w_bufs, s2_bufs, zp_bufs, xlo_bufs, xhi_bufs, load_ready, w_empty, x_empty, turns, sx_ptr,
                        s1_ptr, bias_ptr, out_ptr, out_desc, staging, ws_ptr, cnt_ptr, M, N, stride_sx, n_tiles, m_tiles,
                        tiles, units,
                        BM, SPLIT, EPILOGUE, HAS_BIAS, PDL, hi_row, 1)),
        (_load_part, (w_desc, x_desc, s2_desc, zp_desc, w_bufs, xlo_bufs, xhi_bufs, s2_bufs, zp_bufs, load_ready,
                      w_empty, x_empty, n_tiles, m_tiles, tiles, units, BN, BM, SPLIT, GROUP, PDL, True)),
    ], [4, 1], [MMA_REGS, 24])


@dataclass(frozen=True)
class PpConfig:
    """Tokens per tile (two 128-wide MMAs at 256), ring slots, K splits (1, 2 or 4: :func:`_scatter_epilogue`); the
    tile always has 128 weight rows."""

    bm: int = 256
    stages: int = 4
    split: int = 1


BN = 128  # weight rows per CTA: two warpgroups of ROWS
MAXNREG = 168  # at launch: 12 warps (two MMA warpgroups, the load warp's warpgroup) x 32 x 168 <= 64K registers
MMA_REGS = 240  # then each MMA warpgroup takes 240 (its 64 x 256 int32 accumulator is 128) and the load warp 24
MIN_M = 65  # from here the unsplit tiles; below, split tiles only (the warp-specialized kernel's small tiles else)
SPLIT_M = (17, 256)  # token counts where K splits of one wave won on the layers of few tiles (measured at 32-256)
BIG_TILE_MIN_CTAS = 80  # measured (session 16): 86 tiles of 256 tokens won at M = 256 (4096 x 11008), 64 lost
SMALL_TILE_MIN_CTAS = 100  # 128-token tiles: 128 won at M = 256 (28672 x 8192), 64 lost (the N = 4096 layers)


def _ctas(cfg: PpConfig, m: int, n: int) -> int:
    """Units of a call: output tiles times K splits."""
    return triton.cdiv(n, BN) * triton.cdiv(m, cfg.bm) * cfg.split


def one_wave(cfg: PpConfig, m: int, n: int, sms: int) -> bool:
    """Whether every CTA of a split config is resident at once (its splits wait for each other)."""
    return _ctas(cfg, m, n) <= sms


def _split_config(m: int, n: int, sms: int) -> PpConfig | None:
    """The K-split configs measured best (``benchmarks/gemm_pp_probe.py --splits``, session 17) on layers whose
    unsplit tiles leave SMs idle: as many splits as fit one wave, of the tile the token count fills."""
    if m <= 32:  # 17-32: 32-token tiles (at M = 32: 4096 x 4096 10.8 us, 11008 x 4096 15.9, 28672 x 8192 53.7 in
        cfgs = [PpConfig(32, 8, 4), PpConfig(32, 8, 2)]  # 2; the warp-specialized kernel 12.1 / 19.0 / 62.5)
    elif m <= 64:  # 33-64: 64-token tiles (4096 x 4096 11.9 us in 4, 28672 x 8192 56.8 in 2)
        cfgs = [PpConfig(64, 8, 4), PpConfig(64, 8, 2)]
    elif m <= 128:  # 11008 x 4096: 21.1 us in 4 against 26.4 in 2; 28672 x 8192: 64.9 in 2
        cfgs = [PpConfig(128, 6, 4), PpConfig(128, 6, 2)]
    else:  # 11008 x 4096: two 128-token tiles in 2, 28.4 us (256 tokens in 4: 29.7); 28672 x 8192: 89.3 in 2
        cfgs = [PpConfig(128, 6, 2), PpConfig(256, 4, 2)]
    # (outside 33-64 tokens, only where the splits fill half the GPU at least: the layers measured)
    return next((c for c in cfgs if one_wave(c, m, n, sms)
                 and (32 < m <= 64 or _ctas(c, m, n) >= sms // 2)), None)


def config_for(m: int, n: int, sms: int = 132) -> PpConfig | None:
    """The measured rule (``benchmarks/gemm_pp_probe.py``, sessions 16-17, notes), ``None`` where the
    warp-specialized kernel (:func:`dgq.kernels.gemm_ws.config_for`) serves:

    * 17 to 256 tokens (:data:`SPLIT_M`) on layers of few tiles: K split in 2 or 4 while the CTAs fit one wave
      (:func:`_split_config`).  At M = 256 on 11008 x 4096 28.4 us against the warp-specialized kernel's 35.6, on
      28672 x 8192 89.3 against 105.1 unsplit; at M = 128 21.1 / 64.9 against 35.8 / 89.7; at M = 64 11.9 / 17.6 /
      56.8 against session 16's last-arrival splits' 13.9 / 19.5 / 58.6 (4096 x 4096 too);
    * else from :data:`MIN_M` tokens, 256-token tiles where they make at least :data:`BIG_TILE_MIN_CTAS` CTAs, else
      128-token tiles (6 slots) where those make :data:`SMALL_TILE_MIN_CTAS`; fewer tiles than that leave SMs idle,
      and there the warp-specialized kernel's 64-row tiles won.  Up to 128 tokens the tile is 128 tokens (4096 x
      11008 at M = 128: 19.0 us against 33.3 for a 256-token tile half padding)."""
    if SPLIT_M[0] <= m <= SPLIT_M[1]:
        split = _split_config(m, n, sms)
        if split is not None:
            return split
    if m < MIN_M:
        return None
    tiles = triton.cdiv(n, BN)
    if m <= 128 and tiles >= BIG_TILE_MIN_CTAS:  # a 256-token tile would be half padding
        return PpConfig(128, 6)
    if triton.cdiv(m, 256) * tiles >= BIG_TILE_MIN_CTAS:
        return PpConfig(256, 4)
    if triton.cdiv(m, 128) * tiles >= SMALL_TILE_MIN_CTAS:
        return PpConfig(128, 6)
    return None


def rule(m: int, n: int, device: torch.device) -> PpConfig | None:
    """:func:`config_for` for the GPU at ``device`` (its SM count)."""
    return config_for(m, n, _sm_count(device))


def _out_descriptor(out: torch.Tensor, box: int):
    """The epilogue's bulk stores: ``box`` tokens x 128 bytes of output channels of ``out [M, N]`` (128-byte
    swizzle, as the staging buffer holds them; a 32-bit output's is not used)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    return TensorDescriptor.from_tensor(out, [box, 128 // out.element_size()], gl.NVMMASharedLayout(
        swizzle_byte_width=128, element_bitwidth=out.element_size() * 8, rank=2))


def pp_a8w4_matmul(x_s8: torch.Tensor, kw: KernelWeight, s_x: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = torch.float16,
                   config: PpConfig | None = None) -> torch.Tensor:
    """A8W4 GEMM of int8 codes ``x_s8 [M, K]`` with scales ``s_x``, as :func:`dgq.kernels.gemm_ws.ws_a8w4_matmul`
    (same layers: :func:`dgq.kernels.gemm_ws.supported`; ``out_dtype=None``: the raw int32 accumulator).
    ``config`` pins a variant instead of :func:`config_for`'s (256-token tiles where the rule has none); a split one
    must fit one wave (:func:`one_wave`)."""
    x, out, m, k, n, epilogue = tma_call(x_s8, kw, out_dtype)
    if m == 0:
        return out
    cfg = config or rule(m, n, x.device) or PpConfig()
    sms = _sm_count(x.device)
    _, sx = call_buffers(x, kw, s_x, epilogue, 1)
    dummy = ws = kw.split_scratch
    tiles = triton.cdiv(n, BN) * triton.cdiv(m, cfg.bm)
    if cfg.split > 1:
        if not one_wave(cfg, m, n, sms):
            raise ValueError(f"{tiles} tiles x {cfg.split} K splits do not fit one wave of {sms} CTAs: the splits of "
                             f"a tile wait for each other (pin fewer splits or larger tiles)")
        if 2 * tiles > dummy.numel():
            raise AssertionError(f"{2 * tiles} split-K counts exceed the layer's {dummy.numel()} slots")
        # the partial tiles, allocated per call so that a captured CUDA graph owns its own
        ws = torch.empty(tiles * cfg.split * BN * cfg.bm, dtype=torch.int32, device=x.device)
    options = launch_options(x.device)
    _pp_a8w4_kernel[(min(tiles * cfg.split, sms),)](
        *descriptors(x, kw, WsConfig(BN, cfg.bm, cfg.stages, 1)), sx, kw.s1, bias if bias is not None else dummy,
        out, _out_descriptor(out, min(cfg.bm // cfg.split, 64)), ws, dummy, m, n, k, int(epilogue and sx.numel() > 1),
        GROUP=kw.group_size, BN=BN, BM=cfg.bm, STAGES=cfg.stages, SPLIT=cfg.split, EPILOGUE=epilogue,
        HAS_BIAS=bias is not None, PDL=bool(options),
        MMA_REGS=MMA_REGS, num_warps=4, maxnreg=MAXNREG, **options)
    return out
