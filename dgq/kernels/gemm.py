"""The A8W4 GEMM for 2..2047 tokens where the warp-specialized Hopper kernel (:mod:`dgq.kernels.gemm_ws`) does not
run (another GPU, a layer with 64-wide K tiles), and the layout and widening every A8W4 path shares: one transposed
Triton kernel, the int4 weight widened to int8 in registers.  :mod:`dgq.kernels.linear` says which path serves which
M.  It is also the A8W4 tensor-core kernel that Triton's CPU interpreter runs in the tests.

``out[m, n] = (s_x[m] * s1[n]) * sum_k x_s8[m, k] * W_s8[n, k]`` (+ bias), int32 accumulation, so the accumulator
equals :func:`dgq.formats.int_matmul` bit for bit.  The kernel computes ``out^T = W_s8 @ x_s8^T``: the weight tile
``[BLOCK_N, TILE_K]`` is unpacked in registers and is the *left* (register-sourced) operand of the int8 tensor-core
dot, the activation tile the right one, and the tokens are the dot's N dimension.  Triton on Hopper keeps a register
operand only on the left, so this orientation is what lets the widening stay in registers at every M (M <= 16 pads
to one 16-token tile; larger M uses 32..256-token tiles).

**Widening, four weights at a time.**  The format guarantees ``|s2 * (u4 - zp)| <= 127`` for every stored code, so
``s2 * u4 + c`` with ``c = 128 - s2 * zp`` lies in [1, 255].  Four codes sit in the four bytes of a 32-bit word
(one per byte, after masking a nibble); one 32-bit multiply-add by ``s2`` plus ``c * 0x01010101`` then yields the
four values as uint8 lanes without a carry between lanes, and ``xor 0x80808080`` turns them into the int8 weights.
That is :data:`_WIDEN_PTX` (nibble mask/shift, one ``mad``, one ``xor`` per four weights).  The CPU interpreter cannot
run PTX, so ``USE_ASM=False`` computes the same bytes with plain integer arithmetic (the tests' path);
``tests/test_kernels.py`` proves the byte-lane identity exhaustively for every ``(s2, zp, u4)`` the format allows.

**Layout** (:class:`KernelWeight`, the buffers :class:`dgq.nn.QuantLinear` holds; :mod:`dgq.packing`): codes
``[N, K/2]`` row-major;
within each ``TILE_K``-wide K tile, byte ``j`` holds ``k = j`` (low nibble) and ``k = TILE_K/2 + j`` (high nibble),
so a tile is two dots of depth ``TILE_K/2`` with no interleave.  ``s2``/``zp`` are ``[K/g, N]`` so a tile's scales
are one coalesced row; ``c`` is formed once per tile row from them (``2 + 2`` ops per row, not per weight), which
moves 1 byte per group instead of the 4 a precomputed int32 constant would cost on the memory-bound decode path.

**Activations** arrive as int8 codes from :func:`dgq.kernels.act_quant.quantize_activations_triton` (one launch
before the GEMM).  Quantizing inside the GEMM was built and measured (benchmarks/notes_gemm.md): every program must
first reduce its rows' absmax over all of K, a chain of dependent L2 loads that made the decode GEMM 3-25x slower
than the separate launch.  The GEMMs are launched *programmatically dependent* on it (:mod:`dgq.kernels.pdl`):
their programs become resident while it runs and wait for its codes with ``griddepcontrol.wait``, which hides the
launch latency (3-7% at M <= 16 on the H100).

**Split-K** (M <= 256, long K): each split adds its int32 partial sums into a zeroed buffer allocated *per call*
(so a captured CUDA graph owns its own copy; nothing global can be reallocated under it) and counts its arrival per
output element; the split that completes an element (acquire on the counter) applies the epilogue.  Integer
addition is exact in any order, so the result is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from dgq.errors import DGQError
from dgq.formats import DualGrainedWeight
from dgq.kernels.pdl import launch_options
from dgq.packing import layout_tile, pack_tiled


class KernelShapeError(DGQError, ValueError):
    """A layer whose shape the CUDA kernel does not support (its exact CPU reference still runs it)."""


def tile_k_for(k: int, group: int) -> int:
    """The K tile of the kernel layout (:func:`dgq.packing.layout_tile`): 128 where K and the group allow it, else 64
    (e.g. K = 576); a layer laid out in whole rows is refused."""
    if k % 64:
        raise KernelShapeError(f"the A8W4 CUDA kernel needs in_features to be a multiple of 64, got {k}")
    tile = layout_tile(k, group)
    if tile not in (64, 128):
        raise KernelShapeError(f"the A8W4 CUDA kernel needs the group size to be a multiple of 32 (64 when "
                               f"in_features is a multiple of 128), got {group}")
    return tile


@dataclass(frozen=True)
class KernelWeight:
    """The A8W4 weight as the kernels read it: a view of a layer's buffers (the checkpoint stores another layout).

    ``codes`` uint8 ``[N, K/2]`` (module docstring: per ``tile_k`` tile, byte j = codes of k j and tile_k/2 + j);
    ``s2t`` int8 and ``zpt`` uint8 ``[K/g, N]``; ``s1`` fp32 ``[N]``; ``split_scratch`` int32 ``[2 N]`` zeros, the
    per-tile split-K arrival counters of the GEMV and the warp-specialized kernel (:mod:`dgq.kernels.gemv`,
    :mod:`dgq.kernels.gemm_ws`), which every call leaves zeroed.
    """

    codes: torch.Tensor
    s2t: torch.Tensor
    zpt: torch.Tensor
    s1: torch.Tensor
    group_size: int
    tile_k: int
    split_scratch: torch.Tensor

    @classmethod
    def of(cls, codes: torch.Tensor, s2t: torch.Tensor, zpt: torch.Tensor, s1: torch.Tensor,
           split_scratch: torch.Tensor, group_size: int) -> "KernelWeight":
        """A view of tensors already in this layout (a :class:`dgq.nn.QuantLinear`'s buffers: no copy); the K tile
        follows from the shape, and a shape the kernels cannot run is refused here (:func:`tile_k_for`)."""
        return cls(codes, s2t, zpt, s1, group_size, tile_k_for(2 * codes.shape[1], group_size), split_scratch)

    @classmethod
    def from_dual_grained(cls, dg: DualGrainedWeight) -> "KernelWeight":
        """A standalone kernel weight (benchmarks, tests), packed from the unpacked format tensors."""
        n, k = dg.shape
        return cls.of(pack_tiled(dg.u4, tile_k_for(k, dg.group_size)), dg.s2.t().contiguous(),
                      dg.zp.t().contiguous(), dg.s1.float().contiguous(),
                      torch.zeros(2 * n, dtype=torch.int32, device=dg.u4.device), dg.group_size)

    @property
    def in_features(self) -> int:
        return self.codes.shape[1] * 2

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]


def widen_ptx(s_lo: str, c_lo: str, s_hi: str, c_hi: str) -> str:
    """Four int4 codes -> four int8 weights per 32-bit word, for each nibble half: ``$2`` = four packed code bytes
    (two nibbles each), out ``$0`` (low nibbles) and ``$1`` (high nibbles); the arguments name the operands holding
    each half's s2 and ``c * 0x01010101`` (they differ with ``inline_asm_elementwise``'s packing)."""
    return f"""{{
.reg .b32 lo, hi;
and.b32 lo, $2, 0x0F0F0F0F;
shr.u32 hi, $2, 4;
and.b32 hi, hi, 0x0F0F0F0F;
mad.lo.u32 lo, lo, {s_lo}, {c_lo};
mad.lo.u32 hi, hi, {s_hi}, {c_hi};
xor.b32 $0, lo, 0x80808080;
xor.b32 $1, hi, 0x80808080;
}}"""


# With pack=4 each int32 operand arrives as 4 registers, one per packed element, all equal (the four elements of one
# call share a tile row; the tests check bit-exactness): s2 / c of the low nibbles are $3 / $7, of the high $11 / $15.
_WIDEN_PTX = tl.constexpr(widen_ptx("$3", "$7", "$11", "$15"))


@triton.jit
def _widen(p, s_lo, z_lo, s_hi, z_hi, USE_ASM: tl.constexpr):
    """int8 weights ``(s2 * (u4 - zp))`` of the low and high nibbles of uint8 ``p`` [BN, H]; scales are [BN] int32."""
    if USE_ASM:
        c_lo = ((128 - s_lo * z_lo).to(tl.uint32, bitcast=True) * 0x01010101).to(tl.int32, bitcast=True)
        c_hi = ((128 - s_hi * z_hi).to(tl.uint32, bitcast=True) * 0x01010101).to(tl.int32, bitcast=True)
        w_lo, w_hi = tl.inline_asm_elementwise(
            _WIDEN_PTX, "=r,=r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r",
            [p, s_lo[:, None], c_lo[:, None], s_hi[:, None], c_hi[:, None]],
            dtype=(tl.int8, tl.int8), is_pure=True, pack=4)
    else:
        q = p.to(tl.int32)
        w_lo = ((q & 15) * s_lo[:, None] - (s_lo * z_lo)[:, None]).to(tl.int8)
        w_hi = ((q >> 4) * s_hi[:, None] - (s_hi * z_hi)[:, None]).to(tl.int8)
    return w_lo, w_hi


@triton.jit
def _load(ptrs, mask):
    """A load whose mask may be None (a tile known to lie inside the tensor): masked elements read 0."""
    if mask is None:
        v = tl.load(ptrs)
    else:
        v = tl.load(ptrs, mask=mask, other=0)
    return v


@triton.jit
def _a8w4_kernel(x_ptr, w_ptr, s2_ptr, zp_ptr, sx_ptr, s1_ptr, bias_ptr, out_ptr, ws_ptr,
                 M, N, stride_x, stride_o, stride_sx, M_BUCKET,
                 K: tl.constexpr, GROUP: tl.constexpr, TILE_K: tl.constexpr,
                 EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, USE_ASM: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr,
                 EVEN_N: tl.constexpr, EVEN_K: tl.constexpr):
    """int8 codes ``x`` with scales at ``sx_ptr`` (per token, or one static scale: ``stride_sx`` 0); ``w_ptr`` the
    packed codes of :class:`KernelWeight`.
    EVEN_N / EVEN_K (set by :func:`_even`): no weight tile crosses N, every split's tiles lie inside K, so those loads
    need no mask (masks on the contiguous dimension cost vectorized loads and pipelining).
    """
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    if USE_ASM:
        tl.extra.cuda.gdc_wait()  # launched early (programmatic dependent launch): wait for the producer of x
    num_m, num_n = (M + BLOCK_M - 1) // BLOCK_M, (N + BLOCK_N - 1) // BLOCK_N
    first_m = (pid // (GROUP_M * num_n)) * GROUP_M  # GROUP_M token tiles share each weight tile while it is in L2
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % rows_in_group
    pid_n = (pid % (GROUP_M * num_n)) // rows_in_group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[None, :] * stride_x

    sx = tl.load(sx_ptr + offs_m * stride_sx, mask=m_mask, other=0.0)

    HALF: tl.constexpr = TILE_K // 2
    kh = tl.arange(0, HALF)
    TILES: tl.constexpr = (K // TILE_K + SPLIT_K - 1) // SPLIT_K  # the last split's tiles past K load as zeros
    acc = tl.full([BLOCK_N, BLOCK_M], 0, tl.int32)
    for i in range(TILES):
        k0 = (pid_k * TILES + i) * TILE_K
        if EVEN_K:
            x_mask = m_mask[None, :]
            w_mask = None if EVEN_N else n_mask[:, None]
            s_mask = None if EVEN_N else n_mask
        else:
            in_k = k0 < K
            x_mask = m_mask[None, :] & in_k
            w_mask = n_mask[:, None] & in_k
            s_mask = n_mask & in_k  # masked rows get s2 = zp = 0: weight 0
        x_lo = tl.load(x_rows + (k0 + kh)[:, None], mask=x_mask, other=0)
        x_hi = tl.load(x_rows + (k0 + HALF + kh)[:, None], mask=x_mask, other=0)
        p = _load(w_ptr + offs_n.to(tl.int64)[:, None] * (K // 2) + (k0 // 2 + kh)[None, :], w_mask)
        g_lo = k0 // GROUP
        s_lo = _load(s2_ptr + g_lo * N + offs_n, s_mask).to(tl.int32)
        z_lo = _load(zp_ptr + g_lo * N + offs_n, s_mask).to(tl.int32)
        if GROUP >= TILE_K:  # one group per tile
            s_hi, z_hi = s_lo, z_lo
        else:
            s_hi = _load(s2_ptr + (g_lo + 1) * N + offs_n, s_mask).to(tl.int32)
            z_hi = _load(zp_ptr + (g_lo + 1) * N + offs_n, s_mask).to(tl.int32)
        w_lo, w_hi = _widen(p, s_lo, z_lo, s_hi, z_hi, USE_ASM)
        acc = tl.dot(w_lo, x_lo, acc, out_dtype=tl.int32)
        acc = tl.dot(w_hi, x_hi, acc, out_dtype=tl.int32)

    mask = n_mask[:, None] & m_mask[None, :]
    if SPLIT_K > 1:
        # Per-element arrival (no barrier needed): relaxed add of the partial sum, then an acq_rel count; the split
        # that brings the count to SPLIT_K reads the complete sum (acquire) and owns the epilogue.
        offs = offs_m.to(tl.int64)[None, :] * N + offs_n[:, None]
        tl.atomic_add(ws_ptr + offs, acc, mask=mask, sem="relaxed")
        arrived = tl.atomic_add(ws_ptr + M * N + offs, 1, mask=mask, sem="acq_rel")
        mask = mask & (arrived == SPLIT_K - 1)
        acc = tl.atomic_add(ws_ptr + offs, 0, mask=mask, sem="acquire")
    out_ptrs = out_ptr + offs_m.to(tl.int64)[None, :] * stride_o + offs_n[:, None]
    if EPILOGUE:  # the reference's order: (acc * s_x) * s1 (+ bias) in fp32, then the output's dtype
        s1 = tl.load(s1_ptr + offs_n, mask=n_mask, other=0.0)
        val = acc.to(tl.float32) * sx[None, :] * s1[:, None]
        if HAS_BIAS:
            val += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptrs, val.to(out_ptrs.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptrs, acc, mask=mask)


def _cfg(bm: int, bn: int, split_k: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "SPLIT_K": split_k, "GROUP_M": 8}, num_warps=warps,
                         num_stages=stages)


# A few configs per M regime (each compiles once per K), for H100 (132 SMs): BLOCK_N >= 64 (the wgmma's M);
# decode tiles of 16 tokens; 32..128-token tiles up to M = 256, where small tiles keep 132 SMs busy; split-K up to
# M = 256 for short-N/long-K shapes (at M = 64 without it, 11008x4096 took 2.3x the M = 16 time); 128..256-token
# tiles beyond.  The pruner keeps the regime that matches M.  Up to M = 64 only 64-row weight tiles: in one H100 run
# the autotuner picked 128-row tiles for N = 11008 at M = 16 / 64 that replayed 60% slower than the 64-row tiles it
# picked in the run before (benchmarks/notes_gemm.md), and no run measured a 128-row tile faster there.
REGIMES = (16, 64, 256)  # M upper bounds of the decode, small and medium regimes; larger M is the large regime
_CONFIGS = {
    16: [_cfg(16, 64, 1, 4, 4), _cfg(16, 64, 2, 4, 4), _cfg(16, 64, 4, 4, 4), _cfg(16, 64, 8, 4, 4),
         _cfg(16, 64, 2, 4, 8)],
    64: [_cfg(32, 64, 1, 4, 4), _cfg(64, 64, 1, 4, 4), _cfg(32, 64, 4, 4, 4), _cfg(64, 64, 2, 4, 4)],
    256: [_cfg(64, 128, 1, 4, 4), _cfg(128, 64, 1, 4, 4), _cfg(64, 64, 1, 4, 4), _cfg(128, 128, 1, 8, 4),
          _cfg(64, 64, 2, 4, 4), _cfg(64, 128, 2, 4, 4)],
    0: [_cfg(128, 128, 1, 4, 4), _cfg(128, 128, 1, 8, 4), _cfg(256, 128, 1, 8, 3), _cfg(128, 256, 1, 8, 3),
        _cfg(256, 64, 1, 8, 4)],
}


def regime(m: int) -> int:
    """The key of :data:`_CONFIGS` for ``m`` tokens."""
    return next((r for r in REGIMES if m <= r), 0)


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    wanted = _CONFIGS[regime({**named_args, **kwargs}["M"])]
    return [c for c in configs if any(c is w for w in wanted)]


_kernel = triton.heuristics({"EVEN_N": lambda a: a["N"] % a["BLOCK_N"] == 0,
                             "EVEN_K": lambda a: (a["K"] // a["TILE_K"]) % a["SPLIT_K"] == 0})(_a8w4_kernel)
_tuned = triton.autotune([c for cs in _CONFIGS.values() for c in cs],
                         key=["M_BUCKET", "N", "K", "GROUP", "EPILOGUE"],
                         prune_configs_by={"early_config_prune": _prune},
                         reset_to_zero=["ws_ptr"])(_kernel)  # split-K timings include the per-call zeroing


_chosen_split: dict[tuple, int] = {}  # autotuning key -> SPLIT_K of the config the autotuner chose for it


def _use_asm(device: torch.device) -> bool:
    """Inline PTX on a real GPU; plain integer arithmetic in Triton's CPU interpreter, which cannot run PTX."""
    return device.type == "cuda"


