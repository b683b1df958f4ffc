"""The dual-grained weight format: the one contract between search, kernels and checkpoints.

A Linear weight ``W`` of shape ``[out, in]`` with group size ``g`` is stored as

* ``u4``  uint8 ``[out, in]``      4-bit codes in ``[0, 15]``
* ``zp``  uint8 ``[out, in // g]`` integer zero point per (row, group), in ``[0, 15]``
* ``s2``  int8  ``[out, in // g]`` fine-grained integer scale per (row, group), in ``[1, 127]``
* ``s1``  float32 ``[out]``        coarse-grained float scale per output channel

with the int8 weight ``W_s8 = s2 * (u4 - zp)`` and the float weight ``s1 * W_s8``.  ``W_s8`` must fit int8
*exactly* so that kernels can widen int4 to int8 and use int8 tensor cores; we guarantee it by construction:
``s2`` may be as large as 127 (the paper's relaxed range, appendix A2), and the codes of a group are clamped to
the int8-safe window ``zp ± floor(127 / s2)`` intersected with ``[0, 15]``.

The linear output is ``O = (s_x * s1) * (X_s8 @ W_s8ᵀ)`` with int32 accumulation; :func:`int_matmul` computes
that accumulator exactly on any device, and is the reference every fast kernel must equal.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dgq.errors import DGQError

INT4_MAX = 15
INT8_MAX = 127
# Largest K-chunk whose int8 x int8 dot products sum below 2**24, so fp32 matmul is exact (127 * 127 * 1040 < 2**24).
_EXACT_FP32_CHUNK = 1040


class FormatError(DGQError, ValueError):
    """A tensor set that violates the dual-grained format's invariants."""


@dataclass
class DualGrainedWeight:
    """Unpacked dual-grained weight of one Linear layer (see the module docstring for the equations)."""

    u4: torch.Tensor
    zp: torch.Tensor
    s2: torch.Tensor
    s1: torch.Tensor
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.u4.shape)  # type: ignore[return-value]

    def to(self, device: torch.device | str) -> "DualGrainedWeight":
        """The same weight with its tensors on ``device``."""
        return DualGrainedWeight(self.u4.to(device), self.zp.to(device), self.s2.to(device), self.s1.to(device),
                                 self.group_size)

    def int8_weight(self) -> torch.Tensor:
        """``W_s8 = s2 * (u4 - zp)`` as int8 ``[out, in]`` (exact: guaranteed in range by :meth:`validate`)."""
        g = self.group_size
        codes = self.u4.to(torch.int16) - self.zp.to(torch.int16).repeat_interleave(g, dim=1)
        return (codes * self.s2.to(torch.int16).repeat_interleave(g, dim=1)).to(torch.int8)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight ``s1 * W_s8`` that this format represents."""
        return (self.s1.float()[:, None] * self.int8_weight().float()).to(dtype)

    def validate(self, name: str = "weight") -> None:
        """Raise :class:`FormatError` naming ``name`` if any invariant of the format is broken."""
        out, inp = self.u4.shape
        g = self.group_size
        if g <= 0 or inp % g:
            raise FormatError(f"{name}: group size {g} does not divide in_features {inp}")
        groups = inp // g
        expect = {"u4": ((out, inp), torch.uint8), "zp": ((out, groups), torch.uint8),
                  "s2": ((out, groups), torch.int8), "s1": ((out,), torch.float32)}
        for field, (shape, dtype) in expect.items():
            t = getattr(self, field)
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise FormatError(f"{name}: {field} is {t.dtype}{list(t.shape)}, expected {dtype}{list(shape)}")
        if int(self.u4.max()) > INT4_MAX or int(self.zp.max()) > INT4_MAX:
            raise FormatError(f"{name}: 4-bit codes or zero points exceed {INT4_MAX}")
        if int(self.s2.min()) < 1:
            raise FormatError(f"{name}: group scales s2 must be in [1, {INT8_MAX}]")
        if not torch.isfinite(self.s1).all() or (self.s1 <= 0).any():
            raise FormatError(f"{name}: channel scales s1 must be finite and positive")
        codes = self.u4.to(torch.int32) - self.zp.to(torch.int32).repeat_interleave(g, dim=1)
        if (codes.abs() * self.s2.to(torch.int32).repeat_interleave(g, dim=1)).max() > INT8_MAX:
            raise FormatError(f"{name}: s2 * (u4 - zp) leaves [-{INT8_MAX}, {INT8_MAX}]")


def group_minmax(w: torch.Tensor, group_size: int, ratio: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit float scale and clipped minimum per (row, group), the range shrunk by ``ratio``.

    ``w`` is ``[out, in]``; ``ratio`` broadcasts against ``[out, in // g]`` (or has a leading grid axis).
    The range always contains zero, so zero is exactly representable, as is usual for asymmetric schemes.
    """
    wg = w.reshape(w.shape[0], -1, group_size)
    hi = wg.amax(-1).clamp(min=0) * ratio
    lo = wg.amin(-1).clamp(max=0) * ratio
    scale = ((hi - lo) / INT4_MAX).clamp(min=1e-10)
    return scale, lo


