"""Per-input-channel smoothing scales and their exact folding into the model.

A scale vector ``k`` over the input channels of some Linears is applied as ``x / k`` on the activation (folded
into the producer: a norm's weight and bias, or a Linear's output rows) and ``W * k`` on the consumers' columns,
so the float model computes the same function while activation outliers move into the weights.
"""

from __future__ import annotations

import torch
from torch import nn

from dgq.models.adapters import SmoothPair


def percentile_scales(absmax: torch.Tensor, top_percent: float) -> torch.Tensor:
    """DGQ percentile clipping smoothing (Eq. 7): ``k_j = max(z_j / P, 1)``, ``P`` the top-``top_percent``% value.

    Only the few channels above ``P`` are scaled, by exactly what brings their maximum down to ``P``.
    """
    z = absmax.float()
    p = torch.quantile(z, 1.0 - top_percent / 100.0).clamp(min=1e-8)
    return (z / p).clamp(min=1.0)


def column_absmax(weights: list[torch.Tensor]) -> torch.Tensor:
    """``max|W_j|`` per input channel over all consumers."""
    return torch.stack([w.detach().abs().amax(0).float() for w in weights]).amax(0)


def smoothquant_scales(absmax: torch.Tensor, wmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant: ``s_j = max|X_j|^α / max|W_j|^(1-α)``, balancing activation and weight ranges per channel."""
    x = absmax.float().clamp(min=1e-5)
    return (x.pow(alpha) / wmax.float().clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)


def reduce_for_heads(absmax: torch.Tensor, heads: tuple[int, int, int] | None) -> torch.Tensor:
    """Statistic over output-projection channels → one value per value-projection channel (max over the heads
    that share a key/value head), so the scale can be folded into the value projection."""
    if heads is None:
        return absmax
    n_heads, n_kv, head_dim = heads
    return absmax.reshape(n_kv, n_heads // n_kv, head_dim).amax(1).reshape(-1)


def expand_for_heads(k: torch.Tensor, heads: tuple[int, int, int] | None) -> torch.Tensor:
    """Inverse of :func:`reduce_for_heads`: per value channel → per output-projection input channel."""
    if heads is None:
        return k
    n_heads, n_kv, head_dim = heads
    return k.reshape(n_kv, 1, head_dim).expand(n_kv, n_heads // n_kv, head_dim).reshape(-1)


@torch.no_grad()
def fold_scales(producer: nn.Module, consumers: list[nn.Linear], k: torch.Tensor, pair: SmoothPair) -> None:
    """Divide the activation by ``k`` (per producer output channel) and multiply the consumers' columns by it.

    ``k`` is given per producer channel; for a GQA value → output pair it is expanded over the shared heads.
    A norm that scales by ``offset + w`` (Gemma) keeps ``(w + offset) / k - offset`` in float32 whatever the
    model's dtype: for large ``k`` that value is close to ``-offset``, and bf16/fp16 would lose most of the small
    difference ``offset + w`` that the norm multiplies by (such norms compute in float32 anyway).
    """
    k_out = k.to(producer.weight.device, torch.float32)
    if isinstance(producer, nn.Linear):
        producer.weight.copy_(producer.weight.float().div(k_out[:, None]))
    elif pair.norm_offset:  # a norm x_hat * (offset + w): see below for why its weight becomes float32
        producer.weight.data = (producer.weight.float() + pair.norm_offset) / k_out - pair.norm_offset
    else:  # a norm: x_hat * w + b
        producer.weight.copy_(producer.weight.float() / k_out)
    if getattr(producer, "bias", None) is not None:
        producer.bias.copy_(producer.bias.float() / k_out)
    k_in = expand_for_heads(k_out, pair.heads)
    for lin in consumers:
        lin.weight.copy_(lin.weight.float() * k_in.to(lin.weight.device)[None, :])
