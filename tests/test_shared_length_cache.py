"""The static KV caches whose layers share one length counter (:mod:`dgq.kv_cache`): the logits, cache contents and
lengths of caches whose layers count their own, one counter tensor advanced once per forward, and the blocks of a
compiled decode step sharing one graph (:func:`dgq.bench.compiled`).  dgq's int8 attention runs in Triton's
interpreter on the CPU."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any triton import; a GPU run may set it to 0

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed: the kernels cannot be tested")

from transformers import StaticCache  # noqa: E402

from dgq.config import ConfigError  # noqa: E402
from dgq.kv_cache import Int8StaticCache, Int8StaticLayer, SharedLength, SharedLengthStaticCache  # noqa: E402
from helpers import VOCAB, make_model  # noqa: E402
from test_compile import _graphs, needs_cxx  # noqa: E402

LAYERS, PROMPT, STEPS, MAX_LEN = 3, 7, 4, 16
# after the prefill and each step: the length the cache reports, then each of its layers
LENGTHS = [[n] * (1 + LAYERS) for n in range(PROMPT, PROMPT + STEPS + 1)]


def _model(int8: bool) -> torch.nn.Module:
    """A tiny random Llama of :data:`LAYERS` blocks (a first, a middle and a last layer); dgq's attention, which
    takes the int8 cache's codes and scales, for ``int8``."""
    from dgq.attention import use_decode_attention

    model = make_model("llama", layers=LAYERS)
    return use_decode_attention(model) if int8 else model


def _decode(forward: torch.nn.Module, cache: StaticCache) -> tuple[list[torch.Tensor], list[list[int]]]:
    """The logits of a :data:`PROMPT`-token prefill (batch 2) then :data:`STEPS` one-token steps through
    ``cache``, and after each forward the lengths the cache and each of its layers report."""
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randint(0, VOCAB, (2, PROMPT), generator=gen)]
    inputs += [torch.randint(0, VOCAB, (2, 1), generator=gen) for _ in range(STEPS)]
    logits, lengths = [], []
    with torch.no_grad():
        for ids in inputs:
            logits.append(forward(ids, past_key_values=cache).logits)
            lengths.append([int(cache.get_seq_length())] + [int(layer.get_seq_length()) for layer in cache.layers])
    return logits, lengths


def _assert_same_decoding(model, want_cache, cache, buffers: tuple[str, ...]) -> None:  # noqa: ANN001
    """``model`` decodes the same logits and lengths through ``cache`` as through ``want_cache``, and leaves every
    layer's ``buffers`` the same, bit for bit."""
    want, want_lengths = _decode(model, want_cache)
    got, lengths = _decode(model, cache)
    assert want_lengths == lengths == LENGTHS
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    for layer, want_layer in zip(cache.layers, want_cache.layers, strict=True):
        for name in buffers:
            assert torch.equal(getattr(layer, name), getattr(want_layer, name)), name


def test_the_float_cache_equals_transformers_static_cache():
    """Prefill and steps through :class:`SharedLengthStaticCache` give transformers' ``StaticCache``'s logits and
    keys and values bit for bit (every layer wrote at the length before the forward), and the same lengths."""
    model = _model(int8=False)
    _assert_same_decoding(model, StaticCache(config=model.config, max_cache_len=MAX_LEN),
                          SharedLengthStaticCache(config=model.config, max_cache_len=MAX_LEN), ("keys", "values"))


def test_the_int8_cache_equals_one_whose_layers_count_their_own_length():
    """:class:`Int8StaticCache` (one count) against the same layers each with a count of its own that it advances
    itself, as every ``StaticLayer`` does: the same codes, scales and logits bit for bit, through dgq's attention
    (SDPA on dequantized values for the prefill, the int8 kernel for the steps)."""
    model = _model(int8=True)
    want_cache = Int8StaticCache(config=model.config, max_cache_len=MAX_LEN)
    want_cache.layers = [Int8StaticLayer(MAX_LEN, SharedLength(), advances=True) for _ in range(LAYERS)]
    cache = Int8StaticCache(config=model.config, max_cache_len=MAX_LEN)
    _assert_same_decoding(model, want_cache, cache, ("keys", "values", "key_scales", "value_scales"))
    for layer in cache.layers:
        assert layer.keys.dtype == torch.int8 and layer.key_scales[:, :, :PROMPT + STEPS].gt(0).all()


