"""Variants of dgq's split-KV decode attention (:mod:`dgq.kernels.decode_attention`) against SDPA, per decode shape.

A decode step's attention reads the whole KV cache once per layer and does little arithmetic, so its floor is the
cache's bytes over the copy bandwidth.  Each variant (programs per SM, cache positions per step, V requested with K,
warps) is checked against an fp32 reference first, then timed in one CUDA graph over enough caches that each call
finds its cache cold in L2, as a model's layer does; then the int8 rule and its variants on an int8 cache
(:mod:`dgq.kv_cache`, half the bytes: how the codes widen to fp16, longer steps, fewer waves).  Prints microseconds
and each variant's KV bytes' effective bandwidth.

    PYTHONPATH=.:benchmarks python benchmarks/decode_attention_probe.py --json $OUT/decode_attention.json   # the H100
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from dgq.kernels.decode_attention import CONFIG, CONFIG_INT8, decode_attention
from dgq.kv_cache import quantize_rows

CACHE_LEN, FILLED, DIM = 1088, 1040, 128  # the e2e benchmark's static cache: 1024-token context + steps
SHAPES = [(b, hq, hkv) for hq, hkv in ((32, 32), (32, 8)) for b in (1, 8, 32)]  # Llama-2-7B, Llama-3-8B heads
# the rule (CONFIG), the first kernel (two programs per SM, chunks of one step, V after the scores), and neighbours;
# ``stages`` > 1: the compiler's software pipeline over the cache steps (cp.async copies of the next K and V)
VARIANTS = [dict(CONFIG), {"waves": 2, "min_chunk": 64, "block_n": 64, "v_early": False, "num_warps": 4}] + [
    {"waves": w, "min_chunk": c, "block_n": n, "v_early": e, "num_warps": nw, "stages": st}
    for w, c, n, e, nw, st in ((4, 64, 64, True, 4, 1), (16, 256, 64, True, 4, 1), (8, 128, 64, True, 4, 1),
                               (16, 128, 64, True, 4, 2), (16, 128, 64, True, 4, 3), (16, 128, 64, False, 4, 2),
                               (8, 128, 64, True, 4, 2), (4, 64, 64, True, 4, 2), (16, 128, 128, True, 8, 2),
                               (16, 128, 32, True, 4, 3))]
# on an int8 cache: the rule (CONFIG_INT8), Triton's conversion, pipelines, longer and shorter steps, fewer waves
INT8_VARIANTS = [dict(CONFIG_INT8), {**CONFIG_INT8, "i8_cvt": 0}] + [
    {**CONFIG_INT8, "waves": w, "min_chunk": max(128, n), "block_n": n, "v_early": e, "num_warps": nw, "stages": st}
    for w, n, e, nw, st in ((16, 64, True, 4, 2), (16, 64, True, 4, 3), (16, 64, False, 4, 2), (16, 64, False, 4, 3),
                            (16, 32, True, 4, 3), (16, 64, True, 8, 2), (16, 128, True, 8, 2), (8, 64, True, 4, 2),
                            (16, 64, True, 4, 1), (16, 128, False, 8, 3))]  # (16, 64, True, 4, 1): CONFIG's
L2_BYTES = 50 * 2**20


def _name(cfg: dict) -> str:
    return (f"w{cfg['waves']}_c{cfg['min_chunk']}_n{cfg['block_n']}_{'early' if cfg['v_early'] else 'late'}"
            f"_nw{cfg['num_warps']}_st{cfg.get('stages', 1)}"
            + (f"_int8_cvt{cfg['i8_cvt']}" if "i8_cvt" in cfg else ""))


def main() -> None:
    from gemm import (  # benchmarks/gemm.py: one CUDA graph per timing
        print_failures,
        save_probe,
        time_graph,
    )

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows, failures = [], []
    for batch, hq, hkv in SHAPES:
        kv_bytes = 2 * batch * hkv * CACHE_LEN * DIM * 2
        sets = []
        for _ in range(max(2, 3 * L2_BYTES // kv_bytes + 1)):
            q = torch.randn(batch, hq, 1, DIM, device="cuda", dtype=torch.float16)
            k, v = (torch.randn(batch, hkv, CACHE_LEN, DIM, device="cuda", dtype=torch.float16) for _ in range(2))
            sets.append((q, k, v))
        mask = torch.zeros(batch, 1, 1, CACHE_LEN, dtype=torch.bool, device="cuda")
        mask[..., :FILLED] = True
        q, k, v = sets[0]
        want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                              enable_gqa=hq != hkv).transpose(1, 2)
        gqa = hq != hkv
        times = {"sdpa": time_graph([lambda q=q, k=k, v=v, mask=mask, gqa=gqa: F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=gqa) for q, k, v in sets])}
        for cfg in VARIANTS:
            out = decode_attention(q, k, v, mask, DIM ** -0.5, cfg)
            if not torch.allclose(out.float(), want, atol=2e-3, rtol=2e-2):
                failures.append(f"b{batch} {hq}/{hkv} {_name(cfg)}: max err {(out.float() - want).abs().max():.2e}")
                continue
            times[_name(cfg)] = time_graph([lambda q=q, k=k, v=v, cfg=cfg, mask=mask: decode_attention(
                q, k, v, mask, DIM ** -0.5, cfg) for q, k, v in sets])
        # the int8 rule and its variants on an int8 cache (dgq.kv_cache): codes and one fp32 scale per position
        sets8 = [(q, *quantize_rows(k), *quantize_rows(v)) for q, k, v in sets]
        q, k8, ks, v8, vs = sets8[0]
        want8 = F.scaled_dot_product_attention(q.float(), k8.float() * ks[..., None], v8.float() * vs[..., None],
                                               attn_mask=mask, enable_gqa=gqa).transpose(1, 2)
        for cfg in INT8_VARIANTS:
            name = ("rule_int8_kv" if cfg == CONFIG_INT8 else _name(cfg))
            out = decode_attention(q, k8, v8, mask, DIM ** -0.5, cfg, ks, vs)
            if not torch.allclose(out.float(), want8, atol=3e-3, rtol=2e-2):
                failures.append(f"b{batch} {hq}/{hkv} {name}: max err {(out.float() - want8).abs().max():.2e}")
                continue
            times[name] = time_graph([lambda q=q, k8=k8, ks=ks, v8=v8, vs=vs, mask=mask, cfg=cfg: decode_attention(
                q, k8, v8, mask, DIM ** -0.5, cfg, ks, vs) for q, k8, ks, v8, vs in sets8])
        nbytes = {name: kv_bytes // 2 + 2 * batch * hkv * CACHE_LEN * 4 if "int8" in name else kv_bytes
                  for name in times}
        rows += [{"batch": batch, "q_heads": hq, "kv_heads": hkv, "cache_len": CACHE_LEN, "variant": name,
                  "us": t * 1e3, "kv_bytes": nbytes[name], "kv_tb_s": nbytes[name] / t / 1e9}
                 for name, t in times.items()]
        best = min(times, key=times.get)
        print(f"b{batch} heads {hq}/{hkv} (KV {kv_bytes / 2**20:.1f} MiB): "
              + ", ".join(f"{name} {t * 1e3:.1f} us {nbytes[name] / t / 1e9:.2f} TB/s" for name, t in times.items())
              + f"; best {best}", flush=True)
        save_probe(args.json, rows, failures)
    print_failures(failures)


if __name__ == "__main__":
    main()
