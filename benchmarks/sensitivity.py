"""Where a quantized model loses its perplexity: the same quantized layers switched on by layer type or block range.

Why: on SmolLM2-135M GPTQ lowers the summed per-layer output error by about 30% on held-out tokens
(``benchmarks/gptq_layers.py``) but the WikiText-2 perplexity's excess over FP by only about 15% (RESULTS.md, issue
11), so per-layer error is a poor guide to which layers carry the loss.  This script quantizes the model once with a
preset (layer-wise, as ``dgq quantize`` does), keeps each linear's smoothed float twin beside its quantized module,
and then scores variants that quantize only some linears and leave the others float:

* ``all`` / ``none``: every linear quantized / none (the smoothed float model, equal to FP up to float rounding);
* ``only:T`` / ``except:T``: only the linears of type ``T`` (q, k, v, o, gate, up, down) quantized / all but them;
* ``blocks:A-B``: only the linears of decoder blocks ``A..B`` quantized;
* ``wonly:T`` / ``aonly:T``: the linears of type ``T`` (or ``all``) with only their weight quantized (float
  activations) / only their input activation quantized per token (float weight), the rest float: which of the two
  carries a type's loss.

The calibration of every variant is the one of ``all`` (later blocks were calibrated on the outputs of quantized
earlier blocks), so a variant is "this model with some layers put back", not a separately calibrated model.

    PYTHONPATH=. python benchmarks/sensitivity.py --nsamples 16 --windows 8
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

import dgq.calibrate as calibrate
from dgq.api import quantize
from dgq.config import preset
from dgq.data import calibration_samples
from dgq.eval.perplexity import perplexity
from dgq.loading import load_model
from dgq.nn import FakeQuantLinear, QuantLinear

TYPES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
         "down": "down_proj"}


def record_float_twins() -> dict[str, tuple[nn.Module, nn.Module]]:
    """Wrap the pipeline's per-layer quantizer so that it remembers, per full layer name, the smoothed float linear
    it was given and the module it returned."""
    twins: dict[str, tuple[nn.Module, nn.Module]] = {}
    original = calibrate.quantize_linear

    def quantize_and_remember(name: str, linear: nn.Linear, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        module, report = original(name, linear, *args, **kwargs)
        twins[name] = (linear, module)
        return module, report

    calibrate.quantize_linear = quantize_and_remember
    return twins


def block_index(name: str) -> int:
    """The decoder block number in a layer name such as ``model.layers.12.mlp.down_proj``."""
    parts = name.split(".")
    return int(next(p for p in parts if p.isdigit()))


def _matches(name: str, layer_type: str) -> bool:
    return layer_type == "all" or name.endswith(TYPES[layer_type])


def chooser(variant: str):  # noqa: ANN201
    """What this variant puts in each layer: a function of the layer name giving "q" (the quantized module), "fp"
    (its float twin), "w" (quantized weight, float activations) or "a" (float weight, int8 activations)."""
    if variant in ("all", "none"):
        return lambda name: "q" if variant == "all" else "fp"
    kind, arg = variant.split(":")
    if kind == "blocks":
        lo, hi = (int(t) for t in arg.split("-"))
        return lambda name: "q" if lo <= block_index(name) <= hi else "fp"
    if arg != "all" and arg not in TYPES:
        raise SystemExit(f"error: unknown layer type in {variant!r}; choose from all, {', '.join(TYPES)}")
    pick = {"only": "q", "wonly": "w", "aonly": "a"}.get(kind)
    if pick is not None:
        return lambda name: pick if _matches(name, arg) else "fp"
    if kind == "except":
        return lambda name: "fp" if _matches(name, arg) else "q"
    raise SystemExit(f"error: unknown variant {variant!r}")


def module_for(choice: str, fp: nn.Linear, q: nn.Module) -> nn.Module:
    """The module that ``choice`` (see :func:`chooser`) names for one layer."""
    if choice in ("q", "fp"):
        return q if choice == "q" else fp
    bias = None if fp.bias is None else fp.bias.detach()
    if choice == "a":
        return FakeQuantLinear(fp.weight.detach().float(), bias, "dynamic")
    if not isinstance(q, QuantLinear):
        raise SystemExit("error: wonly needs a dual-grained method (its quantized weight is read from QuantLinear)")
    return FakeQuantLinear(q.dual_grained().dequantize(), bias, "none")


def apply(model: nn.Module, twins: dict[str, tuple[nn.Module, nn.Module]], choose) -> None:  # noqa: ANN001
    """Put in each layer the module that ``choose(name)`` names."""
    for name, (fp, q) in twins.items():
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, module_for(choose(name), fp, q))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="dgq_dynamic")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", default=None, help="comma list (default: all, none, only:T and except:T for every "
                                                     "type, and the blocks in four ranges)")
    ap.add_argument("--json", default=None, help="write {variant: ppl} here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer, _ = load_model(args.model)
    model.eval()
    twins = record_float_twins()
    samples = calibration_samples(tokenizer, nsamples=args.nsamples, seqlen=2048, seed=0, root=args.data_dir)
    config = preset(args.method, group_size=args.group_size, nsamples=args.nsamples)
    t0 = time.perf_counter()
    quantize(model, samples, config, device="cpu")
    print(f"quantized {len(twins)} linears with {args.method} in {time.perf_counter() - t0:.0f} s", flush=True)
    n_blocks = 1 + max(block_index(n) for n in twins)
    quarter = [(i * n_blocks // 4, (i + 1) * n_blocks // 4 - 1) for i in range(4)]
    variants = args.variants.split(",") if args.variants else (
        ["all", "none"] + [f"only:{t}" for t in TYPES] + [f"except:{t}" for t in TYPES]
        + [f"blocks:{lo}-{hi}" for lo, hi in quarter])
    results: dict[str, float] = {}
    for variant in variants:
        apply(model, twins, chooser(variant))
        with torch.no_grad():
            ppl = perplexity(model, tokenizer, "wikitext2", windows=args.windows, root=args.data_dir,
                             progress=False).ppl
        results[variant] = ppl
        print(f"{variant:14s} {ppl:8.3f}", flush=True)
    if "all" in results and "none" in results:
        gap = results["all"] - results["none"]
        print(f"\nshare of the gap ({results['none']:.3f} -> {results['all']:.3f}) that each variant shows")
        for variant, ppl in results.items():
            print(f"{variant:14s} {(ppl - results['none']) / gap:6.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps({"method": args.method, "nsamples": args.nsamples,
                                               "windows": args.windows, "ppl": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
