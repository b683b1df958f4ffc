"""The prefill int8 GEMM: ``out = (s_x * s1) * (X_s8 @ W_s8ᵀ)`` with both tiles brought by the TMA copy engine.

At large M the A8W4 weight is widened to int8 once per call (:func:`dgq.kernels.gemm.widen_weight`, one pass at
copy bandwidth: 5-30% of this kernel's time at M = 4096-1024) and this kernel multiplies.  Both operands are
K-contiguous (``X_s8 [M, K]``, ``W_s8 [N, K]``), which is what the int8 tensor-core instruction (wgmma) needs from
shared memory; tensor descriptors let the copy engine fill the software pipeline's shared-memory stages without address arithmetic in the warps, and a persistent
grid of one program per SM walks the output tiles in GROUP_M-row bands so the weight tiles a band shares stay in L2.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from dgq.kernels.gemm import _use_asm
from dgq.kernels.pdl import launch_options


@triton.jit
def _epilogue(acc, pid_m, pid_n, sx_ptr, s1_ptr, bias_ptr, out_ptr, M, N, stride_o, stride_sx,
              HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``(acc * s_x) * s1 (+ bias)`` in fp32, the reference's order, stored in the output's dtype."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    sx = tl.load(sx_ptr + offs_m * stride_sx, mask=m_mask, other=0.0)
    s1 = tl.load(s1_ptr + offs_n, mask=n_mask, other=0.0)
    val = acc.to(tl.float32) * sx[:, None] * s1[None, :]
    if HAS_BIAS:
        val += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_o + offs_n[None, :]
    tl.store(out_ptrs, val.to(out_ptrs.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _int8_gemm_kernel(a_desc, b_desc, sx_ptr, s1_ptr, bias_ptr, out_ptr, M, N, stride_o, stride_sx, M_BUCKET,
                      K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, NUM_PROGRAMS: tl.constexpr, USE_ASM: tl.constexpr):
    if USE_ASM:
        tl.extra.cuda.gdc_wait()  # launched early (programmatic dependent launch): wait for the producers of x, w
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    K_TILES: tl.constexpr = (K + BLOCK_K - 1) // BLOCK_K  # the descriptors read zeros past K
    band = GROUP_M * num_n
    tile = tl.program_id(0)
    while tile < num_m * num_n:  # (a while loop: Triton's CPU interpreter cannot run a range with run-time bounds)
        first_m = (tile // band) * GROUP_M
        rows = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (tile % band) % rows
        pid_n = (tile % band) // rows
        acc = tl.full([BLOCK_M, BLOCK_N], 0, tl.int32)
        for kk in range(K_TILES):
            a = a_desc.load([pid_m * BLOCK_M, kk * BLOCK_K])
            b = b_desc.load([pid_n * BLOCK_N, kk * BLOCK_K])
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
        _epilogue(acc, pid_m, pid_n, sx_ptr, s1_ptr, bias_ptr, out_ptr, M, N, stride_o, stride_sx, HAS_BIAS,
                  BLOCK_M, BLOCK_N)
        tile += NUM_PROGRAMS


def _set_block_shapes(nargs: dict) -> None:
    """Autotuner pre-hook: the descriptors' block shapes follow the config being run."""
    nargs["a_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    nargs["b_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                         num_warps=warps, num_stages=stages, pre_hook=_set_block_shapes)


# The configs the autotuner chose in benchmarks/gemm_variants.py over the five benchmark shapes and M = 64..8192.
CONFIGS = [_cfg(*c) for c in [(128, 256, 128, 8, 3), (256, 128, 128, 8, 3), (128, 128, 128, 8, 4),
                              (128, 128, 128, 4, 4), (64, 256, 128, 4, 4), (128, 256, 128, 8, 4),
                              (256, 128, 128, 8, 4)]]
# From LARGE_M tokens on, one config: the autotuner chose it for all five benchmark shapes at M = 1024, 4096 and
# 8192 (16 of 20 picks, the other 4 the same tile with 3 stages; results/gemm_variants_h100.json), and on the
# prefill layers of Llama-2-7B and Llama-3-8B (fused and unfused) at 2048 and 8192 tokens it was the fastest of the
# seven or within 1.1% of it (benchmarks/int8_configs_probe.py, results/e2e_h100_s14/).  Fixed, a prefill compiles
# one variant per shape and never runs the autotuner, whose timing allocates a 256 MiB L2-flush buffer: the largest
# transient of a first prefill (BENCHMARKS.md, issue 12's peak memory).  Fewer tokens keep the autotuner (only the
# W8A8 peer and other GPUs' paths run this kernel there).
LARGE_M = 1024
LARGE_M_CONFIG = CONFIGS[5]


