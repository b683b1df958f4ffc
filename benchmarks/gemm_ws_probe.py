"""Probe: a warp-specialized A8W4 GEMM in Gluon for 1..256 tokens (issue 8), to be measured before it goes anywhere.

Why: the in-register kernel of :mod:`dgq.kernels.gemm` widens int4 to int8 in the same warps that issue the
tensor-core MMA, so widening and MMA serialize, and at M = 16..256 it runs at 0.7-1.1x FP16 where the weight bytes
alone allow about 3x (benchmarks/notes_gemm.md).  Triton's automatic warp specialization is Blackwell-only, but
Gluon (``triton.experimental.gluon``, in Triton 3.6) specializes warps by hand on Hopper.  Here three partitions
share shared-memory rings:

* **load** (1 warp): TMA copies of the packed weight tile ``[BN, 64]`` bytes and the two activation halves
  ``[BM, 64]`` (k and k + 64 of each 128-wide K tile: the kernel layout of :mod:`dgq.packing`);
* **widen** (4 warps): packed bytes to two int8 tiles ``[BN, 64]`` with the byte-lane ``mad`` + ``xor`` of
  :data:`dgq.kernels.gemm._WIDEN_PTX`, stored to shared memory for the MMA;
* **mma** (the default 4 warps): ``out^T [BN, BM] += W_lo @ x_lo^T + W_hi @ x_hi^T`` with ``warpgroup_mma``
  (int8, int32 accumulation; tokens are the MMA's N), then int32 stores, or atomic adds when K is split.

It returns the int32 accumulator (no scale epilogue): the question is whether the main loop reaches the weight
bytes' bandwidth.  ``--compile-only`` compiles every config for sm_90a on a machine without a GPU (Triton ships
``ptxas``) and prints shared memory, registers and the MMA instructions; on the H100 the script checks every config
bit-exact against ``torch._int_mm`` on the widened weight and times the best one per M against the current kernel
and cuBLAS FP16 with the cold-L2 CUDA-graph method of ``benchmarks/gemm.py``.

    python benchmarks/gemm_ws_probe.py --compile-only          # any machine
    python benchmarks/gemm_ws_probe.py --json $OUT/ws.json     # the H100
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

from dgq.kernels.gemm import _WIDEN_PTX

HALF = gl.constexpr(64)  # half of the layout's 128-wide K tile: one nibble plane, one MMA of depth 64
MAXNREG = 168  # 12 warps (3 warpgroups: mma, widen, and the load warp's) x 32 threads x 168 <= 64K registers


@gluon.jit
def _load_part(w_desc, x_desc, w_bufs, xlo_bufs, xhi_bufs, load_ready, w_empty, x_empty, n0, m0, kt0, k_tiles):
    stages: gl.constexpr = w_bufs.shape[0]
    for i in range(k_tiles):
        s = i % stages
        ph = (i // stages) & 1
        mbarrier.wait(w_empty.index(s), ph ^ 1)  # barriers start as if phase 1 had completed: the ring starts empty
        mbarrier.wait(x_empty.index(s), ph ^ 1)
        bar = load_ready.index(s)
        mbarrier.expect(bar, w_desc.block_type.nbytes + 2 * x_desc.block_type.nbytes)
        kt = kt0 + i
        tma.async_copy_global_to_shared(w_desc, [n0, kt * HALF], bar, w_bufs.index(s))
        tma.async_copy_global_to_shared(x_desc, [m0, kt * 2 * HALF], bar, xlo_bufs.index(s))
        tma.async_copy_global_to_shared(x_desc, [m0, kt * 2 * HALF + HALF], bar, xhi_bufs.index(s))


@gluon.jit
def _widen_part(s2_ptr, zp_ptr, w_bufs, alo_bufs, ahi_bufs, load_ready, w_empty, a_ready, a_empty, n0, N, kt0,
                k_tiles, GROUP: gl.constexpr):
    stages: gl.constexpr = w_bufs.shape[0]
    a_stages: gl.constexpr = alo_bufs.shape[0]
    bn: gl.constexpr = w_bufs.shape[1]
    layout: gl.constexpr = gl.BlockedLayout([1, 16], [16, 2], [4, 1], [1, 0])
    rows = n0 + gl.arange(0, bn, layout=gl.SliceLayout(1, layout))
    for i in range(k_tiles):
        s = i % stages
        ph = (i // stages) & 1
        a = i % a_stages
        pha = (i // a_stages) & 1
        k0 = (kt0 + i) * 2 * HALF
        g_lo = k0 // GROUP
        g_hi = (k0 + HALF) // GROUP
        s_lo = gl.load(s2_ptr + g_lo * N + rows).to(gl.int32)  # before the wait: overlaps the weight's TMA
        z_lo = gl.load(zp_ptr + g_lo * N + rows).to(gl.int32)
        s_hi = gl.load(s2_ptr + g_hi * N + rows).to(gl.int32)
        z_hi = gl.load(zp_ptr + g_hi * N + rows).to(gl.int32)
        c_lo = ((128 - s_lo * z_lo).to(gl.uint32, bitcast=True) * 0x01010101).to(gl.int32, bitcast=True)
        c_hi = ((128 - s_hi * z_hi).to(gl.uint32, bitcast=True) * 0x01010101).to(gl.int32, bitcast=True)
        mbarrier.wait(load_ready.index(s), ph)
        p = w_bufs.index(s).load(layout)
        fence_async_shared()  # these generic-proxy reads, then the next TMA write of the slot
        mbarrier.arrive(w_empty.index(s), count=1)
        w_lo, w_hi = gl.inline_asm_elementwise(
            _WIDEN_PTX, "=r,=r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r",
            [p, gl.expand_dims(s_lo, 1), gl.expand_dims(c_lo, 1), gl.expand_dims(s_hi, 1), gl.expand_dims(c_hi, 1)],
            dtype=(gl.int8, gl.int8), is_pure=True, pack=4)
        mbarrier.wait(a_empty.index(a), pha ^ 1)
        alo_bufs.index(a).store(w_lo)
        ahi_bufs.index(a).store(w_hi)
        fence_async_shared()  # generic-proxy stores, then the MMA's async-proxy reads
        mbarrier.arrive(a_ready.index(a), count=1)


@gluon.jit
def _mma_part(alo_bufs, ahi_bufs, xlo_bufs, xhi_bufs, load_ready, x_empty, a_ready, a_empty, out_ptr, M, N, n0, m0,
              k_tiles, BM: gl.constexpr, SPLIT: gl.constexpr):
    stages: gl.constexpr = xlo_bufs.shape[0]
    a_stages: gl.constexpr = alo_bufs.shape[0]
    bn: gl.constexpr = alo_bufs.shape[1]
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BM, 32])
    acc = gl.zeros((bn, BM), gl.int32, acc_layout)
    for i in range(k_tiles):
        s = i % stages
        ph = (i // stages) & 1
        a = i % a_stages
        pha = (i // a_stages) & 1
        mbarrier.wait(load_ready.index(s), ph)
        mbarrier.wait(a_ready.index(a), pha)
        acc = warpgroup_mma(alo_bufs.index(a), xlo_bufs.index(s).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma(ahi_bufs.index(a), xhi_bufs.index(s).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=[acc])
        mbarrier.arrive(x_empty.index(s), count=1)
        mbarrier.arrive(a_empty.index(a), count=1)
    out_layout: gl.constexpr = gl.BlockedLayout([1, 1], [32, 1], [4, 1], [0, 1])  # n fastest: coalesced out[m, n]
    res = gl.convert_layout(acc, out_layout)
    offs_n = n0 + gl.arange(0, bn, layout=gl.SliceLayout(1, out_layout))
    offs_m = m0 + gl.arange(0, BM, layout=gl.SliceLayout(0, out_layout))
    mask = gl.expand_dims(offs_m < M, 0) & gl.expand_dims(offs_n < N, 1)
    ptrs = out_ptr + gl.expand_dims(offs_m, 0) * N + gl.expand_dims(offs_n, 1)
    if SPLIT == 1:
        gl.store(ptrs, res, mask=mask)
    else:
        gl.atomic_add(ptrs, res, mask=mask, sem="relaxed")  # integer sums: exact in any order


@gluon.jit
def ws_a8w4_kernel(w_desc, x_desc, s2_ptr, zp_ptr, out_ptr, M, N, K,
                   GROUP: gl.constexpr, BN: gl.constexpr, BM: gl.constexpr, STAGES: gl.constexpr,
                   A_STAGES: gl.constexpr, SPLIT: gl.constexpr, WIDEN_REGS: gl.constexpr):
    n0 = gl.program_id(0) * BN
    m0 = gl.program_id(1) * BM
    tiles = K // (2 * HALF)
    per = gl.cdiv(tiles, SPLIT)
    kt0 = gl.program_id(2) * per
    k_tiles = gl.minimum(per, tiles - kt0)
    w_bufs = gl.allocate_shared_memory(gl.uint8, [STAGES, BN, HALF], w_desc.layout)
    xlo_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BM, HALF], x_desc.layout)
    xhi_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BM, HALF], x_desc.layout)
    a_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=64, element_bitwidth=8, rank=2)
    alo_bufs = gl.allocate_shared_memory(gl.int8, [A_STAGES, BN, HALF], a_layout)
    ahi_bufs = gl.allocate_shared_memory(gl.int8, [A_STAGES, BN, HALF], a_layout)
    load_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    w_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    x_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    a_ready = gl.allocate_shared_memory(gl.int64, [A_STAGES, 1], mbarrier.MBarrierLayout())
    a_empty = gl.allocate_shared_memory(gl.int64, [A_STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(load_ready.index(i), count=1)
        mbarrier.init(w_empty.index(i), count=1)
        mbarrier.init(x_empty.index(i), count=1)
    for i in gl.static_range(A_STAGES):
        mbarrier.init(a_ready.index(i), count=1)
        mbarrier.init(a_empty.index(i), count=1)
    gl.warp_specialize([
        (_mma_part, (alo_bufs, ahi_bufs, xlo_bufs, xhi_bufs, load_ready, x_empty, a_ready, a_empty, out_ptr, M, N,
                     n0, m0, k_tiles, BM, SPLIT)),
        (_load_part, (w_desc, x_desc, w_bufs, xlo_bufs, xhi_bufs, load_ready, w_empty, x_empty, n0, m0, kt0,
                      k_tiles)),
        (_widen_part, (s2_ptr, zp_ptr, w_bufs, alo_bufs, ahi_bufs, load_ready, w_empty, a_ready, a_empty, n0, N, kt0,
                       k_tiles, GROUP)),
    ], [1, 4], [24, WIDEN_REGS])


@dataclass(frozen=True)
class Config:
    """One variant: weight rows and tokens per program, ring depths, K splits, the widen warps' register budget."""

    bn: int
    bm: int
    stages: int
    a_stages: int
    split: int
    widen_regs: int = 96

    def consts(self, group: int) -> dict:
        return {"GROUP": group, "BN": self.bn, "BM": self.bm, "STAGES": self.stages, "A_STAGES": self.a_stages,
                "SPLIT": self.split, "WIDEN_REGS": self.widen_regs}


