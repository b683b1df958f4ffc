"""GPTQ on a fixed 4-bit grid: choose each code with the inverse-Hessian error feedback of GPTQ.

The grid search of :mod:`dgq.search` fixes, per (row, group), an affine 4-bit grid ``value = (code - zp) * step``
with codes limited to ``[low, high]`` (for the dual-grained format ``step = s1 * s2`` and ``[low, high]`` is the
group's int8-safe window, so the overflow guarantee holds for any code chosen here).  Nearest rounding picks each
code alone; GPTQ (Frantar et al., 2022) picks the codes of one column at a time and moves the not yet quantized
columns of the same row so that they compensate the rounding error just made, as measured by ``H = XᵀX``:
after column ``i`` is rounded with error ``e``, the remaining weights change by ``-e · U[i, i:] / U[i, i]``, with
``U`` the upper Cholesky factor of ``H⁻¹``.  Columns are processed in blocks whose updates to later columns are
applied lazily, once per block, as one matrix product.

With ``act_order`` the columns are visited by decreasing ``H_jj`` (the inputs that carry the most energy first),
while every column keeps the grid of the group it belongs to: the grids are fixed before the permutation, so the
stored format is unchanged.  Nothing here knows about models: inputs are a weight matrix, its ``H`` and a grid.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from dgq.errors import DGQError
from dgq.formats import INT4_MAX, DualGrainedWeight, int8_safe_window


class GPTQError(DGQError, ValueError):
    """``H`` stays singular after dampening: the Cholesky factorisation that GPTQ needs does not exist (the user's
    calibration data or dampening setting; the message says which knob to turn)."""


@dataclass
class CodeGrid:
    """Per (row, group) affine 4-bit grid: ``value = (code - zp) * step``, ``code`` integer in ``[low, high]``.

    All four tensors are float ``[rows, groups]`` (``zp``, ``low``, ``high`` hold integer values).
    """

    step: torch.Tensor
    zp: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor

    @classmethod
    def dual_grained(cls, dg: DualGrainedWeight) -> "CodeGrid":
        """The grid of a dual-grained weight: ``step = s1 * s2``, codes inside the int8-safe window."""
        s2, zp = dg.s2.float(), dg.zp.float()
        low, high = int8_safe_window(zp, s2)
        return cls(dg.s1.float()[:, None] * s2, zp, low, high)

    @classmethod
    def float_groups(cls, scale: torch.Tensor, lo: torch.Tensor) -> "CodeGrid":
        """The grid of asymmetric 4-bit quantization with float group scales (as :func:`fake_quant_groups`)."""
        scale = scale.float()
        zp = torch.round(-lo.float() / scale).clamp(0, INT4_MAX)
        return cls(scale, zp, torch.zeros_like(zp), torch.full_like(zp, INT4_MAX))

    def per_column(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``step, zp, low, high`` expanded to ``[rows, k]`` (one entry per weight)."""
        g = k // self.step.shape[1]
        return tuple(t.repeat_interleave(g, dim=1) for t in (self.step, self.zp, self.low, self.high))  # type: ignore[return-value]

    def round(self, w: torch.Tensor) -> torch.Tensor:
        """Nearest codes of ``w`` ``[rows, k]`` on the grid (float tensor of integer values)."""
        step, zp, low, high = self.per_column(w.shape[1])
        return torch.maximum(torch.minimum(torch.round(w.float() / step) + zp, high), low)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """Float weight ``(code - zp) * step`` of codes ``[rows, k]``."""
        step, zp, _, _ = self.per_column(codes.shape[1])
        return (codes - zp) * step


def _damped_cholesky(h: torch.Tensor, damp: float, knob: str) -> torch.Tensor:
    """Lower Cholesky factor of ``H + λI`` with ``λ = damp · mean(diag H)``; ``knob`` names the setting to raise when
    even the dampened ``H`` is not positive definite."""
    h = h.clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info):
        raise GPTQError(f"H is not positive definite even after dampening by {damp} x mean(diag H); "
                        f"raise {knob} or calibrate on more tokens")
    return chol


