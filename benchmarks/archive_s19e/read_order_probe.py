"""Session 19: does the GEMV's access order cost DRAM speed?  The bare bulk-copy read of the 70B layers' codes in
the GEMV's order (each CTA streams its own 64-row block's K range; 1 or 4 boxes of 256 bytes per row per step)
against the bare read's order (consecutive CTAs read neighbouring boxes)."""
import json, sys
import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
sys.path.insert(0, "benchmarks")
from gemm import operand_sets, time_graph
from read_ceiling import tma_read


@gluon.jit
def _own_block_kernel(desc, out_ptr, n_rb, cols_per_q, W: gl.constexpr, STAGES: gl.constexpr):
    BR: gl.constexpr = desc.block_type.shape[0]
    BC: gl.constexpr = desc.block_type.shape[1]
    bufs = gl.allocate_shared_memory(gl.uint8, [STAGES * W, BR, BC], desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for b in gl.static_range(STAGES):
        mbarrier.init(bars.index(b), count=1)
    pid = gl.program_id(0)
    rb = pid % n_rb
    c0 = (pid // n_rb) * cols_per_q
    steps = cols_per_q // W
    for i in range(gl.minimum(STAGES, steps)):
        mbarrier.expect(bars.index(i), W * desc.block_type.nbytes)
        for w in gl.static_range(W):
            tma.async_copy_global_to_shared(desc, [rb * BR, (c0 + i * W + w) * BC], bars.index(i), bufs.index(i * W + w))
    for j in range(steps):
        s = j % STAGES
        mbarrier.wait(bars.index(s), (j // STAGES) & 1)
        if j + STAGES < steps:
            mbarrier.expect(bars.index(s), W * desc.block_type.nbytes)
            for w in gl.static_range(W):
                tma.async_copy_global_to_shared(desc, [rb * BR, (c0 + (j + STAGES) * W + w) * BC], bars.index(s),
                                                bufs.index(s * W + w))
    gl.store(out_ptr + pid, steps)


def own_block_read(w, out, br, bc, quarters, W, stages):
    lay = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=8, rank=2)
    desc = TensorDescriptor.from_tensor(w, [br, bc], lay)
    rows, cols = w.shape
    n_rb = rows // br
    _own_block_kernel[(n_rb * quarters,)](desc, out, n_rb, cols // bc // quarters, W=W, STAGES=stages, num_warps=1)


OUT = sys.argv[1]
rows = []
for k, n in ((28672, 8192), (8192, 28672)):
    sets = operand_sets(k, n)
    codes = [o.kw.codes for o in sets]
    out = torch.zeros(4096, dtype=torch.int32, device="cuda")
    t = {"bare_g264_64x256_st4": time_graph([lambda c=c: tma_read(c, out, 264, 64, 256, 4) for c in codes])}
    cols = codes[0].shape[1] // 256
    for br, q, W, st in ((64, 4, 1, 2), (64, 2, 1, 4), (64, 2, 2, 2), (64, 1, 4, 2), (64, 1, 2, 4), (32, 1, 4, 2),
                         (128, 1, 1, 2), (32, 2, 4, 2), (32, 1, 2, 4)):
        smem = st * W * br * 256
        ctas = codes[0].shape[0] // br * q
        if cols % (q * W) or ctas > 132 * (227 * 1024 // (smem + 1024)):
            continue  # (every CTA resident at once, as the GEMV's are)
        t[f"own_{br}rows_q{q}_W{W}_st{st}"] = time_graph(
            [lambda c=c, a=(br, 256, q, W, st): own_block_read(c, out, *a) for c in codes])
    t["bare_again"] = time_graph([lambda c=c: tma_read(c, out, 264, 64, 256, 4) for c in codes])
    rows += [{"K": k, "N": n, "M": 1, "kernel": a, "ms": b} for a, b in t.items()]
    print(f"K={k} N={n} ({codes[0].shape[0]} x {codes[0].shape[1]} B): " + ", ".join(f"{a} {b*1e3:.1f}" for a, b in t.items()) + " us", flush=True)
    json.dump({"rows": rows}, open(f"{OUT}/read_order_s19.json", "w"), indent=0)
