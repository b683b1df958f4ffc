"""The A8W4 GEMM on Hopper for 2..64 tokens where the ping-pong kernel's split tiles do not serve, and for layers too
narrow for it (to 2047 tokens, 4095 on long-K layers: :func:`takes`): a warp-specialized kernel (Gluon) whose
widening runs beside the MMA.  Its load warp (:func:`_load_part`, with :func:`_unit`'s persistent form) also feeds
:mod:`dgq.kernels.gemm_pp`.

Why a second tensor-core kernel: the in-register kernel of :mod:`dgq.kernels.gemm` widens int4 to int8 in the same
warps that issue the tensor-core MMA, so the two serialize, and at M = 16..256 it ran at 0.7-1.1x cuBLAS FP16 where
the weight bytes allow about 3x (``benchmarks/notes_gemm.md``).  Triton's automatic warp specialization is
Blackwell-only; Gluon (``triton.experimental.gluon``) specializes warps by hand on Hopper.  One CTA has three
partitions around shared-memory rings guarded by mbarriers:

* **load** (1 warp): bulk tensor copies (TMA) of the packed weight tile ``[BN, 64]`` bytes, the tile's group scales
  and zero points (``s2t``/``zpt`` rows, so no widening step waits on global memory), and the two activation halves
  ``[BM, 64]`` (k and k + 64 of each 128-wide K tile: the layout of :mod:`dgq.packing`).  It copies the weight of the
  first ring slots *before* waiting for the activation producer (``griddepcontrol.wait``; the kernel launches
  programmatically dependent on the act-quant), so the weight stream starts while the act-quant still runs.
* **widen** (4 warps): packed bytes to two int8 tiles with the byte-lane ``mad`` + ``xor`` of
  :data:`dgq.kernels.gemm._WIDEN_PTX`, stored to shared memory in the MMA's swizzled layout (8 rows x 64 bytes per
  warp access: no bank conflicts either way).
* **mma** (the default partition, one warpgroup): ``out^T [BN, BM] += W_lo @ x_lo^T + W_hi @ x_hi^T`` with
  ``wgmma`` (int8, int32 accumulation; tokens are the MMA's N, so M <= 16 is one 16-token tile), one tile's MMAs in
  flight while the next are issued; then the epilogue ``(acc * s_x) * s1 (+ bias)`` in fp32, as the reference
  orders it.  The int8 weight goes through shared memory (written by the widen warps, read by the MMAs): at
  M >= 1024 that traffic bounded the kernel near half the tensor pipe, which is why the ping-pong kernel
  (:mod:`dgq.kernels.gemm_pp`, the weight as the MMA's register operand) took the large tiles in session 16.

**Split-K** (``split > 1``): each split stores its int32 partial tile to a buffer allocated per call (a captured
CUDA graph owns its own), then, after the MMA warpgroup's barrier, counts one arrival on its tile's counter (acq_rel,
one atomic per CTA); the split that arrives last adds the others' partials (integer sums: exact in any order) and
applies the epilogue.  The counters are the layer's scratch (:attr:`dgq.kernels.gemm.KernelWeight.split_scratch`),
which the last split rearms, so nothing is zeroed before a call.  An arrival count per output element, the first
version, cost 2-5x (an acq_rel atomic per element); per tile, splits gave 1.3-1.8x at M = 16 (notes).

**One CTA per unit** (an output tile and K split) on a 3-D grid, read from the grid's indices.  The load warp also
has a persistent form (one CTA per SM takes units ``pid, pid + grid, ...``, weight rows fastest, counting K tiles
across units for the ring's slots and phases), which the ping-pong kernel runs; here the unit's divisions cost the
64 x 128 config 500 bytes of ptxas spills.

**Configs** are a fixed rule per M regime (:func:`config_for`), not an autotuner: the fastest configs of two H100
probe runs (``benchmarks/gemm_ws_probe.py``, notes), so a model compiles at most three variants per shape.

The kernel needs sm_90 (``wgmma``, TMA), 128-wide K tiles (``in_features % 128 == 0``), a group of 64 or a multiple
of 128 (one scale row per 64-wide half), and ``out_features % 64 == 0`` (16-byte TMA rows of the scale tiles):
:func:`supported` says so, and :mod:`dgq.kernels.linear` runs the in-register kernel for any other layer.  The
CPU interpreter cannot run Gluon: the CPU tests compile it for sm_90a (Triton ships ``ptxas``), and
``pytest -m cuda`` checks it bit-exact on the GPU.
"""

