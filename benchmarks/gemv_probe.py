"""Config search for the one-token A8W4 GEMV (:mod:`dgq.kernels.gemv`), and the act-quant's cost at one token.

Two parts, on the shapes and with the cold-L2 CUDA-graph timing of ``benchmarks/gemm.py``:

* ``--sweep``: variants (rows per program, K tiles per chunk, K splits, warps) side by side with the rule
  (:func:`dgq.kernels.gemv.config_for`) and cuBLAS FP16; every variant is checked against the exact fp32 epilogue of
  ``torch._int_mm`` first, and again after the graph's replays (the split-K counts must be left at zero);
* ``--fused``: the GEMV that quantizes inside (:func:`dgq.kernels.gemv.a8w4_gemv_float`) against the act-quant
  kernel + the GEMV, and the GEMV alone, which is where :func:`dgq.kernels.gemv.quantizes_inside` comes from.

How the rules were chosen (benchmarks/notes_gemm.md); run it again when the kernel changes:

    PYTHONPATH=. python benchmarks/gemv_probe.py --sweep --fused --json $OUT/gemv.json     # the H100

``--decode`` times each path on the decode step's own layer shapes.  ``--tma`` times the variants of the GEMV fed
by bulk tensor copies (:mod:`dgq.kernels.gemv_tma`) on the benchmark's and the decode step's shapes, each checked
bit-exact against :func:`dgq.kernels.gemv.a8w4_gemv` before and after its graph's replays, beside the GEMV alone and
the dispatch from float activations:

    PYTHONPATH=. python benchmarks/gemv_probe.py --tma plain --json $OUT/gemv_tma.json

``--tma aq`` (session 18) puts each act-quant variant in front of the GEMV from codes (rings of 2-4 slots) beside the
GEMV quantizing inside: ``results/gemv_aq_s18.json``.
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
import triton

from dgq.kernels import gemv
from dgq.kernels.act_quant import quantize_activations_triton


def _cfg(bn: int, tpi: int, split: int, warps: int) -> triton.Config:
    return triton.Config({"BLOCK_N": bn, "TPI": tpi, "SPLIT_K": split}, num_warps=warps, num_stages=1)


VARIANTS = ([_cfg(64, 4, s, 4) for s in (1, 2, 4, 8, 16)] + [_cfg(64, 2, s, 4) for s in (2, 4, 8, 16)]
            + [_cfg(32, 4, s, 2) for s in (4, 8, 16)] + [_cfg(128, 1, s, 4) for s in (4, 8, 16)]
            + [_cfg(128, 2, s, 4) for s in (4, 8)] + [_cfg(64, 1, 16, 2), _cfg(64, 8, 4, 4), _cfg(64, 8, 8, 4),
                                                     _cfg(32, 2, 16, 2), _cfg(64, 4, 4, 8), _cfg(128, 4, 4, 8)])


def _name(c: triton.Config) -> str:
    return f"bn{c.kwargs['BLOCK_N']}_tpi{c.kwargs['TPI']}_split{c.kwargs['SPLIT_K']}_w{c.num_warps}"


def measure(json_path: str | None, sweep: bool, fused: bool) -> None:
    from gemm import (  # benchmarks/gemm.py: same operands and timing method
        SHAPES,
        operand_sets,
        print_failures,
        save_probe,
        time_graph,
    )

    rows, failures, ratios = [], [], {"fused": [], "two_launches": [], "gemv_alone": []}
    for k, n in SHAPES:
        sets = operand_sets(k, n)
        for o in sets:
            o.set_acts(1)
        o = sets[0]
        pad = torch.zeros(32, k, dtype=torch.int8, device="cuda")
        pad[:1] = o.x_s8
        want = (torch._int_mm(pad, o.w8.t())[:1].float() * o.s_x.float() * o.kw.s1).half()
        times = {"fp16": time_graph([lambda o=o: o.x16 @ o.w16.t() for o in sets]),
                 "gemv_alone": time_graph([lambda o=o: gemv.a8w4_gemv(o.x_s8, o.kw, o.s_x) for o in sets])}
        rule = gemv.config_for(n, k, o.kw.tile_k)
        if fused:
            if not torch.equal(gemv.a8w4_gemv_float(o.x16, o.kw), _two_launches(o, gemv.a8w4_gemv)):
                failures.append(f"K={k} N={n} fused != two launches")
            times["fused"] = time_graph([lambda o=o: gemv.a8w4_gemv_float(o.x16, o.kw) for o in sets])
            times["two_launches"] = time_graph([lambda o=o: _two_launches(o, gemv.a8w4_gemv) for o in sets])
        for c in VARIANTS if sweep else ():
            name = _name(c)
            if not torch.equal(gemv.a8w4_gemv(o.x_s8, o.kw, o.s_x, config=c), want) or o.kw.split_scratch.any():
                failures.append(f"K={k} N={n} {name}")
                continue
            times[name] = time_graph([lambda o=o, c=c: gemv.a8w4_gemv(o.x_s8, o.kw, o.s_x, config=c) for o in sets])
            if not torch.equal(gemv.a8w4_gemv(o.x_s8, o.kw, o.s_x, config=c), want):
                failures.append(f"K={k} N={n} {name} after replays")
        rows += [{"K": k, "N": n, "M": 1, "kernel": name, "ms": t, "rule": name == _name(rule)}
                 for name, t in times.items()]
        for key, got in ratios.items():
            if key in times:
                got.append(times["fp16"] / times[key])
        shown = " ".join(f"{name} {times['fp16'] / t:.2f}x" for name, t in times.items()
                         if not name.startswith("bn") or name == _name(rule))
        best = min((t, name) for name, t in times.items())
        print(f"K={k} N={n}: fp16 {times['fp16'] * 1e3:.1f} us; {shown} (rule {_name(rule)}); fastest {best[1]}",
              flush=True)
        save_probe(json_path, rows, failures)
    print("medians vs fp16:", {key: round(statistics.median(v), 2) for key, v in ratios.items() if v})
    print_failures(failures)


def _two_launches(o, kernel):
    """The act-quant kernel, then ``kernel`` on its codes: the two launches a layer makes without quantizing inside."""
    q, s = quantize_activations_triton(o.x16)
    return kernel(q, o.kw, s)


# (K, N) of the decode step's layers, q/k/v and gate/up fused: Llama-2-7B, then Llama-3-8B's that differ
DECODE_SHAPES = [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096), (4096, 6144), (4096, 28672),
                 (14336, 4096)]


def decode_layers(json_path: str | None) -> None:
    """Each decode layer shape at one token: the dispatch (:func:`dgq.kernels.linear.a8w4_linear`) beside the act-quant
    + the GEMV, the GEMV quantizing inside, and the act-quant + the warp-specialized kernel, each checked equal to the
    dispatch first (which is where the register-fed GEMV's rules were checked on the
    model's own shapes)."""
    from gemm import operand_sets, print_failures, save_probe, time_graph

    from dgq.kernels import gemm_ws
    from dgq.kernels.linear import a8w4_linear

    rows, failures = [], []
    for k, n in DECODE_SHAPES:
        sets = operand_sets(k, n)
        for o in sets:
            o.set_acts(1)
        o = sets[0]
        want = a8w4_linear(o.x16, o.kw)
        calls = {"fp16": lambda o: o.x16 @ o.w16.t(), "dispatch": lambda o: a8w4_linear(o.x16, o.kw),
                 "act_quant+gemv": lambda o: _two_launches(o, gemv.a8w4_gemv),
                 "gemv_inside": lambda o: gemv.a8w4_gemv_float(o.x16, o.kw),
                 "act_quant+ws": lambda o: _two_launches(o, gemm_ws.ws_a8w4_matmul)}
        times = {}
        for name, fn in calls.items():
            if name != "fp16" and not torch.equal(fn(o), want):
                failures.append(f"K={k} N={n} {name}")
                continue
            times[name] = time_graph([lambda o=o, fn=fn: fn(o) for o in sets])
            if name != "fp16" and (not torch.equal(fn(o), want) or o.kw.split_scratch.any()):
                failures.append(f"K={k} N={n} {name} after replays")
        rows += [{"K": k, "N": n, "M": 1, "kernel": name, "ms": t} for name, t in times.items()]
        wbytes = o.kw.codes.numel() + 2 * o.kw.s2t.numel()
        print(f"K={k} N={n}: " + ", ".join(f"{name} {t * 1e3:.1f} us ({wbytes / t / 1e9:.2f} TB/s)"
                                          for name, t in times.items() if name != "fp16")
              + f"; fp16 {times['fp16'] * 1e3:.1f} us", flush=True)
        save_probe(json_path, rows, failures)
    print_failures(failures)


def tma_variants(kind: str = "plain") -> list:
    """``plain``: around the rule (64 or 128 rows, rings of 4, splits); ``sweep``: the first run's wider set (rings of
    8, 256 rows; its warp-specialized variants were dropped, code at b85dc05); ``inside``: deeper rings and more
    warps for the kernel that quantizes inside (whose reading of the row stalls the ring)."""
    from dgq.kernels.gemv_tma import TmaGemvConfig as C

    if kind in ("rule", "prelude", "aq"):  # against session 9's rule; what quantizing inside costs; the act-quant
        return []
    if kind == "slots":  # K tiles per slot (one bulk-copy request of 64 x kt bytes per row) and ring depth
        return [C(bn, st, sp, w, kt) for bn, sp, w in ((64, 2, 4), (64, 4, 4), (128, 1, 4), (128, 8, 8))
                for kt, st in ((1, 4), (2, 2), (2, 4), (4, 2))]
    if kind == "inside":
        return [C(bn, st, sp, w) for bn, w in ((64, 4), (128, 8)) for st in (4, 8) for sp in (2, 4, 8)]
    if kind == "sweep":
        return [C(bn, st, sp) for bn in (64, 128) for st in (4, 8) for sp in (1, 2, 4, 8)] + [
            C(256, 4, sp, 8) for sp in (1, 2, 4)]
    return [C(64, 4, sp) for sp in (1, 2, 4, 8)] + [C(128, 4, sp) for sp in (1, 2, 4)]


def _session9_rule(n: int, k: int, inside: bool):
    """:func:`dgq.kernels.gemv_tma.config_for` as session 9 left it: rings of 4 slots of one K tile each."""
    import dataclasses

    from dgq.kernels.gemv_tma import config_for

    return dataclasses.replace(config_for(n, k, inside), stages=4, kt=1)


def _prelude_calls(n: int, k: int, sets: list) -> dict:
    """What the kernel quantizing inside spends before its ring turns, in parts: the rule's inside config given each
    row's absmax (``row_absmax``: the CTAs read their own K range only, no whole-row read and reduction), and the
    same config from int8 codes (no quantizing at all); all three give the dispatch's result bit for bit."""
    from dgq.formats import row_absmax_bits
    from dgq.kernels.gemv_tma import config_for, tma_gemv, tma_gemv_float

    inside = config_for(n, k, True)
    amax = {id(o): row_absmax_bits(o.x16) for o in sets}
    return {"in_rule_absmax_given": lambda o: tma_gemv_float(o.x16, o.kw, row_absmax=amax[id(o)]),
            "codes_inside_cfg": lambda o: tma_gemv(o.x_s8, o.kw, o.s_x, config=inside)}


def _act_quant_calls(n: int, k: int) -> dict:
    """Two launches at one token with each act-quant variant (:class:`dgq.kernels.act_quant.AqConfig`: session 12's
    chunks with IEEE division, the whole row in registers by 16 or 32 warps with the division's fast path) in front
    of the GEMV from codes, by the rule's config and with rings of 3 and 4 slots (more weight requested before the
    GEMV waits for the codes)."""
    import dataclasses

    from dgq.kernels import act_quant
    from dgq.kernels.gemv_tma import config_for, tma_gemv

    def two(variant, cfg):
        def call(o):
            q, s = quantize_activations_triton(o.x16, config=act_quant.AqConfig(*variant))
            return tma_gemv(q, o.kw, s, config=cfg)
        return call

    rule = config_for(n, k)
    chunks = (False, 16, False)
    calls = {"aq_chunks_div+codes": two(chunks, rule)}
    for w in (16, 32):
        calls[f"aq_regs{w}+codes"] = two((True, w, True), rule)
    for st in (3, 4):
        calls[f"aq_regs16+codes_st{st}"] = two((True, 16, True), dataclasses.replace(rule, stages=st))
    return calls


def _tma_name(c) -> str:
    return f"bn{c.bn}_st{c.stages}_sp{c.split}_w{c.warps}" + (f"_kt{c.kt}" if c.kt > 1 else "")


def tma_exactness(failures: list[str], kind: str) -> None:
    """The rule and every third variant, from int8 codes and quantizing inside, on what the timed shapes do not
    reach: group 64, bias, bf16, a static scale, several tokens, K not a multiple of the ring or the split."""
    from gemm import make_weight

    from dgq.kernels.gemm import KernelWeight
    from dgq.kernels.gemv_tma import config_for, tma_gemv, tma_gemv_float

    variants = tma_variants(kind)
    picked = [c for c in variants if c.kt > 1][::2] if kind == "slots" else variants[::3]
    for k, n, g in ((4096, 4096, 64), (1152, 512, 128), (1152, 192, 64), (11008, 4096, 128), (4096, 1024, 256)):
        kw = KernelWeight.from_dual_grained(make_weight(n, k, g))
        bias = torch.randn(n, device="cuda").half()
        for m in (1, 3):
            for dtype in (torch.float16, torch.bfloat16):
                x = (torch.randn(m, k, device="cuda") * 3).to(dtype)
                for static in (None, torch.tensor(0.02)):
                    q, s_x = quantize_activations_triton(x, static)
                    want = gemv.a8w4_gemv(q, kw, s_x, bias.to(dtype), dtype)
                    for cfg in [config_for(n, k), *picked]:
                        for name, got in (("codes", tma_gemv(q, kw, s_x, bias.to(dtype), dtype, config=cfg)),
                                          ("inside", tma_gemv_float(x, kw, static, bias.to(dtype), dtype, config=cfg))):
                            if not torch.equal(got, want) or kw.split_scratch.any():
                                failures.append(f"tma {name} K={k} N={n} g={g} M={m} {dtype} "
                                                f"{'static' if static is not None else 'dynamic'} {_tma_name(cfg)}")


def _session8_dispatch(o):
    """One token as the dispatch ran it before the TMA GEMV (session 8): the register-fed GEMV, quantizing inside on
    layers of few row blocks; act-quant + the warp-specialized kernel past 16384 outputs."""
    from dgq.kernels import gemm_ws

    n, k = o.kw.out_features, o.kw.in_features
    if n > 16384:
        return _two_launches(o, gemm_ws.ws_a8w4_matmul)
    if gemv.quantizes_inside(n, k, o.kw.tile_k):
        return gemv.a8w4_gemv_float(o.x16, o.kw)
    return _two_launches(o, gemv.a8w4_gemv)


def tma_probe(json_path: str | None, kind: str, shapes: str) -> None:
    """The TMA-fed GEMV's variants (from int8 codes, and quantizing inside: ``in_*``) beside the register-fed GEMV
    and the dispatch, per shape, each checked bit-exact before and after its graph's replays."""
    from gemm import SHAPES, operand_sets, print_failures, save_probe, time_graph

    from dgq.kernels.gemv_tma import config_for, tma_gemv, tma_gemv_float
    from dgq.kernels.linear import a8w4_linear

    rows, failures = [], []
    tma_exactness(failures, kind)
    print_failures(failures)
    order = {"all": SHAPES + DECODE_SHAPES, "benchmark": SHAPES, "70b-first": SHAPES[3:] + SHAPES[:3]}[shapes]
    for k, n in dict.fromkeys(order):
        sets = operand_sets(k, n)
        for o in sets:
            o.set_acts(1)
        o = sets[0]
        want = _two_launches(o, gemv.a8w4_gemv)
        rule = config_for(n, k)
        calls = {"fp16": lambda o: o.x16 @ o.w16.t(), "gemv_alone": lambda o: gemv.a8w4_gemv(o.x_s8, o.kw, o.s_x),
                 "dispatch": lambda o: a8w4_linear(o.x16, o.kw), "dispatch_s8": _session8_dispatch,
                 "act_quant+tma": lambda o: _two_launches(o, tma_gemv),
                 "tma_inside": lambda o: tma_gemv_float(o.x16, o.kw),
                 "s9_rule_codes": lambda o: tma_gemv(o.x_s8, o.kw, o.s_x, config=_session9_rule(n, k, False)),
                 "s9_rule_inside": lambda o: tma_gemv_float(o.x16, o.kw, config=_session9_rule(n, k, True)),
                 "rule_codes": lambda o: tma_gemv(o.x_s8, o.kw, o.s_x),
                 "read_sum": lambda o: o.kw.codes.view(torch.int64).sum()}  # a plain read of the codes: the ceiling
        if kind == "prelude":  # the rule's inside config with the row's absmax given, and from codes
            calls.update(_prelude_calls(n, k, sets))
        if kind == "aq":  # the act-quant's variants in front of the GEMV from codes, and deeper rings
            calls.update(_act_quant_calls(n, k))
        for c in tma_variants(kind):
            if kind != "inside":
                calls[_tma_name(c)] = lambda o, c=c: tma_gemv(o.x_s8, o.kw, o.s_x, config=c)
            calls["in_" + _tma_name(c)] = lambda o, c=c: tma_gemv_float(o.x16, o.kw, config=c)
        times = {}
        for name, fn in calls.items():
            exact = name not in ("fp16", "gemv_alone", "read_sum")
            if exact and not torch.equal(fn(o), want):
                failures.append(f"K={k} N={n} {name}")
                continue
            times[name] = time_graph([lambda o=o, fn=fn: fn(o) for o in sets])
            if exact and (not torch.equal(fn(o), want) or o.kw.split_scratch.any()):
                failures.append(f"K={k} N={n} {name} after replays")
        rows += [{"K": k, "N": n, "M": 1, "kernel": name, "ms": t, "rule": name.endswith(_tma_name(rule))}
                 for name, t in times.items()]
        wbytes = o.kw.codes.numel() + 2 * o.kw.s2t.numel()
        best = min(((t, name) for name, t in times.items() if name.startswith("bn")), default=(math.nan, "-"))
        best_in = min(((t, name) for name, t in times.items() if name.startswith("in_")), default=(math.nan, "-"))
        show = ["read_sum", "gemv_alone", "dispatch_s8", "dispatch", "act_quant+tma", "tma_inside", "s9_rule_inside",
                "rule_codes", "s9_rule_codes", "in_rule_absmax_given", "codes_inside_cfg", *_act_quant_calls(n, k)]
        print(f"K={k} N={n}: fp16 {times['fp16'] * 1e3:.1f} us; "
              + ", ".join(f"{name} {times[name] * 1e3:.1f} us ({wbytes / times[name] / 1e9:.2f} TB/s)"
                          for name in show if name in times)
              + f"; rule {_tma_name(rule)}; best codes {best[1]} {best[0] * 1e3:.1f} us, inside {best_in[1]} "
              f"{best_in[0] * 1e3:.1f} us", flush=True)
        save_probe(json_path, rows, failures)
    print_failures(failures)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None, help="write the rows here as they come")
    parser.add_argument("--sweep", action="store_true", help="time the config variants")
    parser.add_argument("--fused", action="store_true", help="time quantizing inside against two launches")
    parser.add_argument("--decode", action="store_true",
                        help="the decode step's layer shapes: each path at one token (instead of the other parts)")
    parser.add_argument("--tma", choices=["plain", "sweep", "inside", "slots", "rule", "prelude", "aq"], default=None,
                        help="the GEMV fed by bulk tensor copies: its variants of this kind (instead of the rest)")
    parser.add_argument("--tma-shapes", choices=["all", "benchmark", "70b-first"], default="all")
    args = parser.parse_args()
    if args.tma:
        tma_probe(args.json, args.tma, args.tma_shapes)
    elif args.decode:
        decode_layers(args.json)
    else:
        measure(args.json, args.sweep, args.fused)


if __name__ == "__main__":
    main()
