"""The int8 LM head's kernel (:mod:`dgq.kernels.int8_rows`) against cuBLAS FP16 on the heads of Llama-2-7B and
Llama-3-8B, at the decode batches and a prefill's last tokens; which launch rule and widening to keep.

Every variant is first checked against the float64 product of the same codes (integer-valued activations, so every
partial sum is exact in fp32 and the result must be bit-identical), then timed as a CUDA-graph replay (the timing
of ``benchmarks/gemm.py``; a head is larger than the L2, so every replay reads it from memory).  Prints microseconds,
GB/s of weight bytes and the ratio to FP16; ``--json`` writes the rows.

    PYTHONPATH=.:benchmarks python benchmarks/int8_head_probe.py --json $OUT/int8_head.json    # the H100
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from dgq.kernels.int8_rows import int8_rows_config, int8_rows_matmul

HEADS = {"llama2-7b": (32000, 4096), "llama3-8b": (128256, 4096)}


def variants(m: int) -> list[tuple[str, dict | None, bool]]:
    """(name, config, magic): the rule with each widening, then pinned configs."""
    out: list[tuple[str, dict | None, bool]] = [("rule_magic", None, True), ("rule_cvt", None, False)]
    bm = max(16, 1 << (m - 1).bit_length()) if m <= 64 else 64
    for bn in (32, 64, 128):
        for bk in (128, 256, 512):
            for stages in (3, 4, 6):
                for warps in (4, 8):
                    if bn * bk > 64 * 512 or (warps == 8 and bn < 64):
                        continue
                    cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
                    out.append((f"bm{bm}_bn{bn}_bk{bk}_s{stages}_w{warps}", cfg, True))
    return out


def main() -> None:
    from gemm import time_graph  # benchmarks/gemm.py: same timing method

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--ms", default="1,8,32", help="token counts")
    args = parser.parse_args()
    rows, failures = [], []
    for model, (n, k) in HEADS.items():
        torch.manual_seed(0)
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
        scale = (torch.rand(n, device="cuda") * 1e-3 + 1e-4).half()
        w16 = (q.float() * scale.float()[:, None]).half()
        for m in [int(v) for v in args.ms.split(",")]:
            xi = torch.randint(-4, 5, (m, k), device="cuda").half()
            exact = ((xi.double() @ q.double().t()).float() * scale.float()).half()
            x = torch.randn(m, k, device="cuda").half()
            fp16_us = time_graph([lambda: F.linear(x, w16)]) * 1e3
            rows.append(dict(model=model, n=n, k=k, m=m, kernel="fp16_cublas", us=fp16_us))
            print(f"{model} M={m}: fp16 cuBLAS {fp16_us:.1f} us ({n * k * 2 / fp16_us / 1e3:.0f} GB/s)", flush=True)
            best = None
            for name, cfg, magic in variants(m):
                try:
                    got = int8_rows_matmul(xi, q, scale, cfg, magic)
                except Exception as exc:  # a config the compiler refuses (shared memory): skip it, say so
                    print(f"  {name}: {type(exc).__name__}: {str(exc)[:100]}")
                    continue
                if not torch.equal(got, exact):
                    failures.append(f"{model} M={m} {name}: differs from the exact product")
                    continue
                us = time_graph([lambda cfg=cfg, magic=magic: int8_rows_matmul(x, q, scale, cfg, magic)]) * 1e3
                rows.append(dict(model=model, n=n, k=k, m=m, kernel=name, us=us, config=cfg, magic=magic))
                if best is None or us < best[1]:
                    best = (name, us)
                if name.startswith("rule") or us < fp16_us * 0.6:
                    print(f"  {name}: {us:.1f} us ({n * k / us / 1e3:.0f} GB/s, {fp16_us / us:.2f}x fp16)", flush=True)
            print(f"  best {best[0]} {best[1]:.1f} us; rule config {int8_rows_config(m)}", flush=True)
    print("FAILURES:" if failures else "all variants exact", *failures, sep="\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f)


if __name__ == "__main__":
    main()
