"""Session 19: the TMA GEMV with a split's slots interleaved with its partners' (the K splits of a tile read
neighbouring 256-byte pieces of the same rows at once) against the production GEMV, one token."""
import importlib.util, json, sys
import torch
sys.path.insert(0, "benchmarks")
spec = importlib.util.spec_from_file_location("gi", ".dev/gemv_inter.py")
gi = importlib.util.module_from_spec(spec); sys.modules["gi"] = gi; spec.loader.exec_module(gi)
from gemm import SHAPES, operand_sets, time_graph, kernel_call, Operands, make_weight
from read_ceiling import tma_read
from dgq.kernels.gemv_tma import tma_gemv, config_for, TmaGemvConfig as C
from dgq.kernels.act_quant import quantize_activations_triton
OUT = sys.argv[1]
fails, rows = [], []
for k, n, g in ((1152, 512, 64), (4096, 1024, 128), (2048, 384, 64), (28672, 256, 128)):
    o = Operands(make_weight(n, k, g))
    for m in (1, 3):
        o.set_acts(m)
        bias = torch.randn(n, device="cuda").half()
        for cfg in (config_for(n, k), C(64, 2, 4, 4, 2), C(64, 3, 8, 4, 1), C(128, 2, 2, 4, 4), C(64, 2, 3, 4, 4)):
            want = tma_gemv(o.x_s8, o.kw, o.s_x, bias, config=cfg)
            got = gi.tma_gemv(o.x_s8, o.kw, o.s_x, bias, config=cfg)
            if not torch.equal(got, want):
                fails.append(f"small {k}x{n} g{g} M={m} {cfg}: {(got != want).sum().item()} differ")
            if o.kw.split_scratch.any():
                fails.append(f"small {k}x{n} M={m} {cfg}: counts left armed")
print("small failures:", fails, flush=True)
name = lambda c: f"i_bn{c.bn}_st{c.stages}_sp{c.split}_kt{c.kt}"
for k, n in [(28672, 8192), (8192, 28672), (4096, 4096), (4096, 11008), (11008, 4096)]:
    sets = operand_sets(k, n)
    for o in sets:
        o.set_acts(1)
    o = sets[0]
    rule = config_for(n, k)
    t = {"fp16": time_graph([kernel_call("fp16", s) for s in sets]),
         "dgq": time_graph([kernel_call("dgq", s) for s in sets]),
         "gemv": time_graph([lambda s=s: tma_gemv(s.x_s8, s.kw, s.s_x) for s in sets])}
    if k * n > 100e6:
        out = torch.zeros(1024, dtype=torch.int32, device="cuda")
        t["bare_read"] = time_graph([lambda s=s: tma_read(s.kw.codes, out, 264, 64, 256, 4) for s in sets])
    variants = [rule] + [C(bn, 2, sp, 4, kt) for bn, sp, kt in ((64, 2, 4), (64, 4, 4), (64, 8, 4), (128, 2, 4),
                                                                 (128, 4, 4), (64, 8, 2), (64, 16, 2))
                         if (bn, sp, kt) != (rule.bn, rule.split, rule.kt) and (k // 128) // sp >= 4]
    best, bt = None, 1e9
    for cfg in variants:
        try:
            if not torch.equal(gi.tma_gemv(o.x_s8, o.kw, o.s_x, config=cfg), tma_gemv(o.x_s8, o.kw, o.s_x)):
                fails.append(f"{k}x{n} {name(cfg)}: not exact"); continue
        except Exception as e:
            fails.append(f"{k}x{n} {name(cfg)}: {type(e).__name__} {str(e)[:200]}"); continue
        ms = time_graph([lambda s=s, c=cfg: gi.tma_gemv(s.x_s8, s.kw, s.s_x, config=c) for s in sets])
        t[name(cfg) + ("_rule" if cfg == rule else "")] = ms
        if ms < bt:
            best, bt = cfg, ms
    def pair(s, c=best):
        q, sx = quantize_activations_triton(s.x16)
        return gi.tma_gemv(q, s.kw, sx, config=c)
    t["aq+best"] = time_graph([lambda s=s: pair(s) for s in sets])
    t["gemv_again"] = time_graph([lambda s=s: tma_gemv(s.x_s8, s.kw, s.s_x) for s in sets])
    t["dgq_again"] = time_graph([kernel_call("dgq", s) for s in sets])
    rows += [{"K": k, "N": n, "M": 1, "kernel": a, "ms": b} for a, b in t.items()]
    print(f"K={k} N={n} rule {rule}: " + ", ".join(f"{a} {b * 1e3:.1f}" for a, b in t.items()) + f" us (best {best})", flush=True)
    json.dump({"rows": rows, "failures": fails}, open(f"{OUT}/gemv_inter_s19.json", "w"), indent=0)
print("failures:", len(fails), *fails, sep="\n")
