"""Session 19: where the TMA GEMV's time over a bare read goes on the 70B layers at one token: the GEMV with its
parts stripped one by one (the math, the warps' shared-memory reads, the scale boxes, the activation boxes)."""
import importlib.util, json, sys
import torch
sys.path.insert(0, "benchmarks")
from gemm import operand_sets, time_graph, kernel_call
from read_ceiling import tma_read
from dgq.kernels.gemv_tma import tma_gemv
OUT = sys.argv[1]
mods = {}
for name in ("full", "nomath", "noread", "noread_noscales", "bare"):
    spec = importlib.util.spec_from_file_location("gs_" + name, f".dev/gemv_strip_{name}.py")
    m = importlib.util.module_from_spec(spec); sys.modules["gs_" + name] = m; spec.loader.exec_module(m); mods[name] = m
rows = []
for k, n in ((28672, 8192), (8192, 28672)):
    sets = operand_sets(k, n)
    for o in sets:
        o.set_acts(1)
    o = sets[0]
    assert torch.equal(mods["full"].tma_gemv(o.x_s8, o.kw, o.s_x), tma_gemv(o.x_s8, o.kw, o.s_x)), "full != production"
    out = torch.zeros(1024, dtype=torch.int32, device="cuda")
    t = {"fp16": time_graph([kernel_call("fp16", s) for s in sets]),
         "dgq": time_graph([kernel_call("dgq", s) for s in sets]),
         "gemv": time_graph([lambda s=s: tma_gemv(s.x_s8, s.kw, s.s_x) for s in sets]),
         "bare_read": time_graph([lambda s=s: tma_read(s.kw.codes, out, 132, 128, 256, 4) for s in sets])}
    for name, mod in mods.items():
        t["strip_" + name] = time_graph([lambda s=s, mod=mod: mod.tma_gemv(s.x_s8, s.kw, s.s_x) for s in sets])
    t["gemv_again"] = time_graph([lambda s=s: tma_gemv(s.x_s8, s.kw, s.s_x) for s in sets])
    t["bare_read_again"] = time_graph([lambda s=s: tma_read(s.kw.codes, out, 132, 128, 256, 4) for s in sets])
    for a, b in t.items():
        rows.append({"K": k, "N": n, "M": 1, "kernel": a, "ms": b})
    print(f"K={k} N={n}: " + ", ".join(f"{a} {b * 1e3:.1f}" for a, b in t.items()) + " us", flush=True)
    json.dump({"rows": rows}, open(f"{OUT}/gemv_strip_s19.json", "w"), indent=0)
