"""A chain of one-token layers, each output the next input (4096 -> 4096, and 4096 -> 11008 -> 4096 pairs through a
slice), in one CUDA graph replayed many times, against the same chain launched eagerly without PDL: bit-identical?"""
import sys, torch
sys.path.insert(0, "benchmarks")
from gemm import make_weight
from dgq.kernels import linear, pdl
from dgq.kernels.gemm import KernelWeight
torch.manual_seed(0)
ws = [KernelWeight.from_dual_grained(make_weight(4096, 4096, 128)) for _ in range(12)]
def chain(x):
    for kw in ws:
        x = linear.a8w4_linear(x, kw) * 0.05  # (keeps the values in range)
    return x
fails = 0
for m in (1, 2, 16):
    x0 = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
    pdl.ENABLED = False
    want = chain(x0.clone())
    torch.cuda.synchronize()
    pdl.ENABLED = True
    static_x = x0.clone()
    chain(static_x)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = chain(static_x)
    for r in range(200):
        g.replay()
        if r % 20 == 0:
            torch.cuda.synchronize()
            if not torch.equal(out, want):
                fails += 1
                print(f"M={m} replay {r}: differs ({(out != want).sum().item()} elements)")
    torch.cuda.synchronize()
    ok = torch.equal(out, want)
    fails += not ok
    print(f"M={m}: chain in a graph equal to eager without PDL: {ok}")
print("chain failures", fails)