def launch(tuned: triton.runtime.Autotuner, kernel, grid, args: tuple, meta: dict,  # noqa: ANN001
           config: triton.Config | None) -> triton.Config:
    """Run ``kernel`` through its autotuner ``tuned``, or with the pinned ``config``; returns the config that ran (the
    split-K kernels remember its SPLIT_K per key, so later calls allocate a reduction buffer only when it splits).

    Triton's CPU interpreter cannot time anything: there the first config left after pruning runs (the kernel tests
    pin each config in turn; this serves the operator and compile tests)."""
    if config is None and args[0].device.type != "cuda":
        nargs = dict(zip(tuned.arg_names, args))
        config = (tuned.early_config_prune(tuned.configs, nargs, **meta) if tuned.early_config_prune
                  else tuned.configs)[0]
    if config is None:
        tuned[grid](*args, **meta)
        return tuned.best_config
    kernel[grid(config.kwargs)](*args, **meta, **config.kwargs, num_warps=config.num_warps,
                                num_stages=config.num_stages)
    return config


class Call(NamedTuple):
    """One GEMM call's operands as :func:`prepare_call` leaves them, and its sizes."""

    x: torch.Tensor  # int8 [M, K], rows contiguous
    out: torch.Tensor  # [M, N], out_dtype or the int32 accumulator
    m: int
    k: int
    n: int
    epilogue: bool  # False: the raw int32 accumulator, no scales or bias


