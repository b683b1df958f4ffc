"""One small adapter per model family.

An adapter only *names* things: the list of decoder blocks and, inside a block, each activation that feeds
linears (its producer, a norm or a linear, and its consumers).  Smoothing folds scales across exactly these
pairs and the calibration driver quantizes exactly these consumers; nothing else in dgq knows module names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from dgq.errors import DGQError


class UnsupportedModelError(DGQError, ValueError):
    """A model architecture dgq has no adapter for."""


@dataclass(frozen=True)
class SmoothPair:
    """An activation inside a block: ``producer`` (module path) computes it, ``consumers`` (Linears) read it.

    ``norm_offset`` is 1 for norms that scale by ``1 + weight`` (Gemma).  ``heads`` is set for a value → output
    projection pair under grouped-query attention: ``(n_heads, n_kv_heads, head_dim)``, since one value channel
    feeds ``n_heads // n_kv_heads`` output-projection channels, which must then share one smoothing factor.
    ``foldable`` is False where nothing exact can absorb a scale (the pair is still quantized, not smoothed).
    """

    producer: str
    consumers: tuple[str, ...]
    norm_offset: float = 0.0
    heads: tuple[int, int, int] | None = None
    foldable: bool = True


@dataclass(frozen=True)
class Adapter:
    """``final_norm`` (module path from the model) produces the LM head's input, with ``norm_offset`` as in
    :class:`SmoothPair`; ``head_input_ok`` says whether the model feeds that output to the head unchanged (OPT's
    ``project_out`` does not)."""

    family: str
    blocks: Callable[[nn.Module], nn.ModuleList]
    pairs: tuple[SmoothPair, ...]
    final_norm: str = ""
    norm_offset: float = 0.0
    head_input_ok: Callable[[nn.Module], bool] = lambda model: True

    def linear_names(self) -> list[str]:
        return [c for p in self.pairs for c in p.consumers]


def _heads(config) -> tuple[int, int, int]:  # noqa: ANN001 - any HF config
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return n_heads, n_kv, head_dim


def _llama_like(model: nn.Module, norm_offset: float, pre_mlp_norm: str) -> Adapter:
    config = model.config
    pairs = (
        SmoothPair("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), norm_offset),
        SmoothPair("self_attn.v_proj", ("self_attn.o_proj",), heads=_heads(config)),
        SmoothPair(pre_mlp_norm, ("mlp.gate_proj", "mlp.up_proj"), norm_offset),
        SmoothPair("mlp.up_proj", ("mlp.down_proj",)),
    )
    return Adapter(config.model_type, lambda m: m.model.layers, pairs, "model.norm", norm_offset)


def _opt(model: nn.Module) -> Adapter:
    config = model.config
    if not config.do_layer_norm_before:
        raise UnsupportedModelError("OPT models with post-layer-norm (do_layer_norm_before=False) are not supported")
    pairs = (
        SmoothPair("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        SmoothPair("self_attn.v_proj", ("self_attn.out_proj",), heads=_heads(config)),
        SmoothPair("final_layer_norm", ("fc1",)),
        # relu(z / k) = relu(z) / k for k > 0, so fc1's rows can absorb fc2's scales; other activations cannot.
        SmoothPair("fc1", ("fc2",), foldable=config.activation_function == "relu"),
    )
    return Adapter("opt", lambda m: m.model.decoder.layers, pairs, "model.decoder.final_layer_norm",
                   head_input_ok=lambda m: m.model.decoder.project_out is None)


_FAMILIES: dict[str, Callable[[nn.Module], Adapter]] = {
    "llama": lambda m: _llama_like(m, 0.0, "post_attention_layernorm"),
    "mistral": lambda m: _llama_like(m, 0.0, "post_attention_layernorm"),
    "qwen2": lambda m: _llama_like(m, 0.0, "post_attention_layernorm"),
    "gemma3_text": lambda m: _llama_like(m, 1.0, "pre_feedforward_layernorm"),
    "opt": _opt,
}
SUPPORTED = tuple(sorted(_FAMILIES))


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of ``model``'s family, or :class:`UnsupportedModelError` listing the supported ones."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _FAMILIES:
        raise UnsupportedModelError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(SUPPORTED)}")
    return _FAMILIES[model_type](model)
