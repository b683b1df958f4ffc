"""Per-layer check of GPTQ settings on SmolLM2's real layers, scored on HELD-OUT calibration tokens.

For a few decoder blocks of the float model: smooth the block as DGQ does (from the "train" sequences), fix the
dual-grained grid with the two-phase search on the train ``H``, then choose codes by nearest rounding or GPTQ with
several settings and report the relative output error ``Σ (w-ŵ)ᵀ H (w-ŵ) / Σ wᵀ H w`` on the train ``H`` (what
GPTQ optimised) and on the ``H`` of other calibration sequences (what generalises).  Blocks get the float model's
inputs (no error accumulation), so this compares rounding rules, not end-to-end perplexity.

    PYTHONPATH=. python benchmarks/gptq_layers.py --train 4 --test 4 --blocks 0,9,19,29
    PYTHONPATH=. python benchmarks/gptq_layers.py --test-first --train 16 --variants "nearest,gptq d.01 ao"

Variants (``--variants``, comma list, default all): DGQ's grid with nearest rounding or GPTQ at several dampings,
with and without act order; no phase-1 clipping (``noclip``); a least-squares refit of ``s1`` after the codes are
fixed (``+s1``); phase 2's best three ``s1`` per row, chosen after GPTQ (``gptq top3 s1``); a wider phase-2 ``s2``
range (``s2 8-48``, ``s2 8-96``); the float group grid of ``w4a8_group`` (``group``).  Runs on one thread by
default, so that it can share the CPU with a quantization run.
"""

from __future__ import annotations

import argparse
import time

import torch

from dgq.calibrate import _block_output, capture_block_inputs, collect_stats, smooth_block
from dgq.config import preset
from dgq.data import calibration_samples
from dgq.formats import DualGrainedWeight, dual_grain, dual_grain_dequant, to_dual_grained
from dgq.gptq import CodeGrid, gptq_codes
from dgq.loading import load_model
from dgq.models import adapter_for
from dgq.search import output_error, rtn_group_scales, search_channel_scale, search_group_clip


