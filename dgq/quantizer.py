"""Quantize one Linear from its calibration statistics: the method, apart from any model traversal.

Given the (already smoothed) weight, ``H = XᵀX`` and the per-channel max of its input, build the module that
replaces the Linear: a :class:`~dgq.nn.QuantLinear` for the dual-grained format, a
:class:`~dgq.nn.FakeQuantLinear` for every other format.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from dgq.config import QuantConfig
from dgq.errors import DGQError
from dgq.formats import INT8_MAX, DualGrainedWeight, to_dual_grained
from dgq.gptq import CodeGrid, float_output_target, gptq_codes
from dgq.nn import FakeQuantLinear, QuantLinear
from dgq.search import (
    int8_channel_fake_quant, naive_channel_scale, output_error, rtn_group_scales, search_act_scale,
    search_channel_scale, search_group_clip,
)


class LayerError(DGQError, ValueError):
    """A layer that cannot be quantized as asked (non-finite weights, indivisible group size)."""


class TokenSample:
    """A weighted sample of an activation's calibration tokens, for scores that ``H`` cannot give (the error of
    quantizing the activation itself, which depends on each token's own maximum).

    Stratified so that the few tokens with huge activations, which decide whether clipping pays, are never missed:
    the ``top`` tokens of largest ``max|x|`` are kept exactly (weight 1), and about one token in ``stride`` of the
    rest stands for ``stride`` tokens.  Under asymmetric calibration each sampled token also keeps its twin in the
    float model (``x_fp``, the same token's activation there), so that a search can score against the float
    model's outputs.

    Without a ``generator`` the rest is every ``stride``-th token, peaks included (so a peak can count ``stride + 1``
    times): the sampling that the presets before ``dgq_static_gptaq_rs`` were measured with.  A stride that divides
    the sequence length takes every sequence's first token (128 sequences of 2048 at stride 256: one sample token in
    eight), and in SmolLM2 that token, the attention sink, is far from typical: the largest ``max|x|`` of
    the last block's MLP inputs, among the smallest of the middle blocks'.  With a ``generator`` each token is drawn
    independently with probability ``1 / stride``, and the peaks are removed from the rest: an exact stratification.

    With ``sink > 0`` the first ``sink`` positions of every calibration sequence (tokens are whole ``seqlen``-token
    sequences laid end to end) are also kept exactly, each with the extra weight ``sink_weight`` on top of whatever
    the sample above gives it: the score becomes (an estimate of) the error over all tokens plus ``sink_weight``
    times the error of the sink tokens.  The first position is an attention sink that every later token reads, so
    its error costs far more perplexity than its share of the tokens says (RESULTS.md, "an unaliased token
    sample"); ``sink_weight`` states that on purpose, where the strided sample did it by accident (weight
    ``stride``).  ``sink_weight = 0`` scores exactly as without sink tokens.

    With ``separate`` the sink tokens get a static scale of their own (``act_first_scale``): they are kept exactly
    but left out of everything else (the rest's sample, the peaks, the weights, and ``rest_absmax``, the per-channel
    maximum of the other tokens), since the shared scale never quantizes them.
    """

    def __init__(self, total_tokens: int, size: int = 1024, top: int = 64,
                 generator: torch.Generator | None = None, seqlen: int = 0, sink: int = 0,
                 sink_weight: float = 0.0, separate: bool = False) -> None:
        if sink and not 0 < sink <= seqlen:
            raise ValueError(f"sink positions ({sink}) need a sequence length at least as long, got {seqlen}")
        if separate and not sink:
            raise ValueError("a separate sink scale needs sink positions (sink >= 1)")
        self.stride = max(1, total_tokens // size)
        self.seqlen = seqlen
        self.sink = sink
        self.sink_weight = sink_weight
        self.separate = separate
        self.position = 0  # tokens seen in all, sinks included (``seen`` counts only those of the rest's stream)
        self.rest_absmax: torch.Tensor | None = None  # with ``separate``: per-channel max|x| of the non-sink tokens
        self.sinks: list[torch.Tensor] = []  # the tokens at positions < sink of every sequence, in order
        self.sinks_fp: list[torch.Tensor] = []
        self.top = top
        self.generator = generator
        self.seen = 0
        self.uniform: list[torch.Tensor] = []
        self.uniform_at: list[torch.Tensor] = []  # each uniform row's token index in the calibration set
        self.peaks: torch.Tensor | None = None
        self.peaks_at = torch.zeros(0, dtype=torch.long)
        self.uniform_fp: list[torch.Tensor] = []
        self.peaks_fp: torch.Tensor | None = None

    def _uniform_rows(self, n: int) -> torch.Tensor:
        """Which of the next ``n`` tokens the rest's sample takes (indices into them)."""
        if self.generator is None:
            return torch.arange((-self.seen) % self.stride, n, self.stride)
        return (torch.rand(n, generator=self.generator) * self.stride < 1).nonzero().squeeze(1)

    def add(self, x: torch.Tensor, x_fp: torch.Tensor | None = None) -> None:
        """Take the sample's share of ``x`` ``[tokens, k]`` (and of its float twin ``x_fp``, same tokens)."""
        if self.seen and (x_fp is None) != (self.peaks_fp is None):
            raise ValueError("a token sample holds float twins for all of its tokens or for none")
        first = self.position
        self.position += x.shape[0]
        if self.sink:
            is_sink = (torch.arange(x.shape[0]) + first) % self.seqlen < self.sink
            at_sink = is_sink.nonzero().squeeze(1)
            self.sinks.append(x[at_sink.to(x.device)])
            if x_fp is not None:
                self.sinks_fp.append(x_fp[at_sink.to(x_fp.device)])
            if self.separate:  # the rest's stream below never sees the sink tokens
                rest = (~is_sink).nonzero().squeeze(1)
                x = x[rest.to(x.device)]
                x_fp = None if x_fp is None else x_fp[rest.to(x_fp.device)]
                if not x.shape[0]:
                    return
                col = x.abs().amax(0)
                self.rest_absmax = col if self.rest_absmax is None else torch.maximum(self.rest_absmax, col)
        rows = self._uniform_rows(x.shape[0])
        self.uniform.append(x[rows.to(x.device)])
        self.uniform_at.append(rows + self.seen)
        pool = x if self.peaks is None else torch.cat([self.peaks, x])
        pool_at = torch.cat([self.peaks_at, torch.arange(self.seen, self.seen + x.shape[0])])
        self.seen += x.shape[0]
        keep = pool.abs().amax(1).topk(min(self.top, pool.shape[0])).indices  # peaks of x: those it will clip
        self.peaks = pool[keep].clone()
        self.peaks_at = pool_at[keep.cpu()]
        if x_fp is not None:
            self.uniform_fp.append(x_fp[rows.to(x_fp.device)])
            pool_fp = x_fp if self.peaks_fp is None else torch.cat([self.peaks_fp, x_fp])
            self.peaks_fp = pool_fp[keep].clone()

    def _rest(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The rest's sample rows (of ``uniform`` or ``uniform_fp``): with a generator, those that are not peaks."""
        rows = torch.cat(parts)
        if self.generator is None:
            return rows
        rest = ~torch.isin(torch.cat(self.uniform_at), self.peaks_at)
        return rows[rest.to(rows.device)]

    def tokens_and_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample tokens ``[n, k]`` and how many calibration tokens each stands for ``[n]``."""
        if self.peaks is None:
            raise ValueError("the token sample saw no tokens")
        uniform = self._rest(self.uniform)
        rest = max(self.seen - self.peaks.shape[0], 0) / max(uniform.shape[0], 1)
        parts = [torch.ones(self.peaks.shape[0]), torch.full((uniform.shape[0],), rest)]
        tokens = [self.peaks, uniform]
        if self.sink and not self.separate:
            sinks = torch.cat(self.sinks)
            parts.append(torch.full((sinks.shape[0],), float(self.sink_weight)))
            tokens.append(sinks)
        return torch.cat(tokens), torch.cat(parts).to(uniform.device)

    def float_tokens(self) -> torch.Tensor | None:
        """The float twins ``[n, k]`` of :meth:`tokens_and_weights`'s tokens, row for row, or None if not kept."""
        if self.peaks_fp is None:
            return None
        return torch.cat([self.peaks_fp, self._rest(self.uniform_fp), *([] if self.separate else self.sinks_fp)])

    def sink_tokens(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The sink tokens ``[n, k]`` and their float twins (None if not kept), in calibration order."""
        if not self.sinks:
            raise ValueError("the token sample holds no sink tokens")
        return torch.cat(self.sinks), torch.cat(self.sinks_fp) if self.sinks_fp else None

    def scaled(self, k: torch.Tensor) -> "TokenSample":
        """The sample of ``x / k`` (what smoothing by ``k`` makes of the activation; the peak tokens stay those
        that peaked before smoothing, which only ever lowers the largest channels)."""
        out = copy.copy(self)
        out.uniform = [u / k for u in self.uniform]
        out.peaks = None if self.peaks is None else self.peaks / k
        out.uniform_fp = [u / k for u in self.uniform_fp]
        out.peaks_fp = None if self.peaks_fp is None else self.peaks_fp / k
        out.sinks = [u / k for u in self.sinks]
        out.sinks_fp = [u / k for u in self.sinks_fp]
        out.rest_absmax = None if self.rest_absmax is None else self.rest_absmax / k
        return out


def token_sample(config: QuantConfig, total_tokens: int, seqlen: int) -> TokenSample:
    """The token sample of one activation for the static scale search, as ``config``'s ``act_sample_*`` ask, over
    ``total_tokens`` calibration tokens that are sequences of ``seqlen`` laid end to end."""
    generator = torch.Generator().manual_seed(config.seed) if config.act_sample_random else None
    if config.act_first_scale:
        return TokenSample(total_tokens, config.act_sample_tokens, config.act_sample_peaks, generator, seqlen,
                           sink=1, separate=True)
    return TokenSample(total_tokens, config.act_sample_tokens, config.act_sample_peaks, generator, seqlen,
                       config.act_sample_sink, config.act_sample_sink_weight)


@dataclass
class LinearStats:
    """Calibration statistics of one activation: ``H = XᵀX`` and ``max|x_j|`` over all tokens, for the static
    scale search a :class:`TokenSample`, and for asymmetric calibration ``drift = Xᵀ(X_fp - X)``, ``X_fp`` the
    float model's activation on the same tokens."""

    h: torch.Tensor
    absmax: torch.Tensor
    tokens: int
    sample: TokenSample | None = None
    drift: torch.Tensor | None = None


@dataclass
class LayerReport:
    """What quantizing one layer did; ``rel_error`` is ``||X(W-Ŵ)ᵀ||² / ||XWᵀ||²`` over the calibration set, and
    for static activations the scale and its ratio to the calibration max's (1: no clipping)."""

    name: str
    rel_error: float
    act_scale: float | None
    act_ratio: float | None = None  # static scale / (calibration max / 127): the clip the search chose
    act_first_scale: float | None = None  # with ``act_first_scale``: the first position's own static scale


def check_layer_shape(name: str, linear: nn.Module, config: QuantConfig) -> None:
    """Fail early, naming the layer, on a shape the format cannot hold; needs no weights (works on meta models)."""
    k = linear.in_features
    if config.weight in ("dual", "group") and k % config.group_size:
        raise LayerError(f"layer {name}: group size {config.group_size} does not divide in_features {k} "
                         f"(choose a group size that divides it, e.g. 64)")
    if config.weight in ("dual", "group", "channel") and k % 2:
        raise LayerError(f"layer {name}: in_features {k} is odd; 4-bit codes are packed in pairs")


def check_layer(name: str, linear: nn.Linear, config: QuantConfig) -> None:
    """:func:`check_layer_shape`, and finite weights: a NaN would otherwise surface as a wrong quantization."""
    check_layer_shape(name, linear, config)
    if not torch.isfinite(linear.weight).all():
        raise LayerError(f"layer {name}: weight contains NaN or Inf")


def _group_scales(w: torch.Tensor, h: torch.Tensor, g: int, config: QuantConfig):  # noqa: ANN202
    if config.search:
        return search_group_clip(w, h, g, config.clip_grid, config.clip_min)
    return rtn_group_scales(w, g)


def _gptq(w: torch.Tensor, h: torch.Tensor, grid: CodeGrid, nearest: torch.Tensor,
          config: QuantConfig) -> torch.Tensor:
    """GPTQ codes on ``grid``, row by row kept only where they beat the ``nearest`` codes on the undamped output
    error ``(w - ŵ)ᵀ H (w - ŵ)``: rows are independent in that error, so per layer it is never above rounding."""
    codes = gptq_codes(w, h, grid, config.gptq_damp, config.gptq_block, config.act_order)
    better = output_error(w, grid.dequantize(codes), h) < output_error(w, grid.dequantize(nearest), h)
    return torch.where(better[:, None], codes, nearest)


def _static_scale(stats: LinearStats, w: torch.Tensor, w_hat: torch.Tensor, config: QuantConfig,
                  w_float: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The per-tensor activation scale: the calibration max / 127, or with ``act_clip_grid > 1`` the clipped max
    that minimises the layer's output error on the token sample; and with ``act_first_scale`` the scale of every
    sequence's first position (else None), searched alike on those tokens alone, while the shared scale is searched
    on the other tokens and their maximum.

    The error is measured against ``x Wᵀ`` with ``w`` the weight that was quantized; under asymmetric calibration
    (the sample holds float twins and ``w_float`` is the layer's float weight) against the float model's own
    outputs ``x_fp W_floatᵀ`` on the same tokens instead: that is what the fitted ``w`` approximates and what the
    layer should reproduce, and unlike the fit it carries no ridge.
    """
    absmax = stats.absmax.max().float()
    if config.act_clip_grid == 1:
        return absmax.reshape(()) / INT8_MAX, None
    sample = stats.sample
    if sample is None:
        raise ValueError("the static scale search needs a token sample; calibration did not collect one")

    def search(x: torch.Tensor, weights: torch.Tensor, x_fp: torch.Tensor | None, peak: torch.Tensor) -> torch.Tensor:
        target = None
        if x_fp is not None and w_float is not None:
            target = x_fp.to(w.device).float() @ w_float.float().t()
        return search_act_scale(x.to(w.device), weights.to(w.device), w, w_hat, peak.float(), config.act_clip_grid,
                                config.act_clip_min, target=target)

    x, weights = sample.tokens_and_weights()
    if not config.act_first_scale:
        return search(x, weights, sample.float_tokens(), absmax), None
    if sample.rest_absmax is None:
        raise ValueError("act_first_scale needs calibration tokens beyond each sequence's first")
    first, first_fp = sample.sink_tokens()
    return (search(x, weights, sample.float_tokens(), sample.rest_absmax.max()),
            search(first, torch.ones(first.shape[0]), first_fp, first.abs().max()))


def float_target_ridge(stats: LinearStats, config: QuantConfig) -> float:
    """The ridge of the float-output fit, as a fraction of mean diag H: ``float_target_damp``, times
    ``float_target_tokens / tokens`` when ``float_target_tokens`` is set.

    The fit's correction ``δ = (H + λI)⁻¹ drift · w`` is estimated from ``N`` tokens and its noise grows as ``N``
    shrinks, while a ridge given as a fraction of ``H`` (which grows as ``N``) shrinks with it; a ridge of fixed
    absolute size (``λ = damp · N0 · mean x²``) keeps the prior's weight fixed instead, so that with fewer tokens
    the fit trusts the data less.  At ``N = N0`` the two agree exactly.
    """
    if not config.float_target_tokens:
        return config.float_target_damp
    return config.float_target_damp * (config.float_target_tokens / max(stats.tokens, 1))


@torch.no_grad()
def quantize_linear(name: str, linear: nn.Linear, stats: LinearStats, config: QuantConfig,
                    ) -> tuple[nn.Module, LayerReport]:
    """The quantized replacement of ``linear`` and a report of its calibration output error."""
    check_layer(name, linear, config)
    w = w_float = linear.weight.detach().float()
    h = stats.h.to(w.device, torch.float32)
    if stats.drift is not None:  # asymmetric calibration: quantize the weight that best reproduces the float outputs
        w = float_output_target(w, h, stats.drift.to(w.device, torch.float32), float_target_ridge(stats, config))
    bias = None if linear.bias is None else linear.bias.detach().clone()
    dg: DualGrainedWeight | None = None
    if config.weight == "dual":
        g = config.group_size
        rtn = rtn_group_scales(w, g)
        if config.search:
            s1, gs = search_channel_scale(w, h, _group_scales(w, h, g, config), g, config.s1_grid,
                                          config.s2_range, fallback=rtn)
        else:
            s1, gs = naive_channel_scale(rtn), rtn
        dg = to_dual_grained(w, s1, gs.scale, gs.lo, g)
        if config.gptq:
            codes = _gptq(w, h, CodeGrid.dual_grained(dg), dg.u4.float(), config)
            dg = DualGrainedWeight(codes.to(torch.uint8), dg.zp, dg.s2, dg.s1, g)
            dg.validate(name)
        w_hat = dg.dequantize()
    elif config.weight == "int8":
        w_hat = int8_channel_fake_quant(w)
    else:
        gs = _group_scales(w, h, w.shape[1] if config.weight == "channel" else config.group_size, config)
        grid = CodeGrid.float_groups(gs.scale, gs.lo)
        codes = grid.round(w)
        if config.gptq:
            codes = _gptq(w, h, grid, codes, config)
        w_hat = grid.dequantize(codes)
    act_scale, first_scale = _static_scale(stats, w, w_hat, config, w_float) if config.act == "static" else (None, None)
    if dg is not None:
        module: nn.Module = QuantLinear.from_weight(dg, bias, config.act, act_scale, first_scale)
    else:
        module = FakeQuantLinear(w_hat.to(linear.weight.dtype), bias, config.act, act_scale)
    ref = output_error(w, torch.zeros_like(w), h).sum().clamp(min=1e-30)
    rel = float(output_error(w, w_hat, h).sum() / ref)
    if act_scale is None:
        return module, LayerReport(name, rel, None)
    ratio = float(act_scale) * INT8_MAX / float(stats.absmax.max().clamp(min=1e-30))
    if first_scale is None:
        return module, LayerReport(name, rel, float(act_scale), ratio)
    return module, LayerReport(name, rel, float(act_scale), ratio, float(first_scale))