from __future__ import annotations

import functools
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

from dgq.kernels.gemm import _WIDEN_PTX, Call, KernelWeight, prepare_call
from dgq.kernels.gemv import _WIDEN_WORD_PTX
from dgq.kernels.pdl import launch_options

HALF = gl.constexpr(64)  # half of the layout's 128-wide K tile: one nibble plane, one MMA of depth 64
A_STAGES = gl.constexpr(2)  # widened tiles in flight between the widen and MMA partitions


@gluon.jit
def _gdc_wait():
    """Wait for the grid this one was launched programmatically dependent on (the act-quant): its codes, scales."""
    gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _widen(p, s_lo, z_lo, s_hi, z_hi, WORDS: gl.constexpr):
    """Packed codes ``p`` (rows of a tile) widened to int8 weights of both nibble halves by the byte-lane identity:
    ``s2 * u4 + (128 - s2 * zp) * 0x01010101``, then ``xor 0x80808080``, with the row's group scales and zero points
    (int32 ``[rows]``).  ``WORDS``: ``p`` holds 32-bit words and the halves come back as words of four weights (the
    GEMVs' ``dp4a`` operands, :data:`dgq.kernels.gemv._WIDEN_WORD_PTX`); else ``p`` holds bytes and the halves come
    back as int8 tensors of its shape (the MMA's operands, :data:`dgq.kernels.gemm._WIDEN_PTX`)."""
    c_lo = ((128 - s_lo * z_lo).to(gl.uint32, bitcast=True) * 0x01010101).to(gl.int32, bitcast=True)
    c_hi = ((128 - s_hi * z_hi).to(gl.uint32, bitcast=True) * 0x01010101).to(gl.int32, bitcast=True)
    args = [p, gl.expand_dims(s_lo, 1), gl.expand_dims(c_lo, 1), gl.expand_dims(s_hi, 1), gl.expand_dims(c_hi, 1)]
    if WORDS:
        lo, hi = gl.inline_asm_elementwise(_WIDEN_WORD_PTX, "=r,=r,r,r,r,r,r", args, dtype=(gl.int32, gl.int32),
                                           is_pure=True, pack=1)
    else:
        lo, hi = gl.inline_asm_elementwise(_WIDEN_PTX, "=r,=r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r", args,
                                           dtype=(gl.int8, gl.int8), is_pure=True, pack=4)
    return lo, hi


@gluon.jit
def _reduce_splits(part, ws_ptr, cnt_ptr, offs, mask, sid, tile, plane, SPLIT: gl.constexpr):
    """The exact split-K reduction of the Gluon kernels: split ``sid`` stores its int32 partial ``part`` (at ``offs``
    of its plane of ``plane`` elements), then counts one arrival on its tile's counter (after the CTA's barrier, with
    release); the split that arrives last (acquire) adds the others' partials and rearms the count for the layer's
    next call.  Returns the sum and the mask of what this CTA now owns (nothing, unless it arrived last)."""
    gl.store(ws_ptr + sid * plane + offs, part, mask=mask)
    gl.thread_barrier()
    last = gl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel") == SPLIT - 1
    mask = mask & last
    for j in gl.static_range(SPLIT):
        part += gl.load(ws_ptr + j * plane + offs, mask=mask & (sid != j), other=0, cache_modifier=".cg")
    gl.atomic_xchg(cnt_ptr + tile, 0, mask=last, sem="relaxed")
    return part, mask


