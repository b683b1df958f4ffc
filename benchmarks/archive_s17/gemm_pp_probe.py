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

from dgq.kernels.gemm_pp import PpConfig, pp_a8w4_matmul
from dgq.kernels.gemm_pp import config_for as pp_rule
from dgq.kernels.gemm_ws import config_for, ws_a8w4_matmul
from dgq.kernels.linear import a8w4_mm, widen_once_matmul

# Session 16's first run also timed the two warpgroups issuing their MMAs as soon as each had widened, without the
# order barrier (results/gemm_pp_probe_s16.json, "_free"): equal within 2% at M <= 1024, up to 13% slower at
# M = 2048 / 4096 on 8192 x 28672, so the kernel always takes turns.
VARIANTS = [PpConfig(256, 4), PpConfig(256, 5), PpConfig(128, 6)]
# --splits: K splits for the layers whose tiles alone leave SMs idle (M <= 256 on the N = 4096 / 8192 layers)
# and 64-token tiles unsplit at M = 256 (four times the tiles of the 256-token ones; session 16's last call)
SPLIT_VARIANTS = {64: [PpConfig(64, 8, s) for s in (2, 4)],
                  256: [PpConfig(256, 4, 2), PpConfig(128, 6, 2), PpConfig(128, 6, 4), PpConfig(64, 8, 4),
                        PpConfig(64, 8, 1), PpConfig(64, 6, 1)]}
# --stream (session 17): stream-K, every CTA an even share of all tiles' K tiles, for the layers whose tiles alone
# leave SMs idle or end in a partial wave (ncu, session 16: at M = 256 the 256-token tile runs its MMAs ~80% of the
# active cycles, but 86 tiles keep 65% of the SMs busy on 4096 x 11008 and 32 tiles a quarter on the N = 4096 layers)
STREAM_VARIANTS = [PpConfig(256, 4, stream=True), PpConfig(128, 6, stream=True), PpConfig(64, 8, stream=True)]
# --scatter (session 17): K splits of one wave reduced by all splits at once (each owns 1/split of the tile's columns)
SCATTER_VARIANTS = [PpConfig(bm, st, s, scatter=True) for bm, st in ((256, 4), (128, 6), (64, 8)) for s in (2, 4)]


def _fits(cfg: PpConfig, m: int, n: int, sms: int = 132) -> bool:
    """Whether a scattered-reduction config can run this layer (all its CTAs in one wave)."""
    return not cfg.scatter or -(-n // 128) * -(-m // cfg.bm) * cfg.split <= sms


def _name(cfg: PpConfig) -> str:
    return (f"pp_bm{cfg.bm}_st{cfg.stages}" + (f"_sp{cfg.split}" if cfg.split > 1 else "")
            + ("_sk" if cfg.stream else "") + ("_sc" if cfg.scatter else ""))


def _exact(o, m: int, cfg: PpConfig, bias: torch.Tensor | None = None,
           dtypes: tuple = (torch.float32, torch.float16, torch.bfloat16)) -> bool:
    pad = torch.zeros(max(m, 32), o.kw.in_features, dtype=torch.int8, device="cuda")
    pad[:m] = o.x_s8
    want = torch._int_mm(pad, o.w8.t())[:m]
    if not (cfg.stream or cfg.scatter) and not torch.equal(pp_a8w4_matmul(o.x_s8, o.kw, out_dtype=None, config=cfg),
                                                          want):
        return False  # (stream-K and the scattered reduction write floats only: fp32 against the exact kernel)
    return all(torch.equal(pp_a8w4_matmul(o.x_s8, o.kw, o.s_x, bias, dt, config=cfg),
                           ws_a8w4_matmul(o.x_s8, o.kw, o.s_x, bias, dt))
               for dt in dtypes)


def small_layers(failures: list[str], variants: list[PpConfig], dtypes: tuple = (torch.float32, torch.float16,
                                                                             torch.bfloat16)) -> None:
    """Group 64 and 128, token counts that leave partial tiles, a bias: what the timed shapes do not reach."""
    from gemm import Operands, make_weight

    for k, n, g in ((1152, 512, 64), (4096, 1024, 128), (2048, 384, 64)):
        o = Operands(make_weight(n, k, g))
        for m in (1, 17, 255, 1000, 1500):
            o.set_acts(m)
            bias = torch.randn(n, device="cuda").half()
            for cfg in variants:
                if not _fits(cfg, m, n):
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
                        help="the K-split (and 64-token) variants at M = 64 and 256 instead (--ms: of those)")
    parser.add_argument("--scatter", action="store_true",
                        help="the scattered split-K variants instead (those that fit one wave), checked like --stream")
    parser.add_argument("--stream", action="store_true",
                        help="the stream-K variants instead (tiles of at most M tokens), checked on the small layers "
                             "in fp32 (group 64 and 128, odd M, bias) first")
    args = parser.parse_args()
    from gemm import SHAPES, operand_sets, print_failures, time_graph

    rows, failures = [], []
    ms = [int(v) for v in args.ms.split(",")]
    if args.splits:
        ms = [m for m in ms if m in SPLIT_VARIANTS] or sorted(SPLIT_VARIANTS)
    if args.stream or args.scatter:
        small_layers(failures, STREAM_VARIANTS if args.stream else SCATTER_VARIANTS, (torch.float32,))
    elif not args.splits:  # (each variant compiles per group, dtype and bias: ~10 s each; the split one's in pytest -m cuda)
        small_layers(failures, VARIANTS)
    print_failures(failures)
    for k, n in SHAPES:
        sets = operand_sets(k, n)
        for m in ms:
            for o in sets:
                o.set_acts(m)
            o = sets[0]
            times = {"fp16": time_graph([lambda o=o: o.x16 @ o.w16.t() for o in sets]),
                     "dispatch": time_graph([lambda o=o: a8w4_mm(o.x_s8, o.s_x, o.kw) for o in sets]),
                     "ws_rule": time_graph([lambda o=o: ws_a8w4_matmul(o.x_s8, o.kw, o.s_x) for o in sets])}
            if m >= 1024:
                times["widen_once"] = time_graph([lambda o=o: widen_once_matmul(o.x_s8, o.s_x, o.kw) for o in sets])
            if args.stream or args.scatter:
                variants = [c for c in (STREAM_VARIANTS if args.stream else SCATTER_VARIANTS)
                            if c.bm <= max(m, 64) and _fits(c, m, n)]
            else:
                variants = SPLIT_VARIANTS[m] if args.splits else VARIANTS
            for cfg in variants:
                name = _name(cfg)
                dtypes = (torch.float16,) if args.splits or args.stream or args.scatter else (torch.float32, torch.float16,
                                                                                torch.bfloat16)
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