_tuned = triton.autotune(CONFIGS, key=["M_BUCKET", "N", "K", "HAS_BIAS", "NUM_PROGRAMS"])(_int8_gemm_kernel)


def whole_wave_rows(m: int, device: torch.device) -> int:
    """The fewest output rows whose tiles of :data:`LARGE_M_CONFIG` for ``m`` tokens fill whole waves of the
    persistent grid (one program per SM): a layer cut into chunks of a multiple of this many rows runs as many waves
    as the whole layer, plus one partial wave at most for its last chunk, as the whole layer does."""
    bm, bn = LARGE_M_CONFIG.kwargs["BLOCK_M"], LARGE_M_CONFIG.kwargs["BLOCK_N"]
    programs = _num_programs(device)
    m_tiles = triton.cdiv(m, bm)
    return programs // math.gcd(programs, m_tiles) * bn


def _num_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the CPU interpreter: a few programs, so the persistent loop is exercised


def int8_matmul(x_s8: torch.Tensor, w_s8: torch.Tensor, s_x: torch.Tensor, s1: torch.Tensor,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16,
                config: triton.Config | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``(s_x * s1) * (x_s8 @ w_s8ᵀ) + bias`` for int8 ``x_s8 [M, K]`` and ``w_s8 [N, K]`` (K a multiple of 16).

    ``out``: write into this ``[M, N]`` tensor of ``out_dtype`` whose rows may be strided but whose columns are
    contiguous (a column slice of a wider output, as the chunked widening fills it)."""
    m, k = x_s8.shape
    n = w_s8.shape[0]
    if x_s8.dtype != torch.int8 or w_s8.dtype != torch.int8 or w_s8.shape[1] != k:
        raise ValueError(f"expected int8 x [M, K] and w [N, K], got {x_s8.dtype}{list(x_s8.shape)}, "
                         f"{w_s8.dtype}{list(w_s8.shape)}")
    x_s8, w_s8 = x_s8.contiguous(), w_s8.contiguous()
    if out is None:
        out = torch.empty((m, n), dtype=out_dtype, device=x_s8.device)
    elif out.dtype != out_dtype or tuple(out.shape) != (m, n) or (n > 1 and out.stride(1) != 1):
        raise ValueError(f"out must be {out_dtype} [{m}, {n}] with contiguous columns, got "
                         f"{out.dtype}{list(out.shape)} strides {out.stride()}")
    if m == 0:
        return out
    sx = s_x.reshape(-1).float()
    a_desc = TensorDescriptor.from_tensor(x_s8, [1, 16])  # block shapes set per config
    b_desc = TensorDescriptor.from_tensor(w_s8, [1, 16])
    progs = _num_programs(x_s8.device)
    args = (a_desc, b_desc, sx, s1, bias if bias is not None else s1, out, m, n, out.stride(0),
            int(sx.numel() > 1))
    meta = dict(K=k, HAS_BIAS=bias is not None, NUM_PROGRAMS=progs, USE_ASM=_use_asm(x_s8.device),
                **launch_options(x_s8.device))
    tiles = lambda c: triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"])  # noqa: E731
    if config is None and m >= LARGE_M:
        config = LARGE_M_CONFIG
    if config is None and x_s8.device.type != "cuda":  # the CPU interpreter cannot time configs (gemm.launch)
        config = CONFIGS[0]
    if config is None:
        _tuned[lambda c: (min(progs, tiles(c)),)](*args, triton.next_power_of_2(m), **meta)
    else:
        kw = config.kwargs
        _set_block_shapes({"a_desc": a_desc, "b_desc": b_desc, **kw})
        _int8_gemm_kernel[(min(progs, tiles(kw)),)](*args, triton.next_power_of_2(m), **meta, **kw,
                                                      num_warps=config.num_warps, num_stages=config.num_stages)
    return out
