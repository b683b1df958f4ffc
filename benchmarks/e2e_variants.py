"""``benchmarks/e2e.py`` for one model and one format, with a named variant of dgq's code patched in: the measured
side of the ideas that were bounded or tried end to end before (or instead of) being built (notes_e2e.md, session 12).

Each variant replaces one thing in this process only, before anything is compiled:

* ``nomerge``: the decode attention's merge kernel is skipped (its output left unwritten: timing only, the logits
  are garbage), the most that folding the merge into the split kernel could gain;
* ``attn_late``: the decode attention's kernels wait for their producer but let their consumer launch only when they
  end (as shipped they release it at their start);
* ``aq_late``: the same for the activation quantizer;
* ``noabsmax``: the fused q/k/v and gate/up GEMVs read their row for its absmax themselves (before session 12);
* ``down_absmax``: the down projection's one-token GEMV is handed its row's absmax from the graph as well;
* ``per_layer_length``: the decode steps' float KV cache is transformers' ``StaticCache``, whose every layer counts
  and advances its own length (before session 13: one more 1-element kernel per layer and step);
* ``autotuned_int8``: the int8 GEMM's autotuner picks its config at every M (before session 14; session 14's first
  calls ran it as ``whole_widen``, which also undid the fixed-size widening chunks tried then, commit a6967dc);
* ``whole_widen``: the large-M path widens every layer whole, never in chunks (before session 14).

    PYTHONPATH=. python benchmarks/e2e_variants.py noabsmax --models llama2-7b --formats dgq_dynamic \
        --seqlens 2048 --batched-prefill 0 --decode-batches 1 --out results/x.json

(the arguments after the variants, a comma list or ``none``, are ``e2e.py``'s, run as its one-format child process).
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import triton
import triton.language as tl

VARIANTS = ("none", "nomerge", "attn_late", "aq_late", "noabsmax", "down_absmax", "per_layer_length", "autotuned_int8", "whole_widen")


@triton.jit
def _wait_only(PDL: tl.constexpr):
    """:func:`dgq.kernels.pdl.wait_then_release` without the release: the consumer launches when this kernel ends."""
    if PDL:
        tl.extra.cuda.gdc_wait()


class _Skipped:
    """A kernel whose launches do nothing."""

    def __getitem__(self, grid: object):  # noqa: ANN204
        return lambda *args, **kwargs: None


def apply(variants: list[str]) -> None:
    from dgq import fuse
    from dgq.kernels import act_quant, ops
    from dgq.kernels import decode_attention as attention

    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"error: unknown variant(s) {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}")
    if "nomerge" in variants:
        attention._decode_attention_merge = _Skipped()
    if "attn_late" in variants:
        attention.wait_then_release = _wait_only
    if "aq_late" in variants:
        act_quant.wait_then_release = _wait_only
    if "noabsmax" in variants:
        ops.takes_row_absmax = lambda *args, **kwargs: False
    if "down_absmax" in variants:
        fuse_projections = fuse.fuse_projections

        def fuse_with_down(model):  # noqa: ANN001, ANN202
            model = fuse_projections(model)
            for block in model.model.layers:
                block.mlp.down_proj.absmax_in_graph = True
            return model

        fuse.fuse_projections = fuse_with_down
    if "per_layer_length" in variants:
        from transformers import StaticCache

        from dgq import kv_cache

        kv_cache.float_static_cache = StaticCache  # what dgq.bench.DecodeStep imports at each call
    if "autotuned_int8" in variants:
        from dgq.kernels import int8_gemm

        int8_gemm.LARGE_M = 1 << 40  # read at each call
    if "whole_widen" in variants:
        from dgq.kernels import linear

        linear.WIDEN_CHUNK_BYTES = 1 << 40  # read at each call


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        return
    apply(sys.argv[1].split(","))
    script = Path(__file__).with_name("e2e.py")
    sys.argv = [str(script), "--child"] + sys.argv[2:]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