# Per M regime: 64-row weight tiles and K splits where few tiles would leave SMs idle (N = 4096 gives 64 programs).
CONFIGS = {16: [Config(64, 16, 4, 2, s) for s in (1, 2, 4)] + [Config(64, 16, 6, 2, 2), Config(128, 16, 4, 2, 2)],
           64: [Config(64, 64, 4, 2, s) for s in (1, 2)] + [Config(128, 64, 4, 2, 1)],
           256: [Config(64, 128, 3, 2, 1), Config(128, 128, 3, 2, 1), Config(128, 128, 4, 2, 1, 128)]}
# (An int8 MMA 256 tokens wide fails in Triton 3.6's WGMMA lowering: 'WGMMA type or shape is not supported'.)


def regime(m: int) -> int:
    return next(r for r in sorted(CONFIGS) if m <= r)


def _shared_layout() -> gl.NVMMASharedLayout:
    return gl.NVMMASharedLayout(swizzle_byte_width=64, element_bitwidth=8, rank=2)


def ws_a8w4(x_s8: torch.Tensor, codes: torch.Tensor, s2t: torch.Tensor, zpt: torch.Tensor, group: int,
            cfg: Config) -> torch.Tensor:
    """int32 ``x_s8 [M, K] @ W_s8^T`` from the kernel layout (``codes [N, K/2]``, ``s2t``/``zpt [K/g, N]``)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    m, k = x_s8.shape
    n = codes.shape[0]
    out = (torch.zeros if cfg.split > 1 else torch.empty)((m, n), dtype=torch.int32, device=x_s8.device)
    w_desc = TensorDescriptor.from_tensor(codes, [cfg.bn, HALF.value], _shared_layout())
    x_desc = TensorDescriptor.from_tensor(x_s8, [cfg.bm, HALF.value], _shared_layout())
    grid = (triton.cdiv(n, cfg.bn), triton.cdiv(m, cfg.bm), cfg.split)
    ws_a8w4_kernel[grid](w_desc, x_desc, s2t, zpt, out, m, n, k, **cfg.consts(group), num_warps=4, maxnreg=MAXNREG)
    return out


def compile_only(group: int = 128) -> None:
    """Compile every config for sm_90a here (no GPU needed) and print what ptxas made of it."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    lay = repr(_shared_layout())
    for configs in CONFIGS.values():
        for cfg in configs:
            sig = {"w_desc": f"tensordesc<u8[{cfg.bn}, {HALF.value}],{lay}>",
                   "x_desc": f"tensordesc<i8[{cfg.bm}, {HALF.value}],{lay}>",
                   "s2_ptr": "*i8", "zp_ptr": "*u8", "out_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32",
                   **{name: "constexpr" for name in cfg.consts(group)}}
            start = time.perf_counter()
            kernel = triton.compile(GluonASTSource(ws_a8w4_kernel, sig, cfg.consts(group)),
                                    target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "maxnreg": MAXNREG})
            sass_mma = "wgmma.mma_async.sync.aligned.m64n%dk32.s32.s8.s8" % cfg.bm in kernel.asm["ptx"]
            print(f"{cfg}: shared {kernel.metadata.shared} B, wgmma m64n{cfg.bm}k32 s8 in PTX: {sass_mma}, "
                  f"compiled in {time.perf_counter() - start:.1f} s", flush=True)


