"""Perplexity cost of the compressed-tensors export: float16 group scales ``s1 * s2`` instead of dgq's exact
int8 ``s2`` times float32 ``s1``.

Evaluates a saved dgq checkpoint as is, then with every dual-grained layer replaced by the weights the export
stores (codes and zero points unchanged, folded scale rounded to float16) and the same int8 activations.

    python benchmarks/export_precision.py runs/smollm2-dgq --windows 8
"""

from __future__ import annotations

import argparse

import torch

from dgq.checkpoint import load
from dgq.eval.perplexity import perplexity
from dgq.export import _folded_scale
from dgq.nn import FakeQuantLinear, QuantLinear


def exported_weights(model: torch.nn.Module) -> None:
    """Swap each QuantLinear for the float weights the compressed-tensors export represents."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            dg = module.dual_grained()
            g = dg.group_size
            scale = _folded_scale(module, torch.float16).float().repeat_interleave(g, 1)
            codes = dg.u4.float() - dg.zp.float().repeat_interleave(g, 1)
            act_scale = module.act_scale if module.act_mode == "static" else None
            model.set_submodule(name, FakeQuantLinear(codes * scale, module.bias, module.act_mode, act_scale))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--dataset", default="wikitext2")
    parser.add_argument("--windows", type=int, default=None)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    model = load(args.checkpoint)
    ours = perplexity(model, tokenizer, args.dataset, windows=args.windows).ppl
    exported_weights(model)
    export = perplexity(model, tokenizer, args.dataset, windows=args.windows).ppl
    print(f"{args.dataset}, {args.windows or 'all'} windows: dgq {ours:.4f}, compressed-tensors scales {export:.4f}, "
          f"difference {export - ours:+.4f} ({(export - ours) / ours:+.4%})")


if __name__ == "__main__":
    main()
