"""Probe: the ping-pong register-operand A8W4 GEMM (:mod:`dgq.kernels.gemm_pp`) beside the warp-specialized kernel's
rule, widen-once + the int8 GEMM, the dispatch (int8 codes in) and cuBLAS FP16, on the benchmark's five shapes, with
the cold-L2 CUDA-graph timing of ``benchmarks/gemm.py``.  Every variant is checked first: its int32 accumulators bit-exact against
``torch._int_mm``, its fp32 and fp16 epilogues equal to the warp-specialized kernel's (group 128 on the timed
shapes; group 64, odd token counts and a bias on a small layer), and again after its graph's replays.

    PYTHONPATH=. python benchmarks/gemm_pp_probe.py --json $OUT/pp.json      # the H100
"""

from __future__ import annotations

import argparse
import json

import torch

from dgq.kernels.gemm_pp import PpConfig, one_wave, pp_a8w4_matmul
from dgq.kernels.gemm_pp import config_for as pp_rule
from dgq.kernels.gemm_ws import config_for, ws_a8w4_matmul
from dgq.kernels.linear import a8w4_mm, widen_once_matmul

# Session 16's first run also timed the two warpgroups issuing their MMAs as soon as each had widened, without the
# order barrier (results/gemm_pp_probe_s16.json, "_free"): equal within 2% at M <= 1024, up to 13% slower at
# M = 2048 / 4096 on 8192 x 28672, so the kernel always takes turns.
VARIANTS = [PpConfig(256, 4), PpConfig(256, 5), PpConfig(128, 6)]
# --splits: K splits for the layers whose tiles alone leave SMs idle (M <= 256 on the N = 4096 / 8192 layers),
# reduced by all splits at once (session 17; session 16's last-arrival reduction lost at M = 256), those of one wave
# only; at M = 128 also the unsplit 128-token tile (the rule's 256-token tiles are half empty there)
SPLIT_VARIANTS = {16: [PpConfig(16, 8, 2), PpConfig(16, 12, 2), PpConfig(16, 8)],  # (16 tokens: 2 splits at most)
                  32: [PpConfig(32, 8, 4), PpConfig(32, 12, 4), PpConfig(32, 8, 2)],
                  64: [PpConfig(64, 8, s) for s in (2, 4)],
                  128: [PpConfig(128, 6, 4), PpConfig(128, 6, 2), PpConfig(64, 8, 2), PpConfig(128, 6)],
                  256: [PpConfig(128, 6, 2), PpConfig(256, 4, 2), PpConfig(256, 4, 4)]}


def _name(cfg: PpConfig) -> str:
    return f"pp_bm{cfg.bm}_st{cfg.stages}" + (f"_sp{cfg.split}" if cfg.split > 1 else "")


def _exact(o, m: int, cfg: PpConfig, bias: torch.Tensor | None = None,
           dtypes: tuple = (torch.float32, torch.float16, torch.bfloat16)) -> bool:
    pad = torch.zeros(max(m, 32), o.kw.in_features, dtype=torch.int8, device="cuda")
    pad[:m] = o.x_s8
    want = torch._int_mm(pad, o.w8.t())[:m]
    if not torch.equal(pp_a8w4_matmul(o.x_s8, o.kw, out_dtype=None, config=cfg), want):
        return False
    return all(torch.equal(pp_a8w4_matmul(o.x_s8, o.kw, o.s_x, bias, dt, config=cfg),
                           ws_a8w4_matmul(o.x_s8, o.kw, o.s_x, bias, dt))
               for dt in dtypes)