def fake_quant_groups(w: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """Round ``w`` ``[..., out, in]`` to asymmetric 4 bits with float group scales; returns the dequantized weight."""
    g = w.shape[-1] // scale.shape[-1]
    wg = w.reshape(*w.shape[:-1], -1, g)
    zp = torch.round(-lo / scale).clamp(0, INT4_MAX)[..., None]
    q = torch.clamp(torch.round(wg / scale[..., None]) + zp, 0, INT4_MAX)
    return ((q - zp) * scale[..., None]).reshape(w.shape)


def int8_safe_window(zp: torch.Tensor, s2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lowest and highest 4-bit code of each group whose ``s2 * (u4 - zp)`` stays in ``[-127, 127]``:
    ``zp ± floor(127 / s2)`` intersected with ``[0, 15]`` (float tensors of integer values, shaped like ``zp``).

    Every code producer (nearest rounding here, GPTQ's error feedback in :mod:`dgq.gptq`) clamps to this window,
    which is what makes the int8 widening exact by construction."""
    reach = torch.floor(INT8_MAX / s2)
    return (zp - reach).clamp(min=0), (zp + reach).clamp(max=INT4_MAX)


def dual_grain(w: torch.Tensor, s1: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor,
               group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``w`` to the dual-grained codes for channel scales ``s1`` (paper Eq. 5, overflow-safe).

    ``s2 = round(scale / s1)`` in ``[1, 127]``; the zero point maps the phase-1 clipped minimum ``lo`` onto the
    integer grid of the effective scale ``s1 * s2``; codes are clamped to the int8-safe window of their group.
    Leading grid axes on ``s1`` (``[..., out]``), ``scale`` and ``lo`` (``[..., out, groups]``) are supported so a
    search can score many candidates at once.  Returns ``(u4, zp, s2)`` as float tensors of integer values.
    """
    s2 = torch.round(scale / s1[..., None]).clamp(1, INT8_MAX)
    step = s1[..., None] * s2
    zp = torch.round(-lo / step).clamp(0, INT4_MAX)
    low, high = int8_safe_window(zp, s2)
    wg = w.reshape(*w.shape[:-1], -1, group_size)
    u4 = torch.maximum(torch.minimum(torch.round(wg / step[..., None]) + zp[..., None], high[..., None]),
                       low[..., None])
    return u4.reshape(*u4.shape[:-2], -1), zp, s2


def dual_grain_dequant(u4: torch.Tensor, zp: torch.Tensor, s2: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
    """Float weight of (possibly batched) float-valued dual-grained codes, as :func:`dual_grain` returns them."""
    g = u4.shape[-1] // zp.shape[-1]
    ug = u4.reshape(*u4.shape[:-1], -1, g)
    return ((ug - zp[..., None]) * (s2 * s1[..., None])[..., None]).reshape(u4.shape)


def to_dual_grained(w: torch.Tensor, s1: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor,
                    group_size: int) -> DualGrainedWeight:
    """Final integer tensors of :func:`dual_grain` for one candidate, validated."""
    u4, zp, s2 = dual_grain(w.float(), s1.float(), scale.float(), lo.float(), group_size)
    dg = DualGrainedWeight(u4=u4.to(torch.uint8), zp=zp.to(torch.uint8), s2=s2.to(torch.int8),
                           s1=s1.float().contiguous(), group_size=group_size)
    dg.validate()
    return dg


def amax_abs(x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    """``x.abs().amax(dim)`` in one read of ``x`` and without its ``|x|`` copy (the same values: ``max|x|`` is
    ``max(max x, -min x)``); every calibration pass and every quantized forward takes this per token."""
    lo, hi = torch.aminmax(x, dim=dim, keepdim=keepdim)
    return torch.maximum(hi, lo.neg_())


_SAME_WIDTH_INT = {torch.float16: (torch.int16, 0x7FFF), torch.bfloat16: (torch.int16, 0x7FFF),
                   torch.float32: (torch.int32, 0x7FFFFFFF)}


def row_absmax_bits(x: torch.Tensor) -> torch.Tensor:
    """Each row's ``max |x|`` (last dimension, kept) as the bit pattern of ``x``'s dtype, in the integer of its width:
    viewed back as ``x.dtype`` it is exactly the float :func:`amax_abs` gives (the sign bit cleared, the magnitudes of
    IEEE floats order as their bit patterns do).

    Why bits: a compiled graph computes this beside the kernel that produces ``x`` (an RMSNorm: the compiler fuses
    the reduction into it) and hands it to the one-token GEMV (:attr:`dgq.nn.QuantLinear.absmax_in_graph`), whose
    CTAs then need not read the whole row first.  The bit view pins the value to ``x`` as rounded to its dtype; a
    float ``abs().amax()`` fused into the producer could be taken before that rounding (the compiler may drop a cast
    inside a kernel), so the scale, and the codes, could differ from the reference's."""
    ints, magnitude = _SAME_WIDTH_INT[x.dtype]
    return (x.view(ints) & magnitude).amax(-1, keepdim=True)


def absmax_bits_dtype(dtype: torch.dtype) -> torch.dtype:
    """The integer dtype :func:`row_absmax_bits` returns for activations of ``dtype``."""
    return _SAME_WIDTH_INT[dtype][0]


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` from a fused gate/up output (gate the first half of the last dimension), rounded as a
    Llama-family MLP rounds it: the SiLU in the input's dtype, then the product in it.  The input of a down
    projection that takes the gate/up output itself (:attr:`dgq.nn.QuantLinear.swiglu_input`)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def quantize_activations(x: torch.Tensor, static_scale: torch.Tensor | None = None,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 activations: per-token dynamic (``static_scale is None``) or one calibrated per-tensor scale
    (or, ``[tokens, 1]``, a calibrated scale per row, picked by each row's position, not computed from it).

    Returns ``(x_s8, s_x)``: the int8 codes and ``s_x``, float32 broadcastable to ``x[..., :1]``.
    """
    xf = x.float()
    if static_scale is None:
        s_x = (amax_abs(xf, -1, keepdim=True) / INT8_MAX).clamp_(min=1e-8)
    elif static_scale.numel() == 1:
        s_x = static_scale.float().reshape(*([1] * xf.dim()))
    else:  # static scales chosen per row by position (dgq.positions), one per token of ``x``
        s_x = static_scale.float().reshape(*xf.shape[:-1], 1)
    return torch.div(xf, s_x).round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8), s_x


def exact_matmul(x_q: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """Exact ``x_q @ w_t`` for integer-valued float32 ``x_q [M, K]`` and ``w_t [K, N]`` with entries in [-127, 127].

    Float32 matmul is exact while every partial sum stays below 2**24, so K is cut into chunks that guarantee it;
    one chunk returns float32, several are summed in float64 (both hold the integers exactly).  TF32 must be off
    for this to hold on CUDA.
    """
    if x_q.is_cuda and torch.backends.cuda.matmul.allow_tf32:
        raise RuntimeError("exact_matmul needs torch.backends.cuda.matmul.allow_tf32 = False to be exact")
    k = x_q.shape[-1]
    if k <= _EXACT_FP32_CHUNK:
        return x_q @ w_t
    acc = torch.zeros(x_q.shape[:-1] + (w_t.shape[1],), dtype=torch.float64, device=x_q.device)
    for start in range(0, k, _EXACT_FP32_CHUNK):
        acc += x_q[..., start:start + _EXACT_FP32_CHUNK] @ w_t[start:start + _EXACT_FP32_CHUNK]
    return acc


def int_matmul(x_s8: torch.Tensor, w_s8: torch.Tensor) -> torch.Tensor:
    """Exact int32 ``x_s8 @ w_s8ᵀ`` for int8 ``x [M, K]`` and ``w [N, K]``, on any device: the reference
    accumulator every kernel must equal.

    On a CPU where it is fast (:func:`cpu_int_mm_is_fast`) this is ``torch._int_mm`` (int8 products, int32
    accumulation: exact, and 3-5x the fp32 GEMM's speed on AVX512-VNNI; the calibration's quantized passes and
    every CPU evaluation run through it); elsewhere :func:`exact_matmul`'s chunked float products, which are exact
    too and need no integer GEMM.
    """
    if x_s8.device.type == "cpu" and x_s8.shape[-1] > 1 and cpu_int_mm_is_fast():  # (torch 2.13's CPU _int_mm
        return torch._int_mm(x_s8.contiguous(), w_s8.t())  # returns zeros for K = 1)
    return exact_matmul(x_s8.float(), w_s8.float().t()).to(torch.int32)


def cpu_int_mm_is_fast() -> bool:
    """Whether this CPU's ``torch._int_mm`` beats the fp32 GEMM (:data:`_CPU_INT_MM_FAST`, timed once when this
    module is imported).  Both paths of :func:`int_matmul` give the same exact int32, so the choice moves time only.

    Why: where torch has an int8 GEMM for the CPU (AVX512-VNNI) ``_int_mm`` was 3-5x the fp32 GEMM; on an AVX2-only
    CPU (session 20's AMD EPYC) it fell back to a loop 25x slower than fp32 (8192 x 576 x 1536: 3.2 s against
    0.13 s), and the README's quantize job ran 40 s per block instead of ~9."""
    return _CPU_INT_MM_FAST


def _int_mm_beats_fp32(n: int = 384) -> bool:
    """``torch._int_mm`` against the fp32 GEMM on an ``n`` x ``n`` x ``n`` product, best of three each (at import:
    a compiled graph cannot time, and reads the answer as a constant; ~1 ms on an int8 GEMM, ~25 ms on the loop)."""
    x = torch.randint(-127, 128, (n, n), dtype=torch.int8)
    w = torch.randint(-127, 128, (n, n), dtype=torch.int8)

    def best(run: Callable[[], torch.Tensor]) -> float:
        run()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return min(times)

    return best(lambda: torch._int_mm(x, w.t())) < best(lambda: x.float() @ w.float().t())


_CPU_INT_MM_FAST = _int_mm_beats_fp32()


def relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """``||W - Ŵ||² / ||W||²`` in float32: what a stored matrix loses, for the calibration report."""
    w = weight.detach().float()
    return float((w - approx.float()).pow(2).sum() / w.pow(2).sum().clamp(min=1e-30))