def prepare_call(x_s8: torch.Tensor, kw: KernelWeight, out_dtype: torch.dtype | None) -> Call:
    """The tensor-core GEMMs' common entry: ``x_s8`` checked (int8 ``[M, K]``) and made row-contiguous, and the output
    allocated (``out_dtype=None``: the int32 accumulator)."""
    if x_s8.dtype != torch.int8 or x_s8.dim() != 2 or x_s8.shape[-1] != kw.in_features:
        raise ValueError(f"x_s8 must be int8 [M, {kw.in_features}], got {x_s8.dtype}{list(x_s8.shape)}")
    x = x_s8 if x_s8.stride(-1) == 1 else x_s8.contiguous()
    out = torch.empty((x.shape[0], kw.out_features), dtype=out_dtype or torch.int32, device=x.device)
    return Call(x, out, x.shape[0], x.shape[1], kw.out_features, out_dtype is not None)


def a8w4_matmul(x_s8: torch.Tensor, kw: KernelWeight, s_x: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = torch.float16,
                config: triton.Config | None = None) -> torch.Tensor:
    """A8W4 GEMM of int8 codes ``x_s8 [M, K]`` with scales ``s_x`` (``[M, 1]`` per token or one static scale).

    ``out_dtype=None`` returns the raw int32 accumulator (``s_x`` and ``bias`` are then ignored).  ``config`` pins
    one kernel configuration instead of autotuning (tests use it to reach every code path).
    """
    x, out, m, k, n, epilogue = prepare_call(x_s8, kw, out_dtype)
    if m == 0:
        return out
    sx = s_x.reshape(-1).float() if epilogue else None
    # The split-K buffer (sums, then arrival counts) is allocated per call, and zeroed, only where the config splits:
    # the pinned one, or the one the autotuner chose for this key (until it has chosen, any config of the regime may).
    key = (triton.next_power_of_2(m), n, k, kw.group_size, x.dtype, out.dtype, None if bias is None else bias.dtype)
    split = config.kwargs["SPLIT_K"] if config else _chosen_split.get(key, 0 if regime(m) else 1)
    ws = torch.zeros(2 * m * n if split != 1 else 1, dtype=torch.int32, device=x.device)
    any_t = ws  # pointer for arguments a variant does not read
    args = (x, kw.codes, kw.s2t, kw.zpt, sx if epilogue else any_t, kw.s1 if epilogue else any_t,
            bias if bias is not None else any_t, out, ws, m, n, x.stride(0), out.stride(0),
            int(epilogue and sx.numel() > 1), triton.next_power_of_2(m))
    meta = dict(K=k, GROUP=kw.group_size, TILE_K=kw.tile_k, EPILOGUE=epilogue, HAS_BIAS=bias is not None,
                USE_ASM=_use_asm(x.device), **launch_options(x.device))

    def grid(c: dict) -> tuple[int, int]:
        return triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"]), c["SPLIT_K"]

    _chosen_split[key] = launch(_tuned, _kernel, grid, args, meta, config).kwargs["SPLIT_K"]
    return out


