"""A8W4 GEMM whose MMA warps widen the weight themselves into the tensor-core instruction's register operand.

Why: at M >= 1024 the warp-specialized kernel (:mod:`dgq.kernels.gemm_ws`) is bound by shared-memory bandwidth (ncu,
session 10: L1/TEX 64-70% busy while the tensor pipe idles half the time).  Per 128-wide K tile of a 128 x 256 tile
it moves about 160 KB through shared memory: the copies in (8 KB codes, 32 KB activations), the widen warps' reads
(8 KB) and int8 writes (16 KB), and the MMAs' reads of both operands (the int8 weight once per 128-token
instruction, 32 KB; the activations once per warpgroup, 64 KB).  Here each MMA warpgroup reads its rows' packed
codes from shared memory straight into the ``wgmma`` A-operand register layout, widens them there with the same
byte-lane ``mad`` + ``xor`` (:data:`dgq.kernels.gemm._WIDEN_PTX`), and issues the MMA from registers: the int8
weight never touches shared memory (112 KB per K tile instead of 160).  The widening of tile ``i + 1`` runs while
tile ``i``'s MMAs do (they are asynchronous); the registers an MMA reads stay live until its wait.

Measured (``benchmarks/gemm_rs_probe.py``, session 10, notes_gemm.md): with ``overlap`` the next tile is widened
while the last tile's MMAs run, but nothing keeps their A registers live until the wait that retires them, and ptxas
gave the next tile's widening the same registers (SASS: ``LOP3`` writes to R152-R167 between the ``IGMMA`` reading
them and its ``WARPGROUP.DEPBAR``): results raced (bit-exact failures on 35 of 40 runs of the 128 x 256 config).
A masked store of the old registers after the wait did not keep them (ptxas kept copies in local memory instead).
Without overlap (each tile's MMAs retire before the next tile's registers are written) it is exact and 0.86-1.10x
the dispatch.  So this kernel is not on any path; the code stays at the commit that measured it.

One load warp fills the same TMA ring as the warp-specialized kernel (:func:`dgq.kernels.gemm_ws._load_part`); the
codes' slot is released as soon as they are in registers, the activations' once the tile's MMAs are done.
"""

from __future__ import annotations

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from dgq.kernels.gemm import _WIDEN_PTX, KernelWeight, launch_options, prepare_call
from dgq.kernels.gemm_ws import HALF, WsConfig, _epilogue, _gdc_wait, _lane_constants, _load_part, _sm_count, _unit


