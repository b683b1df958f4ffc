"""dgq's kernels as PyTorch operators (:mod:`dgq.kernels.ops`) and quantized models under ``torch.compile``.

On the CPU the operators run their Triton kernels in the interpreter; the compiled graphs use inductor's CPU
backend.  ``tests/test_kernels_cuda.py`` compiles a model with CUDA graphs on a GPU.
"""

from __future__ import annotations

import os
import shutil

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any triton import; a GPU run may set it to 0

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the kernels cannot be tested")

from dgq.api import quantize  # noqa: E402
from dgq.config import preset  # noqa: E402
from dgq.formats import int_matmul, quantize_activations, row_absmax_bits  # noqa: E402
from dgq.fuse import fuse_projections  # noqa: E402
from dgq.kernels import ops  # noqa: E402
from dgq.nn import QuantLinear  # noqa: E402
from helpers import make_model  # noqa: E402
from test_kernels import fp32_epilogue, random_weight  # noqa: E402

# inductor's CPU backend compiles C++; without a compiler these tests cannot run (the GPU suite compiles with Triton)
needs_cxx = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None,
                               reason="torch.compile's CPU backend needs a C++ compiler")


def _layer(n: int, k: int, g: int, act: str = "dynamic", bias: bool = False, seed: int = 0) -> QuantLinear:
    gen = torch.Generator().manual_seed(seed)
    b = torch.randn(n, generator=gen) if bias else None
    return QuantLinear.from_weight(random_weight(n, k, g, gen), b, act, torch.tensor(0.02) if act == "static" else None)


@pytest.mark.parametrize("m", [1, 3])  # the GEMV and the tensor-core kernel
def test_gemm_operator_passes_opcheck(m: int) -> None:
    """Schema, fake implementation and autograd registration agree with what the operator does."""
    layer = _layer(128, 256, 64, bias=True)
    x_s8, s_x = quantize_activations(torch.randn(m, 256))
    args = (x_s8, s_x, layer.codes, layer.s2t, layer.zpt, layer.s1, layer.split_scratch, 64, layer.bias,
            torch.float32)
    torch.library.opcheck(torch.ops.dgq.a8w4_mm, args, test_utils=("test_schema", "test_faketensor"))
    out = torch.ops.dgq.a8w4_mm(*args)
    assert torch.equal(out, fp32_epilogue(int_matmul(x_s8, layer.dual_grained().int8_weight()), s_x, layer.s1,
                                          layer.bias))
    assert not layer.split_scratch.any()


@pytest.mark.parametrize("m,act", [(1, "dynamic"), (3, "dynamic"), (1, "static"), (3, "static")])
@pytest.mark.parametrize("swiglu", [False, True])
def test_linear_operator_passes_opcheck(m: int, act: str, swiglu: bool) -> None:
    """The whole-layer operator (what a compiled CUDA graph calls: act-quant and GEMM, or the GEMV quantizing
    inside at one token; with ``swiglu`` from a fused gate/up output) agrees with its fake implementation and
    equals the exact reference."""
    layer = _layer(128, 256, 64, act=act, bias=True, seed=2)
    layer.swiglu_input = swiglu
    x = torch.randn(m, 512 if swiglu else 256)
    static = layer.act_scale if act == "static" else None
    args = (x, layer.codes, layer.s2t, layer.zpt, layer.s1, layer.split_scratch, 64, static, layer.bias,
            torch.float32, swiglu)
    torch.library.opcheck(torch.ops.dgq.a8w4_linear, args, test_utils=("test_schema", "test_faketensor"))
    assert torch.equal(torch.ops.dgq.a8w4_linear(*args), layer.forward_reference(x))
    assert not layer.split_scratch.any()


def test_row_absmax_is_refused_where_no_gemv_takes_it() -> None:
    """The row absmax a compiled graph may hand the layer operator is for the Hopper TMA GEMV alone; elsewhere (here
    the CPU, which runs the reference kernels) the operator says so instead of ignoring it."""
    layer = _layer(128, 256, 64)
    x = torch.randn(1, 256)
    with pytest.raises(ValueError, match="takes_row_absmax"):
        torch.ops.dgq.a8w4_linear(x, layer.codes, layer.s2t, layer.zpt, layer.s1, layer.split_scratch, 64, None,
                                  None, torch.float32, False, row_absmax_bits(x))


def test_quantize_operators_pass_opcheck() -> None:
    x = torch.randn(5, 192)
    torch.library.opcheck(torch.ops.dgq.quantize_activations, (x,), test_utils=("test_schema", "test_faketensor"))
    q, s = torch.ops.dgq.quantize_activations(x)
    want_q, want_s = quantize_activations(x)
    assert torch.equal(q, want_q) and torch.equal(s, want_s)


@needs_cxx
@pytest.mark.parametrize("act,in_graph", [("dynamic", True), ("dynamic", False), ("static", True),
                                          ("static", False)])
