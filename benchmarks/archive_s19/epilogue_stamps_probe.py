"""Session 19 call 2: where a split tile's reduction and the epilogue spend their time (per-CTA clock stamps), and
the epilogue's scales requested early (L1 prefetch at the unit's start, loaded with the partials)."""
import importlib.util, json, os, sys
import torch
sys.path.insert(0, "benchmarks")
def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    m = importlib.util.module_from_spec(spec); sys.modules[name] = m; spec.loader.exec_module(m); return m
MODS = {"base": load("pp_exp", ".dev/pp_exp.py"), "early": load("pp_exp_e", ".dev/pp_exp_e.py")}
from gemm import SHAPES, sets_at, time_graph, kernel_call, Operands, make_weight
from dgq.kernels.gemm_ws import ws_a8w4_matmul
OUT = sys.argv[1]
P = MODS["base"].PpConfig
PLAN = {256: {(4096, 4096): [P(256, 4, 2), P(256, 4, 4), P(128, 6, 2)], (4096, 11008): [P(256, 4, 1)],
              (11008, 4096): [P(256, 4, 3), P(256, 4, 4), P(128, 6, 2)], (8192, 28672): [P(256, 4, 1)],
              (28672, 8192): [P(256, 4, 2)]},
        1024: {s: [P(256, 4, 1)] for s in SHAPES}, 4096: {s: [P(256, 4, 1)] for s in SHAPES}}
fails, rows, traces = [], [], {}
name = lambda v, c: f"{v}_bm{c.bm}_sp{c.split}"

def exact(mod, o, m, cfg, bias=None):
    pad = torch.zeros(max(m, 32), o.kw.in_features, dtype=torch.int8, device="cuda"); pad[:m] = o.x_s8
    if bias is None and not torch.equal(mod.pp_a8w4_matmul(o.x_s8, o.kw, out_dtype=None, config=cfg),
                                        torch._int_mm(pad, o.w8.t())[:m]):
        return "int32"
    if not torch.equal(mod.pp_a8w4_matmul(o.x_s8, o.kw, o.s_x, bias, torch.float16, config=cfg),
                       ws_a8w4_matmul(o.x_s8, o.kw, o.s_x, bias, torch.float16)):
        return "fp16"
    return None

for k, n, g in ((1152, 512, 64), (4096, 1024, 128)):
    o = Operands(make_weight(n, k, g))
    for m in (17, 255, 1000):
        o.set_acts(m)
        bias = torch.randn(n, device="cuda").half()
        for v, mod in MODS.items():
            for cfg in (P(256, 4, 2), P(256, 4, 3), P(128, 6, 2), P(256, 4, 1)):
                try:
                    bad = exact(mod, o, m, cfg, bias)
                    if bad: fails.append(f"small {k}x{n} g{g} M={m} {name(v, cfg)} {bad}")
                except Exception as e:
                    fails.append(f"small {k}x{n} g{g} M={m} {name(v, cfg)}: {type(e).__name__} {str(e)[:300]}")
print("small-layer failures:", fails, flush=True)

def timeline(mod, m, cfg, sets):
    n = sets[0].kw.out_features
    grid = min(mod.triton.cdiv(n, 128) * mod.triton.cdiv(m, cfg.bm) * cfg.split, 132)
    grid -= grid % cfg.split
    trs = [torch.zeros(grid, 64, dtype=torch.int64, device="cuda") for _ in range(3)]
    calls = [lambda s=s, t=t: mod.pp_a8w4_matmul(s.x_s8, s.kw, s.s_x, config=cfg, trace=t) for s, t in zip(sets[:3], trs)]
    for c in calls: c()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls: c()
    for _ in range(3): g.replay()
    torch.cuda.synchronize()
    return [t.cpu().tolist() for t in trs]

for m, plan in PLAN.items():
    for k, n, mm, sets in sets_at(list(plan), [m]):
        o = sets[0]
        t = {"fp16": time_graph([kernel_call("fp16", s) for s in sets]),
             "fp8_rowwise": time_graph([kernel_call("fp8_rowwise", s) for s in sets]),
             "dgq_pp": time_graph([kernel_call("dgq_pp", s) for s in sets])}
        for cfg in plan[(k, n)]:
            for v, mod in MODS.items():
                try:
                    bad = exact(mod, o, m, cfg)
                except Exception as e:
                    fails.append(f"{k}x{n} M={m} {name(v, cfg)}: {type(e).__name__} {str(e)[:300]}"); continue
                if bad:
                    fails.append(f"{k}x{n} M={m} {name(v, cfg)}: not exact ({bad})"); continue
                t[name(v, cfg)] = time_graph([lambda s=s, c=cfg, mod=mod: mod.pp_a8w4_matmul(s.x_s8, s.kw, s.s_x, config=c)
                                              for s in sets])
                if exact(mod, o, m, cfg):
                    fails.append(f"{k}x{n} M={m} {name(v, cfg)}: not exact after replays")
                if m == 256:
                    traces[f"{k}x{n}_M{m}_{name(v, cfg)}"] = timeline(mod, m, cfg, sets)
        rows += [{"K": k, "N": n, "M": m, "kernel": a, "ms": b} for a, b in t.items()]
        f16 = t["fp16"]
        print(f"K={k} N={n} M={m}: " + ", ".join(f"{a} {b*1e3:.1f} ({f16/b:.2f}x)" for a, b in t.items()), flush=True)
        json.dump({"rows": rows, "failures": fails}, open(f"{OUT}/s19_probe2.json", "w"), indent=0)
        json.dump(traces, open(f"{OUT}/s19_traces2.json", "w"))
print("failures:", len(fails), *fails, sep="\n")
