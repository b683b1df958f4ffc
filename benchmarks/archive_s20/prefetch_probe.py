"""Probe (session 20): the ping-pong kernel's main loop with the next K tile widened while this tile's MMAs run
(PREFETCH 1: if/else, 2: predicated) and without the slot-release proxy fence, against today's loop.  Each variant
checked bit-exact (int32 against torch._int_mm on small layers with odd M and group 64; fp16 against today's kernel
on the timed shapes, before and after the replays), then timed with gemm.py's cold-L2 graphs."""
import argparse, json, sys, time
from dataclasses import replace
import torch
sys.path.insert(0, "benchmarks")
from gemm import SHAPES, Operands, make_weight, sets_at, time_graph
from dgq.kernels.gemm_pp import PpConfig, one_wave, pp_a8w4_matmul, config_for

p = argparse.ArgumentParser()
p.add_argument("--json", required=True)
p.add_argument("--ms", default="128,256,1024,4096")
p.add_argument("--variants", default="0T,0F,1T,2T,2F")
a = p.parse_args()
VARS = [(int(v[0]), v[1] == "T") for v in a.variants.split(",")]
name = lambda v: f"pf{v[0]}{'' if v[1] else '_nofence'}"
rows, failures, t0 = [], [], time.time()
def dump():
    json.dump({"rows": rows, "failures": failures}, open(a.json, "w"), indent=1)
# exactness on small layers: every rule config family x variant, int32 out
for k, n, g in ((1152, 512, 64), (4096, 1024, 128)):
    o = Operands(make_weight(n, k, g))
    for m in (17, 100, 255, 1000):
        o.set_acts(m)
        pad = torch.zeros(max(m, 32), k, dtype=torch.int8, device="cuda"); pad[:m] = o.x_s8
        want = torch._int_mm(pad, o.w8.t())[:m]
        for base in (PpConfig(128, 6, 2), PpConfig(256, 4), PpConfig(256, 4, 2), PpConfig(128, 6)):
            if base.split > 1 and not one_wave(base, m, n, 132):
                continue
            for v in VARS:
                cfg = replace(base, prefetch=v[0], fence=v[1])
                try:
                    got = pp_a8w4_matmul(o.x_s8, o.kw, out_dtype=None, config=cfg)
                    if not torch.equal(got, want):
                        failures.append(f"small K={k} N={n} g={g} M={m} {base} {name(v)}: int32 not exact")
                except Exception as e:
                    failures.append(f"small K={k} N={n} M={m} {base} {name(v)}: {type(e).__name__} {str(e)[:200]}")
print(f"small layers checked in {time.time() - t0:.0f} s; {len(failures)} failures", flush=True); dump()
for k, n, m, sets in sets_at(SHAPES, [int(x) for x in a.ms.split(",")]):
    base = config_for(m, n) or PpConfig()
    o = sets[0]
    ref = pp_a8w4_matmul(o.x_s8, o.kw, o.s_x, config=base)
    times = {"fp16": time_graph([lambda o=o: o.x16 @ o.w16.t() for o in sets])}
    for v in VARS:
        cfg = replace(base, prefetch=v[0], fence=v[1])
        if not torch.equal(pp_a8w4_matmul(o.x_s8, o.kw, o.s_x, config=cfg), ref):
            failures.append(f"K={k} N={n} M={m} {name(v)}: fp16 differs from today's kernel"); continue
        times[name(v)] = time_graph([lambda o=o, c=cfg: pp_a8w4_matmul(o.x_s8, o.kw, o.s_x, config=c) for o in sets])
        if not torch.equal(pp_a8w4_matmul(o.x_s8, o.kw, o.s_x, config=cfg), ref):
            failures.append(f"K={k} N={n} M={m} {name(v)}: differs after replays")
    rows += [{"K": k, "N": n, "M": m, "config": str(base), "kernel": kk, "ms": t} for kk, t in times.items()]
    print(f"K={k} N={n} M={m} {base}: " + ", ".join(f"{kk} {t * 1e3:.1f}" for kk, t in times.items()) + " us", flush=True)
    dump()
print(f"{len(failures)} failures", *failures, sep="\n")
print(f"total {time.time() - t0:.0f} s")