@gluon.jit
def _load_weight(w_desc, s2_desc, zp_desc, w_bufs, s2_bufs, zp_bufs, bar, s, n0, kt, GROUP: gl.constexpr):
    tma.async_copy_global_to_shared(w_desc, [n0, kt * HALF], bar, w_bufs.index(s))
    tma.async_copy_global_to_shared(s2_desc, [kt * 2 * HALF // GROUP, n0], bar, s2_bufs.index(s))
    tma.async_copy_global_to_shared(zp_desc, [kt * 2 * HALF // GROUP, n0], bar, zp_bufs.index(s))


@gluon.jit
def _unit(u, n_tiles, m_tiles, tiles, SPLIT: gl.constexpr, PERSISTENT: gl.constexpr):
    """Work unit ``u`` of a persistent CTA (else the CTA's own, from its 3-D grid position): its output tile (weight
    rows fastest, as a grid launches them, so the CTAs running at once share activation tiles in L2), its K split,
    and that split's range of 128-wide K tiles.  (The grid's own indices, where they serve: the epilogue's addresses
    from the division's results cost ptxas 500 bytes of spills on the 64 x 128 config.)"""
    if PERSISTENT:
        n_tile = u % n_tiles
        m_tile = (u // n_tiles) % m_tiles
        sid = u // (n_tiles * m_tiles)
    else:
        n_tile = gl.program_id(0)
        m_tile = gl.program_id(1)
        sid = gl.program_id(2)
    per = gl.cdiv(tiles, SPLIT)
    kt0 = sid * per
    k_tiles = gl.maximum(gl.minimum(per, tiles - kt0), 0)
    return n_tile, m_tile, sid, kt0, k_tiles


@gluon.jit
def _load_ring(w_desc, x_desc, s2_desc, zp_desc, STAGES: gl.constexpr, READERS: gl.constexpr):
    """The load warp's ring (:func:`_load_part`): ``STAGES`` slots of the weight tile, both activation halves, the
    group scales and zero points, a barrier per slot that its copies complete, and the two that its ``READERS``
    consumer partitions release the weight and the activations on."""
    bn: gl.constexpr = w_desc.block_type.shape[0]
    bm: gl.constexpr = x_desc.block_type.shape[0]
    srows: gl.constexpr = s2_desc.block_type.shape[0]
    w_bufs = gl.allocate_shared_memory(gl.uint8, [STAGES, bn, HALF], w_desc.layout)
    xlo_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, bm, HALF], x_desc.layout)
    xhi_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, bm, HALF], x_desc.layout)
    s2_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, srows, bn], s2_desc.layout)
    zp_bufs = gl.allocate_shared_memory(gl.uint8, [STAGES, srows, bn], zp_desc.layout)
    load_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    w_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    x_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(load_ready.index(i), count=1)
        mbarrier.init(w_empty.index(i), count=READERS)
        mbarrier.init(x_empty.index(i), count=READERS)
    return w_bufs, xlo_bufs, xhi_bufs, s2_bufs, zp_bufs, load_ready, w_empty, x_empty


@gluon.jit
def _load_part(w_desc, x_desc, s2_desc, zp_desc, w_bufs, xlo_bufs, xhi_bufs, s2_bufs, zp_bufs, load_ready, w_empty,
               x_empty, n_tiles, m_tiles, tiles, units, BN: gl.constexpr, BM: gl.constexpr, SPLIT: gl.constexpr,
               GROUP: gl.constexpr, PDL: gl.constexpr, PERSISTENT: gl.constexpr):
    stages: gl.constexpr = w_bufs.shape[0]
    nbytes: gl.constexpr = (w_desc.block_type.nbytes + 2 * x_desc.block_type.nbytes + s2_desc.block_type.nbytes
                            + zp_desc.block_type.nbytes)
    pid = gl.program_id(0)
    n_tile, m_tile, sid, kt0, k_tiles = _unit(pid, n_tiles, m_tiles, tiles, SPLIT, PERSISTENT)
    pre = gl.minimum(k_tiles, stages)
    for i in range(pre):  # the ring starts empty: the first unit's first weight tiles need no wait
        mbarrier.expect(load_ready.index(i), nbytes)
        _load_weight(w_desc, s2_desc, zp_desc, w_bufs, s2_bufs, zp_bufs, load_ready.index(i), i, n_tile * BN,
                     kt0 + i, GROUP)
    if PDL:
        _gdc_wait()
    if PERSISTENT:
        c = 0  # K tiles loaded so far: the ring's slot and phase
        for u in range(pid, units, gl.num_programs(0)):
            c = _load_unit(w_desc, x_desc, s2_desc, zp_desc, w_bufs, xlo_bufs, xhi_bufs, s2_bufs, zp_bufs, load_ready,
                           w_empty, x_empty, u, c, pre, n_tiles, m_tiles, tiles, nbytes, BN, BM, SPLIT, GROUP,
                           PERSISTENT)
    else:  # one unit per CTA
        _load_unit(w_desc, x_desc, s2_desc, zp_desc, w_bufs, xlo_bufs, xhi_bufs, s2_bufs, zp_bufs, load_ready,
                   w_empty, x_empty, pid, 0, pre, n_tiles, m_tiles, tiles, nbytes, BN, BM, SPLIT, GROUP, PERSISTENT)