@triton.jit
def _widen_kernel(w_ptr, s2_ptr, zp_ptr, out_ptr, N, ROW0, ROWS, K: tl.constexpr, GROUP: tl.constexpr,
                  TILE_K: tl.constexpr, BLOCK_N: tl.constexpr, USE_ASM: tl.constexpr):
    """Rows ``ROW0 .. ROW0 + ROWS`` of ``W_s8 [N, K]`` from the kernel layout into ``out [ROWS, K]``, one K tile of
    BLOCK_N rows per program (same widening as the GEMM)."""
    pid_n, tile = tl.program_id(0), tl.program_id(1)
    HALF: tl.constexpr = TILE_K // 2
    local = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = local < ROWS
    offs_n = ROW0 + local
    kh = tl.arange(0, HALF)
    k0 = tile * TILE_K
    p = tl.load(w_ptr + offs_n.to(tl.int64)[:, None] * (K // 2) + (k0 // 2 + kh)[None, :], mask=n_mask[:, None],
                other=0)
    g_lo, g_hi = k0 // GROUP, (k0 + HALF) // GROUP
    s_lo = tl.load(s2_ptr + g_lo * N + offs_n, mask=n_mask, other=0).to(tl.int32)
    z_lo = tl.load(zp_ptr + g_lo * N + offs_n, mask=n_mask, other=0).to(tl.int32)
    s_hi = tl.load(s2_ptr + g_hi * N + offs_n, mask=n_mask, other=0).to(tl.int32)
    z_hi = tl.load(zp_ptr + g_hi * N + offs_n, mask=n_mask, other=0).to(tl.int32)
    w_lo, w_hi = _widen(p, s_lo, z_lo, s_hi, z_hi, USE_ASM)
    rows = out_ptr + local.to(tl.int64)[:, None] * K
    tl.store(rows + (k0 + kh)[None, :], w_lo, mask=n_mask[:, None])
    tl.store(rows + (k0 + HALF + kh)[None, :], w_hi, mask=n_mask[:, None])


def widen_weight(kw: KernelWeight, block_n: int = 64, rows: range | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """``W_s8 = s2 * (u4 - zp)`` as int8 ``[N, K]`` in one pass over the packed weight (the large-M path's first
    step); ``rows`` (a step-1 range) widens those output rows alone, into ``out`` (int8 ``[len(rows), K]``,
    contiguous) when given."""
    n, k = kw.out_features, kw.in_features
    rows = range(n) if rows is None else rows
    if rows.step != 1 or not 0 <= rows.start <= rows.stop <= n:
        raise ValueError(f"rows {rows} is not a step-1 range inside the weight's {n} rows")
    shape = (len(rows), k)
    if out is None:
        out = torch.empty(shape, dtype=torch.int8, device=kw.codes.device)
    elif out.dtype != torch.int8 or tuple(out.shape) != shape or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous int8 tensor of shape {list(shape)}, got "
                         f"{out.dtype}{list(out.shape)}")
    if len(rows):
        _widen_kernel[(triton.cdiv(len(rows), block_n), k // kw.tile_k)](
            kw.codes, kw.s2t, kw.zpt, out, n, rows.start, len(rows), K=k, GROUP=kw.group_size, TILE_K=kw.tile_k,
            BLOCK_N=block_n, USE_ASM=_use_asm(kw.codes.device))
    return out
