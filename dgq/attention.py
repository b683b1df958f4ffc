"""One-token decode steps through dgq's split-KV attention kernel, as a transformers attention implementation.

:func:`use_decode_attention` registers ``"dgq_decode"`` with transformers (an attention function and, for its mask,
transformers' own boolean SDPA mask) and switches a model to it.  Steps of one new token per sequence, the decode
steps of a static-cache generation, run :func:`dgq.kernels.decode_attention.decode_attention` (through the
``dgq::decode_attention`` operator, so a compiled step captures it); every other call (a prompt's prefill) is
transformers' SDPA attention, the path the model would take anyway.  With an int8 cache (:mod:`dgq.kv_cache`) the
keys and values arrive as ``(codes, scales)`` pairs: the kernel reads them as they are, SDPA gets them dequantized.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dgq.config import ConfigError
from dgq.kernels.decode_attention import BLOCK_G, supports

NAME = "dgq_decode"


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: ``query [B, Hq, Lq, D]``, ``key``/``value [B, Hkv, L, D]``;
    returns ``([B, Lq, Hq, D], None)``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    int8 = isinstance(key, tuple)  # an int8 cache's (codes, scales) pairs (dgq.kv_cache)
    if query.shape[2] != 1 or dropout or kwargs.get("softcap") is not None:  # SDPA refuses a softcap as it should
        if int8:
            from dgq.kv_cache import dequantize_rows

            key, value = dequantize_rows(*key, query.dtype), dequantize_rows(*value, query.dtype)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    from dgq.kernels.ops import decode_attention

    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if int8:
        return decode_attention(query, key[0], value[0], attention_mask, scale, key[1], value[1]), None
    return decode_attention(query, key, value, attention_mask, scale), None


def use_decode_attention(model: nn.Module) -> nn.Module:
    """Switch ``model`` (a transformers model) to the ``"dgq_decode"`` attention; returns it.  A model whose heads
    the kernel cannot serve is refused here, with its head counts, rather than at its first decode step."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = model.config.get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if not supports(heads, kv_heads, dim):
        raise ConfigError(f"dgq's decode attention does not serve {heads} query heads on {kv_heads} KV heads of "
                          f"dimension {dim} (it needs at most {BLOCK_G} query heads per KV head and a power-of-two "
                          f"head dimension of 16 to 256)")

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    return model
