"""Session 19 call 3: the ping-pong kernel's staged epilogue (bulk tensor stores) against the session-18 epilogue,
the rule's configs at M = 64..4096 on the five shapes; exactness new == old (fp16, bf16, bias) first."""
import importlib.util, json, sys
import torch
sys.path.insert(0, "benchmarks")
spec = importlib.util.spec_from_file_location("pp_old", ".dev/pp_old.py")
old = importlib.util.module_from_spec(spec); sys.modules["pp_old"] = old; spec.loader.exec_module(old)
from gemm import SHAPES, sets_at, time_graph, kernel_call
from dgq.kernels import gemm_pp
OUT = sys.argv[1]
MS = [int(v) for v in sys.argv[2].split(",")]
rows, fails = [], []
for k, n, m, sets in sets_at(SHAPES, MS):
    cfg = gemm_pp.config_for(m, n)
    if cfg is None:
        continue
    o = sets[0]
    ocfg = old.PpConfig(cfg.bm, cfg.stages, cfg.split)
    bias = torch.randn(n, device="cuda")
    for dt in (torch.float16, torch.bfloat16):
        a = gemm_pp.pp_a8w4_matmul(o.x_s8, o.kw, o.s_x, bias.to(dt), dt)
        b = old.pp_a8w4_matmul(o.x_s8, o.kw, o.s_x, bias.to(dt), dt, config=ocfg)
        if not torch.equal(a, b):
            fails.append(f"{k}x{n} M={m} {cfg} {dt}: new != old ({(a != b).sum().item()} differ)")
    t = {"fp16": time_graph([kernel_call("fp16", s) for s in sets]),
         "fp8_rowwise": time_graph([kernel_call("fp8_rowwise", s) for s in sets]),
         "pp_old": time_graph([lambda s=s: old.pp_a8w4_matmul(s.x_s8, s.kw, s.s_x, config=ocfg) for s in sets]),
         "pp_new": time_graph([kernel_call("dgq_pp", s) for s in sets]),
         "dgq": time_graph([kernel_call("dgq", s) for s in sets])}
    a = gemm_pp.pp_a8w4_matmul(o.x_s8, o.kw, o.s_x)
    if not torch.equal(a, old.pp_a8w4_matmul(o.x_s8, o.kw, o.s_x, config=ocfg)):
        fails.append(f"{k}x{n} M={m}: new != old after replays")
    rows += [{"K": k, "N": n, "M": m, "kernel": a, "ms": b} for a, b in t.items()]
    f = t["fp16"]
    print(f"K={k} N={n} M={m} {cfg}: " + ", ".join(f"{a} {b*1e3:.1f} ({f/b:.2f}x)" for a, b in t.items())
          + f"  new/old {t['pp_old']/t['pp_new']:.3f}", flush=True)
    json.dump({"rows": rows, "failures": fails}, open(f"{OUT}/s19_epilogue.json", "w"), indent=0)
print("failures:", len(fails), *fails, sep="\n")