@gluon.jit
def _load_unit(w_desc, x_desc, s2_desc, zp_desc, w_bufs, xlo_bufs, xhi_bufs, s2_bufs, zp_bufs, load_ready, w_empty,
               x_empty, u, c, pre, n_tiles, m_tiles, tiles, nbytes: gl.constexpr, BN: gl.constexpr, BM: gl.constexpr,
               SPLIT: gl.constexpr, GROUP: gl.constexpr, PERSISTENT: gl.constexpr):
    """The loads of unit ``u``, from the ring's ``c``-th K tile on (the first ``pre`` weight tiles are in flight
    already; ``nbytes``: one slot's copies); returns the count after it."""
    stages: gl.constexpr = w_bufs.shape[0]
    n_tile, m_tile, sid, kt0, k_tiles = _unit(u, n_tiles, m_tiles, tiles, SPLIT, PERSISTENT)
    for i in range(k_tiles):
        j = c + i  # this tile's place in the rings
        s = j % stages
        bar = load_ready.index(s)
        if j >= pre:  # (a fresh barrier passes the wait on its phase 1: slots not used yet)
            ph = (j // stages) & 1
            mbarrier.wait(w_empty.index(s), ph ^ 1)
            mbarrier.wait(x_empty.index(s), ph ^ 1)
            mbarrier.expect(bar, nbytes)
            _load_weight(w_desc, s2_desc, zp_desc, w_bufs, s2_bufs, zp_bufs, bar, s, n_tile * BN, kt0 + i, GROUP)
        kx = (kt0 + i) * 2 * HALF
        tma.async_copy_global_to_shared(x_desc, [m_tile * BM, kx], bar, xlo_bufs.index(s))
        tma.async_copy_global_to_shared(x_desc, [m_tile * BM, kx + HALF], bar, xhi_bufs.index(s))
    return c + k_tiles


@gluon.jit
def _scale_row_views(s2_bufs, zp_bufs):
    """The ring's group-scale and zero-point tiles (they arrive unswizzled) viewed as one plain 1-D row per (slot,
    group), for the consumers' row loads."""
    stages: gl.constexpr = s2_bufs.shape[0]
    srows: gl.constexpr = s2_bufs.shape[1]
    bn: gl.constexpr = s2_bufs.shape[2]
    plain: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
    return (s2_bufs._reinterpret(gl.int8, [stages * srows, bn], plain),
            zp_bufs._reinterpret(gl.uint8, [stages * srows, bn], plain))


@gluon.jit
def _widen_part(w_bufs, s2_bufs, zp_bufs, alo_bufs, ahi_bufs, load_ready, w_empty, a_ready, a_empty, n_tiles, m_tiles,
                tiles, SPLIT: gl.constexpr, HI_ROW: gl.constexpr):
    """Widen this CTA's K tiles into the MMA's A slots."""
    stages: gl.constexpr = w_bufs.shape[0]
    a_stages: gl.constexpr = alo_bufs.shape[0]
    srows: gl.constexpr = s2_bufs.shape[1]
    s2v, zpv = _scale_row_views(s2_bufs, zp_bufs)
    layout: gl.constexpr = gl.BlockedLayout([1, 16], [8, 4], [gl.num_warps(), 1], [1, 0])
    rows: gl.constexpr = gl.SliceLayout(1, layout)
    _, _, _, _, k_tiles = _unit(gl.program_id(0), n_tiles, m_tiles, tiles, SPLIT, False)
    for j in range(k_tiles):  # this tile's place in the rings
        s = j % stages
        a = j % a_stages
        mbarrier.wait(load_ready.index(s), (j // stages) & 1)
        p = w_bufs.index(s).load(layout)
        s_lo = s2v.index(s * srows).load(rows).to(gl.int32)
        z_lo = zpv.index(s * srows).load(rows).to(gl.int32)
        s_hi = s2v.index(s * srows + HI_ROW).load(rows).to(gl.int32)
        z_hi = zpv.index(s * srows + HI_ROW).load(rows).to(gl.int32)
        fence_async_shared()  # these reads, then the slot's next TMA write (the ping-pong loop drops it: gemm_pp)
        mbarrier.arrive(w_empty.index(s), count=1)
        w_lo, w_hi = _widen(p, s_lo, z_lo, s_hi, z_hi, False)
        mbarrier.wait(a_empty.index(a), ((j // a_stages) & 1) ^ 1)
        alo_bufs.index(a).store(w_lo)
        ahi_bufs.index(a).store(w_hi)
        fence_async_shared()  # generic-proxy stores, then the MMA's async-proxy reads
        mbarrier.arrive(a_ready.index(a), count=1)


@gluon.jit
def _mma_part(alo_bufs, ahi_bufs, xlo_bufs, xhi_bufs, load_ready, x_empty, a_ready, a_empty, sx_ptr, s1_ptr,
              bias_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, stride_sx, n_tiles, m_tiles, tiles, BM: gl.constexpr,
              SPLIT: gl.constexpr, EPILOGUE: gl.constexpr, HAS_BIAS: gl.constexpr, PDL: gl.constexpr):
    """This CTA's MMAs over its K tiles, then its epilogue."""
    stages: gl.constexpr = xlo_bufs.shape[0]
    a_stages: gl.constexpr = alo_bufs.shape[0]
    bn: gl.constexpr = alo_bufs.shape[1]
    warps: gl.constexpr = gl.num_warps()
    INSTR_N: gl.constexpr = min(BM, 128)  # wgmma int8: n <= 128 here (Triton refuses n = 256)
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[warps, 1],
                                                         instr_shape=[16, INSTR_N, 32])
    n_tile, m_tile, sid, kt0, k_tiles = _unit(gl.program_id(0), n_tiles, m_tiles, tiles, SPLIT, False)
    acc = gl.zeros((bn, BM), gl.int32, acc_layout)
    for j in range(k_tiles):  # this tile's place in the rings
        s = j % stages
        a = j % a_stages
        mbarrier.wait(load_ready.index(s), (j // stages) & 1)
        mbarrier.wait(a_ready.index(a), (j // a_stages) & 1)
        acc = warpgroup_mma(alo_bufs.index(a), xlo_bufs.index(s).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma(ahi_bufs.index(a), xhi_bufs.index(s).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(2, deps=[acc])  # the previous tile's two MMAs are done: release its slots
        if j > 0:
            mbarrier.arrive(x_empty.index((j - 1) % stages), count=1)
            mbarrier.arrive(a_empty.index((j - 1) % a_stages), count=1)
    acc = warpgroup_mma_wait(0, deps=[acc])
    if k_tiles > 0:  # the last tile's slots too: every slot filled is released (nothing waits for these)
        mbarrier.arrive(x_empty.index((k_tiles - 1) % stages), count=1)
        mbarrier.arrive(a_empty.index((k_tiles - 1) % a_stages), count=1)
    if PDL:
        _gdc_wait()  # the epilogue reads the act-quant's scales
    _epilogue(acc, sx_ptr, s1_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, stride_sx, n_tile * bn, m_tile * BM,
              sid, m_tile * n_tiles + n_tile, BM, SPLIT, EPILOGUE, HAS_BIAS)


@gluon.jit
def _epilogue(acc, sx_ptr, s1_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, stride_sx, n0, m0, sid, tile,
              BM: gl.constexpr, SPLIT: gl.constexpr, EPILOGUE: gl.constexpr, HAS_BIAS: gl.constexpr):
    """One output tile: the split-K reduction if any, then ``(acc * s_x) * s1 (+ bias)`` in fp32 (or the raw int32)."""
    bn: gl.constexpr = acc.shape[0]
    warps: gl.constexpr = gl.num_warps()
    # n fastest: coalesced out[m, n]
    out_layout: gl.constexpr = gl.BlockedLayout([1, 1], [32, 1], [4, warps // 4], [0, 1])
    res = gl.convert_layout(acc, out_layout)
    offs_n = n0 + gl.arange(0, bn, layout=gl.SliceLayout(1, out_layout))
    offs_m = m0 + gl.arange(0, BM, layout=gl.SliceLayout(0, out_layout))
    m_mask = offs_m < M
    mask = gl.expand_dims(m_mask, 0) & gl.expand_dims(offs_n < N, 1)
    offs = gl.expand_dims(offs_m, 0) * N + gl.expand_dims(offs_n, 1)
    if SPLIT > 1:
        res, mask = _reduce_splits(res, ws_ptr, cnt_ptr, offs, mask, sid, tile, M * N, SPLIT)
    if EPILOGUE:
        sx = gl.load(sx_ptr + offs_m * stride_sx, mask=m_mask, other=0.0)
        s1 = gl.load(s1_ptr + offs_n, mask=offs_n < N, other=0.0)
        val = res.to(gl.float32) * gl.expand_dims(sx, 0) * gl.expand_dims(s1, 1)
        if HAS_BIAS:
            val += gl.expand_dims(gl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(gl.float32), 1)
        gl.store(out_ptr + offs, val.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        gl.store(out_ptr + offs, res, mask=mask)


@gluon.jit
def _ws_a8w4_kernel(w_desc, x_desc, s2_desc, zp_desc, sx_ptr, s1_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K,
                    stride_sx, GROUP: gl.constexpr, BN: gl.constexpr, BM: gl.constexpr, STAGES: gl.constexpr,
                    SPLIT: gl.constexpr, WIDEN_WARPS: gl.constexpr, WIDEN_REGS: gl.constexpr, EPILOGUE: gl.constexpr,
                    HAS_BIAS: gl.constexpr, PDL: gl.constexpr):
    n_tiles = gl.cdiv(N, BN)
    m_tiles = gl.cdiv(M, BM)
    tiles = K // (2 * HALF)
    units = n_tiles * m_tiles * SPLIT  # (read by the loader's persistent form only: one unit per CTA here)
    w_bufs, xlo_bufs, xhi_bufs, s2_bufs, zp_bufs, load_ready, w_empty, x_empty = _load_ring(
        w_desc, x_desc, s2_desc, zp_desc, STAGES, 1)
    alo_bufs = gl.allocate_shared_memory(gl.int8, [A_STAGES, BN, HALF], w_desc.layout)
    ahi_bufs = gl.allocate_shared_memory(gl.int8, [A_STAGES, BN, HALF], w_desc.layout)
    a_ready = gl.allocate_shared_memory(gl.int64, [A_STAGES, 1], mbarrier.MBarrierLayout())
    a_empty = gl.allocate_shared_memory(gl.int64, [A_STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(A_STAGES):
        mbarrier.init(a_ready.index(i), count=1)
        mbarrier.init(a_empty.index(i), count=1)
    gl.warp_specialize([
        (_mma_part, (alo_bufs, ahi_bufs, xlo_bufs, xhi_bufs, load_ready, x_empty, a_ready, a_empty, sx_ptr, s1_ptr,
                     bias_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, stride_sx, n_tiles, m_tiles, tiles, BM, SPLIT, EPILOGUE,
                     HAS_BIAS, PDL)),
        (_load_part, (w_desc, x_desc, s2_desc, zp_desc, w_bufs, xlo_bufs, xhi_bufs, s2_bufs, zp_bufs, load_ready,
                      w_empty, x_empty, n_tiles, m_tiles, tiles, units, BN, BM, SPLIT, GROUP, PDL, False)),
        (_widen_part, (w_bufs, s2_bufs, zp_bufs, alo_bufs, ahi_bufs, load_ready, w_empty, a_ready, a_empty, n_tiles,
                       m_tiles, tiles, SPLIT, 1 if GROUP == 64 else 0)),
    ], [1, WIDEN_WARPS], [24, WIDEN_REGS])


@dataclass(frozen=True)
class WsConfig:
    """Weight rows and tokens per CTA, ring depth, K splits, the widen warps' registers, the kernel's register cap."""

    bn: int
    bm: int
    stages: int
    split: int
    widen_regs: int = 96
    # 12 warps (mma, widen, and the load warp's warpgroup) x 32 threads x 168 <= 64K registers; 80 fits two CTAs
    maxnreg: int = 168
    widen_warps: int = 4  # 8 lost at M = 256 (23.8 vs 24.4 us under ncu): the widening is not the limit there


MAX_M = 2047  # measured: from M = 2048 on, widen-once + the int8 GEMM (dgq.kernels.linear) ...
# ... except on long-K layers (K >= 2N: down projections) up to this M, where its 256-token tiles (since replaced by
# the ping-pong kernel's) won at M = 2048
# (11008 x 4096: 149.8 vs 160.7 us; 28672 x 8192: 743.6 vs 865.3) and at M = 4096 won one and tied one (310.3 vs
# 327.1; 1673.8 vs 1655.8); at M = 8192 widen-once won all five shapes by 3-19%
MAX_M_LONG_K = 4095


def takes(m: int, k: int, n: int) -> bool:
    """Whether the measured rule gives ``m`` tokens of a ``k``-deep, ``n``-wide layer to this kernel rather than to
    widen-once + the int8 GEMM (:data:`MAX_M`, :data:`MAX_M_LONG_K`)."""
    return m <= MAX_M or (m <= MAX_M_LONG_K and k >= 2 * n)


def config_for(m: int, n: int, sms: int = 132) -> WsConfig:
    """The measured rule per M regime for a GPU of ``sms`` SMs (H100: 132; ``benchmarks/gemm_ws_probe.py``, median of
    15 cold-L2 graph replays, benchmarks/notes_gemm.md "WS" runs).  The small-M kernel is latency-bound: each CTA
    keeps its ring's bytes in flight, so the rule fills the GPU with CTAs:

    * M <= 32: tiles of 16 (or 32) tokens, 80 registers, so two CTAs share an SM; 64-row weight tiles (6 stages)
      unless they alone outnumber the SMs (then 128 rows, 4 stages); K split in 2 or 4 while the CTAs still fit in
      one wave of two per SM.  At M = 32 this beat the 64-token rule below on all seven decode layer shapes of
      Llama-2-7B / Llama-3-8B (act-quant + GEMM: 84.8 against 102.0 us per Llama-2 layer; 11008 x 4096: 21.8
      against 31.3 us), within 7% of the best probed config on each.  From 17 tokens the ping-pong kernel's 32-token
      split tiles took the layers of 32-66 tile rows in session 17 (M = 32, int8 codes in: 4096 x 4096 10.8 against
      12.1 us, 11008 x 4096 15.9 against 19.0, 28672 x 8192 53.7 against 62.5);
    * 33-64 tokens on layers of more than half as many 128-row tiles as SMs (the others go to the ping-pong kernel
      split in K, :func:`dgq.kernels.gemm_pp.config_for`): 128-row tiles, one CTA per SM where the tiles fit one
      wave, two per SM (80 registers) only where they do not.  Two CTAs per SM beside a running act-quant slowed
      the pair by half on 4096 x 11008 (31 vs 22 us: the early-launched CTAs' waiting warps take the SMs' issue
      slots from the act-quant's);
    * more tokens, on the layers whose tiles are too few for the ping-pong kernel (:mod:`dgq.kernels.gemm_pp`, which
      took the 128- and 256-token tiles of this kernel's earlier rule in session 16): 6-stage rings of 128 tokens
      and 64-row tiles.  Tried at M = 256 and lost on every shape: two CTAs per SM (64-token tiles), K splits,
      256-row tiles, eight widening warps (``benchmarks/notes_gemm.md``, session 10).

    K splits reduce through per-tile arrival counts (module docstring); at M = 256 a split lost 2-3x (the partial
    sums' traffic rivals the weight's), so none is used there.
    """
    if m <= 32:
        bn = 128 if n // 64 > sms else 64
        tiles = n // bn
        split = max(s for s in (1, 2, 4) if s == 1 or tiles * s <= 2 * sms)
        return WsConfig(bn, 16 if m <= 16 else 32, 4 if bn == 128 else 6, split, 80, 80)
    if m <= 64:
        return WsConfig(128, 64, 4, 1) if n // 128 <= sms else WsConfig(128, 64, 4, 1, 80, 80)
    return WsConfig(64, 128, 6, 1)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def _is_hopper(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] == 9


def supported(kw: KernelWeight, device: torch.device) -> bool:
    """Whether this kernel can run ``kw`` here (module docstring); else the in-register kernel serves the layer."""
    group = kw.group_size
    return (device.type == "cuda" and kw.tile_k == 128 and (group == 64 or group % 128 == 0)
            and kw.out_features % 64 == 0 and _is_hopper(device))


def _scale_rows(group: int, bn: int) -> int:
    """Rows per TMA box of ``s2t``/``zpt``: the 128-wide K tile's groups (2 at g = 64, else 1), and at least 128
    bytes, because a bulk tensor copy needs a 128-byte-aligned shared-memory destination and the ring's slots sit back
    to back (one 64-byte row put odd slots off by 64: 'misaligned address' on the H100).  Extra rows are the next
    tile's groups, or zeros past the end; the widening reads the first rows only."""
    return max(2 if group == 64 else 1, 128 // bn)


def _nvmma(swizzle: int) -> gl.NVMMASharedLayout:
    return gl.NVMMASharedLayout(swizzle_byte_width=swizzle, element_bitwidth=8, rank=2)


def descriptors(x_s8: torch.Tensor, kw: KernelWeight, cfg: WsConfig) -> tuple:
    """The four TMA descriptors of one call: weight codes, activations (64-byte swizzle, the MMA's operand layout),
    and the group scales and zero points (plain rows)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    box = [_scale_rows(kw.group_size, cfg.bn), cfg.bn]
    return (TensorDescriptor.from_tensor(kw.codes, [cfg.bn, HALF.value], _nvmma(64)),
            TensorDescriptor.from_tensor(x_s8, [cfg.bm, HALF.value], _nvmma(64)),
            TensorDescriptor.from_tensor(kw.s2t, box, _nvmma(0)),
            TensorDescriptor.from_tensor(kw.zpt, box, _nvmma(0)))


def tma_call(x_s8: torch.Tensor, kw: KernelWeight, out_dtype: torch.dtype | None) -> Call:
    """:func:`dgq.kernels.gemm.prepare_call`, then the activations as a bulk tensor copy reads them: dense rows from a
    16-byte-aligned start (a copy where they are not)."""
    call = prepare_call(x_s8, kw, out_dtype)
    if not call.x.is_contiguous() or call.x.data_ptr() % 16:
        return call._replace(x=call.x.clone(memory_format=torch.contiguous_format))
    return call


def call_buffers(x: torch.Tensor, kw: KernelWeight, s_x: torch.Tensor | None, epilogue: bool, split: int) -> tuple:
    """The Gluon GEMMs' per-call tensors: split-K partials ``[split, M, N]`` int32, allocated per call so that a
    captured CUDA graph owns its own (the per-tile arrival counts are the layer's scratch, which every call leaves
    zeroed), and the activation scales as fp32; where a kernel reads neither, the scratch stands in."""
    dummy = kw.split_scratch
    ws = torch.empty((split, x.shape[0], kw.out_features), dtype=torch.int32, device=x.device) if split > 1 else dummy
    return ws, s_x.reshape(-1).float() if epilogue else dummy


def ws_a8w4_matmul(x_s8: torch.Tensor, kw: KernelWeight, s_x: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = torch.float16,
                   config: WsConfig | None = None) -> torch.Tensor:
    """A8W4 GEMM of int8 codes ``x_s8 [M, K]`` with scales ``s_x`` (``[M, 1]`` per token or one static scale), as
    :func:`dgq.kernels.gemm.a8w4_matmul` (``out_dtype=None``: the raw int32 accumulator); ``config`` pins a variant
    instead of :func:`config_for` (tests reach every path with it)."""
    x, out, m, k, n, epilogue = tma_call(x_s8, kw, out_dtype)
    if m == 0:
        return out
    cfg = config or config_for(m, n, _sm_count(x.device))
    ws, sx = call_buffers(x, kw, s_x, epilogue, cfg.split)
    dummy = kw.split_scratch
    n_tiles, m_tiles = triton.cdiv(n, cfg.bn), triton.cdiv(m, cfg.bm)
    if cfg.split > 1 and n_tiles * m_tiles > dummy.numel():
        raise AssertionError(f"{n_tiles * m_tiles} split-K tiles exceed the layer's {dummy.numel()} count slots")
    grid = (n_tiles, m_tiles, cfg.split)
    options = launch_options(x.device)
    _ws_a8w4_kernel[grid](*descriptors(x, kw, cfg), sx, kw.s1, bias if bias is not None else dummy, out, ws, dummy,
                          m, n, k, int(epilogue and sx.numel() > 1), GROUP=kw.group_size, BN=cfg.bn, BM=cfg.bm,
                          STAGES=cfg.stages, SPLIT=cfg.split, WIDEN_WARPS=cfg.widen_warps, WIDEN_REGS=cfg.widen_regs,
                          EPILOGUE=epilogue, HAS_BIAS=bias is not None, PDL=bool(options),
                          num_warps=4, maxnreg=cfg.maxnreg, **options)
    return out
