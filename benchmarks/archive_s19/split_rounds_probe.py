"""Session 19 call 1: the ping-pong kernel's K splits at M = 256 in rounds (split-fastest units), split 3, and a
per-CTA timeline (globaltimer / clock64 stamps) of the split configs.  Experiment code (.dev/pp_exp.py)."""
import importlib.util, json, sys, statistics
import torch
sys.path.insert(0, "benchmarks")
spec = importlib.util.spec_from_file_location("pp_exp", ".dev/pp_exp.py")
pp = importlib.util.module_from_spec(spec); sys.modules["pp_exp"] = pp; spec.loader.exec_module(pp)
from gemm import SHAPES, sets_at, time_graph, kernel_call, Operands, make_weight
from dgq.kernels.gemm_pp import pp_a8w4_matmul
from dgq.kernels.gemm_ws import ws_a8w4_matmul
from dgq.kernels.act_quant import quantize_activations_triton
PpConfig = pp.PpConfig
OUT = sys.argv[1]
MS = [int(v) for v in sys.argv[2].split(",")] if len(sys.argv) > 2 else [256]
CFGS = [PpConfig(256, 4, 1), PpConfig(256, 4, 2), PpConfig(256, 4, 3), PpConfig(256, 4, 4), PpConfig(128, 6, 2),
        PpConfig(128, 6, 4)]
name = lambda c: f"x_bm{c.bm}_sp{c.split}"
fails, rows, traces = [], [], {}

def exact(o, m, cfg):
    pad = torch.zeros(max(m, 32), o.kw.in_features, dtype=torch.int8, device="cuda"); pad[:m] = o.x_s8
    want = torch._int_mm(pad, o.w8.t())[:m]
    if not torch.equal(pp.pp_a8w4_matmul(o.x_s8, o.kw, out_dtype=None, config=cfg), want):
        return "int32"
    for dt in (torch.float16,):
        if not torch.equal(pp.pp_a8w4_matmul(o.x_s8, o.kw, o.s_x, None, dt, config=cfg),
                           ws_a8w4_matmul(o.x_s8, o.kw, o.s_x, None, dt)):
            return str(dt)
    return None

# small layers: group 64 / 128, odd M, bias (fp16)
for k, n, g in ((1152, 512, 64), (4096, 1024, 128)):
    o = Operands(make_weight(n, k, g))
    for m in (17, 255, 1000):
        o.set_acts(m)
        bias = torch.randn(n, device="cuda").half()
        for cfg in CFGS:
            try:
                if not torch.equal(pp.pp_a8w4_matmul(o.x_s8, o.kw, o.s_x, bias, torch.float16, config=cfg),
                                   ws_a8w4_matmul(o.x_s8, o.kw, o.s_x, bias, torch.float16)):
                    fails.append(f"small {k}x{n} g{g} M={m} {name(cfg)}")
            except Exception as e:
                fails.append(f"small {k}x{n} g{g} M={m} {name(cfg)}: {type(e).__name__} {str(e)[:200]}")
print("small-layer failures:", fails, flush=True)

def aq_then(s, c):
    q, sx = quantize_activations_triton(s.x16)
    return pp.pp_a8w4_matmul(q, s.kw, sx, config=c)


def timeline(o, m, cfg, sets):
    """Trace of the middle call of three in one graph (PDL overlap as in the benchmark)."""
    grid = min(pp.triton.cdiv(o.kw.out_features, 128) * pp.triton.cdiv(m, cfg.bm) * cfg.split, 132)
    grid -= grid % cfg.split
    trs = [torch.zeros(grid, 32, dtype=torch.int64, device="cuda") for _ in range(3)]
    calls = [lambda s=s, t=t: pp.pp_a8w4_matmul(s.x_s8, s.kw, s.s_x, config=cfg, trace=t) for s, t in zip(sets[:3], trs)]
    for c in calls: c()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls: c()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    return [t.cpu().tolist() for t in trs]

for k, n, m, sets in sets_at(SHAPES, MS):
    o = sets[0]
    t = {"fp16": time_graph([kernel_call("fp16", s) for s in sets]),
         "fp8_rowwise": time_graph([kernel_call("fp8_rowwise", s) for s in sets]),
         "dgq": time_graph([kernel_call("dgq", s) for s in sets]),
         "dgq_pp": time_graph([kernel_call("dgq_pp", s) for s in sets])}
    for cfg in CFGS:
        units = pp.triton.cdiv(n, 128) * pp.triton.cdiv(m, cfg.bm) * cfg.split
        if cfg.split > 1 and units > 2 * 132:
            continue
        try:
            bad = exact(o, m, cfg)
        except Exception as e:
            fails.append(f"{k}x{n} M={m} {name(cfg)}: {type(e).__name__} {str(e)[:200]}"); continue
        if bad:
            fails.append(f"{k}x{n} M={m} {name(cfg)}: not exact ({bad})"); continue
        t[name(cfg)] = time_graph([lambda s=s, c=cfg: pp.pp_a8w4_matmul(s.x_s8, s.kw, s.s_x, config=c) for s in sets])
        # with the act-quant in front, as the layer runs it
        t[name(cfg) + "+aq"] = time_graph([lambda s=s, c=cfg: aq_then(s, c) for s in sets])
        if exact(o, m, cfg):
            fails.append(f"{k}x{n} M={m} {name(cfg)}: not exact after replays")
        if cfg.split > 1 and cfg != PpConfig(128, 6, 4) or cfg.split == 1 and k == 4096 and n == 11008:
            traces[f"{k}x{n}_M{m}_{name(cfg)}"] = timeline(o, m, cfg, sets)
    rows += [{"K": k, "N": n, "M": m, "kernel": a, "ms": b} for a, b in t.items()]
    f16 = t["fp16"]
    print(f"K={k} N={n} M={m}: " + ", ".join(f"{a} {b*1e3:.1f} ({f16/b:.2f}x)" for a, b in t.items()), flush=True)
    json.dump({"rows": rows, "failures": fails}, open(f"{OUT}/s19_probe.json", "w"), indent=0)
    json.dump(traces, open(f"{OUT}/s19_traces.json", "w"))
print("failures:", len(fails), *fails, sep="\n")
