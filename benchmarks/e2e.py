"""End-to-end speed and memory of FP16, W8A8, W4A16 and DGQ A8W4 on random-weight Llama models (GPU only).

Builds each model from its configuration with random weights on the GPU (no download), converts every decoder
linear with dgq's own code (DGQ's q/k/v and gate/up fused, as ``dgq.load(..., fuse=True)`` does), and measures in
one process per (model, format), median of repeats after warm-up: prefill latency (batch 1 at several lengths,
batch 8 x 1024), decode throughput (batch 1/8/32, 1024-token context, static KV cache), peak memory and weight
bytes.  Every format runs the same way (:mod:`dgq.bench`): compiled with ``torch.compile`` (each decoder block;
``--compile-scope whole`` for the model as one graph), the prefill captured in a CUDA graph per length and the
decode step in one, its attention dgq's split-KV kernel for every format (``--attention sdpa``: transformers');
``--decode-modes`` / ``--prefill-modes`` add the other modes for comparison, and ``--profile`` adds a
``torch.profiler`` breakdown of one decode step per batch and one 2048-token prefill.  ``--quantize-head`` and
``--quantize-embedding`` give the DGQ formats an A8W4 LM head and a 4-bit input embedding (as ``dgq quantize``'s
options of those names make them; every other format keeps both in fp16, as SmoothQuant's W8A8 does).

    python benchmarks/e2e.py --models llama2-7b --formats fp16,w8a8,dgq_dynamic --quantize-head --quantize-embedding \
        --out results/e2e_h100_head4.json      # issue 12's peak-memory target at 2048 tokens

    python benchmarks/e2e.py --out results/e2e_h100.json
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from dgq import bench, int8_rows
from dgq.api import ATTENTIONS
from dgq.attention import use_decode_attention
from dgq.bench import DecodeStep, breakdown, compiled, decode, prefill
from dgq.config import QuantConfig
from dgq.embedding import QuantEmbedding, quantize_embedding_matrix, untie_head
from dgq.formats import INT4_MAX, INT8_MAX, group_minmax, to_dual_grained
from dgq.fuse import fuse_projections
from dgq.kernels.ops import int8_linear
from dgq.nn import QuantLinear
from dgq.search import naive_channel_scale, rtn_group_scales

MODELS = {
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=8192),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                      rope_theta=500000.0),
}
FORMATS = ("fp16", "w8a8", "w4a16", "dgq_dynamic", "dgq_static")
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


class W8A8Linear(nn.Module):
    """Per-channel int8 weights, per-token int8 activations, dgq's Triton int8 GEMM (the W8A8 peer)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        s1 = (w.abs().amax(1) / INT8_MAX).clamp(min=1e-8)
        self.register_buffer("w_s8", torch.round(w / s1[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8))
        self.register_buffer("s1", s1)
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = int8_linear(x.reshape(-1, x.shape[-1]), self.w_s8, self.s1, None, x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)


class W4A16Linear(nn.Module):
    """tinygemm (``torch._weight_int4pack_mm``), asymmetric int4 with bf16 group scales: the W4A16 peer."""

    GROUP = 128

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scale, lo = group_minmax(w, self.GROUP)
        q = torch.clamp(torch.round((w.reshape(w.shape[0], -1, self.GROUP) - lo[..., None]) / scale[..., None]),
                        0, INT4_MAX).to(torch.uint8).reshape(w.shape)
        packed = (q[:, 0::2] << 4 | q[:, 1::2]).contiguous()
        self.register_buffer("packed", torch._convert_weight_to_int4pack(packed, 8))
        zeros = lo + 8 * scale  # tinygemm dequantizes (q - 8) * scale + zero
        self.register_buffer("scales_zeros", torch.stack([scale.t(), zeros.t()], -1).to(torch.bfloat16).contiguous())
        self.out_features = linear.out_features
        ref = ((q.float().reshape(w.shape[0], -1, self.GROUP) * scale[..., None]) + lo[..., None]).reshape(w.shape)
        x = torch.randn(4, w.shape[1], device=w.device, dtype=torch.bfloat16)
        err = (self(x).float() - x.float() @ ref.t()).norm() / (x.float() @ ref.t()).norm()
        if err > 2e-2:
            raise RuntimeError(f"tinygemm packing check failed (relative error {err:.3f})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        out = torch._weight_int4pack_mm(x2, self.packed, self.GROUP, self.scales_zeros)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def dgq_linear(linear: nn.Linear, act: str) -> QuantLinear:
    """The dual-grained layer dgq's own code makes (RTN dual-grained rounding: speed does not depend on values)."""
    w = linear.weight.detach().float()
    rtn = rtn_group_scales(w, 128)
    dg = to_dual_grained(w, naive_channel_scale(rtn), rtn.scale, rtn.lo, 128)
    scale = torch.tensor(0.05, device=w.device) if act == "static" else None  # a fixed static scale: speed only
    return QuantLinear.from_weight(dg, None, act, scale)


def dgq_embedding(embedding: nn.Embedding) -> QuantEmbedding:
    """The 4-bit input embedding dgq's own code makes (min/max rounding: speed and memory do not depend on values)."""
    return quantize_embedding_matrix(embedding.weight, QuantConfig(search=False, group_size=128))


def convert(model: nn.Module, fmt: str, fuse: bool = True, head: bool = False, embedding: bool = False,
            int8_head: bool = False, int8_embedding: bool = False) -> nn.Module:
    """Replace every decoder linear of ``model`` in place by the ``fmt`` layer (DGQ's projections fused); for the
    DGQ formats, with ``head`` the LM head too and with ``embedding`` the input embedding in 4 bits, and with
    ``int8_head`` / ``int8_embedding`` those as int8 rows (:mod:`dgq.int8_rows`)."""
    if fmt == "fp16":
        return model
    if fmt.startswith("dgq") and (head or embedding or int8_head or int8_embedding):
        untie_head(model)
        if head:
            model.lm_head = dgq_linear(model.lm_head, fmt.removeprefix("dgq_"))
        if embedding:
            model.set_input_embeddings(dgq_embedding(model.get_input_embeddings()))
        if int8_head:
            int8_rows.int8_head(model)
        if int8_embedding:
            int8_rows.int8_input_embedding(model)
        torch.cuda.empty_cache()
    make: Callable[[nn.Linear], nn.Module] = {
        "w8a8": W8A8Linear, "w4a16": W4A16Linear,
        "dgq_dynamic": lambda lin: dgq_linear(lin, "dynamic"), "dgq_static": lambda lin: dgq_linear(lin, "static"),
    }[fmt]
    for block in model.model.layers:
        for name in LINEARS:
            block.set_submodule(name, make(block.get_submodule(name)))
            torch.cuda.empty_cache()
    return fuse_projections(model) if fmt.startswith("dgq") and fuse else model


def weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def build(name: str) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**MODELS[name], dtype=torch.float16)
    with torch.device("cuda"):
        torch.manual_seed(0)
        model = LlamaForCausalLM._from_config(config, dtype=torch.float16)
    return model.eval()


def measure(name: str, fmt: str, args: argparse.Namespace) -> list[dict]:
    """Every measurement of one model in one format, in this process."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch._dynamo.config.recompile_limit = 512  # a graph per prefill shape and decode batch, each mode and scope
    torch._dynamo.config.accumulated_recompile_limit = 8192
    bench.SCOPE = args.compile_scope
    if args.act_quant == "graph":  # the reference's torch ops, fused by inductor into the producer, divisions exact
        from dgq.kernels import ops

        ops.ACT_QUANT_IN_GRAPH["cuda"] = True
        torch._inductor.config.eager_numerics.division_rounding = True
        torch._inductor.config.emulate_precision_casts = True
    vocab = MODELS[name]["vocab_size"]
    rows: list[dict] = []

    def record(row: dict) -> None:  # written at once, so a later failure loses nothing measured
        rows.append(row)
        Path(args.out).write_text(json.dumps(rows))

    start = time.perf_counter()
    model = convert(build(name), fmt, fuse=not args.no_fuse, head=args.quantize_head,
                    embedding=args.quantize_embedding, int8_head=args.int8_head, int8_embedding=args.int8_embedding)
    if args.attention == "dgq":
        use_decode_attention(model)
    gc.collect()
    wb, resident = weight_bytes(model), torch.cuda.memory_allocated()
    base = dict(model=name, format=fmt, weight_bytes=wb, resident_bytes=resident, fused=not args.no_fuse,
                compile_scope=args.compile_scope, attention=args.attention, act_quant=args.act_quant,
                kv_cache=args.kv_cache, quantize_head=args.quantize_head and fmt.startswith("dgq"),
                quantize_embedding=args.quantize_embedding and fmt.startswith("dgq"),
                int8_head=args.int8_head and fmt.startswith("dgq"),
                int8_embedding=args.int8_embedding and fmt.startswith("dgq"))
    print(f"{name} {fmt}: built in {time.perf_counter() - start:.0f} s, weights {wb / 2**30:.2f} GiB, "
          f"allocated {resident / 2**30:.2f} GiB", flush=True)
    for mode in args.prefill_modes.split(","):
        for batch, seqlen in [(1, int(s)) for s in args.seqlens.split(",")] + [(8, 1024)] * args.batched_prefill:
            start = time.perf_counter()
            ms, peak, warm = prefill(model, batch, seqlen, vocab, args.repeats, mode)
            record({**base, "phase": "prefill", "mode": mode, "batch": batch, "seqlen": seqlen, "ms": ms,
                    "peak_mem_bytes": peak, "warm_peak_mem_bytes": warm})
            print(f"  prefill {mode} b{batch} s{seqlen}: {ms:.2f} ms, peak {peak / 2**30:.2f} GiB "
                  f"(warm {warm / 2**30:.3f}) "
                  f"({time.perf_counter() - start:.0f} s incl. compile/capture)", flush=True)
    for mode in args.decode_modes.split(","):
        for batch in [int(b) for b in args.decode_batches.split(",") if b]:
            start = time.perf_counter()
            tps, peak = decode(model, batch, 1024, args.decode_steps, vocab, mode, args.kv_cache)
            record({**base, "phase": "decode", "mode": mode, "batch": batch, "seqlen": 1024,
                         "tokens_per_s": tps, "peak_mem_bytes": peak})
            print(f"  decode {mode} b{batch}: {tps:.1f} tok/s, peak {peak / 2**30:.2f} GiB "
                  f"({time.perf_counter() - start:.0f} s incl. compile/capture)", flush=True)
    if args.profile:
        with torch.inference_mode():
            profile(model, vocab, args, base, record)
    return rows


def profile(model: nn.Module, vocab: int, args: argparse.Namespace, base: dict,
            record: Callable[[dict], None]) -> None:
    """``torch.profiler`` breakdown of one decode step (uncaptured) per decode batch and one 2048-token prefill."""
    mode = args.decode_modes.split(",")[0]
    phases: list[tuple[str, Callable[[], object]]] = [
        (f"decode b{b}", DecodeStep(model, b, 1024, vocab, mode, capture=False, steps=16,
                                    kv_cache=args.kv_cache).step)
        for b in (int(b) for b in args.decode_batches.split(","))]
    forward = compiled(model, dynamic=True)
    ids, mask = torch.randint(0, vocab, (1, 2048), device="cuda"), bench.causal_mask(1, 2048)
    phases.append(("prefill 2048", lambda: forward(ids, attention_mask=mask, use_cache=False, logits_to_keep=1)))
    for phase, fn in phases:
        parts = breakdown(fn)
        record({**base, "phase": "profile", "what": phase, "us": parts})
        print(f"  profile {phase}: " + ", ".join(f"{k} {v:.0f}" for k, v in parts.items() if k != "top"),
              flush=True)
        for kernel, us in parts["top"].items():
            print(f"      {us:8.1f} us  {kernel}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="llama2-7b,llama3-8b")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--seqlens", default="256,512,1024,2048,4096")
    parser.add_argument("--decode-batches", default="1,8,32", help="comma list; empty: no decode")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--decode-steps", type=int, default=50)
    parser.add_argument("--decode-modes", default="compiled", help="comma list of dgq.bench.DECODE_MODES")
    parser.add_argument("--prefill-modes", default="graph", help="comma list of dgq.bench.PREFILL_MODES")
    parser.add_argument("--batched-prefill", type=int, default=1, help="also prefill 8 x 1024 (1) or not (0)")
    parser.add_argument("--profile", action="store_true", help="torch.profiler breakdown of decode and prefill")
    parser.add_argument("--no-fuse", action="store_true", help="DGQ without fused projections")
    parser.add_argument("--compile-scope", default="blocks", choices=bench.SCOPES, help="see dgq.bench.compiled")
    parser.add_argument("--attention", default="dgq", choices=ATTENTIONS,
                        help="decode steps' attention: dgq's split-KV kernel (default; dgq.attention), or "
                             "transformers' SDPA")
    parser.add_argument("--act-quant", default="kernel", choices=("kernel", "graph"),
                        help="compiled DGQ/W8A8 layers quantize activations in dgq's exact kernel (with the GEMM: "
                             "dgq::a8w4_linear), or in the graph, fused by inductor into the producer")
    parser.add_argument("--kv-cache", default="fp16", choices=bench.KV_CACHES,
                        help="decode steps' KV cache: the model's dtype, or int8 with per-position scales "
                             "(dgq.kv_cache; needs --attention dgq)")
    parser.add_argument("--quantize-head", action="store_true",
                        help="DGQ formats: the LM head as an A8W4 layer too (other formats keep it in fp16)")
    parser.add_argument("--quantize-embedding", action="store_true",
                        help="DGQ formats: the input embedding in 4 bits with group scales (dgq.embedding)")
    parser.add_argument("--int8-head", action="store_true",
                        help="DGQ formats: the LM head as int8 rows, weight-only (dgq.int8_rows)")
    parser.add_argument("--int8-embedding", action="store_true",
                        help="DGQ formats: the input embedding as int8 rows (dgq.int8_rows)")
    parser.add_argument("--out", default="results/e2e_h100.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.kv_cache == "int8" and args.attention != "dgq":
        parser.error("--kv-cache int8 needs --attention dgq (SDPA cannot read int8 codes)")
    if not torch.cuda.is_available():
        raise SystemExit("error: benchmarks/e2e.py needs a CUDA GPU")
    if args.child:  # one (model, format) pair; rows go to --out as they are measured
        measure(args.models, args.formats, args)
        return
    rows: list[dict] = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        for fmt in args.formats.split(","):
            # A fresh process per pair, so memory held by one format (allocator pools, graph pools, caches)
            # cannot inflate the next one's peak.
            part = out.with_suffix(f".{name}.{fmt}.part")
            cmd = [sys.executable, __file__, "--child", "--models", name, "--formats", fmt, "--out", str(part),
                   "--seqlens", args.seqlens, "--decode-batches", args.decode_batches,
                   "--repeats", str(args.repeats), "--decode-steps", str(args.decode_steps),
                   "--decode-modes", args.decode_modes, "--prefill-modes", args.prefill_modes,
                   "--batched-prefill", str(args.batched_prefill)] + ["--profile"] * args.profile \
                + ["--no-fuse"] * args.no_fuse + ["--compile-scope", args.compile_scope, "--attention", args.attention,
                                              "--act-quant", args.act_quant, "--kv-cache", args.kv_cache] \
                + ["--quantize-head"] * args.quantize_head + ["--quantize-embedding"] * args.quantize_embedding \
                + ["--int8-head"] * args.int8_head + ["--int8-embedding"] * args.int8_embedding
            code = subprocess.run(cmd).returncode
            if part.exists():
                rows += json.loads(part.read_text())
                part.unlink()
            if code:  # what it measured is kept; the failure is a row of its own, and the next pair still runs
                rows.append({"model": name, "format": fmt, "phase": "failed", "returncode": code})
                print(f"{name} {fmt}: FAILED (exit code {code}); rows before the failure kept", flush=True)
            out.write_text(json.dumps(rows, indent=1) + "\n")
    print_table(rows, args.prefill_modes.split(",")[0], args.decode_modes.split(",")[0])


def print_table(rows: list[dict], prefill_mode: str = "graph", decode_mode: str = "compiled") -> None:
    """Ratios vs FP16 of the same model: prefill speed-up, decode speed-up, weight and peak memory."""
    def get(model: str, fmt: str, phase: str, batch: int, seqlen: int) -> dict | None:
        mode = prefill_mode if phase == "prefill" else decode_mode
        return next((r for r in rows if (r["model"], r["format"], r["phase"], r.get("batch"), r.get("seqlen"),
                                         r.get("mode")) == (model, fmt, phase, batch, seqlen, mode)), None)

    print("\nmodel      format       prefill@2048 ms (x fp16)  decode b1 tok/s (x fp16)  weights GiB (x fp16)  "
          "peak@2048 GiB")
    for model in dict.fromkeys(r["model"] for r in rows):
        fp_p, fp_d = get(model, "fp16", "prefill", 1, 2048), get(model, "fp16", "decode", 1, 1024)
        for fmt in dict.fromkeys(r["format"] for r in rows if r["model"] == model):
            p, d = get(model, fmt, "prefill", 1, 2048), get(model, fmt, "decode", 1, 1024)
            if not p or not d or not fp_p or not fp_d:
                continue
            print(f"{model:10s} {fmt:12s} {p['ms']:8.2f} ({fp_p['ms'] / p['ms']:.2f}x)          "
                  f"{d['tokens_per_s']:8.1f} ({d['tokens_per_s'] / fp_d['tokens_per_s']:.2f}x)        "
                  f"{p['weight_bytes'] / 2**30:6.2f} ({p['weight_bytes'] / fp_p['weight_bytes']:.2f}x)       "
                  f"{p['peak_mem_bytes'] / 2**30:6.2f}")


if __name__ == "__main__":
    main()