@gluon.jit
def _rs_mma_unit(w_bufs, s2v, zpv, xlo_bufs, xhi_bufs, load_ready, w_empty, x_empty, sx_ptr, s1_ptr, bias_ptr,
                 out_ptr, ws_ptr, cnt_ptr, M, N, stride_sx, u, c, n_tiles, m_tiles, tiles, BM: gl.constexpr,
                 SPLIT: gl.constexpr, EPILOGUE: gl.constexpr, HAS_BIAS: gl.constexpr, PDL: gl.constexpr,
                 HI_ROW: gl.constexpr, PERSISTENT: gl.constexpr, OVERLAP: gl.constexpr):
    stages: gl.constexpr = xlo_bufs.shape[0]
    srows: gl.constexpr = s2v.shape[0] // stages
    bn: gl.constexpr = w_bufs.shape[1]
    warps: gl.constexpr = gl.num_warps()
    INSTR_N: gl.constexpr = min(BM, 128)
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[warps, 1],
                                                         instr_shape=[16, INSTR_N, 32])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=4)
    rows: gl.constexpr = gl.SliceLayout(1, a_layout)
    n_tile, m_tile, sid, kt0, k_tiles = _unit(u, n_tiles, m_tiles, tiles, SPLIT, PERSISTENT)
    acc = gl.zeros((bn, BM), gl.int32, acc_layout)
    for i in range(k_tiles):
        j = c + i
        s = j % stages
        mbarrier.wait(load_ready.index(s), (j // stages) & 1)
        p = w_bufs.index(s).load(a_layout)
        s_lo = s2v.index(s * srows).load(rows).to(gl.int32)
        z_lo = zpv.index(s * srows).load(rows).to(gl.int32)
        s_hi = s2v.index(s * srows + HI_ROW).load(rows).to(gl.int32)
        z_hi = zpv.index(s * srows + HI_ROW).load(rows).to(gl.int32)
        fence_async_shared()  # these generic-proxy reads, then the slot's next TMA write
        mbarrier.arrive(w_empty.index(s), count=1)
        c_lo, c_hi = _lane_constants(s_lo, z_lo, s_hi, z_hi)
        n_lo, n_hi = gl.inline_asm_elementwise(
            _WIDEN_PTX, "=r,=r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r",
            [p, gl.expand_dims(s_lo, 1), gl.expand_dims(c_lo, 1), gl.expand_dims(s_hi, 1), gl.expand_dims(c_hi, 1)],
            dtype=(gl.int8, gl.int8), is_pure=True, pack=4)
        if OVERLAP:  # this tile's widening ran while the previous tile's MMAs did; they retire after this issue
            acc = warpgroup_mma(n_lo, xlo_bufs.index(s).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma(n_hi, xhi_bufs.index(s).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(2, deps=[acc])
            if i > 0:
                mbarrier.arrive(x_empty.index((j - 1) % stages), count=1)
        else:  # each tile's MMAs retire before the next tile's registers are written
            acc = warpgroup_mma(n_lo, xlo_bufs.index(s).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma(n_hi, xhi_bufs.index(s).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(0, deps=[acc])
            mbarrier.arrive(x_empty.index(s), count=1)
    acc = warpgroup_mma_wait(0, deps=[acc])
    if OVERLAP and k_tiles > 0:
        mbarrier.arrive(x_empty.index((c + k_tiles - 1) % stages), count=1)
    if PDL:
        _gdc_wait()
    _epilogue(acc, sx_ptr, s1_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, stride_sx, n_tile * bn, m_tile * BM,
              sid, m_tile * n_tiles + n_tile, BM, SPLIT, EPILOGUE, HAS_BIAS)
    return c + k_tiles


@gluon.jit
def _rs_mma_part(w_bufs, s2_bufs, zp_bufs, xlo_bufs, xhi_bufs, load_ready, w_empty, x_empty, sx_ptr, s1_ptr, bias_ptr,
                 out_ptr, ws_ptr, cnt_ptr, M, N, stride_sx, n_tiles, m_tiles, tiles, units, BM: gl.constexpr,
                 SPLIT: gl.constexpr, EPILOGUE: gl.constexpr, HAS_BIAS: gl.constexpr, PDL: gl.constexpr,
                 HI_ROW: gl.constexpr, PERSISTENT: gl.constexpr, OVERLAP: gl.constexpr):
    stages: gl.constexpr = w_bufs.shape[0]
    srows: gl.constexpr = s2_bufs.shape[1]
    bn: gl.constexpr = w_bufs.shape[1]
    plain: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
    s2v = s2_bufs._reinterpret(gl.int8, [stages * srows, bn], plain)
    zpv = zp_bufs._reinterpret(gl.uint8, [stages * srows, bn], plain)
    if PERSISTENT:
        c = 0
        for u in range(gl.program_id(0), units, gl.num_programs(0)):
            c = _rs_mma_unit(w_bufs, s2v, zpv, xlo_bufs, xhi_bufs, load_ready, w_empty, x_empty, sx_ptr, s1_ptr,
                             bias_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, stride_sx, u, c, n_tiles, m_tiles, tiles, BM,
                             SPLIT, EPILOGUE, HAS_BIAS, PDL, HI_ROW, PERSISTENT, OVERLAP)
    else:
        _rs_mma_unit(w_bufs, s2v, zpv, xlo_bufs, xhi_bufs, load_ready, w_empty, x_empty, sx_ptr, s1_ptr, bias_ptr,
                     out_ptr, ws_ptr, cnt_ptr, M, N, stride_sx, gl.program_id(0), 0, n_tiles, m_tiles, tiles, BM,
                     SPLIT, EPILOGUE, HAS_BIAS, PDL, HI_ROW, PERSISTENT, OVERLAP)


@gluon.jit
def _rs_a8w4_kernel(w_desc, x_desc, s2_desc, zp_desc, sx_ptr, s1_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K,
                    stride_sx, GROUP: gl.constexpr, BN: gl.constexpr, BM: gl.constexpr, STAGES: gl.constexpr,
                    SPLIT: gl.constexpr, EPILOGUE: gl.constexpr, HAS_BIAS: gl.constexpr, PDL: gl.constexpr,
                    PERSISTENT: gl.constexpr, OVERLAP: gl.constexpr):
    n_tiles = gl.cdiv(N, BN)
    m_tiles = gl.cdiv(M, BM)
    tiles = K // (2 * HALF)
    units = n_tiles * m_tiles * SPLIT
    srows: gl.constexpr = s2_desc.block_type.shape[0]
    w_bufs = gl.allocate_shared_memory(gl.uint8, [STAGES, BN, HALF], w_desc.layout)
    xlo_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BM, HALF], x_desc.layout)
    xhi_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BM, HALF], x_desc.layout)
    s2_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, srows, BN], s2_desc.layout)
    zp_bufs = gl.allocate_shared_memory(gl.uint8, [STAGES, srows, BN], zp_desc.layout)
    load_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    w_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    x_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(load_ready.index(i), count=1)
        mbarrier.init(w_empty.index(i), count=1)
        mbarrier.init(x_empty.index(i), count=1)
    gl.warp_specialize([
        (_rs_mma_part, (w_bufs, s2_bufs, zp_bufs, xlo_bufs, xhi_bufs, load_ready, w_empty, x_empty, sx_ptr, s1_ptr,
                        bias_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, stride_sx, n_tiles, m_tiles, tiles, units, BM,
                        SPLIT, EPILOGUE, HAS_BIAS, PDL, 1 if GROUP == 64 else 0, PERSISTENT, OVERLAP)),
        (_load_part, (w_desc, x_desc, s2_desc, zp_desc, w_bufs, xlo_bufs, xhi_bufs, s2_bufs, zp_bufs, load_ready,
                      w_empty, x_empty, n_tiles, m_tiles, tiles, units, BN, BM, SPLIT, GROUP, PDL, PERSISTENT)),
    ], [1], [24])