@pytest.mark.parametrize("cache_class", [SharedLengthStaticCache, Int8StaticCache])
def test_the_layers_share_one_count_advanced_once_per_forward(cache_class):
    """One tensor object is every layer's length; a forward changes it once (its version counter counts in-place
    writes: transformers' ``StaticCache`` writes one count per layer), by the new tokens, in the last layer; a
    reset zeroes it once, and every layer's tensors."""
    model = _model(int8=cache_class is Int8StaticCache)
    cache = cache_class(config=model.config, max_cache_len=MAX_LEN)
    count = cache.layers[0].cumulative_length
    assert [layer.advances for layer in cache.layers] == [False] * (LAYERS - 1) + [True]
    with torch.no_grad():
        for tokens, length in ((PROMPT, PROMPT), (1, PROMPT + 1)):
            version = count._version
            model(torch.randint(0, VOCAB, (2, tokens)), past_key_values=cache)
            assert all(layer.cumulative_length is count for layer in cache.layers)
            assert count._version == version + 1 and int(count) == length
    version = count._version
    cache.reset()
    assert count._version == version + 1 and int(count) == 0 and int(cache.get_seq_length()) == 0
    assert not any(t.any() for layer in cache.layers for t in layer._state())


@needs_cxx
@pytest.mark.parametrize("int8", [False, True])
def test_compiled_blocks_share_one_graph_and_give_the_eager_logits(int8):
    """``bench.compiled`` (every block one shared compiled function): a prefill into a fresh cache (its layers
    initialized inside the compiled code) and a one-token step compile one graph each for all three blocks, the
    last, which advances the count, included; later steps compile nothing.  Lengths as eager, and the logits to
    float rounding (inductor reorders the norms' and softmax's reductions)."""
    from dgq import bench

    torch._dynamo.reset()
    model = _model(int8)
    cache_class = Int8StaticCache if int8 else SharedLengthStaticCache
    want, want_lengths = _decode(model, cache_class(config=model.config, max_cache_len=MAX_LEN))
    compiled = bench.compiled(model, dynamic=False)
    graphs: list[int] = []

    def counted(*args: object, **kwargs: object) -> object:
        before = _graphs()
        out = compiled(*args, **kwargs)
        graphs.append(_graphs() - before)
        return out

    got, lengths = _decode(counted, cache_class(config=model.config, max_cache_len=MAX_LEN))
    assert graphs == [1, 1] + [0] * (STEPS - 1)
    assert lengths == want_lengths == LENGTHS
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-3)


def test_generate_takes_the_float_cache():
    """transformers' ``generate`` given the cache as ``past_key_values`` decodes the tokens and logits it decodes
    with transformers' ``StaticCache`` given the same way."""
    model = _model(int8=False)
    prompt = torch.randint(0, VOCAB, (2, PROMPT), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=STEPS + 1, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                  output_logits=True, disable_compile=True)
    want = model.generate(prompt, past_key_values=StaticCache(config=model.config, max_cache_len=MAX_LEN), **kwargs)
    cache = SharedLengthStaticCache(config=model.config, max_cache_len=MAX_LEN)
    got = model.generate(prompt, past_key_values=cache, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    assert all(torch.equal(g, w) for g, w in zip(got.logits, want.logits, strict=True))
    assert int(cache.get_seq_length()) == PROMPT + STEPS  # the last token generated is not fed back


def test_a_model_with_sliding_window_layers_is_refused_in_one_line():
    from transformers import MistralConfig

    config = MistralConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=16)
    with pytest.raises(ConfigError, match=r"^a shared-length KV cache takes full-attention layers only; this model has "
                                          r"StaticSlidingWindowLayer \(use transformers' StaticCache\)$"):
        SharedLengthStaticCache(config=config, max_cache_len=32)


def test_a_decode_step_keeps_transformers_cache_for_sliding_window_layers():
    """:func:`dgq.kv_cache.float_static_cache`, what ``dgq bench`` decodes with: shared where the model allows it."""
    from transformers import MistralConfig

    from dgq.kv_cache import float_static_cache

    sliding = MistralConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, sliding_window=16)
    assert type(float_static_cache(sliding, 32)) is StaticCache
    assert type(float_static_cache(make_model("llama").config, 32)) is SharedLengthStaticCache


def test_layers_on_two_devices_cannot_share_a_count():
    length = SharedLength()
    assert length.on(torch.device("cpu")) is length.on(torch.device("cpu"))
    with pytest.raises(ConfigError, match="all its layers on one device: its length is on cpu, a layer is on meta"):
        length.on(torch.device("meta"))
