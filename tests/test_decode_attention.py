"""The split-KV decode attention (:mod:`dgq.kernels.decode_attention`) against plain softmax attention, in Triton's
CPU interpreter (a GPU run sets ``TRITON_INTERPRET=0``): grouped and plain heads, masks with holes and a masked
tail, caches that are not a multiple of the block or of the chunk, and the transformers attention function that
routes one-token steps to it."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any triton import

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the kernels cannot be tested")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from dgq.kernels.decode_attention import BLOCK_N, _widen, decode_attention, num_splits  # noqa: E402
from dgq.kv_cache import quantize_rows  # noqa: E402
from test_compile import needs_cxx  # noqa: E402

DEVICE = "cuda" if os.environ["TRITON_INTERPRET"] == "0" else "cpu"


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
              ) -> torch.Tensor:
    """fp32 softmax attention with repeated KV heads; ``[B, 1, Hq, D]``."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.float().repeat_interleave(groups, 1), v.float().repeat_interleave(groups, 1)
    s = (q.float() @ k.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2)


@pytest.mark.parametrize("batch, q_heads, kv_heads, kv_len, dim", [
    (1, 4, 4, 200, 64),     # plain heads, cache not a multiple of the block
    (2, 8, 2, 130, 64),     # grouped query heads, batch 2
    (1, 16, 1, 64, 128),    # 16 query heads on one KV head, one block
])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_softmax_attention(batch, q_heads, kv_heads, kv_len, dim, masked):
    gen = torch.Generator().manual_seed(batch * 1000 + kv_len)
    q = torch.randn(batch, q_heads, 1, dim, generator=gen).half().to(DEVICE)
    k = torch.randn(batch, kv_heads, kv_len, dim, generator=gen).half().to(DEVICE)
    v = torch.randn(batch, kv_heads, kv_len, dim, generator=gen).half().to(DEVICE)
    mask = None
    if masked:  # a static cache filled up to a different length per row, with a hole in the middle
        filled = torch.tensor([kv_len - 37, kv_len // 3][:batch])
        mask = (torch.arange(kv_len)[None, :] < filled[:, None])
        mask[:, 5:9] = False
        mask = mask[:, None, None, :].to(DEVICE)
    got = decode_attention(q, k, v, mask, dim ** -0.5)
    assert got.shape == (batch, 1, q_heads, dim) and got.dtype == torch.float16
    torch.testing.assert_close(got.float(), reference(q, k, v, mask, dim ** -0.5), atol=2e-3, rtol=2e-3)


def test_a_chunk_with_nothing_to_attend_to_weighs_nothing():
    """The mask ends before the last chunks begin: their log-sum-exp is -inf and the merge must ignore them."""
    kv_len = 8 * BLOCK_N
    assert num_splits(1, kv_len, torch.device(DEVICE)) >= 2
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, n, 64, generator=gen).half().to(DEVICE) for n in (1, kv_len, kv_len))
    mask = (torch.arange(kv_len) < 10)[None, None, None, :].to(DEVICE)
    got = decode_attention(q, k, v, mask, 0.125)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), reference(q, k, v, mask, 0.125), atol=2e-3, rtol=2e-3)


def test_splits_cover_the_sms_before_chunks_shrink():
    """128-position chunks (on the CPU interpreter the "GPU" has 8 SMs), halved only while the programs would not
    cover the SMs once, never below one step of the kernel."""
    cpu = torch.device("cpu")
    assert num_splits(4, 512, cpu) == 4  # 4 x 4 chunks of 128 cover 8 SMs
    assert num_splits(1, 512, cpu) == 8  # 4 chunks of 128 would not: chunks of 64
    assert num_splits(1, 100, cpu) == 2  # not below one 64-position step


@pytest.mark.parametrize("config", [{"waves": 2, "min_chunk": 64, "block_n": 64, "v_early": False},
                                    {"waves": 16, "min_chunk": 128, "block_n": 32, "v_early": True}])
def test_the_probe_variants_equal_the_reference(config):
    """The variants benchmarks/decode_attention_probe.py times (V after or with K, other chunks and steps) compute
    the same attention, over a masked cache of several chunks with grouped-query heads."""
    gen = torch.Generator().manual_seed(4)
    kv_len = 6 * BLOCK_N
    q, k, v = (torch.randn(2, 4, n, 64, generator=gen).half().to(DEVICE) for n in (1, kv_len, kv_len))
    k, v = k[:, :2], v[:, :2]
    mask = (torch.arange(kv_len) < kv_len - 40)[None, None, None, :].expand(2, 1, 1, kv_len).to(DEVICE)
    got = decode_attention(q, k, v, mask, 0.125, config)
    torch.testing.assert_close(got.float(), reference(q, k, v, mask, 0.125), atol=2e-3, rtol=2e-3)


CONVERSIONS = [0, 1] + [2] * (DEVICE == "cuda")  # 2 is PTX, which the interpreter cannot run (it runs 1 instead)


@triton.jit
def _widen_all(x_ptr, out_ptr, I8_CVT: tl.constexpr):
    offs = tl.arange(0, 256)
    tl.store(out_ptr + offs, _widen(tl.load(x_ptr + offs), I8_CVT))


@pytest.mark.parametrize("i8_cvt", CONVERSIONS)
def test_every_int8_code_widens_exactly(i8_cvt):
    """Each way the kernel widens int8 codes to fp16 gives every one of the 256 codes exactly."""
    codes = torch.arange(-128, 128, dtype=torch.int8, device=DEVICE)
    out = torch.empty(256, dtype=torch.float16, device=DEVICE)
    _widen_all[(1,)](codes, out, I8_CVT=i8_cvt)
    assert torch.equal(out, codes.half())


