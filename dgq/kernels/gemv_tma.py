"""The one-token A8W4 GEMV fed by bulk tensor copies (TMA) into a shared-memory ring (Gluon, Hopper).

Why a second GEMV: :mod:`dgq.kernels.gemv` keeps the weight it has requested in registers, two chunks per program,
so the bytes in flight are bounded by the register file.  On the H100 it was latency-bound (ncu on 4096 x 11008:
DRAM 45%, 16% occupancy, 118 registers).  Here one thread of each CTA issues bulk copies of ``[BN, 64 KT]``-byte
weight boxes (``KT`` 128-wide K tiles of packed codes), their group scales and zero points (and, from codes, the
activation codes) into a ring of ``STAGES`` slots, each completing on its own mbarrier; the warps read a slot,
meet at a barrier, refill the slot with the tiles ``STAGES`` slots ahead, and compute while the copies run.  Bytes
in flight per CTA are ``STAGES x BN x 64 KT``, whatever the registers.  Measured against the register GEMV
(``benchmarks/gemv_probe.py --tma``, BENCHMARKS.md): 11.3 against 12.9 us on 4096 x 11008, 49 against 63 us on
8192 x 28672, equal on 4096 x 4096 (launch and ramp).  Slots of 2-4 K tiles (session 15) make each weight row's
request 128-256 bytes instead of 64, which DRAM serves faster: 8192 x 28672 from codes 46 us, 2.6 TB/s, as fast as
``torch.sum`` reads the same bytes (:func:`config_for`).

The arithmetic is :mod:`dgq.kernels.gemv`'s: each 32-bit word of packed codes widened to two words of four int8
weights (the byte-lane identity of :data:`dgq.kernels.gemm._WIDEN_PTX`), each against its activation word with one
``dp4a``; int32 sums, exact in any order, so the result is bit-identical to the other paths.

Quantizing inside (:func:`tma_gemv_float`, what a layer runs at one token): each CTA reads the whole row for the
absmax, so every CTA finds the act-quant kernel's scale, rounds its own K range once into shared memory and reads
its codes from there: one launch instead of two, faster on every measured layer shape (:func:`config_for`).  Where
a compiled graph computes the row's absmax beside its producer (``row_absmax``), the CTAs skip the whole-row read.

Weight tiles arrive unswizzled: a warp reads 8 rows x 64 bytes of one K tile per load (one contiguous 512-byte
span at ``KT = 1``; with wider slots the rows are 128-256 bytes apart, so the load takes 2x the shared-memory
wavefronts: not what bounds this kernel, whose DRAM is the limit).  Long K is split across CTAs (``SPLIT``) with
:mod:`dgq.kernels.gemv`'s protocol: partials stored to a per-call buffer, one acq_rel arrival per CTA on the layer's
own counter, the last split adds and rearms it.

The weight tiles of the first slots are requested before ``griddepcontrol.wait`` (the kernel launches
programmatically dependent on the activation's producer), the activation after it.  Needs sm_90, 128-wide K tiles, a
group of 64 or a multiple of 128 and ``out_features % 64 == 0`` (:func:`dgq.kernels.gemm_ws.supported`: the same
descriptors' rules).  The CPU interpreter cannot run Gluon: the CPU tests build it for sm_90a; ``pytest -m cuda``
checks it bit-exact on the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma

from dgq.formats import absmax_bits_dtype
from dgq.kernels.act_quant import _MIN_SCALE, _RNE_MAGIC
from dgq.kernels.gemm import KernelWeight
from dgq.kernels.gemm_ws import (
    _gdc_wait, _load_weight, _nvmma, _reduce_splits, _scale_rows, _widen, supported, tma_call,
)
from dgq.kernels.gemv import _DP4A2_PTX
from dgq.kernels.pdl import launch_options

HALF = gl.constexpr(64)  # packed bytes per row of one 128-wide K tile (and activation codes per nibble half)


@gluon.jit
def _add(a, b):
    return a + b


@gluon.jit
def _fill_ring(w_desc, x_desc, s2_desc, zp_desc, w_bufs, x_bufs, s2_bufs, zp_bufs, ready, n0, m, kt0, slots,
               GROUP: gl.constexpr, PDL: gl.constexpr, X_TMA: gl.constexpr):
    """Fills the ring's first slots: the weight tiles before waiting for the act-quant, the codes after it (``X_TMA``;
    else the kernel quantizes the activation itself)."""
    stages: gl.constexpr = w_bufs.shape[0]
    KT: gl.constexpr = w_desc.block_type.shape[1] // HALF  # K tiles per slot
    for i in range(gl.minimum(slots, stages)):  # the weight does not depend on the act-quant: request it first
        _arm_and_load_weight(w_desc, x_desc, s2_desc, zp_desc, w_bufs, s2_bufs, zp_bufs, ready.index(i), i, n0,
                             kt0 + i * KT, GROUP, X_TMA)
    if X_TMA:
        if PDL:
            _gdc_wait()
        for i in range(gl.minimum(slots, stages)):
            _load_codes(x_desc, x_bufs, ready.index(i), i, m, kt0 + i * KT, KT)


@gluon.jit
def _arm_and_load_weight(w_desc, x_desc, s2_desc, zp_desc, w_bufs, s2_bufs, zp_bufs, bar, s, n0, kt,
                         GROUP: gl.constexpr, X_TMA: gl.constexpr):
    """Arms slot ``s``'s barrier for every byte the slot will receive (with ``X_TMA`` the activation codes too, which
    :func:`_load_codes` copies) and copies the weight tiles from ``kt``, their scales and zero points into it."""
    KT: gl.constexpr = w_desc.block_type.shape[1] // HALF
    nbytes: gl.constexpr = (w_desc.block_type.nbytes + s2_desc.block_type.nbytes + zp_desc.block_type.nbytes
                            + (KT * x_desc.block_type.nbytes if X_TMA else 0))
    mbarrier.expect(bar, nbytes)
    _load_weight(w_desc, s2_desc, zp_desc, w_bufs, s2_bufs, zp_bufs, bar, s, n0, kt, GROUP)


@gluon.jit
def _load_codes(x_desc, x_bufs, bar, s, m, kt, KT: gl.constexpr):
    """Token ``m``'s activation codes of K tiles ``kt..kt+KT-1`` into slot ``s`` (one 128-code box per tile: a box
    is at most 256 wide)."""
    for j in gl.static_range(KT):
        tma.async_copy_global_to_shared(x_desc, [m, (kt + j) * 2 * HALF], bar, x_bufs.index(s * KT + j))


@gluon.jit
def _refill(w_desc, x_desc, s2_desc, zp_desc, w_bufs, x_bufs, s2_bufs, zp_bufs, bar, s, n0, m, kt,
            GROUP: gl.constexpr, X_TMA: gl.constexpr):
    """Arms slot ``s``'s barrier for the bytes it will receive and copies the K tiles from ``kt`` into the slot."""
    _arm_and_load_weight(w_desc, x_desc, s2_desc, zp_desc, w_bufs, s2_bufs, zp_bufs, bar, s, n0, kt, GROUP, X_TMA)
    if X_TMA:
        _load_codes(x_desc, x_bufs, bar, s, m, kt, w_desc.block_type.shape[1] // HALF)


@gluon.jit
def _max(a, b):
    return gl.maximum(a, b)


@gluon.jit
def _round_clamp_s8(v):
    """:func:`dgq.kernels.act_quant._round_clamp_s8` in Gluon (a Gluon kernel cannot call a Triton function; same
    constants, same operations, so the same codes)."""
    v = gl.minimum(gl.maximum(v, -127.0), 127.0) + _RNE_MAGIC
    return v.to(gl.int32, bitcast=True).to(gl.int8)


@gluon.jit
def _quantize_row(x_ptr, xq, sx_ptr, m, stride_x, kt0, K: gl.constexpr, DYNAMIC: gl.constexpr,
                  ABSMAX: gl.constexpr):
    """This CTA's K range of row ``m`` quantized into the shared buffer ``xq`` (int8, in the row's order: per K tile
    the 64 codes of the low nibbles, then the 64 of the high), as :mod:`dgq.kernels.act_quant` does: the row's
    scale (absmax over all of K, so every CTA finds the same) or the static one; returns the scale.  The range's
    values are loaded together with the absmax's, before the reduction: one trip to L2, not two.  With ``ABSMAX``
    the row's absmax comes at ``sx_ptr`` (:func:`dgq.formats.row_absmax_bits`, computed by the graph beside the
    row's producer) and the CTA reads its own range only."""
    warps: gl.constexpr = gl.num_warps()
    XQ: gl.constexpr = xq.shape[0]
    own_layout: gl.constexpr = gl.BlockedLayout([XQ // (32 * warps)], [32], [warps], [0])
    XL: gl.constexpr = gl.BlockedLayout([8], [32], [warps], [0])  # 16-byte loads of fp16
    XB: gl.constexpr = 8 * 32 * warps
    x_row = x_ptr + m * stride_x
    oc = kt0 * 2 * HALF + gl.arange(0, XQ, layout=own_layout)
    own = gl.load(x_row + oc, mask=oc < K, other=0.0)
    if DYNAMIC and ABSMAX:  # the bit pattern of max|x| in x's dtype: exactly the value the loop below finds
        amax = gl.load(sx_ptr + m).to(x_ptr.dtype.element_ty, bitcast=True).to(gl.float32)
        sx = gl.maximum(gl.div_rn(amax, 127.0), _MIN_SCALE)  # act_quant._dynamic_scale
    elif DYNAMIC:
        cols = gl.arange(0, XB, layout=XL)
        amax = gl.full([XB], 0.0, gl.float32, XL)
        for j in gl.static_range((K + XB - 1) // XB):  # unrolled: independent loads
            c = j * XB + cols
            amax = gl.maximum(amax, gl.abs(gl.load(x_row + c, mask=c < K, other=0.0).to(gl.float32)))
        sx = gl.maximum(gl.div_rn(gl.reduce(amax, 0, _max), 127.0), _MIN_SCALE)  # act_quant._dynamic_scale
    else:
        sx = gl.load(sx_ptr)
    xq.store(_round_clamp_s8(gl.div_rn(own.to(gl.float32), sx)))
    gl.thread_barrier()  # every thread's codes, then every warp reads them
    return sx


@gluon.jit
def _consume_ring(w_desc, x_desc, s2_desc, zp_desc, w_bufs, x_bufs, s2_bufs, zp_bufs, ready, x_ptr, sx_ptr, s1_ptr,
                  bias_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, stride_x, stride_sx, n0, m, sid, kt0, k_tiles,
                  K: gl.constexpr, GROUP: gl.constexpr, SPLIT: gl.constexpr, HAS_BIAS: gl.constexpr,
                  PDL: gl.constexpr, FUSE: gl.constexpr, DYNAMIC: gl.constexpr, ABSMAX: gl.constexpr):
    """Reads each slot's K tiles, refills the slot with the tiles ``stages`` slots ahead once every warp has read it,
    widens and multiplies; then the split-K reduction and the epilogue.  With ``FUSE`` the activation codes come from
    ``x_bufs``, this CTA's K range quantized here first (:func:`_quantize_row`)."""
    stages: gl.constexpr = w_bufs.shape[0]
    BN: gl.constexpr = w_bufs.shape[1]
    KT: gl.constexpr = w_bufs.shape[2] // HALF  # K tiles per slot
    srows: gl.constexpr = s2_bufs.shape[1]
    HI_ROW: gl.constexpr = 1 if GROUP == 64 else 0  # the high nibbles' scale row in a slot
    TW: gl.constexpr = HALF // 4  # 32-bit words per row of a tile
    layout: gl.constexpr = gl.BlockedLayout([1, 4], [8, 4], [gl.num_warps(), 1], [1, 0])  # 16-byte reads per thread
    rows: gl.constexpr = gl.SliceLayout(1, layout)
    cols: gl.constexpr = gl.SliceLayout(0, layout)
    plain2: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    plain1: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])  # rows of a 2-D view, read one at a time
    s2v = s2_bufs._reinterpret(gl.int8, [stages * srows, BN], plain1)
    zpv = zp_bufs._reinterpret(gl.uint8, [stages * srows, BN], plain1)
    if FUSE:
        if PDL:
            _gdc_wait()  # the activation's producer
        sx = _quantize_row(x_ptr, x_bufs, sx_ptr, m, stride_x, kt0, K, DYNAMIC, ABSMAX)
        xq = x_bufs._reinterpret(gl.int32, [x_bufs.shape[0] // HALF, TW], plain1)  # row 2t: tile t's low codes
    else:
        x_words = x_bufs._reinterpret(gl.int32, [2 * x_bufs.shape[0], TW], plain1)  # row 2b: box b's low codes
    acc = gl.zeros([BN, TW], gl.int32, layout)
    for i in range(gl.cdiv(k_tiles, KT)):  # slot by slot; a slot's tiles past K arrive zero-filled and add nothing
        s = i % stages
        kt = kt0 + i * KT
        mbarrier.wait(ready.index(s), (i // stages) & 1)
        words = w_bufs.index(s)._reinterpret(gl.int32, [BN, KT * TW], plain2)
        for j in gl.static_range(KT):
            p = words.slice(j * TW, TW, 1).load(layout)
            if FUSE:
                x_lo = gl.expand_dims(xq.index(2 * (i * KT + j)).load(cols), 0)
                x_hi = gl.expand_dims(xq.index(2 * (i * KT + j) + 1).load(cols), 0)
            else:
                x_lo = gl.expand_dims(x_words.index(2 * (s * KT + j)).load(cols), 0)
                x_hi = gl.expand_dims(x_words.index(2 * (s * KT + j) + 1).load(cols), 0)
            row = s * srows + ((kt + j) * 2 * HALF) // GROUP - (kt * 2 * HALF) // GROUP  # tile j's group in the slot
            s_lo = s2v.index(row).load(rows).to(gl.int32)
            z_lo = zpv.index(row).load(rows).to(gl.int32)
            s_hi = s2v.index(row + HI_ROW).load(rows).to(gl.int32)
            z_hi = zpv.index(row + HI_ROW).load(rows).to(gl.int32)
            if j == KT - 1:  # the slot's last reads: then it is refilled while this tile is computed
                fence_async_shared()  # these generic-proxy reads, then the slot's next bulk copy
                gl.thread_barrier()  # every warp has read slot s
                if (i + stages) * KT < k_tiles:
                    _refill(w_desc, x_desc, s2_desc, zp_desc, w_bufs, x_bufs, s2_bufs, zp_bufs, ready.index(s), s,
                            n0, m, kt + stages * KT, GROUP, not FUSE)
            w_lo, w_hi = _widen(p, s_lo, z_lo, s_hi, z_hi, True)
            acc = gl.inline_asm_elementwise(_DP4A2_PTX, "=r,r,r,r,r,r", [w_lo, x_lo, acc, w_hi, x_hi],
                                            dtype=gl.int32, is_pure=True, pack=1)
    total = gl.reduce(acc, 1, _add)  # [BN] (not gl.sum: the CPU tests build this under the interpreter's patches)
    offs_n = n0 + gl.arange(0, BN, layout=rows)
    n_mask = offs_n < N
    mask = n_mask
    if SPLIT > 1:  # exact int32 reduction across splits: the split that arrives last adds the others' partials
        total, mask = _reduce_splits(total, ws_ptr, cnt_ptr, m * N + offs_n, mask, sid,
                                     m * gl.num_programs(0) + gl.program_id(0), M * N, SPLIT)
    if not FUSE:
        sx = gl.load(sx_ptr + m * stride_sx)
    s1 = gl.load(s1_ptr + offs_n, mask=n_mask, other=0.0)
    val = total.to(gl.float32) * sx * s1  # the reference's order: (acc * s_x) * s1 (+ bias)
    if HAS_BIAS:
        val += gl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(gl.float32)
    gl.store(out_ptr + m * N + offs_n, val.to(out_ptr.dtype.element_ty), mask=mask)


@gluon.jit
def _tma_gemv_kernel(w_desc, x_desc, s2_desc, zp_desc, x_ptr, sx_ptr, s1_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr, M, N,
                     stride_x, stride_sx, K: gl.constexpr, GROUP: gl.constexpr, BN: gl.constexpr,
                     STAGES: gl.constexpr, SPLIT: gl.constexpr, HAS_BIAS: gl.constexpr, PDL: gl.constexpr,
                     FUSE: gl.constexpr, DYNAMIC: gl.constexpr, XQ: gl.constexpr, ABSMAX: gl.constexpr = False):
    """``FUSE``: ``x_ptr`` holds the float activations (row stride ``stride_x``), quantized here (``DYNAMIC``: per
    row, from the row's absmax bits at ``sx_ptr`` with ``ABSMAX``; else by the scale at ``sx_ptr``) into ``XQ``
    bytes of shared memory (:func:`code_buffer_bytes`), and ``x_desc`` is not read; else ``x_desc`` describes the
    int8 codes and ``sx_ptr`` their scales."""
    n0 = gl.program_id(0) * BN
    sid = gl.program_id(1)
    m = gl.program_id(2)
    TILES: gl.constexpr = K // (2 * HALF)
    KT: gl.constexpr = w_desc.block_type.shape[1] // HALF  # K tiles per slot
    PER: gl.constexpr = ((TILES + SPLIT - 1) // SPLIT + KT - 1) // KT * KT  # whole slots, so splits never overlap
    kt0 = sid * PER
    k_tiles = gl.maximum(gl.minimum(PER, TILES - kt0), 0)
    srows: gl.constexpr = s2_desc.block_type.shape[0]
    w_bufs = gl.allocate_shared_memory(gl.uint8, [STAGES] + w_desc.block_type.shape, w_desc.layout)
    if FUSE:  # this CTA's codes, whole
        x_bufs = gl.allocate_shared_memory(gl.int8, [XQ], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    else:
        x_bufs = gl.allocate_shared_memory(gl.int8, [STAGES * KT, 1, 2 * HALF], x_desc.layout)
    s2_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, srows, BN], s2_desc.layout)
    zp_bufs = gl.allocate_shared_memory(gl.uint8, [STAGES, srows, BN], zp_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
    _fill_ring(w_desc, x_desc, s2_desc, zp_desc, w_bufs, x_bufs, s2_bufs, zp_bufs, ready, n0, m, kt0,
               gl.cdiv(k_tiles, KT), GROUP, PDL, not FUSE)
    _consume_ring(w_desc, x_desc, s2_desc, zp_desc, w_bufs, x_bufs, s2_bufs, zp_bufs, ready, x_ptr, sx_ptr, s1_ptr,
                  bias_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, stride_x, stride_sx, n0, m, sid, kt0, k_tiles, K, GROUP,
                  SPLIT, HAS_BIAS, PDL, FUSE, DYNAMIC, ABSMAX)


@dataclass(frozen=True)
class TmaGemvConfig:
    """Weight rows per CTA, ring slots, K splits, warps, 128-wide K tiles per slot."""

    bn: int
    stages: int
    split: int
    warps: int = 4
    kt: int = 1  # 128-wide K tiles per slot: each row's bytes of a slot, 64 x kt, come in one bulk-copy request


MAX_ROWS = 768 * 64  # CTAs x rows: measured, the fastest variants ran 256-768 CTAs of 64 rows or 224 of 128
MIN_SPLIT_TILES = 8  # measured: no split left fewer than 8 K tiles per CTA among the fastest variants


def config_for(n: int, k: int, inside: bool = False) -> TmaGemvConfig:
    """The measured rule (H100, cold-L2 graph replays, ``benchmarks/gemv_probe.py --tma``, notes).

    Rows and splits (session 9, the benchmark's and the decode step's ten shapes): from codes, small CTAs (64 rows)
    on layers up to 24576 outputs, 128 rows beyond; K split in powers of two up to 8 while the CTAs' rows stay within
    :data:`MAX_ROWS` and each keeps :data:`MIN_SPLIT_TILES` tiles.  Quantizing inside (``inside``), every CTA first
    reads the whole row for its absmax, so long rows want fewer, wider CTAs with more warps to read them: on
    K >= 8192 with N <= 8192, 128 rows, 8 warps, K in 8; on wide layers 64 rows in 2 splits.  A loader warp
    (warp-specialized) won on none of five shapes (code at b85dc05).

    Slots (session 15, ``--tma slots``): a ring of 2 slots of several K tiles beat 4 slots of one on the five
    benchmark shapes.  The bytes in flight are alike; what changes is the bulk copies' request per weight row, 64
    bytes per K tile: two or four tiles a slot make it 128 or 256 bytes, which DRAM serves faster (8192 x 28672 from
    codes: 45.8 against 49.4 us; the same codes stored tile by tile, 4 KB contiguous per tile but still 64-byte
    rows, gained about half as much: ``results/gemv_tiled_h100_s15.json``).  From codes 4 tiles a
    slot where a split has 16 K tiles or more, else 2 (``--tma rule``: 4 lost 1-1.2 us on the K = 4096 layers split
    into 8-tile ranges); quantizing inside 2, whose CTAs also hold their K range of codes in shared memory
    (8192 x 28672: 48.1 against 51.1 us; against the rings of 4 one-tile slots, the new rule won on all ten shapes
    by 1-5%)."""
    if inside and k >= 8192 and n <= 8192:
        return TmaGemvConfig(128, 2, 8, 8, kt=2)
    if inside and n > 24576:
        return TmaGemvConfig(64, 2, 2, kt=2)
    bn = 64 if n <= 24576 else 128
    tiles, k_tiles = triton.cdiv(n, bn), k // 128
    split = 1
    while split < 8 and tiles * split * 2 * bn <= MAX_ROWS and k_tiles // (split * 2) >= MIN_SPLIT_TILES:
        split *= 2
    return TmaGemvConfig(bn, 2, split, kt=4 if not inside and k_tiles // split >= 16 else 2)


def code_buffer_bytes(k: int, cfg: TmaGemvConfig) -> int:
    """Shared memory for one CTA's activation codes when the kernel quantizes them: its K range (whole slots, as the
    kernel splits K), rounded up to a power of two (Gluon's shared buffers) and to at least one step of the
    quantizing loop (8 codes per thread)."""
    return triton.next_power_of_2(max(split_tiles(k, cfg) * 128, 8 * 32 * cfg.warps))


def split_tiles(k: int, cfg: TmaGemvConfig) -> int:
    """128-wide K tiles per split: an even share, rounded up to whole slots (the kernel's ``PER``)."""
    return triton.cdiv(triton.cdiv(k // 128, cfg.split), cfg.kt) * cfg.kt


def slot_scale_rows(group: int, cfg: TmaGemvConfig) -> int:
    """Rows of ``s2t``/``zpt`` per slot: the groups of its ``kt`` K tiles (2 per tile at g = 64, at most 1 per tile
    beyond), and :func:`dgq.kernels.gemm_ws._scale_rows`' 128-byte minimum."""
    return max(_scale_rows(group, cfg.bn), (2 if group == 64 else 1) * cfg.kt)


def descriptors(kw: KernelWeight, cfg: TmaGemvConfig, x_s8: torch.Tensor | None) -> tuple:
    """The four TMA descriptors of one call, all unswizzled: weight codes ``[BN, 64 kt]`` bytes (a slot's ``kt``
    K tiles), one token's 128 codes of a K tile (``x_s8 is None``: the kernel quantizes the activation itself, and
    the weight's descriptor stands in, unread), and the slot's group scales and zero points (rows of
    ``s2t``/``zpt``, :func:`slot_scale_rows`)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    box = [slot_scale_rows(kw.group_size, cfg), cfg.bn]
    w = TensorDescriptor.from_tensor(kw.codes, [cfg.bn, HALF.value * cfg.kt], _nvmma(0))
    return (w, w if x_s8 is None else TensorDescriptor.from_tensor(x_s8, [1, 2 * HALF.value], _nvmma(0)),
            TensorDescriptor.from_tensor(kw.s2t, box, _nvmma(0)), TensorDescriptor.from_tensor(kw.zpt, box, _nvmma(0)))


def tma_gemv(x_s8: torch.Tensor, kw: KernelWeight, s_x: torch.Tensor, bias: torch.Tensor | None = None,
             out_dtype: torch.dtype = torch.float16, config: TmaGemvConfig | None = None) -> torch.Tensor:
    """``(s_x * s1) * (x_s8 @ W_s8ᵀ) + bias`` for a few tokens ``x_s8`` int8 ``[M, K]`` (``s_x`` per token or one
    static scale), bit for bit :func:`dgq.kernels.gemv.a8w4_gemv`'s; ``config`` pins a variant (tests, probes)."""
    _check(kw, x_s8.device)
    x, out, *_ = tma_call(x_s8, kw, out_dtype)
    sx = s_x.reshape(-1).float()
    return _launch(x, x, int(sx.numel() > 1), kw, sx, bias, out, config, fuse=False, dynamic=True)


def tma_gemv_float(x: torch.Tensor, kw: KernelWeight, static_scale: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16,
                   config: TmaGemvConfig | None = None, row_absmax: torch.Tensor | None = None) -> torch.Tensor:
    """The GEMV from float activations ``x [M, K]``, quantized inside with :mod:`dgq.kernels.act_quant`'s arithmetic
    (per row, or by ``static_scale``): :func:`tma_gemv` on that kernel's codes, bit for bit, in one launch.  Each
    CTA reads the row whole for the dynamic scale (from L2, while its first weight tiles are on their way) and
    rounds only its own K range, once, into shared memory.  It beat the act-quant + :func:`tma_gemv` on every
    benchmark and decode layer shape (with :func:`config_for`'s ``inside`` rule; notes).

    ``row_absmax`` (dynamic only): each row's :func:`dgq.formats.row_absmax_bits`, already computed (a compiled
    graph fuses it into the row's producer); the CTAs then read only their own K range, with the same result."""
    _check(kw, x.device)
    if x.dim() != 2 or x.shape[1] != kw.in_features or not x.is_floating_point():
        raise ValueError(f"x must be a float [M, {kw.in_features}], got {x.dtype}{list(x.shape)}")
    x = x if x.stride(1) == 1 else x.contiguous()
    out = torch.empty((x.shape[0], kw.out_features), dtype=out_dtype, device=x.device)
    if row_absmax is not None:
        ints = absmax_bits_dtype(x.dtype)
        if static_scale is not None or row_absmax.dtype != ints or row_absmax.shape != (x.shape[0], 1):
            raise ValueError(f"row_absmax is a dynamic layer's {ints}[{x.shape[0]}, 1] (dgq.formats.row_absmax_bits), "
                             f"got {row_absmax.dtype}{list(row_absmax.shape)}"
                             + (" with a static scale" if static_scale is not None else ""))
        sx = row_absmax.contiguous()
    else:  # dynamic: the kernel computes each row's scale and never reads sx (any fp32 tensor stands in)
        sx = kw.s1 if static_scale is None else static_scale.detach().to(device=x.device,
                                                                         dtype=torch.float32).reshape(1)
    return _launch(None, x, x.stride(0), kw, sx, bias, out, config or config_for(kw.out_features, x.shape[1], True),
                   fuse=True, dynamic=static_scale is None, absmax=row_absmax is not None)


def _check(kw: KernelWeight, device: torch.device) -> None:
    if not supported(kw, device):
        raise ValueError(f"the TMA GEMV needs Hopper, 128-wide K tiles, a group of 64 or a multiple of 128 and "
                         f"out_features % 64 == 0; got K={kw.in_features} N={kw.out_features} g={kw.group_size} on "
                         f"{device}")


def _launch(x_s8: torch.Tensor | None, x: torch.Tensor, stride: int, kw: KernelWeight, sx: torch.Tensor,
            bias: torch.Tensor | None, out: torch.Tensor, config: TmaGemvConfig | None, fuse: bool,
            dynamic: bool, absmax: bool = False) -> torch.Tensor:
    m, k = x.shape
    n = kw.out_features
    if m == 0:
        return out
    cfg = config or config_for(n, k)
    cnt = kw.split_scratch
    grid = (triton.cdiv(n, cfg.bn), cfg.split, m)
    if cfg.split > 1 and grid[0] * m > cnt.numel():
        raise ValueError(f"the GEMV serves a few tokens; {m} rows exceed the layer's split-K count slots")
    ws = torch.empty((cfg.split, m, n), dtype=torch.int32, device=x.device) if cfg.split > 1 else cnt
    options = launch_options(x.device)
    _tma_gemv_kernel[grid](*descriptors(kw, cfg, x_s8), x, sx, kw.s1, bias if bias is not None else cnt, out, ws,
                           cnt, m, n, stride if fuse else 0, 0 if fuse else stride, K=k, GROUP=kw.group_size,
                           BN=cfg.bn, STAGES=cfg.stages, SPLIT=cfg.split, HAS_BIAS=bias is not None,
                           PDL=bool(options), FUSE=fuse, DYNAMIC=dynamic, XQ=code_buffer_bytes(k, cfg) if fuse else 0,
                           ABSMAX=absmax, num_warps=cfg.warps, **options)
    return out
