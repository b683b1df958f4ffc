"""EXPERIMENT (session 19): a persistent TMA GEMV from codes.  Each CTA streams its units (output tile x K split x
token) through one ring: the refill of a slot may already be the next unit's first tiles, so a unit's reduction,
split-K fixup and stores overlap the next unit's loads, and the grid is a few CTAs per SM instead of one per unit."""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier

from dgq.kernels.gemm_ws import _gdc_wait, _reduce_splits, _sm_count, _widen, tma_call
from dgq.kernels.gemv import _DP4A2_PTX
from dgq.kernels.gemv_tma import HALF, TmaGemvConfig, _add, _arm_and_load_weight, _load_codes, descriptors
from dgq.kernels.pdl import launch_options


@gluon.jit
def _unit_of(u, n_tiles, SPLIT: gl.constexpr):
    """Unit ``u``: K splits fastest (a tile's splits run side by side and meet soon), then output tiles, then tokens."""
    rest = u // SPLIT
    return rest % n_tiles, u % SPLIT, rest // n_tiles


@gluon.jit
def _slot_load(w_desc, x_desc, s2_desc, zp_desc, w_bufs, x_bufs, s2_bufs, zp_bufs, ready, L, s, n_tiles, pid, grid,
               WEIGHT: gl.constexpr, CODES: gl.constexpr, SPLIT: gl.constexpr, SPU: gl.constexpr,
               PER: gl.constexpr, GROUP: gl.constexpr):
    """The CTA's ``L``-th slot load (its unit ``L // SPU``, that unit's slot ``L % SPU``) into ring slot ``s``."""
    BN: gl.constexpr = w_bufs.shape[1]
    KT: gl.constexpr = w_desc.block_type.shape[1] // HALF
    n_tile, sid, m = _unit_of(pid + (L // SPU) * grid, n_tiles, SPLIT)
    kt = sid * PER + (L % SPU) * KT
    if WEIGHT:
        _arm_and_load_weight(w_desc, x_desc, s2_desc, zp_desc, w_bufs, s2_bufs, zp_bufs, ready.index(s), s,
                             n_tile * BN, kt, GROUP, True)
    if CODES:
        _load_codes(x_desc, x_bufs, ready.index(s), s, m, kt, KT)


@gluon.jit
def _persist_kernel(w_desc, x_desc, s2_desc, zp_desc, sx_ptr, s1_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr, M, N,
                    stride_sx, K: gl.constexpr, GROUP: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr,
                    SPLIT: gl.constexpr, HAS_BIAS: gl.constexpr, PDL: gl.constexpr):
    pid = gl.program_id(0)
    grid = gl.num_programs(0)
    TILES: gl.constexpr = K // (2 * HALF)
    KT: gl.constexpr = w_desc.block_type.shape[1] // HALF
    PER: gl.constexpr = ((TILES + SPLIT - 1) // SPLIT + KT - 1) // KT * KT  # whole slots; tiles past K zero-filled
    SPU: gl.constexpr = PER // KT  # slots per unit, the same for every unit
    n_tiles = gl.cdiv(N, BN)
    units = n_tiles * SPLIT * M
    total = (units - pid + grid - 1) // grid * SPU  # this CTA's slot loads
    srows: gl.constexpr = s2_desc.block_type.shape[0]
    w_bufs = gl.allocate_shared_memory(gl.uint8, [STAGES] + w_desc.block_type.shape, w_desc.layout)
    x_bufs = gl.allocate_shared_memory(gl.int8, [STAGES * KT, 1, 2 * HALF], x_desc.layout)
    s2_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, srows, BN], s2_desc.layout)
    zp_bufs = gl.allocate_shared_memory(gl.uint8, [STAGES, srows, BN], zp_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for b in gl.static_range(STAGES):
        mbarrier.init(ready.index(b), count=1)
    for L in range(gl.minimum(STAGES, total)):  # the weight first, the codes once the act-quant is done
        _slot_load(w_desc, x_desc, s2_desc, zp_desc, w_bufs, x_bufs, s2_bufs, zp_bufs, ready, L, L, n_tiles, pid,
                   grid, True, False, SPLIT, SPU, PER, GROUP)
    if PDL:
        _gdc_wait()
    for L in range(gl.minimum(STAGES, total)):
        _slot_load(w_desc, x_desc, s2_desc, zp_desc, w_bufs, x_bufs, s2_bufs, zp_bufs, ready, L, L, n_tiles, pid,
                   grid, False, True, SPLIT, SPU, PER, GROUP)
    HI_ROW: gl.constexpr = 1 if GROUP == 64 else 0
    TW: gl.constexpr = HALF // 4
    layout: gl.constexpr = gl.BlockedLayout([1, 4], [8, 4], [gl.num_warps(), 1], [1, 0])
    rows: gl.constexpr = gl.SliceLayout(1, layout)
    cols: gl.constexpr = gl.SliceLayout(0, layout)
    plain2: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    plain1: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
    s2v = s2_bufs._reinterpret(gl.int8, [STAGES * srows, BN], plain1)
    zpv = zp_bufs._reinterpret(gl.uint8, [STAGES * srows, BN], plain1)
    x_words = x_bufs._reinterpret(gl.int32, [2 * x_bufs.shape[0], TW], plain1)
    c = 0
    for u in range(pid, units, grid):
        n_tile, sid, m = _unit_of(u, n_tiles, SPLIT)
        acc = gl.zeros([BN, TW], gl.int32, layout)
        for q in range(SPU):
            s = c % STAGES
            kt = sid * PER + q * KT
            mbarrier.wait(ready.index(s), (c // STAGES) & 1)
            words = w_bufs.index(s)._reinterpret(gl.int32, [BN, KT * TW], plain2)
            for j in gl.static_range(KT):
                p = words.slice(j * TW, TW, 1).load(layout)
                x_lo = gl.expand_dims(x_words.index(2 * (s * KT + j)).load(cols), 0)
                x_hi = gl.expand_dims(x_words.index(2 * (s * KT + j) + 1).load(cols), 0)
                row = s * srows + ((kt + j) * 2 * HALF) // GROUP - (kt * 2 * HALF) // GROUP
                s_lo = s2v.index(row).load(rows).to(gl.int32)
                z_lo = zpv.index(row).load(rows).to(gl.int32)
                s_hi = s2v.index(row + HI_ROW).load(rows).to(gl.int32)
                z_hi = zpv.index(row + HI_ROW).load(rows).to(gl.int32)
                if j == KT - 1:
                    fence_async_shared()
                    gl.thread_barrier()
                    if c + STAGES < total:
                        _slot_load(w_desc, x_desc, s2_desc, zp_desc, w_bufs, x_bufs, s2_bufs, zp_bufs, ready,
                                   c + STAGES, s, n_tiles, pid, grid, True, True, SPLIT, SPU, PER, GROUP)
                w_lo, w_hi = _widen(p, s_lo, z_lo, s_hi, z_hi, True)
                acc = gl.inline_asm_elementwise(_DP4A2_PTX, "=r,r,r,r,r,r", [w_lo, x_lo, acc, w_hi, x_hi],
                                                dtype=gl.int32, is_pure=True, pack=1)
            c += 1
        tot = gl.reduce(acc, 1, _add)
        offs_n = n_tile * BN + gl.arange(0, BN, layout=rows)
        n_mask = offs_n < N
        mask = n_mask
        if SPLIT > 1:
            tot, mask = _reduce_splits(tot, ws_ptr, cnt_ptr, m * N + offs_n, mask, sid, m * n_tiles + n_tile, M * N,
                                       SPLIT)
        sx = gl.load(sx_ptr + m * stride_sx)
        s1 = gl.load(s1_ptr + offs_n, mask=n_mask, other=0.0)
        val = tot.to(gl.float32) * sx * s1
        if HAS_BIAS:
            val += gl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(gl.float32)
        gl.store(out_ptr + m * N + offs_n, val.to(out_ptr.dtype.element_ty), mask=mask)


def persist_gemv(x_s8: torch.Tensor, kw, s_x: torch.Tensor, cfg: TmaGemvConfig, per_sm: int,
                 bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    x, out, m, k, n, _ = tma_call(x_s8, kw, out_dtype)
    sx = s_x.reshape(-1).float()
    cnt = kw.split_scratch
    units = triton.cdiv(n, cfg.bn) * cfg.split * m
    ws = torch.empty((cfg.split, m, n), dtype=torch.int32, device=x.device) if cfg.split > 1 else cnt
    options = launch_options(x.device)
    grid = min(units, per_sm * _sm_count(x.device))
    _persist_kernel[(grid,)](*descriptors(kw, cfg, x), sx, kw.s1, bias if bias is not None else cnt, out, ws, cnt,
                             m, n, int(sx.numel() > 1), K=k, GROUP=kw.group_size, BN=cfg.bn, STAGES=cfg.stages,
                             SPLIT=cfg.split, HAS_BIAS=bias is not None, PDL=bool(options), num_warps=cfg.warps,
                             **options)
    return out