def rel(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    return float(output_error(w, w_hat, h).sum() / output_error(w, torch.zeros_like(w), h).sum())


def refit_s1(w: torch.Tensor, h: torch.Tensor, dg: DualGrainedWeight) -> DualGrainedWeight:
    """Least-squares s1 per row for fixed integer weights q: argmin (w - s q)ᵀ H (w - s q) = qᵀHw / qᵀHq."""
    q = dg.int8_weight().float()
    qh = q @ h
    s1 = (qh * w).sum(1) / (qh * q).sum(1).clamp(min=1e-30)
    s1 = torch.where(s1 > 0, s1, dg.s1)
    return DualGrainedWeight(dg.u4, dg.zp, dg.s2, s1.float().contiguous(), dg.group_size)


def top3_gptq(w: torch.Tensor, h: torch.Tensor, g: int, config, kw: dict) -> torch.Tensor:  # noqa: ANN001
    """Phase 2's three best s1 per row (scored after nearest rounding), each followed by GPTQ; per row the one with
    the lowest error on ``h`` after GPTQ.  Returns the dequantized weight."""
    gs = search_group_clip(w, h, g, config.clip_grid, config.clip_min)
    targets = torch.linspace(config.s2_range[0], config.s2_range[1], config.s1_grid)
    cand = gs.scale.amax(-1)[None, :] / targets[:, None]  # [T, rows]
    err = output_error(w, dual_grain_dequant(*dual_grain(w, cand, gs.scale, gs.lo, g), cand), h)  # [T, rows]
    order = err.argsort(0)[:3]
    best_err, best = None, None
    for k in range(3):
        s1 = cand.gather(0, order[k:k + 1])[0]
        dg = to_dual_grained(w, s1, gs.scale, gs.lo, g)
        codes = gptq_codes(w, h, CodeGrid.dual_grained(dg), **kw)
        w_hat = DualGrainedWeight(codes.to(torch.uint8), dg.zp, dg.s2, dg.s1, g).dequantize()
        e = output_error(w, w_hat, h)
        if best is None:
            best_err, best = e, w_hat
        else:
            use = e < best_err
            best_err = torch.where(use, e, best_err)
            best = torch.where(use[:, None], w_hat, best)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir", default="/work/shared/data")
    ap.add_argument("--train", type=int, default=4)
    ap.add_argument("--test", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--blocks", default="0,9,19,29")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--test-first", action="store_true",
                    help="held-out = the first --test sequences, train = the next --train (same held-out set for "
                         "any --train)")
    ap.add_argument("--variants", default=None, help="comma list of variant names (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    config = preset("dgq_gptq", group_size=args.group_size)
    model, tok, _ = load_model(args.model)
    model.eval()
    adapter = adapter_for(model)
    samples = calibration_samples(tok, nsamples=args.train + args.test, seqlen=args.seqlen, root=args.data_dir)
    inputs = capture_block_inputs(model, adapter, samples, 1, torch.device("cpu"))
    n = args.train
    if args.test_first:  # reorder so that train comes first below
        order = list(range(args.test, args.test + args.train)) + list(range(args.test))
        inputs.hidden = [inputs.hidden[j] for j in order]
        inputs.kwargs = [[kw[j] for j in order] for kw in inputs.kwargs]
    wanted = {int(b) for b in args.blocks.split(",")}
    variants = {  # name: (clip search, gptq kwargs or None)
        "nearest": (True, None),
        "gptq d.01 ao": (True, dict(damp=0.01, act_order=True)),
        "gptq d.01": (True, dict(damp=0.01, act_order=False)),
        "gptq d.001 ao": (True, dict(damp=0.001, act_order=True)),
        "gptq d.03 ao": (True, dict(damp=0.03, act_order=True)),
        "gptq d.1 ao": (True, dict(damp=0.1, act_order=True)),
        "noclip nearest": (False, None),
        "noclip gptq d.01 ao": (False, dict(damp=0.01, act_order=True)),
        "nearest +s1": (True, None),
        "gptq d.01 ao +s1": (True, dict(damp=0.01, act_order=True)),
        "gptq d.1 ao +s1": (True, dict(damp=0.1, act_order=True)),
        "gptq top3 s1": ("top3", dict(damp=0.01, act_order=True)),  # phase 2's best 3 s1 per row, scored after GPTQ
        "group nearest": ("group", None),  # float group scales (w4a8_group's grid), same phase-1 search
        "group gptq d.01 ao": ("group", dict(damp=0.01, act_order=True)),
        # the phase-2 range of the widest group's s2 (default 8-24): larger s2 gives narrow groups finer s2 steps
        "s2 8-48 nearest": ("s2:8-48", None),
        "s2 8-48 gptq d.01 ao": ("s2:8-48", dict(damp=0.01, act_order=True)),
        "s2 8-96 nearest": ("s2:8-96", None),
        "s2 8-96 gptq d.01 ao": ("s2:8-96", dict(damp=0.01, act_order=True)),
    }
    if args.variants:
        variants = {v: variants[v] for v in args.variants.split(",")}
    totals = {v: [0.0, 0.0] for v in variants}
    hidden = inputs.hidden
    blocks = adapter.blocks(model)
    with torch.no_grad():
        for i, block in enumerate(blocks):
            kwargs = inputs.kwargs[i]
            if i in wanted:
                t0 = time.perf_counter()
                stats = collect_stats(block, adapter.pairs, hidden[:n], kwargs[:n])
                stats = smooth_block(block, adapter.pairs, stats, config)  # folds the train smoothing into block
                test = collect_stats(block, adapter.pairs, hidden[n:], kwargs[n:])
                for pair, tr, te in zip(adapter.pairs, stats, test):
                    for name in pair.consumers:
                        w = block.get_submodule(name).weight.float()
                        ht, hv = tr.h, te.h
                        g = args.group_size
                        row = []
                        grids = {}
                        for clip in {c for c, _ in variants.values()} - {"group", "top3"}:
                            s2_range = config.s2_range
                            if isinstance(clip, str):  # "s2:lo-hi"
                                s2_range = tuple(int(t) for t in clip[3:].split("-"))
                            gs = search_group_clip(w, ht, g, config.clip_grid, config.clip_min) if clip \
                                else rtn_group_scales(w, g)
                            s1, gs = search_channel_scale(w, ht, gs, g, config.s1_grid, s2_range,
                                                          fallback=rtn_group_scales(w, g))
                            grids[clip] = to_dual_grained(w, s1, gs.scale, gs.lo, g)
                        if any(c == "group" for c, _ in variants.values()):
                            gs = search_group_clip(w, ht, g, config.clip_grid, config.clip_min)
                            grids["group"] = CodeGrid.float_groups(gs.scale, gs.lo)
                        for v, (clip, kw) in variants.items():
                            if clip == "top3":
                                w_hat = top3_gptq(w, ht, g, config, kw)
                                a, b = rel(w, w_hat, ht), rel(w, w_hat, hv)
                                totals[v][0] += a
                                totals[v][1] += b
                                row.append(f"{v}: {a:.3e}/{b:.3e}")
                                continue
                            if clip == "group":
                                grid = grids["group"]
                                codes = grid.round(w) if kw is None else gptq_codes(w, ht, grid, **kw)
                                a, b = rel(w, grid.dequantize(codes), ht), rel(w, grid.dequantize(codes), hv)
                                totals[v][0] += a
                                totals[v][1] += b
                                row.append(f"{v}: {a:.3e}/{b:.3e}")
                                continue
                            dg = grids[clip]
                            grid = CodeGrid.dual_grained(dg)
                            codes = dg.u4.float() if kw is None else gptq_codes(w, ht, grid, **kw)
                            dq = DualGrainedWeight(codes.to(torch.uint8), dg.zp, dg.s2, dg.s1, g)
                            if v.endswith("+s1"):
                                dq = refit_s1(w, ht, dq)
                            w_hat = dq.dequantize()
                            a, b = rel(w, w_hat, ht), rel(w, w_hat, hv)
                            totals[v][0] += a
                            totals[v][1] += b
                            row.append(f"{v}: {a:.3e}/{b:.3e}")
                        print(f"block {i} {name}  " + "  ".join(row), flush=True)
                print(f"block {i} took {time.perf_counter() - t0:.0f} s", flush=True)
            if i >= max(wanted):
                break
            hidden = [_block_output(block(h, **kw)) for h, kw in zip(hidden, kwargs)]
    base = totals["nearest"]
    print("\nsum over layers of relative output error (train H / held-out H), and ratio to nearest")
    for v, (a, b) in totals.items():
        print(f"{v:22s} {a:.4e} / {b:.4e}   {a / base[0]:.3f} / {b / base[1]:.3f}")


if __name__ == "__main__":
    main()
