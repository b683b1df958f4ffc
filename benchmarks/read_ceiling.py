"""The one-token ceiling on the 70B layers: what reading their packed codes costs on this GPU by any means.

At one token the A8W4 GEMV is a read of the weight (117 MB of codes on 8192 x 28672 and 28672 x 8192, plus 3.7 MB of
group scales and zero points).  Beside ``dgq`` (act-quant + the TMA GEMV) and the GEMV from codes, this times a bare
bulk-tensor-copy read of the same codes into a shared-memory ring with no arithmetic (several grids and box sizes),
a device-to-device copy, ``torch.sum`` and cuBLAS FP16 at one token, on the layer itself (4x the bytes) and on a
weight of the codes' bytes; cold-L2 CUDA-graph timing of ``benchmarks/gemm.py``.  Session 19 (H100): the bare read
40.5-41.4 us (2.85-2.90 TB/s), the GEMV 46.1-46.4, cuBLAS FP16 on 117 MB 44.5-44.8 (``results/s19/read_ceiling_s19.json``).

    PYTHONPATH=.:benchmarks python benchmarks/read_ceiling.py --out $OUT/read_ceiling.json      # the H100
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor


@gluon.jit
def _read_kernel(desc, out_ptr, n_boxes, col_boxes, STAGES: gl.constexpr):
    """Boxes ``pid, pid + grid, ...`` of ``desc``'s tensor into a ring of ``STAGES`` slots, each slot re-requested as
    soon as its copy lands (nothing reads it): the copy engine's read rate alone."""
    BR: gl.constexpr = desc.block_type.shape[0]
    BC: gl.constexpr = desc.block_type.shape[1]
    bufs = gl.allocate_shared_memory(gl.uint8, [STAGES, BR, BC], desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    pid = gl.program_id(0)
    g = gl.num_programs(0)
    count = (n_boxes - pid + g - 1) // g
    for i in range(gl.minimum(STAGES, count)):
        b = pid + i * g
        mbarrier.expect(bars.index(i), desc.block_type.nbytes)
        tma.async_copy_global_to_shared(desc, [(b // col_boxes) * BR, (b % col_boxes) * BC], bars.index(i), bufs.index(i))
    for j in range(count):
        s = j % STAGES
        mbarrier.wait(bars.index(s), (j // STAGES) & 1)
        if j + STAGES < count:
            b = pid + (j + STAGES) * g
            mbarrier.expect(bars.index(s), desc.block_type.nbytes)
            tma.async_copy_global_to_shared(desc, [(b // col_boxes) * BR, (b % col_boxes) * BC], bars.index(s),
                                            bufs.index(s))
    gl.store(out_ptr + pid, count)


def tma_read(w: torch.Tensor, out: torch.Tensor, grid: int, br: int, bc: int, stages: int) -> None:
    """Read all of ``w`` (uint8, 2-D) in ``[br, bc]`` boxes by ``grid`` CTAs; each writes its box count to ``out``."""
    lay = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=8, rank=2)
    desc = TensorDescriptor.from_tensor(w, [br, bc], lay)
    rows, cols = w.shape
    _read_kernel[(grid,)](desc, out, (rows // br) * (cols // bc), cols // bc, STAGES=stages, num_warps=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="write the rows here (JSON) as they come")
    args = parser.parse_args()
    sys.path.insert(0, "benchmarks")
    from gemm import kernel_call, operand_sets, time_graph

    from dgq.kernels.gemv_tma import tma_gemv

    rows = []
    for k, n in ((28672, 8192), (8192, 28672)):
        sets = operand_sets(k, n)
        for o in sets:
            o.set_acts(1)
        codes = [o.kw.codes for o in sets]
        mb = codes[0].numel() / 1e6
        out = torch.zeros(1024, dtype=torch.int32, device="cuda")
        t = {"fp16": time_graph([kernel_call("fp16", o) for o in sets]),
             "dgq": time_graph([kernel_call("dgq", o) for o in sets]),
             "gemv_from_codes": time_graph([lambda o=o: tma_gemv(o.x_s8, o.kw, o.s_x) for o in sets]),
             # (an int32 sum of int8 codes goes through a cast: 0.3 TB/s, not a read rate; kept as measured)
             "torch_sum": time_graph([lambda c=c: c.sum(dtype=torch.int32) for c in codes])}
        dst = torch.empty_like(codes[0])
        t["d2d_copy(read+write)"] = time_graph([lambda c=c, d=dst: d.copy_(c) for c in codes])
        for grid, br, bc, st in ((132, 128, 256, 4), (264, 64, 256, 4), (132, 64, 256, 8), (528, 64, 128, 4),
                                 (132, 256, 256, 2), (396, 64, 256, 3)):
            t[f"tma_read_g{grid}_{br}x{bc}_st{st}"] = time_graph(
                [lambda c=c, a=(grid, br, bc, st), o=out: tma_read(c, o, *a) for c in codes])
        # cuBLAS FP16 at one token on a weight of the GEMV's bytes (n_small x k fp16 = the codes' bytes)
        n_small = (codes[0].numel() // 2) // k // 64 * 64
        w_small = [torch.randn(n_small, k, device="cuda", dtype=torch.float16) for _ in range(6)]
        x = sets[0].x16
        t[f"fp16_{n_small}x{k}({n_small * k * 2 / 1e6:.0f}MB)"] = time_graph(
            [lambda w=w, x=x: x @ w.t() for w in w_small])
        for name, ms in t.items():  # the bytes each row's TB/s is of: FP16's weight, else the codes
            nbytes = n * k * 2 if name == "fp16" else n_small * k * 2 if name.startswith("fp16_") else codes[0].numel()
            rows.append({"K": k, "N": n, "M": 1, "kernel": name, "ms": ms})
            print(f"K={k} N={n} codes {mb:.0f} MB: {name} {ms * 1e3:.1f} us, {nbytes / ms / 1e9:.2f} TB/s", flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"rows": rows}, f, indent=0)


if __name__ == "__main__":
    main()
