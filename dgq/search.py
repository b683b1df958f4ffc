"""The two-phase grid search of DGQ, scored on quadratic forms of ``H = XᵀX``.

For a Linear ``y = x Wᵀ`` and calibration inputs ``X``, the output error of row ``n`` is
``||X (w_n - q_n)||² = (w_n - q_n)ᵀ H (w_n - q_n)``.  ``H`` is accumulated once over every calibration token, so a
candidate costs a ``K x K`` quadratic form (phase 1: the ``g x g`` diagonal block of its group) instead of a pass
over the data; this is what lets the search use all calibration tokens and still take seconds per layer.
Nothing here knows about models: inputs are a weight matrix and its ``H``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dgq.formats import INT8_MAX, dual_grain, dual_grain_dequant, fake_quant_groups, group_minmax

# Bytes of candidate tensors materialised at once; rows are processed in chunks that stay below it.  Sized for the
# CPU's caches: the searches are chains of elementwise passes over ``[candidates, rows, K]``, which run from cache
# at 16 MiB and from memory at the former 256 MiB (SmolLM2-135M, 2 cores: 2.1 s -> 1.3 s per block, same results).
_CHUNK_BYTES = 1 << 24
# s2 of the widest group in the naive dual-grained rounding: 8 * 15 = 120 can never overflow int8.
NAIVE_S2_MAX = 8


@dataclass
class GroupScales:
    """Per (row, group) float scale and clipped minimum of asymmetric 4-bit quantization (phase 1 output)."""

    scale: torch.Tensor
    lo: torch.Tensor


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per-row output error ``(w - ŵ)ᵀ H (w - ŵ)``; ``w``/``w_hat`` may carry leading candidate axes."""
    d = (w - w_hat).float()
    return ((d @ h) * d).sum(-1)


def diagonal_blocks(h: torch.Tensor, group_size: int) -> torch.Tensor:
    """The ``[groups, g, g]`` diagonal blocks of ``H``: the error of one group's contribution alone."""
    groups = h.shape[0] // group_size
    hv = h.reshape(groups, group_size, groups, group_size)
    return torch.diagonal(hv, dim1=0, dim2=2).permute(2, 0, 1).contiguous()


