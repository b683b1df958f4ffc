"""The dual-grained format: overflow-free by construction, exact identities, exact integer reference."""

from unittest.mock import patch

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from dgq.formats import (
    INT8_MAX, DualGrainedWeight, FormatError, absmax_bits_dtype, amax_abs, exact_matmul, group_minmax, int_matmul,
    quantize_activations, row_absmax_bits, to_dual_grained,
)
from dgq.packing import pack_u4, unpack_u4

GROUP = 16


def _weights(kind: str, rows: int, groups: int, seed: int, magnitude: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, groups * GROUP, generator=g) * magnitude
    if kind == "outliers":
        w[torch.rand(w.shape, generator=g) < 0.01] *= 1000
    elif kind == "constant":
        w[:, :GROUP] = magnitude
    elif kind == "zeros":
        w[: rows // 2] = 0
    elif kind == "one_sided":
        w = w.abs()
    return w


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(["plain", "outliers", "constant", "zeros", "one_sided"]),
       rows=st.integers(1, 6), groups=st.integers(1, 4), seed=st.integers(0, 10_000),
       magnitude=st.sampled_from([1e-8, 1e-3, 1.0, 1e4]),
       s2_target=st.floats(1.0, 127.0), ratio=st.floats(0.3, 1.0))
def test_no_int8_overflow_for_any_weights(kind, rows, groups, seed, magnitude, s2_target, ratio):
    w = _weights(kind, rows, groups, seed, magnitude)
    scale, lo = group_minmax(w, GROUP, ratio)
    s1 = scale.amax(1) / s2_target
    dg = to_dual_grained(w, s1, scale, lo, GROUP)  # validate() raises on any violation
    w8 = dg.int8_weight().to(torch.int32)
    assert w8.abs().max() <= INT8_MAX
    assert int(dg.s2.min()) >= 1 and int(dg.u4.max()) <= 15 and int(dg.zp.max()) <= 15


def test_dequant_identity_and_zero_exact():
    w = torch.randn(8, 64)
    w[0, :GROUP] = 0.0
    scale, lo = group_minmax(w, GROUP)
    dg = to_dual_grained(w, scale.amax(1) / 8, scale, lo, GROUP)
    g = dg.group_size
    expect = dg.s1[:, None] * (dg.s2.float().repeat_interleave(g, 1)
                               * (dg.u4.float() - dg.zp.float().repeat_interleave(g, 1)))
    torch.testing.assert_close(dg.dequantize(), expect, rtol=0, atol=0)
    assert torch.all(dg.dequantize()[0, :GROUP] == 0), "zero must be exactly representable"


def test_rounding_error_is_half_a_step_when_s2_is_exact():
    w = torch.randn(8, GROUP)  # one group per row, so s1 = scale / 8 makes s2 = 8 with no rounding of the scale
    scale, lo = group_minmax(w, GROUP)
    dg = to_dual_grained(w, scale.amax(1) / 8, scale, lo, GROUP)
    assert torch.all(dg.s2 == 8)
    step = (dg.s1 * 8)[:, None]
    assert torch.all((dg.dequantize() - w).abs() <= step * 0.5 + 1e-6)


def test_large_s2_clamps_codes_into_safe_window():
    w = torch.randn(4, 32)
    scale, lo = group_minmax(w, GROUP)
    dg = to_dual_grained(w, scale.amax(1) / 127, scale, lo, GROUP)
    assert int(dg.s2.max()) == 127
    assert dg.int8_weight().to(torch.int32).abs().max() <= INT8_MAX


@pytest.mark.parametrize("field,value,message", [
    ("u4", 16, "exceed"), ("s2", 0, "s2 must be"), ("s2", 127, "leaves"),
])
def test_validate_rejects_broken_tensors(field, value, message):
    w = torch.randn(2, 32)
    scale, lo = group_minmax(w, GROUP)
    dg = to_dual_grained(w, scale.amax(1) / 8, scale, lo, GROUP)
    t = getattr(dg, field).clone()
    t.view(-1)[0] = value
    if field == "s2" and value == 127:
        dg.u4[0, :GROUP] = 15
        dg.zp[0, 0] = 0
    broken = DualGrainedWeight(**{**dg.__dict__, field: t})
    with pytest.raises(FormatError, match=message):
        broken.validate("layer.x")


def test_validate_rejects_indivisible_group():
    dg = DualGrainedWeight(torch.zeros(2, 30, dtype=torch.uint8), torch.zeros(2, 1, dtype=torch.uint8),
                           torch.ones(2, 1, dtype=torch.int8), torch.ones(2), 16)
    with pytest.raises(FormatError, match="does not divide"):
        dg.validate()


@pytest.mark.parametrize("int_mm", [True, False])  # int_matmul through the CPU's int8 GEMM, or the float products
@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 5), n=st.integers(1, 7), k=st.integers(1, 2500), seed=st.integers(0, 1000))
def test_int_matmul_is_exact(int_mm, m, n, k, seed):
    """Both of :func:`int_matmul`'s CPU paths, whichever this machine's timing picks (``cpu_int_mm_is_fast``)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    if seed % 3 == 0:  # worst case: every product at its maximum
        x.fill_(127), w.fill_(-127)
    expect = x.long() @ w.long().t()
    with patch("dgq.formats.cpu_int_mm_is_fast", lambda: int_mm):
        got = int_matmul(x, w)
    assert torch.equal(got.long(), expect)
    assert torch.equal(exact_matmul(x.float(), w.float().t()).long(), expect)


def test_int_matmul_single_column_is_exact():
    """K = 1: torch 2.13's CPU ``_int_mm`` returns zeros there (found by the property test above); the float path runs."""
    x, w = torch.full((3, 1), 127, dtype=torch.int8), torch.full((4, 1), -127, dtype=torch.int8)
    assert torch.equal(int_matmul(x, w).long(), torch.full((3, 4), -16129))


def test_amax_abs_equals_abs_amax():
    x = torch.randn(7, 33)
    x[2, 5] = -1e4  # the extreme is negative in one row
    assert torch.equal(amax_abs(x, -1, keepdim=True), x.abs().amax(-1, keepdim=True))
    assert torch.equal(amax_abs(x, 0), x.abs().amax(0))


def test_activation_quantization_modes():
    x = torch.randn(5, 33) * 3
    x_s8, s = quantize_activations(x)
    assert x_s8.dtype == torch.int8 and s.shape == (5, 1)
    assert torch.equal(x_s8.abs().amax(1), torch.full((5,), 127, dtype=torch.int8))
    assert (x_s8.float() * s - x).abs().max() <= s.max() / 2 + 1e-6
    static, s_static = quantize_activations(x * 100, torch.tensor(0.01))
    assert static.abs().max() == 127  # saturates at the static range
    assert s_static.numel() == 1


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 9), k_half=st.integers(1, 40), seed=st.integers(0, 1000))
def test_pack_roundtrip(n, k_half, seed):
    u4 = torch.randint(0, 16, (n, 2 * k_half), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    assert torch.equal(unpack_u4(pack_u4(u4)), u4)


@pytest.mark.parametrize("k", [256, 1536])  # one float chunk and several (K > 1040) in the float definition
def test_quant_linear_cpu_forward_is_the_format_definition(k):
    """The CPU forward (int8 GEMM) equals ``(s_x · s1) · (X_s8 @ W_s8ᵀ) + b`` computed by exact float products."""
    from dgq.nn import QuantLinear

    g = torch.Generator().manual_seed(k)
    w = torch.randn(48, k, generator=g)
    s, lo = group_minmax(w, GROUP)
    dg = to_dual_grained(w, s.amax(-1) / 12, s, lo, GROUP)
    bias = torch.randn(48, generator=g)
    layer = QuantLinear.from_weight(dg, bias, "dynamic")
    x = torch.randn(2, 5, k, generator=g) * 4
    x_s8, s_x = quantize_activations(x.reshape(-1, k))
    acc = exact_matmul(x_s8.float(), dg.int8_weight().float().t()).float()
    expect = (acc * s_x * dg.s1 + bias).reshape(2, 5, 48)
    assert torch.equal(layer(x), expect)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_row_absmax_bits_are_the_rows_absmax(dtype: torch.dtype) -> None:
    """The bit patterns a compiled graph hands the one-token GEMV, viewed back as floats, are each row's max |x|
    exactly: rows of mixed signs over ten decades, a zero row, an all-negative row, an infinity."""
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(6, 333, generator=gen) * torch.logspace(-6, 4, 333)).to(dtype)
    x[2] = 0
    x[3] = -x[3].abs()
    x[4, 7] = -float("inf")
    bits = row_absmax_bits(x)
    assert bits.dtype == absmax_bits_dtype(dtype) and bits.shape == (6, 1)
    assert torch.equal(bits.view(dtype).float(), amax_abs(x.float(), -1, keepdim=True))
