"""Triton kernels against the exact references, in Triton's CPU interpreter (set before triton is imported).

Accumulators must equal :func:`dgq.formats.int_matmul` bit for bit; fp16/bf16 outputs must equal the reference
epilogue up to the output's rounding.  Configs are pinned (no autotuning in the interpreter) so that every path
runs: split-K with its last-program reduction, M/N tails, both group sizes, packed and int8 weights.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any triton import; a GPU run may set it to 0

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed: the kernels cannot be tested")

from dgq.formats import DualGrainedWeight, int_matmul, quantize_activations  # noqa: E402
from dgq.kernels.act_quant import quantize_activations_triton  # noqa: E402
from dgq.kernels.gemm import KernelWeight, a8w4_matmul, w8a8_matmul, widen_weight, _cfg  # noqa: E402
from dgq.nn import QuantLinear  # noqa: E402
from dgq.packing import pack_u4, unpack_u4  # noqa: E402

DEVICE = "cuda" if os.environ["TRITON_INTERPRET"] == "0" else "cpu"


def random_weight(n: int, k: int, g: int, gen: torch.Generator, kind: str = "random") -> DualGrainedWeight:
    """A valid dual-grained weight; ``extreme`` puts s2 at its bounds 1 and 127 with codes in their safe windows."""
    groups = k // g
    s2 = torch.randint(1, 128, (n, groups), generator=gen)
    zp = torch.randint(0, 16, (n, groups), generator=gen)
    if kind == "extreme":
        s2 = torch.where(torch.rand(n, groups, generator=gen) < 0.5, 1, 127)
        zp = torch.where(s2 == 127, torch.randint(0, 2, (n, groups), generator=gen) * 15,
                         torch.randint(0, 16, (n, groups), generator=gen))
    reach = torch.div(127, s2, rounding_mode="floor")
    low, high = (zp - reach).clamp(min=0), (zp + reach).clamp(max=15)
    u = torch.rand(n, k, generator=gen)
    if kind == "extreme":
        u = (u < 0.5).float()  # every code at an end of its window
    lo, hi = low.repeat_interleave(g, 1), high.repeat_interleave(g, 1)
    u4 = (lo + torch.floor(u * (hi - lo + 1)).clamp(max=hi - lo)).to(torch.uint8)
    dg = DualGrainedWeight(u4=u4, zp=zp.to(torch.uint8), s2=s2.to(torch.int8),
                           s1=torch.rand(n, generator=gen) * 1e-3 + 1e-4, group_size=g)
    dg.validate()
    return dg


def random_acts(m: int, k: int, gen: torch.Generator, kind: str = "random") -> torch.Tensor:
    if kind == "extreme":  # all ±127, one zero row
        x = torch.where(torch.rand(m, k, generator=gen) < 0.5, -127, 127).to(torch.int8)
        x[m // 2] = 0
        return x
    return torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)


def kernel_weight(dg: DualGrainedWeight) -> KernelWeight:
    return KernelWeight.from_format(pack_u4(dg.u4).to(DEVICE), dg.s2.to(DEVICE), dg.zp.to(DEVICE), dg.s1.to(DEVICE),
                                    dg.group_size)


# (M, N, K, group, config): small-M split-K and large-M tiles, M and N tails, groups 64 and 128.
GEMM_CASES = [
    (1, 40, 256, 64, _cfg(16, 32, 64, 2, 4, 1)),
    (3, 48, 256, 128, _cfg(16, 32, 64, 4, 4, 1)),
    (16, 64, 128, 128, _cfg(16, 64, 128, 1, 4, 1)),
    (17, 50, 384, 128, _cfg(16, 32, 128, 2, 4, 1)),  # 3 K tiles over 2 splits
    (64, 96, 128, 64, _cfg(32, 64, 64, 1, 4, 1)),
]


@pytest.mark.parametrize("m,n,k,g,config", GEMM_CASES)
@pytest.mark.parametrize("kind", ["random", "extreme"])
def test_a8w4_accumulator_is_exact(m: int, n: int, k: int, g: int, config: triton.Config, kind: str) -> None:
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    dg, x = random_weight(n, k, g, gen, kind), random_acts(m, k, gen, kind)
    acc = a8w4_matmul(x.to(DEVICE), kernel_weight(dg), out_dtype=None, config=config)
    assert acc.dtype == torch.int32
    assert torch.equal(acc.cpu(), int_matmul(x, dg.int8_weight()))


@pytest.mark.parametrize("m,n,k,g,config", GEMM_CASES[::2])
def test_w8a8_and_widen_are_exact(m: int, n: int, k: int, g: int, config: triton.Config) -> None:
    gen = torch.Generator().manual_seed(7 + m)
    dg, x = random_weight(n, k, g, gen), random_acts(m, k, gen)
    w = widen_weight(kernel_weight(dg), block_n=32, block_k=64)
    assert torch.equal(w.cpu(), dg.int8_weight())
    acc = w8a8_matmul(x.to(DEVICE), w, out_dtype=None, config=config)
    assert torch.equal(acc.cpu(), int_matmul(x, dg.int8_weight()))


def test_split_k_workspace_is_left_clean() -> None:
    """The last program of each tile zeroes the shared workspace: a second call gives the same exact result."""
    gen = torch.Generator().manual_seed(3)
    dg, kw = None, None
    dg = random_weight(40, 256, 64, gen)
    kw = kernel_weight(dg)
    for _ in range(2):
        x = random_acts(2, 256, gen)
        acc = a8w4_matmul(x.to(DEVICE), kw, out_dtype=None, config=_cfg(16, 32, 64, 4, 4, 1))
        assert torch.equal(acc.cpu(), int_matmul(x, dg.int8_weight()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
def test_epilogue_matches_reference(dtype: torch.dtype, bias: bool) -> None:
    gen = torch.Generator().manual_seed(11)
    dg, x = random_weight(48, 256, 128, gen), random_acts(5, 256, gen)
    s_x = torch.rand(5, 1, generator=gen) * 0.05 + 1e-3
    b = torch.randn(48, generator=gen) if bias else None
    ref = int_matmul(x, dg.int8_weight()).double() * s_x.double() * dg.s1.double()
    if b is not None:
        ref += b.double()
    out = a8w4_matmul(x.to(DEVICE), kernel_weight(dg), s_x.to(DEVICE), None if b is None else b.to(DEVICE), dtype,
                      config=_cfg(16, 32, 64, 2, 4, 1))
    assert out.dtype == dtype
    eps = torch.finfo(dtype).eps  # fp32 products in the kernel, then one rounding to dtype; bias may cancel
    torch.testing.assert_close(out.cpu().double(), ref.to(dtype).double(), rtol=2 * eps, atol=4 * eps * ref.abs().max())


@pytest.mark.parametrize("shape", [(1, 100), (7, 256), (4, 5000), (2, 40000)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("static", [False, True])
def test_act_quant_is_bit_exact(shape: tuple[int, int], dtype: torch.dtype, static: bool) -> None:
    gen = torch.Generator().manual_seed(shape[1])
    x = (torch.randn(shape, generator=gen) * torch.logspace(-3, 2, shape[0])[:, None]).to(dtype)
    x[0, :3] = torch.tensor([0.5, -1.5, 2.5]).to(dtype)  # ties of the rounding, with the row scaled to hit them
    x[0, 3] = 127.0
    if shape[0] > 2:
        x[1] = 0  # zero row: scale clamps to 1e-8
    scale = torch.tensor(0.01) if static else None  # static: many values clamp at ±127
    q, s = quantize_activations_triton(x.to(DEVICE), scale)
    q_ref, s_ref = quantize_activations(x, scale)
    assert torch.equal(s.cpu(), s_ref) and torch.equal(q.cpu(), q_ref)


def test_rounding_ties_go_to_even() -> None:
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -2.5, 126.5, 127.0, -126.5]])
    q, _ = quantize_activations_triton(x.to(DEVICE), torch.tensor(1.0))
    assert q.cpu().tolist() == [[0, 2, 2, 0, -2, 126, 127, -126]]


def test_pack_round_trip() -> None:
    u4 = torch.randint(0, 16, (24, 130), dtype=torch.uint8)
    packed = pack_u4(u4)
    assert packed.shape == (65, 24) and torch.equal(unpack_u4(packed), u4)
    assert packed[0, 0] == u4[0, 0] | (u4[0, 1] << 4)


def test_misfit_config_is_rejected() -> None:
    gen = torch.Generator().manual_seed(5)
    dg = random_weight(32, 192, 64, gen)
    with pytest.raises(ValueError, match="does not fit"):
        a8w4_matmul(random_acts(1, 192, gen).to(DEVICE), kernel_weight(dg), out_dtype=None,
                    config=_cfg(16, 32, 128, 1, 4, 1))


@pytest.mark.skipif(DEVICE != "cuda", reason="the QuantLinear fast path dispatches on CUDA inputs only")
@pytest.mark.parametrize("act_mode", ["dynamic", "static"])
def test_quant_linear_fast_path_matches_reference(act_mode: str) -> None:
    gen = torch.Generator().manual_seed(1)
    dg = random_weight(96, 256, 128, gen)
    layer = QuantLinear.from_weight(dg, torch.randn(96, generator=gen).half(), act_mode,
                                    torch.tensor(0.02) if act_mode == "static" else None).to(DEVICE)
    x = torch.randn(2, 9, 256, generator=gen).half().to(DEVICE)
    out = layer(x)
    torch.testing.assert_close(out, layer.forward_reference(x), rtol=2e-3, atol=1e-3)
