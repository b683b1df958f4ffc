"""Which int8 GEMM config to fix for large M (:data:`dgq.kernels.int8_gemm.LARGE_M_CONFIG`), on the prefill
layers of Llama-2-7B and Llama-3-8B, and what their widening costs.

Why: the int8 GEMM's autotuner allocates a 256 MiB L2-flush buffer on a prefill's first call, the largest
transient of a DGQ prefill (issue 12's peak memory); a fixed config removes it if one config is fastest everywhere.

Per (layer, M): each of the int8 GEMM's configs on the widened weight (the rule's marked), then the whole large-M
path (widen + GEMM, :func:`dgq.kernels.linear.a8w4_mm`) and the widening alone, timed as CUDA-graph replays over
three operand sets (the timing of ``benchmarks/gemm.py``).  ``--json`` writes the rows.

Session 14 ran this script at commit a6967dc, as ``benchmarks/widen_chunks_probe.py``, with the widening also cut
into chunks of a fixed byte size (``results/e2e_h100_s14/call{1,2}/widen_chunks*.json``): every size was as slow as
the whole or slower (each chunk adds a launch pair and its own last partial wave).  What was kept cuts only layers
past 64 MiB widened, in chunks of whole waves (:func:`dgq.kernels.linear.widen_chunk_rows`), measured end to end.

    PYTHONPATH=.:benchmarks python benchmarks/int8_configs_probe.py --json $OUT/int8_configs.json   # the H100
"""

from __future__ import annotations

import argparse
import json

import torch

from dgq.kernels import int8_gemm, linear
from dgq.kernels.act_quant import quantize_activations_triton
from dgq.kernels.gemm import KernelWeight, widen_weight

# (name, K, N): the layers that take the large-M path at these M (a long-K layer from 4096 tokens on: gemm_ws.takes),
# fused as dgq.load fuses them, and the W8A8 peer's unfused ones
LAYERS = [("l2_qkv", 4096, 12288), ("l2_o", 4096, 4096), ("l2_gate_up", 4096, 22016), ("l2_down", 11008, 4096),
          ("l2_up_unfused", 4096, 11008), ("l3_qkv", 4096, 6144), ("l3_gate_up", 4096, 28672),
          ("l3_down", 14336, 4096)]
SETS = 3


def main() -> None:
    from gemm import make_weight, time_graph  # benchmarks/gemm.py: same random weights and timing method

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--ms", default="2048,4096,8192")
    parser.add_argument("--layers", default=",".join(name for name, _, _ in LAYERS))
    args = parser.parse_args()
    rows = []
    wanted = args.layers.split(",")
    for name, k, n in [layer for layer in LAYERS if layer[0] in wanted]:
        torch.manual_seed(0)
        weights = [KernelWeight.from_dual_grained(make_weight(n, k, 128)) for _ in range(SETS)]
        for m in [int(v) for v in args.ms.split(",")]:
            acts = [quantize_activations_triton(torch.randn(m, k, device="cuda").half()) for _ in range(SETS)]
            w8 = [widen_weight(kw) for kw in weights]
            base = dict(layer=name, k=k, n=n, m=m)
            best = None
            for i, cfg in enumerate(int8_gemm.CONFIGS):
                calls = [lambda a=a, w=w, kw=kw, cfg=cfg: int8_gemm.int8_matmul(a[0], w, a[1], kw.s1, config=cfg)
                         for a, w, kw in zip(acts, w8, weights)]
                try:
                    us = time_graph(calls) * 1e3
                except Exception as exc:  # a config the compiler refuses: say so, go on
                    print(f"  config {i}: {type(exc).__name__}: {str(exc)[:100]}")
                    continue
                rule = cfg is int8_gemm.LARGE_M_CONFIG
                rows.append({**base, "kernel": f"int8_gemm_config{i}", "rule": rule, "us": us, "config": str(cfg)})
                if best is None or us < best[1]:
                    best = (i, us)
                if rule:
                    rule_us = us
            print(f"{name} K={k} N={n} M={m}: int8 GEMM rule {rule_us:.1f} us, best config {best[0]} "
                  f"{best[1]:.1f} us ({rule_us / best[1]:.3f}x)", flush=True)
            del w8
            whole_us = time_graph([lambda a=a, kw=kw: linear.a8w4_mm(a[0], a[1], kw)
                                   for a, kw in zip(acts, weights)]) * 1e3
            rows.append({**base, "kernel": "a8w4_mm", "us": whole_us})
            print(f"  a8w4_mm (widen + this GEMM; the warp-specialized kernel on long K) {whole_us:.1f} us", flush=True)
            widen_us = time_graph([lambda kw=kw: widen_weight(kw) for kw in weights]) * 1e3
            rows.append({**base, "kernel": "widen_whole", "us": widen_us})
            print(f"  the whole widening alone {widen_us:.1f} us", flush=True)
            del acts
        del weights
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f)


if __name__ == "__main__":
    main()