def measure(json_path: str | None) -> None:
    """On the GPU: every config bit-exact against torch._int_mm on the widened weight, then cold-L2 timings."""
    from gemm import SHAPES, operand_sets, time_graph  # benchmarks/gemm.py: same operands and timing method
    from dgq.kernels.gemm import a8w4_matmul

    rows, failures = [], []
    for k, n in SHAPES:
        sets = operand_sets(k, n)
        for m in (1, 16, 64, 256):
            for o in sets:
                o.set_acts(m)
            o = sets[0]
            pad = torch.zeros(max(m, 32), k, dtype=torch.int8, device="cuda")
            pad[:m] = o.x_s8
            want = torch._int_mm(pad, o.w8.t())[:m]
            best = None
            for cfg in CONFIGS[regime(m)]:
                got = ws_a8w4(o.x_s8, o.kw.codes, o.kw.s2t, o.kw.zpt, o.dg.group_size, cfg)
                if not torch.equal(got, want):
                    failures.append(f"K={k} N={n} M={m} {cfg}: {(got != want).sum().item()} of {got.numel()} differ")
                    continue
                ms = time_graph([lambda o=o, c=cfg: ws_a8w4(o.x_s8, o.kw.codes, o.kw.s2t, o.kw.zpt,
                                                           o.dg.group_size, c) for o in sets])
                rows.append({"K": k, "N": n, "M": m, "kernel": "ws", "config": str(cfg), "ms": ms})
                best = ms if best is None else min(best, ms)
            peers = {"fp16": lambda o: o.x16 @ o.w16.t(), "dgq_gemm_only": lambda o: a8w4_matmul(o.x_s8, o.kw, o.s_x)}
            times = {name: time_graph([lambda o=o, f=f: f(o) for o in sets]) for name, f in peers.items()}
            for name, ms in times.items():
                rows.append({"K": k, "N": n, "M": m, "kernel": name, "ms": ms})
            line = f"K={k} N={n} M={m}: fp16 {times['fp16']:.4f} ms, current {times['dgq_gemm_only']:.4f} ms"
            if best is not None:
                line += (f", ws best {best:.4f} ms = {times['fp16'] / best:.2f}x fp16, "
                         f"{times['dgq_gemm_only'] / best:.2f}x current")
            print(line, flush=True)
            if json_path:
                with open(json_path, "w") as f:
                    json.dump({"rows": rows, "failures": failures}, f, indent=1)
    print(f"{len(failures)} failures", *failures, sep="\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compile-only", action="store_true", help="compile for sm_90a and stop (no GPU needed)")
    parser.add_argument("--json", default=None, help="write the rows here as they come")
    args = parser.parse_args()
    if args.compile_only:
        compile_only()
    else:
        measure(args.json)


if __name__ == "__main__":
    main()