def small_layers(failures: list[str], variants: list[PpConfig],
                 dtypes: tuple = (torch.float32, torch.float16, torch.bfloat16)) -> None:
    """Group 64 and 128, token counts that leave partial tiles, a bias: what the timed shapes do not reach."""
    from gemm import Operands, make_weight

    for k, n, g in ((1152, 512, 64), (4096, 1024, 128), (2048, 384, 64)):
        o = Operands(make_weight(n, k, g))
        for m in (1, 17, 255, 1000, 1500):
            o.set_acts(m)
            bias = torch.randn(n, device="cuda").half()
            for cfg in variants:
                if cfg.split > 1 and not one_wave(cfg, m, n, 132):
                    continue
                try:
                    ok = _exact(o, m, cfg, bias, dtypes)
                except Exception as e:  # noqa: BLE001 - a variant that cannot build or launch is reported
                    failures.append(f"K={k} N={n} g={g} M={m} {_name(cfg)}: {type(e).__name__}: {str(e)[:160]}")
                    continue
                if not ok:
                    failures.append(f"K={k} N={n} g={g} M={m} {_name(cfg)}: not exact")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None)
    parser.add_argument("--ms", default="256,1024,2048,4096")
    parser.add_argument("--splits", action="store_true",
                        help="the K-split variants at M = 64, 128 and 256 instead (--ms: of those), checked on the "
                             "small layers in fp32 (groups 64 and 128, odd M, bias) first")
    args = parser.parse_args()
    from gemm import SHAPES, print_failures, sets_at, time_graph

    rows, failures = [], []
    ms = [int(v) for v in args.ms.split(",")]
    if args.splits:
        ms = [m for m in ms if m in SPLIT_VARIANTS] or sorted(SPLIT_VARIANTS)
    if args.splits:
        small_layers(failures, sorted({c for v in SPLIT_VARIANTS.values() for c in v if c.split > 1}, key=str),
                     (torch.float32,))
    else:  # (each variant compiles per group, dtype and bias: ~10 s each; the split one's in pytest -m cuda)
        small_layers(failures, VARIANTS)
    print_failures(failures)
    for k, n, m, sets in sets_at(SHAPES, ms):
        o = sets[0]
        times = {"fp16": time_graph([lambda o=o: o.x16 @ o.w16.t() for o in sets]),
                 "dispatch": time_graph([lambda o=o: a8w4_mm(o.x_s8, o.s_x, o.kw) for o in sets]),
                 "ws_rule": time_graph([lambda o=o: ws_a8w4_matmul(o.x_s8, o.kw, o.s_x) for o in sets])}
        if m >= 1024:
            times["widen_once"] = time_graph([lambda o=o: widen_once_matmul(o.x_s8, o.s_x, o.kw) for o in sets])
        for cfg in SPLIT_VARIANTS[m] if args.splits else VARIANTS:
            if cfg.split > 1 and not one_wave(cfg, m, n, 132):
                continue
            name = _name(cfg)
            dtypes = (torch.float16,) if args.splits else (torch.float32, torch.float16, torch.bfloat16)
            try:
                ok = _exact(o, m, cfg, dtypes=dtypes)
            except Exception as e:  # noqa: BLE001
                failures.append(f"K={k} N={n} M={m} {name}: {type(e).__name__}: {str(e)[:160]}")
                continue
            if not ok:
                failures.append(f"K={k} N={n} M={m} {name}: not exact")
                continue
            times[name] = time_graph([lambda o=o, c=cfg: pp_a8w4_matmul(o.x_s8, o.kw, o.s_x, config=c)
                                      for o in sets])
            if not _exact(o, m, cfg, dtypes=dtypes):
                failures.append(f"K={k} N={n} M={m} {name}: not exact after replays")
        rows += [{"K": k, "N": n, "M": m, "kernel": name, "ms": t} for name, t in times.items()]
        print(f"K={k} N={n} M={m} (ws {config_for(m, n)}, pp {pp_rule(m, n)}): "
              + ", ".join(f"{name} {t * 1e3:.1f}" for name, t in times.items()) + " us", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"rows": rows, "failures": failures}, f, indent=1)
    print_failures(failures)


if __name__ == "__main__":
    main()