def rs_a8w4_matmul(x_s8, kw: KernelWeight, s_x=None, bias=None, out_dtype=None, config: WsConfig = None,
                   overlap: bool = True):
    """As :func:`dgq.kernels.gemm_ws.ws_a8w4_matmul` (its configs: bn, bm, stages, split, maxnreg, mma_warps,
    persistent; the widening fields are unused)."""
    import torch

    from dgq.kernels.gemm_ws import descriptors

    x, out = prepare_call(x_s8, kw, out_dtype)
    if not x.is_contiguous() or x.data_ptr() % 16:
        x = x.clone(memory_format=torch.contiguous_format)
    m, k = x.shape
    n = kw.out_features
    epilogue = out_dtype is not None
    if m == 0:
        return out
    cfg = config
    dummy = kw.split_scratch
    ws = torch.empty((cfg.split, m, n), dtype=torch.int32, device=x.device) if cfg.split > 1 else dummy
    sx = s_x.reshape(-1).float() if epilogue else dummy
    units = triton.cdiv(n, cfg.bn) * triton.cdiv(m, cfg.bm) * cfg.split
    grid = ((min(units, cfg.persistent * _sm_count(x.device)),) if cfg.persistent
            else (triton.cdiv(n, cfg.bn), triton.cdiv(m, cfg.bm), cfg.split))
    options = launch_options(x.device)
    _rs_a8w4_kernel[grid](*descriptors(x, kw, cfg), sx, kw.s1, bias if bias is not None else dummy, out, ws, dummy,
                          m, n, k, int(epilogue and sx.numel() > 1), GROUP=kw.group_size, BN=cfg.bn, BM=cfg.bm,
                          STAGES=cfg.stages, SPLIT=cfg.split, EPILOGUE=epilogue, HAS_BIAS=bias is not None,
                          PDL=bool(options), PERSISTENT=cfg.persistent > 0, OVERLAP=overlap, num_warps=cfg.mma_warps,
                          maxnreg=cfg.maxnreg, **options)
    return out