@pytest.mark.parametrize("v_early,i8_cvt", [(True, c) for c in CONVERSIONS] + [(False, 1)])
def test_an_int8_cache_attends_like_its_dequantized_values(v_early, i8_cvt):
    """int8 K and V with per-position scales (half the bytes of an fp16 cache) give the attention of the values they
    stand for, over a masked cache of several chunks with grouped-query heads; refused half given."""
    gen = torch.Generator().manual_seed(5)
    kv_len = 5 * BLOCK_N + 7
    q = torch.randn(2, 4, 1, 64, generator=gen).half().to(DEVICE)
    k, v = (torch.randn(2, 2, kv_len, 64, generator=gen).half() * 3 for _ in range(2))
    (k8, ks), (v8, vs) = quantize_rows(k), quantize_rows(v)
    mask = (torch.arange(kv_len) < kv_len - 30)[None, None, None, :].expand(2, 1, 1, kv_len).to(DEVICE)
    got = decode_attention(q, k8.to(DEVICE), v8.to(DEVICE), mask, 0.125, {"v_early": v_early, "i8_cvt": i8_cvt},
                           ks.to(DEVICE), vs.to(DEVICE))
    assert got.dtype == torch.float16
    want = reference(q, (k8.float() * ks[..., None]).to(DEVICE), (v8.float() * vs[..., None]).to(DEVICE), mask, 0.125)
    torch.testing.assert_close(got.float(), want, atol=3e-3, rtol=3e-3)
    with pytest.raises(ValueError, match="an int8 K and V need both"):
        decode_attention(q, k8.to(DEVICE), v8.to(DEVICE), mask, 0.125)


@pytest.mark.parametrize("shape, why", [((1, 4, 2, 64), "one query token"), ((1, 3, 1, 64), "multiple")])
def test_unsupported_shapes_are_refused(shape, why):
    q = torch.zeros(shape, dtype=torch.float16)
    k = torch.zeros(1, 2, 16, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="decode attention takes"):
        decode_attention(q, k, k, None, 0.125)


def tiny_llama(heads: int = 4, kv_heads: int = 2, hidden: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=hidden, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).to(DEVICE, torch.float16).eval()


def test_a_static_cache_generation_gives_sdpa_s_tokens_and_logits(monkeypatch):
    """A tiny Llama generating with a static cache: the same tokens, and logits to fp16 rounding, with dgq's decode
    attention as with SDPA (prefill is SDPA in both); the kernel runs once per layer and decode step."""
    import dgq.kernels.decode_attention as kernel
    from dgq.attention import use_decode_attention

    model = tiny_llama()
    calls = []
    run = kernel.decode_attention
    monkeypatch.setattr(kernel, "decode_attention", lambda *a, **k: calls.append(1) or run(*a, **k))
    prompt = torch.randint(0, 97, (2, 9), device=DEVICE)
    kwargs = dict(max_new_tokens=4, do_sample=False, cache_implementation="static", return_dict_in_generate=True,
                  output_logits=True, pad_token_id=0, disable_compile=True)
    want = model.generate(prompt, **kwargs)
    got = use_decode_attention(model).generate(prompt, **kwargs)
    assert model.config._attn_implementation == "dgq_decode"
    assert torch.equal(got.sequences, want.sequences)
    for g, w in zip(got.logits[1:], want.logits[1:]):  # the first logits come from the (SDPA) prefill
        torch.testing.assert_close(g.float(), w.float(), atol=2e-2, rtol=2e-2)
    assert len(calls) == 3 * 2  # decode steps after the prefill x layers


def test_a_model_the_kernel_cannot_serve_is_refused_when_switched():
    from dgq.attention import use_decode_attention
    from dgq.config import ConfigError

    with pytest.raises(ConfigError, match="does not serve 4 query heads on 4 KV heads of dimension 24"):
        use_decode_attention(tiny_llama(heads=4, kv_heads=4, hidden=96))


@pytest.mark.parametrize("masked", [False, True])
def test_operator_passes_opcheck(masked):
    """Schema and fake implementation of ``dgq::decode_attention`` agree with what it does."""
    import dgq.kernels.ops  # noqa: F401  (registers the operators)

    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 4, n, 64, generator=gen).half().to(DEVICE) for n in (1, 100, 100))
    mask = (torch.arange(100) < 70)[None, None, None, :].to(DEVICE) if masked else None
    torch.library.opcheck(torch.ops.dgq.decode_attention, (q, k, v, mask, 0.125, None, None),
                          test_utils=("test_schema", "test_faketensor"))
    (k8, ks), (v8, vs) = quantize_rows(k), quantize_rows(v)
    torch.library.opcheck(torch.ops.dgq.decode_attention, (q, k8, v8, mask, 0.125, ks, vs),
                          test_utils=("test_schema", "test_faketensor"))


@needs_cxx
def test_a_decode_step_compiles_whole_through_the_operator():
    """A static-cache decode step with dgq's attention compiled with ``fullgraph=True`` (the operator, no graph
    break) gives the eager step's logits."""
    from transformers import StaticCache

    from dgq.attention import use_decode_attention

    model = use_decode_attention(tiny_llama())
    prompt = torch.randint(0, 97, (1, 9), device=DEVICE)
    logits = []
    for forward in (model, torch.compile(model, fullgraph=True)):
        cache = StaticCache(config=model.config, max_cache_len=16)
        with torch.no_grad():
            model(prompt, past_key_values=cache, cache_position=torch.arange(9, device=DEVICE))
            out = forward(prompt[:, -1:], past_key_values=cache, cache_position=torch.tensor([9], device=DEVICE))
        logits.append(out.logits.float())
    torch.testing.assert_close(logits[1], logits[0], atol=2e-2, rtol=2e-2)