def _inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` with ``λ = damp · mean(diag H)``.

    Row ``i`` of ``U`` holds, scaled by ``U[i, i]``, how the remaining columns must move to compensate an error
    in column ``i`` once columns before ``i`` are fixed (the sequential elimination GPTQ performs).
    """
    chol = _damped_cholesky(h, damp, "the dampening (gptq_damp)")
    return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)


def float_output_target(w: torch.Tensor, h: torch.Tensor, drift: torch.Tensor, damp: float) -> torch.Tensor:
    """The weight ``w + δ`` whose outputs on the quantized model's inputs ``X`` best match the float model's
    ``X_fp wᵀ`` (asymmetric calibration, as in GPTAQ), with ``H = XᵀX`` and ``drift = Xᵀ(X_fp - X)``.

    Minimising ``||X_fp w_n - X q_n||²`` over a row ``q_n`` equals minimising ``(w*_n - q_n)ᵀ H (w*_n - q_n)`` plus a
    constant, with ``H w*_n = XᵀX_fp w_n = (H + drift) w_n``: every search and GPTQ step that scores
    ``(w - ŵ)ᵀ H (w - ŵ)`` then compensates, besides its own rounding, the error that the quantized earlier layers
    left in ``X``.  ``w*`` is fitted as a ridge correction of ``w``, ``(H + λI) δ_n = drift · w_n`` with
    ``λ = damp · mean(diag H)``: it is exactly ``w`` when ``X = X_fp``, and the ridge keeps the correction small
    along directions that the calibration tokens barely span (``w*`` itself would be shrunk towards 0 by a ridge
    on it).  ``drift`` is accumulated from ``X_fp - X`` token by token because ``XᵀX_fp - XᵀX`` cancels in float32.
    """
    w = w.float()
    chol = _damped_cholesky(h.float(), damp, "float_target_damp")
    delta = torch.cholesky_solve(drift.float() @ w.t(), chol)
    return w + delta.t()


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run the body with one intra-op CPU thread, restoring the previous count after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
@_one_thread()
def gptq_codes(w: torch.Tensor, h: torch.Tensor, grid: CodeGrid, damp: float = 0.01, block_size: int = 128,
               act_order: bool = False) -> torch.Tensor:
    """Codes ``[rows, k]`` (float, integer-valued) for ``w`` on ``grid``, chosen by GPTQ's error feedback on ``H``.

    Input channels that never fire (``H_jj = 0``) cannot affect the output; their weights are zeroed and their
    diagonal set to 1 so that the factorisation exists, as in GPTQ.  The result always lies on ``grid``: every
    code is clamped to its group's ``[low, high]``.

    Runs on one CPU thread: the column loop is a dozen tiny ops per column, and on a loaded CPU the thread
    synchronisation of those ops (and of LAPACK's ``cholesky_inverse``) cost ten to twenty times the work itself.
    """
    w = w.float().clone()
    h = h.float().clone()
    rows, k = w.shape
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    step, zp, low, high = grid.per_column(k)
    perm = torch.argsort(h.diagonal(), descending=True) if act_order else None
    if perm is not None:  # the grids travel with their columns: they were fixed before the permutation
        w, h = w[:, perm], h[perm][:, perm]
        step, zp, low, high = (t[:, perm] for t in (step, zp, low, high))
    u = _inverse_hessian_factor(h, damp)
    # Column-major from here on: column c of w is the contiguous row c of wt, so each step reads contiguous memory.
    wt, step, zp, low, high = (t.t().contiguous() for t in (w, step, zp, low, high))
    codes = torch.empty_like(wt)
    for b0 in range(0, k, block_size):
        b1 = min(b0 + block_size, k)
        wb = wt[b0:b1].clone()
        errors = torch.empty_like(wb)
        ub = u[b0:b1, b0:b1]
        for i in range(b1 - b0):
            c = b0 + i
            q = torch.clamp(torch.round(wb[i] / step[c]).add_(zp[c]), low[c], high[c])
            codes[c] = q
            err = torch.sub(wb[i], (q - zp[c]).mul_(step[c])).div_(ub[i, i])
            wb[i:].addr_(ub[i, i:], err, alpha=-1.0)
            errors[i] = err
        wt[b1:].addmm_(u[b0:b1, b1:].t(), errors, alpha=-1.0)  # the block's lazy update of all later columns
    codes = codes.t()
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes
