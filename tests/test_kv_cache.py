"""The int8 KV cache (:mod:`dgq.kv_cache`): its rounding, and a generation through it against the same rounding
applied to an ordinary cache inside SDPA.  The kernel runs in Triton's interpreter on the CPU."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any triton import; a GPU run may set it to 0

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed: the kernels cannot be tested")

from dgq.kv_cache import Int8StaticCache, dequantize_rows, quantize_rows  # noqa: E402
from test_decode_attention import DEVICE, tiny_llama  # noqa: E402


def test_rows_round_to_within_half_a_step():
    x = torch.randn(2, 3, 50, 64) * torch.logspace(-3, 2, 50)[None, None, :, None]
    x[0, 0, 0] = 0  # an all-zero vector keeps a positive scale and decodes to zeros
    codes, scale = quantize_rows(x)
    assert codes.dtype == torch.int8 and scale.shape == x.shape[:3] and codes.abs().max() <= 127
    assert ((dequantize_rows(codes, scale, torch.float32) - x).abs() <= scale[..., None] / 2 + 1e-12).all()
    assert not dequantize_rows(codes, scale, torch.float32)[0, 0, 0].any()


@pytest.mark.parametrize("dtype,new_len", [(torch.float16, 1), (torch.bfloat16, 5)])
def test_the_write_kernel_equals_rounding_then_copying(dtype, new_len):
    """:func:`dgq.kernels.kv_write.write_int8` (one launch for keys and values, what a CUDA cache runs) stores the
    codes and scales of :func:`quantize_rows`, bit for bit, at the cache's current length, and nothing elsewhere;
    the new states arrive as the attention's transposed views, not contiguous."""
    from dgq.kernels.kv_write import write_int8

    gen = torch.Generator().manual_seed(3)
    batch, heads, max_len, dim, start = 2, 3, 16, 64, 7
    k, v = ((torch.randn(batch, new_len, heads, dim, generator=gen) * 4).to(dtype).to(DEVICE).transpose(1, 2)
            for _ in range(2))
    k[0, 1, 0] = 0  # an all-zero row keeps a positive scale
    keys, values = (torch.zeros(batch, heads, max_len, dim, dtype=torch.int8, device=DEVICE) for _ in range(2))
    key_scales, value_scales = (torch.zeros(batch, heads, max_len, device=DEVICE) for _ in range(2))
    write_int8(k, v, keys, values, key_scales, value_scales, torch.tensor(start, device=DEVICE))
    for codes, scales, states in ((keys, key_scales, k), (values, value_scales, v)):
        # the reference on the CPU: CUDA's torch divides by a Python number as a product with its reciprocal, which
        # can differ from the division by one ulp (seen on the H100 in 4 of 60 scales); the kernel divides exactly
        want_codes, want_scales = quantize_rows(states.cpu())
        codes, scales = codes.cpu(), scales.cpu()
        assert torch.equal(codes[:, :, start:start + new_len], want_codes)
        assert torch.equal(scales[:, :, start:start + new_len], want_scales)
        assert not codes[:, :, :start].any() and not codes[:, :, start + new_len:].any()
        assert not scales[:, :, :start].any() and not scales[:, :, start + new_len:].any()


def _fake_int8_attention(module, query, key, value, attention_mask, **kwargs):  # noqa: ANN001, ANN003, ANN202
    """SDPA over keys and values rounded as the int8 cache rounds them: what that cache must equal."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    key, value = (dequantize_rows(*quantize_rows(t), t.dtype) for t in (key, value))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def test_a_generation_through_the_int8_cache_equals_sdpa_on_rounded_values(monkeypatch):
    """A tiny Llama (grouped-query heads) generating through :class:`Int8StaticCache` with dgq's attention (int8
    kernel for the steps, SDPA on dequantized values for the prefill) gives the tokens, and the logits to fp16
    rounding, of an ordinary static cache whose attention rounds keys and values the same way; the int8 kernel runs
    once per layer and step."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    import dgq.kernels.decode_attention as kernel
    from dgq.attention import use_decode_attention

    model = tiny_llama(heads=4, kv_heads=2)
    int8_calls = []
    run = kernel.decode_attention
    monkeypatch.setattr(kernel, "decode_attention",
                        lambda *a, **k: int8_calls.append(a[1].dtype == torch.int8) or run(*a, **k))
    prompt = torch.randint(0, 97, (2, 9), device=DEVICE)
    kwargs = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True, pad_token_id=0,
                  disable_compile=True)
    AttentionInterface.register("test_fake_int8", _fake_int8_attention)
    AttentionMaskInterface.register("test_fake_int8", sdpa_mask)
    model.set_attn_implementation("test_fake_int8")
    want = model.generate(prompt, cache_implementation="static", **kwargs)
    cache = Int8StaticCache(config=model.config, max_cache_len=16)
    got = use_decode_attention(model).generate(prompt, past_key_values=cache, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    for g, w in zip(got.logits, want.logits):
        torch.testing.assert_close(g.float(), w.float(), atol=2e-2, rtol=2e-2)
    assert int8_calls == [True] * (3 * 2)  # decode steps after the prefill x layers
    assert cache.layers[0].keys.dtype == torch.int8 and cache.layers[0].key_scales[:, :, :12].gt(0).all()


def test_a_model_with_sliding_window_layers_is_refused_in_one_line():
    """Sliding-window layers keep a rolling window the int8 cache does not implement: a user error naming the layer
    kinds and the way out, before anything is allocated."""
    from transformers import MistralConfig

    from dgq.config import ConfigError

    config = MistralConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=16)
    with pytest.raises(ConfigError, match="full-attention layers only; this model has .*Sliding.*fp16 cache"):
        Int8StaticCache(config=config, max_cache_len=32)