def test_kernel_path_compiles_without_graph_break(act: str, in_graph: bool, monkeypatch) -> None:
    """The layer's kernel path traced whole (``fullgraph=True``), with the activation quantization in the graph or
    as dgq's operator, equals the exact reference."""
    monkeypatch.setitem(ops.ACT_QUANT_IN_GRAPH, "cpu", in_graph)
    torch._dynamo.reset()
    layer = _layer(128, 256, 64, act=act, bias=True, seed=1)
    x = torch.randn(3, 256)
    compiled = torch.compile(layer.forward_kernels, fullgraph=True)
    assert torch.equal(compiled(x), layer.forward_reference(x))


@needs_cxx
def test_quantized_model_compiles_whole() -> None:
    """A quantized model with fused projections compiles with ``fullgraph=True`` (no graph break anywhere: not in
    the fused parents' hooks, not in the reference's int8 cache) and gives the eager logits."""
    torch._dynamo.reset()
    model = make_model("llama")
    ids = torch.randint(0, 96, (2, 32), generator=torch.Generator().manual_seed(0))
    quantize(model, ids, preset("dgq", group_size=64), device="cpu", progress=False)
    fuse_projections(model)
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model, fullgraph=True)(ids).logits
    # inductor reorders float reductions (norms, softmax), which may move an activation code by one step
    assert torch.allclose(compiled, eager, rtol=1e-3, atol=1e-3)


def _fresh_fused_model(layers: int, seed: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A tiny quantized, fused Llama, a fresh compiler (caches and graph counters reset), an 8-token prompt and a
    next token."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = make_model("llama", layers=layers)
    gen = torch.Generator().manual_seed(seed)
    quantize(model, torch.randint(0, 96, (2, 32), generator=gen), preset("dgq", group_size=64), device="cpu",
             progress=False)
    fuse_projections(model)
    return model, torch.randint(0, 96, (1, 8), generator=gen), torch.randint(0, 96, (1, 1), generator=gen)


def _graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@needs_cxx
def test_block_scope_compiles_one_graph_for_all_blocks() -> None:
    """``bench.compiled`` with the ``"blocks"`` scope compiles each kind of call (prefill, a prefill into the static
    KV cache, a one-token decode step) once for the first block and reuses it for the others: a count that does not
    grow with the layers (``block.compile()`` specialized every block on its cache layer index).  Each block writes
    its own cache layer, and the logits and the cache equal eager's to float rounding (inductor reorders the norms'
    and softmax's reductions, which may move an activation code by one step)."""
    from transformers import StaticCache

    from dgq import bench

    model, ids, tok = _fresh_fused_model(layers=3, seed=0)
    mask = torch.ones(8, 8, dtype=torch.bool).tril_()[None, None]

    def run(forward: torch.nn.Module) -> tuple[list[torch.Tensor], StaticCache, list[int]]:
        cache = StaticCache(config=model.config, max_cache_len=16)
        graphs, logits = [], []
        for call in (lambda: forward(ids, attention_mask=mask, use_cache=False),
                     lambda: forward(ids, past_key_values=cache, cache_position=torch.arange(8)),
                     lambda: forward(tok, past_key_values=cache, cache_position=torch.tensor([8]))):
            before = _graphs()
            logits.append(call().logits)
            graphs.append(_graphs() - before)
        return logits, cache, graphs

    with torch.inference_mode():
        eager, eager_cache, _ = run(model)
        logits, cache, graphs = run(bench.compiled(model, dynamic=False))
    assert graphs == [1, 1, 1]
    for got, want in zip(logits, eager):
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-3)
    for got, want in zip(cache.layers, eager_cache.layers):
        assert torch.allclose(got.keys, want.keys, rtol=1e-3, atol=1e-3)
        assert torch.allclose(got.values, want.values, rtol=1e-3, atol=1e-3)


def test_layer_cache_needs_the_layer() -> None:
    """A cache that creates its layers lazily has none to hand a compiled block: a clear error, not an IndexError."""
    from transformers import DynamicCache

    from dgq.bench import LayerCache

    with pytest.raises(ValueError, match="block 0 needs its own"):
        LayerCache(DynamicCache(), 0)


@needs_cxx
def test_int8_kv_cache_decode_step_compiles() -> None:
    """The blocks compiled (``bench.compiled``) with dgq's attention over an int8 KV cache (:mod:`dgq.kv_cache`): a
    prefill into the cache and a one-token step trace with no graph break, once each for all blocks, and give the
    eager logits to float rounding."""
    from dgq import bench
    from dgq.attention import use_decode_attention
    from dgq.kv_cache import Int8StaticCache

    model, ids, tok = _fresh_fused_model(layers=2, seed=1)
    use_decode_attention(model)

    def run(forward: torch.nn.Module) -> tuple[list[torch.Tensor], list[int]]:
        cache = Int8StaticCache(config=model.config, max_cache_len=16)
        graphs, logits = [], []
        for call in (lambda: forward(ids, past_key_values=cache, cache_position=torch.arange(8)),
                     lambda: forward(tok, past_key_values=cache, cache_position=torch.tensor([8]))):
            before = _graphs()
            logits.append(call().logits)
            graphs.append(_graphs() - before)
        return logits, graphs

    with torch.inference_mode():
        eager, _ = run(model)
        logits, graphs = run(bench.compiled(model, dynamic=False))
    assert graphs == [1, 1]
    for got, want in zip(logits, eager):
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-3)