def search_group_clip(w: torch.Tensor, h: torch.Tensor, group_size: int, grid: int = 20,
                      clip_min: float = 0.5) -> GroupScales:
    """Phase 1: per group, the clipping ratio in ``[clip_min, 1]`` minimising the group's output error.

    Each candidate ratio shrinks the group's min/max range (paper Eq. 1, 3); the score of group ``j`` of row ``n``
    is ``dᵀ H_jj d`` with ``d`` the group's rounding error and ``H_jj`` its diagonal block.  ``grid == 1`` is RTN.
    """
    w = w.float()
    rows, k = w.shape
    groups = k // group_size
    ratios = torch.linspace(1.0, clip_min, grid, device=w.device) if grid > 1 else torch.ones(1, device=w.device)
    blocks = diagonal_blocks(h.float(), group_size)
    scale = torch.empty(rows, groups, device=w.device)
    lo = torch.empty(rows, groups, device=w.device)
    step = max(1, _CHUNK_BYTES // (4 * 4 * grid * k))
    for r0 in range(0, rows, step):
        wc = w[r0:r0 + step]
        s, m = group_minmax(wc, group_size, ratios[:, None, None])  # [A, n, G]
        d = (wc - fake_quant_groups(wc.expand(grid, -1, -1), s, m)).reshape(grid, -1, groups, group_size)
        err = (torch.einsum("angi,gij->angj", d, blocks) * d).sum(-1)  # [A, n, G]
        best = err.argmin(0, keepdim=True)
        scale[r0:r0 + wc.shape[0]] = s.gather(0, best)[0]
        lo[r0:r0 + wc.shape[0]] = m.gather(0, best)[0]
    return GroupScales(scale, lo)


def rtn_group_scales(w: torch.Tensor, group_size: int) -> GroupScales:
    """Round-to-nearest group scales (no clipping)."""
    s, m = group_minmax(w.float(), group_size)
    return GroupScales(s, m)


def naive_channel_scale(g: GroupScales) -> torch.Tensor:
    """The paper's RTN dual-grained s1: the widest group gets ``s2 = 8``, the largest overflow-free value."""
    return (g.scale.amax(-1) / NAIVE_S2_MAX).clamp(min=1e-12)


def search_channel_scale(w: torch.Tensor, h: torch.Tensor, g: GroupScales, group_size: int, grid: int = 20,
                         s2_range: tuple[int, int] = (8, 24), fallback: GroupScales | None = None,
                         ) -> tuple[torch.Tensor, GroupScales]:
    """Phase 2: per output channel, the ``s1`` minimising the full output error against the original ``w``.

    Candidates put the widest group's ``s2`` at each value of ``s2_range``; every candidate re-quantizes ``w``
    itself (not the phase-1 result) with ``s2 = round(S'/s1)`` under the int8-safe clamp (paper Eq. 6).  The naive
    dual-grained point of ``fallback`` (RTN scales, ``s2 <= 8``) is scored too, so the search can never end worse
    than RTN-DG.  Returns ``s1`` and the group scales it pairs with, per row.
    """
    w, h = w.float(), h.float()
    rows, k = w.shape
    targets = torch.linspace(s2_range[0], s2_range[1], grid, device=w.device)
    scale, lo = g.scale.clone(), g.lo.clone()
    s1 = torch.empty(rows, device=w.device)
    step = max(1, _CHUNK_BYTES // (4 * 4 * (grid + 1) * k))
    for r0 in range(0, rows, step):
        sl = slice(r0, min(rows, r0 + step))
        wc, sc, mc = w[sl], g.scale[sl], g.lo[sl]
        cand = sc.amax(-1)[None, :] / targets[:, None]  # [T, n]
        err = output_error(wc, dual_grain_dequant(*dual_grain(wc, cand, sc, mc, group_size), cand), h)
        best_err, best = err.min(0)
        s1[sl] = cand.gather(0, best[None])[0]
        if fallback is not None:
            fs, fm = fallback.scale[sl], fallback.lo[sl]
            naive = naive_channel_scale(GroupScales(fs, fm))
            naive_err = output_error(wc, dual_grain_dequant(*dual_grain(wc, naive, fs, fm, group_size), naive), h)
            use = naive_err < best_err
            s1[sl] = torch.where(use, naive, s1[sl])
            scale[sl] = torch.where(use[:, None], fs, sc)
            lo[sl] = torch.where(use[:, None], fm, mc)
    return s1.clamp(min=1e-12), GroupScales(scale, lo)


def int8_channel_fake_quant(w: torch.Tensor) -> torch.Tensor:
    """Symmetric per-output-channel int8 rounding (the SmoothQuant W8 weights), dequantized."""
    s = (w.abs().amax(-1, keepdim=True) / INT8_MAX).clamp(min=1e-12)
    return torch.clamp(torch.round(w / s), -INT8_MAX, INT8_MAX) * s


def search_act_scale(x: torch.Tensor, weights: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor,
                     absmax: torch.Tensor, grid: int, clip_min: float,
                     target: torch.Tensor | None = None) -> torch.Tensor:
    """The static per-tensor int8 activation scale ``r · absmax / 127``, ``r`` in ``[clip_min, 1]``, minimising the
    layer's output error ``Σ_t weights_t ||q(x_t) Ŵᵀ - x_t Wᵀ||²`` over sample tokens ``x`` ``[n, k]``.

    Clipping trades the error of the few tokens above the clip for finer steps on all others; only the layer's
    output (with its already quantized weight ``ŵ``) can say which wins.  ``r = 1`` (the max) is a candidate, so
    on the sample the result is never worse than the max.  ``target`` ``[n, rows]``, when given, replaces ``x Wᵀ``
    as the outputs to reproduce (the float model's outputs on the same tokens, under asymmetric calibration).
    """
    x, w, w_hat = x.float(), w.float(), w_hat.float()
    ref = x @ w.t() if target is None else target.float()
    best, best_err = None, float("inf")
    for r in torch.linspace(1.0, clip_min, grid).tolist():
        s = (absmax * r / INT8_MAX).clamp(min=1e-8)
        xq = torch.clamp(torch.round(x / s), -INT8_MAX, INT8_MAX) * s
        err = float((((xq @ w_hat.t()) - ref) ** 2).sum(1) @ weights)
        if err < best_err:
            best, best_err = s, err
    return best.reshape(())
