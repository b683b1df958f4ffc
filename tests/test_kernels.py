"""Triton kernels against the exact references, in Triton's CPU interpreter (set before triton is imported).

Accumulators must equal :func:`dgq.formats.int_matmul` bit for bit; fp16/bf16 outputs must equal the reference
epilogue up to the output's rounding.  Configs are pinned (no autotuning in the interpreter) so that every path
runs: split-K with its last-split reduction, M/N tails, both K tiles (64, 128), group sizes 64 and 128, the
decode GEMV, the TMA int8 GEMM's persistent tile loop and K tail, and the path ``a8w4_linear`` picks for each M.  The interpreter runs the plain-integer widening
(``USE_ASM=False``); the PTX's byte-lane arithmetic is proven here exhaustively in 32-bit integer emulation, and the
real kernel is checked bit-exact on a GPU by ``tests/test_kernels_cuda.py`` (``pytest -m cuda``).
"""

from __future__ import annotations

import os
import types

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any triton import; a GPU run may set it to 0

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed: the kernels cannot be tested")

from dgq.formats import DualGrainedWeight, int_matmul, quantize_activations, swiglu  # noqa: E402
from dgq.kernels import act_quant, gemv, int8_gemm, linear  # noqa: E402
from dgq.kernels.act_quant import quantize_activations_triton  # noqa: E402
from dgq.kernels.gemm import KernelShapeError, KernelWeight, _cfg, a8w4_matmul, tile_k_for, widen_weight  # noqa: E402
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
    return KernelWeight.from_dual_grained(dg.to(DEVICE))


# (M, N, K, group, config): split-K (even, and with an empty last split), M and N tails, several M tiles, K tiles of
# 128 holding one or two groups and of 64 (K = 192, as SmolLM2's 576), a weight tile wider than N.
GEMM_CASES = [
    (1, 40, 256, 64, _cfg(16, 64, 2, 4, 1)),
    (3, 72, 384, 128, _cfg(16, 64, 4, 4, 1)),
    (17, 64, 192, 64, _cfg(32, 64, 1, 4, 1)),
    (20, 130, 256, 128, _cfg(16, 64, 1, 4, 1)),
    (64, 64, 128, 64, _cfg(64, 128, 1, 4, 1)),
]


@pytest.mark.parametrize("m,n,k,g,config", GEMM_CASES)
@pytest.mark.parametrize("kind", ["random", "extreme"])
def test_a8w4_accumulator_is_exact(m: int, n: int, k: int, g: int, config: triton.Config, kind: str) -> None:
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    dg, x = random_weight(n, k, g, gen, kind), random_acts(m, k, gen, kind)
    acc = a8w4_matmul(x.to(DEVICE), kernel_weight(dg), out_dtype=None, config=config)
    assert acc.dtype == torch.int32
    assert torch.equal(acc.cpu(), int_matmul(x, dg.int8_weight()))


def fp32_epilogue(acc: torch.Tensor, s_x: torch.Tensor, s1: torch.Tensor, b: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """The kernels' epilogue in the same fp32 operations and order: ``(acc * s_x) * s1 (+ b)``."""
    out = acc.float() * s_x.float().reshape(-1, 1) * s1.float()
    return out if b is None else out + b.float()


# (M, N, K, group, BLOCK_M, BLOCK_N, BLOCK_K): more tiles than the interpreter's 4 persistent programs, M and N tails,
# a K tail read as zeros through the descriptor (K = 192 with 128-wide K blocks).
INT8_CASES = [(20, 130, 256, 128, 16, 32, 64), (5, 64, 192, 64, 16, 64, 128), (33, 40, 128, 64, 16, 32, 128)]


@pytest.mark.parametrize("m,n,k,g,bm,bn,bk", INT8_CASES)
def test_widen_and_int8_gemm_are_exact(m: int, n: int, k: int, g: int, bm: int, bn: int, bk: int) -> None:
    gen = torch.Generator().manual_seed(7 + m)
    dg, x = random_weight(n, k, g, gen, "extreme"), random_acts(m, k, gen)
    w8 = widen_weight(kernel_weight(dg), block_n=64)
    assert torch.equal(w8.cpu(), dg.int8_weight())
    s_x = torch.rand(m, 1, generator=gen) * 0.05 + 1e-3
    config = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 2}, num_warps=4, num_stages=1)
    out = int8_gemm.int8_matmul(x.to(DEVICE), w8, s_x.to(DEVICE), dg.s1.to(DEVICE), out_dtype=torch.float32,
                                config=config)
    assert torch.equal(out.cpu(), fp32_epilogue(int_matmul(x, dg.int8_weight()), s_x, dg.s1))


def test_widening_a_range_of_rows_is_a_slice_of_the_whole() -> None:
    gen = torch.Generator().manual_seed(11)
    dg = random_weight(200, 256, 64, gen, "extreme")
    kw = kernel_weight(dg)
    whole = widen_weight(kw)
    buffer = torch.full((80, 256), 99, dtype=torch.int8, device=DEVICE)
    for rows in (range(0, 64), range(70, 150), range(130, 200), range(200, 200)):
        got = widen_weight(kw, rows=rows, out=buffer[:len(rows)])
        assert torch.equal(got.cpu(), whole[rows.start:rows.stop].cpu())
        assert got.data_ptr() == buffer.data_ptr() or not len(rows)
    with pytest.raises(ValueError, match="step-1 range"):
        widen_weight(kw, rows=range(150, 250))
    with pytest.raises(ValueError, match="contiguous int8"):
        widen_weight(kw, rows=range(0, 64), out=buffer[:32])


def test_widen_once_in_chunks_is_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """The large-M path in chunks (here of 256 rows: whole waves and the byte budget lowered) equals the exact
    reference: every chunk's rows land in their own output columns, with their own channel scales and bias, the
    last chunk a tail."""
    config = triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 2}, num_warps=4, num_stages=1)
    fn, calls = linear.int8_matmul, []
    monkeypatch.setattr(linear, "int8_matmul", lambda *a, **kw: calls.append(a[1].shape[0]) or
                        fn(*a, **kw, config=config))
    monkeypatch.setattr(linear, "whole_wave_rows", lambda m, device: 256)
    gen = torch.Generator().manual_seed(3)
    dg, x = random_weight(600, 128, 64, gen, "extreme"), random_acts(5, 128, gen)
    s_x, b = torch.rand(5, 1, generator=gen) * 0.05 + 1e-3, torch.randn(600, generator=gen)
    out = linear.widen_once_matmul(x.to(DEVICE), s_x.to(DEVICE), kernel_weight(dg), b.to(DEVICE), torch.float32,
                                   chunk_bytes=300 * 128)
    assert calls == [256, 256, 88]
    assert torch.equal(out.cpu(), fp32_epilogue(int_matmul(x, dg.int8_weight()), s_x, dg.s1, b))


def test_widening_chunks_are_whole_waves_within_their_budget() -> None:
    wave = 8448  # 33 tiles of 256 rows: with 16 or 64 token tiles, whole waves of 132 programs (an H100)
    assert linear.widen_chunk_rows(22016, 4096, wave) == 8448  # Llama-2 gate/up, 86 MiB: 33 MiB chunks
    assert linear.widen_chunk_rows(12288, 4096, wave) == 12288  # 48 MiB: whole
    assert linear.widen_chunk_rows(57344, 8192, wave) == 8448  # 70B gate/up, 448 MiB: chunks of 66 MiB
    assert linear.widen_chunk_rows(57344, 8192, wave, chunk_bytes=1 << 30) == 57344
    assert linear.widen_chunk_rows(22016, 4096, 33792) == 22016  # one wave's rows are the whole layer


def test_whole_wave_rows_fill_every_program(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(int8_gemm, "_num_programs", lambda device: 132)
    for m in (2048, 3000, 8192, 2100):
        rows = int8_gemm.whole_wave_rows(m, torch.device(DEVICE))
        tiles = -(-m // 128) * rows // 256
        assert rows % 256 == 0 and tiles % 132 == 0
    assert int8_gemm.whole_wave_rows(2048, torch.device(DEVICE)) == 8448


# (M, N, K, group): an N tail, more K tiles than some configs' splits cover (masked tiles), two groups per K tile, and
# K tiles of 64 (K = 192, as SmolLM2's 576).
GEMV_CASES = [(1, 40, 256, 64), (3, 72, 384, 128), (2, 64, 192, 64)]


@pytest.mark.parametrize("m,n,k,g", GEMV_CASES)
@pytest.mark.parametrize("config", gemv.CONFIGS[:4], ids=str)
def test_gemv_is_exact(m: int, n: int, k: int, g: int, config: triton.Config) -> None:
    gen = torch.Generator().manual_seed(n + k)
    dg, x = random_weight(n, k, g, gen, "extreme"), random_acts(m, k, gen, "extreme")
    s_x = torch.rand(m, 1, generator=gen) * 0.05 + 1e-3
    b = torch.randn(n, generator=gen)
    kw = kernel_weight(dg)
    for _ in range(2):  # at M = 1 the split-K slots are the layer's own: each call must leave them zeroed
        out = gemv.a8w4_gemv(x.to(DEVICE), kw, s_x.to(DEVICE), b.to(DEVICE), torch.float32, config)
        assert torch.equal(out.cpu(), fp32_epilogue(int_matmul(x, dg.int8_weight()), s_x, dg.s1, b))
        assert not kw.split_scratch.any()


@pytest.mark.parametrize("m,n,k,g", GEMV_CASES)
@pytest.mark.parametrize("config", [gemv.CONFIGS[0], gemv.CONFIGS[2]], ids=str)
@pytest.mark.parametrize("static", [False, True])
def test_gemv_quantizing_inside_is_exact(m: int, n: int, k: int, g: int, config: triton.Config, static: bool) -> None:
    """The one-launch GEMV from float activations equals the exact reference on the CPU definition's codes: rounding
    ties (exact .5 multiples of the scale), clamping, a zero row, rows scaled over three decades."""
    gen = torch.Generator().manual_seed(n + k + static)
    dg = random_weight(n, k, g, gen, "extreme")
    x = torch.randn(m, k, generator=gen) * torch.logspace(-2, 1, m)[:, None]
    x[0, :8] = torch.tensor([0.5, -1.5, 2.5, 126.5, -126.5, 127.0, -127.0, 0.0]) * 0.02 if static else x[0, :8]
    x[-1] = 0 if m > 1 else x[-1]
    scale = torch.tensor(0.02) if static else None
    b = torch.randn(n, generator=gen)
    kw = kernel_weight(dg)
    out = gemv.a8w4_gemv_float(x.to(DEVICE), kw, None if scale is None else scale.to(DEVICE), b.to(DEVICE),
                               torch.float32, config)
    x_q, s_x = quantize_activations(x, scale)
    assert torch.equal(out.cpu(), fp32_epilogue(int_matmul(x_q, dg.int8_weight()), s_x, dg.s1, b))
    assert not kw.split_scratch.any()


def test_gemv_rule_aims_at_four_programs_per_sm() -> None:
    def picked(n: int, k: int) -> tuple[int, int, int]:
        c = gemv.config_for(n, k, 128)
        return c.kwargs["BLOCK_N"], c.kwargs["TPI"], c.kwargs["SPLIT_K"]

    assert picked(4096, 4096) == (128, 1, 16)  # 32 row blocks x 16 splits = 512 programs
    assert picked(11008, 4096) == (128, 1, 4)  # 86 x 4 = 344 (x 8 would pass 512)
    assert picked(8192, 28672) == (64, 2, 4)  # long K: 64 rows, two tiles per chunk
    assert picked(28672, 8192) == (64, 4, 1)  # wide: 448 row blocks already
    assert picked(192, 576)[2] == 4 and picked(192, 384)[2] == 2  # no more splits than K tiles


def test_gemv_takes_a_static_scale() -> None:
    gen = torch.Generator().manual_seed(5)
    dg, x = random_weight(64, 256, 128, gen), random_acts(1, 256, gen)
    scale = torch.tensor([[0.02]])
    out = gemv.a8w4_gemv(x.to(DEVICE), kernel_weight(dg), scale.to(DEVICE), None, torch.float32, gemv.CONFIGS[1])
    assert torch.equal(out.cpu(), fp32_epilogue(int_matmul(x, dg.int8_weight()), scale, dg.s1))


@pytest.mark.parametrize("m", [1, 3, 6])
def test_linear_takes_the_path_for_its_m(m: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """M = 1: the GEMV (quantizing inside on a narrow layer); then the in-register kernel; from WIDEN_MIN_M (lowered
    here to 5): widen + int8 GEMM.
    Each path gives the exact reference (the kernels are pinned to small configs: no autotuning here)."""
    monkeypatch.setattr(linear, "WIDEN_MIN_M", 5)
    called = []
    for name, config in (("a8w4_gemv_float", gemv.CONFIGS[1]), ("a8w4_matmul", _cfg(16, 64, 1, 4, 1)),
                         ("int8_matmul", triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 2},
                                                       num_warps=4, num_stages=1))):
        fn = getattr(linear, name)
        monkeypatch.setattr(linear, name, lambda *a, _fn=fn, _c=config, _n=name, **kw: called.append(_n) or
                            _fn(*a, **kw, config=_c))
    gen = torch.Generator().manual_seed(m)
    dg = random_weight(64, 256, 64, gen)
    x = torch.randn(m, 256, generator=gen)
    out = linear.a8w4_linear(x.to(DEVICE), kernel_weight(dg), out_dtype=torch.float32)
    q, s = quantize_activations(x)
    assert called == [{1: "a8w4_gemv_float", 3: "a8w4_matmul", 6: "int8_matmul"}[m]]
    assert torch.equal(out.cpu(), fp32_epilogue(int_matmul(q, dg.int8_weight()), s, dg.s1))


def test_wide_layer_quantizes_before_its_gemv(monkeypatch: pytest.MonkeyPatch) -> None:
    """One token on a layer of more row blocks than the fused GEMV pays off for: act-quant, then the GEMV."""
    monkeypatch.setattr(gemv, "FUSE_MAX_ROW_BLOCKS", 0)
    called = []
    fn = linear.a8w4_gemv
    monkeypatch.setattr(linear, "a8w4_gemv", lambda *a, **kw: called.append(1) or fn(*a, **kw, config=gemv.CONFIGS[1]))
    gen = torch.Generator().manual_seed(5)
    dg = random_weight(64, 256, 64, gen)
    x = torch.randn(1, 256, generator=gen)
    out = linear.a8w4_linear(x.to(DEVICE), kernel_weight(dg), out_dtype=torch.float32)
    q, s = quantize_activations(x)
    assert called == [1] and torch.equal(out.cpu(), fp32_epilogue(int_matmul(q, dg.int8_weight()), s, dg.s1))


def test_one_token_takes_the_tma_gemv_where_the_gluon_kernels_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a layer the Gluon kernels take (Hopper), one token goes to the TMA-fed GEMV: from codes after the
    act-quant kernel with a dynamic scale (its own whole-row read lost to the act-quant in registers, session 18),
    quantizing inside with a static one; a layer they do not take stays on the register-fed GEMV.  The Gluon
    kernels are stood in for: they do not run on the CPU."""
    called = []
    fake_ws = type("FakeWs", (), {"supported": staticmethod(lambda kw, device: kw.out_features % 64 == 0)})
    fake_tma = type("FakeTma", (), {"tma_gemv": staticmethod(lambda *a, **k: called.append("tma")),
                                    "tma_gemv_float": staticmethod(lambda *a, **k: called.append("tma_inside"))})
    monkeypatch.setattr(linear, "gemm_ws", fake_ws)
    monkeypatch.setattr(linear, "gemv_tma", fake_tma)
    monkeypatch.setattr(linear, "a8w4_gemv", lambda *a, **k: called.append("gemv"))
    monkeypatch.setattr(linear, "a8w4_gemv_float", lambda *a, **k: called.append("gemv_inside"))
    gen = torch.Generator().manual_seed(6)
    for n in (64, 96):  # taken by the Gluon kernels; N % 64 != 0: not
        kw = kernel_weight(random_weight(n, 256, 64, gen))
        x = torch.randn(1, 256, generator=gen)
        x_s8, s_x = quantize_activations(x)
        linear.a8w4_mm(x_s8.to(DEVICE), s_x.to(DEVICE), kw)
        linear.a8w4_linear(x.to(DEVICE), kw)
        linear.a8w4_linear(x.to(DEVICE), kw, torch.tensor(0.05))
    assert called == ["tma", "tma", "tma_inside", "gemv", "gemv_inside", "gemv_inside"]


def test_many_tokens_take_the_ping_pong_kernel_where_its_tiles_fill_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the Gluon kernels run (Hopper), from 65 tokens the ping-pong kernel takes every layer whose tiles fill
    the GPU (its rule, :func:`dgq.kernels.gemm_pp.config_for`), at any M, and at 33-256 tokens the layers of few
    tiles, split in K; the warp-specialized kernel the rest up to its range, widen-once beyond.  The Gluon kernels
    are stood in for: they do not run on the CPU."""
    from dgq.kernels import gemm_pp

    called = []
    fake_ws = type("FakeWs", (), {"supported": staticmethod(lambda kw, device: True), "takes": staticmethod(
        lambda m, k, n: m <= 2047), "ws_a8w4_matmul": staticmethod(lambda *a, **k: called.append("ws"))})
    fake_pp = type("FakePp", (), {"rule": staticmethod(lambda m, n, device: gemm_pp.config_for(m, n)),
                                  "pp_a8w4_matmul": staticmethod(lambda *a, config, **k: called.append(
                                      ("pp", config.bm, config.split)))})
    monkeypatch.setattr(linear, "gemm_ws", fake_ws)
    monkeypatch.setattr(linear, "gemm_pp", fake_pp)
    monkeypatch.setattr(linear, "widen_once_matmul", lambda *a, **k: called.append("widen_once"))
    for m, n in ((64, 11008), (64, 4096), (65, 11008), (300, 4096), (256, 4096), (256, 8192), (4096, 4096),
                 (3000, 64), (32, 4096), (16, 4096)):
        kw = types.SimpleNamespace(out_features=n, in_features=4096)
        linear.a8w4_mm(torch.zeros(m, 4096, dtype=torch.int8), torch.ones(m, 1), kw)
    assert called == ["ws", ("pp", 64, 4), ("pp", 128, 1), "ws", ("pp", 128, 2), ("pp", 256, 2), ("pp", 256, 1),
                      "widen_once", ("pp", 32, 4), "ws"]


def test_kernel_layout_pairs_k_and_k_plus_half_tile() -> None:
    """Byte j of each K tile holds the codes of k = j (low nibble) and k = tile/2 + j (high nibble)."""
    gen = torch.Generator().manual_seed(2)
    for k, g, tile in ((256, 64, 128), (256, 128, 128), (192, 64, 64)):
        dg = random_weight(8, k, g, gen)
        kw = kernel_weight(dg)
        assert kw.tile_k == tile == tile_k_for(k, g)
        u = dg.u4.reshape(8, k // tile, tile)
        want = (u[:, :, : tile // 2] | (u[:, :, tile // 2:] << 4)).reshape(8, k // 2)
        assert torch.equal(kw.codes.cpu(), want)


@pytest.mark.parametrize("k,g", [(100, 50), (256, 16), (96, 48)])
def test_unsupported_shapes_are_refused_clearly(k: int, g: int) -> None:
    with pytest.raises(KernelShapeError, match="A8W4 CUDA kernel needs"):
        tile_k_for(k, g)


def test_split_k_calls_are_independent() -> None:
    """Each call owns its split-K buffer: repeated calls on one weight give the same exact results."""
    gen = torch.Generator().manual_seed(3)
    dg = random_weight(40, 256, 64, gen)
    kw = kernel_weight(dg)
    for m in (2, 1, 2):
        x = random_acts(m, 256, gen)
        acc = a8w4_matmul(x.to(DEVICE), kw, out_dtype=None, config=_cfg(16, 64, 2, 4, 1))
        assert torch.equal(acc.cpu(), int_matmul(x, dg.int8_weight()))


def reference_epilogue(acc: torch.Tensor, s_x: torch.Tensor, s1: torch.Tensor, b: torch.Tensor | None
                       ) -> torch.Tensor:
    ref = acc.double() * s_x.double().reshape(-1, 1) * s1.double()
    return ref if b is None else ref + b.double()


def assert_rounded_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """Equal to the float64 reference up to fp32 products and one rounding to ``dtype`` (bias may cancel)."""
    assert out.dtype == dtype
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.cpu().double(), ref.to(dtype).double(), rtol=2 * eps, atol=4 * eps * ref.abs().max())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
def test_epilogue_matches_reference(dtype: torch.dtype, bias: bool) -> None:
    gen = torch.Generator().manual_seed(11)
    dg, x = random_weight(48, 256, 128, gen), random_acts(5, 256, gen)
    s_x = torch.rand(5, 1, generator=gen) * 0.05 + 1e-3
    b = torch.randn(48, generator=gen).to(dtype) if bias else None
    out = a8w4_matmul(x.to(DEVICE), kernel_weight(dg), s_x.to(DEVICE), None if b is None else b.to(DEVICE), dtype,
                      config=_cfg(16, 64, 2, 4, 1))
    assert_rounded_close(out, reference_epilogue(int_matmul(x, dg.int8_weight()), s_x, dg.s1, b), dtype)


def widen_word(p: np.ndarray, s_lo: np.ndarray, c_lo: np.ndarray, s_hi: np.ndarray, c_hi: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """The kernel's PTX (``_WIDEN_PTX``) instruction by instruction, in 32-bit unsigned arithmetic."""
    m32 = np.uint64(0xFFFFFFFF)
    word = p.astype(np.uint64)
    lo = word & np.uint64(0x0F0F0F0F)
    hi = (word >> np.uint64(4)) & np.uint64(0x0F0F0F0F)
    rep = np.uint64(0x01010101)
    lo = (lo * s_lo.astype(np.uint64) + (c_lo.astype(np.int64).astype(np.uint64) * rep)) & m32
    hi = (hi * s_hi.astype(np.uint64) + (c_hi.astype(np.int64).astype(np.uint64) * rep)) & m32
    flip = np.uint64(0x80808080)
    return (lo ^ flip).astype(np.uint32), (hi ^ flip).astype(np.uint32)


def lanes(words: np.ndarray) -> np.ndarray:
    """The four bytes of each uint32 word as int8, least significant first."""
    return words.astype("<u4").view(np.int8).reshape(-1, 4)


def test_byte_lane_widening_is_exact_for_every_allowed_code() -> None:
    """For every (s2, zp) the format allows and every 4-tuple of codes in the group's int8-safe window, one 32-bit
    multiply-add and one xor give the four int8 weights s2 * (u4 - zp) with no carry between lanes."""
    checked = 0
    for s2 in range(1, 128):
        for zp in range(16):
            codes = np.array([u for u in range(16) if abs(s2 * (u - zp)) <= 127], dtype=np.uint32)
            t = np.stack(np.meshgrid(codes, codes, codes, codes, indexing="ij"), -1).reshape(-1, 4)
            b = t | (t[:, ::-1] << 4)  # the same codes, reversed, in the high nibbles
            word = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16) | (b[:, 3] << 24)
            s = np.full(word.shape, s2)
            c = np.full(word.shape, 128 - s2 * zp)
            lo, hi = widen_word(word, s, c, s, c)
            want = (s2 * (t.astype(np.int64) - zp)).astype(np.int8)
            assert np.array_equal(lanes(lo), want) and np.array_equal(lanes(hi), want[:, ::-1])
            checked += len(word)
    assert checked > 10_000_000


def test_nibble_split_feeds_each_half_its_own_group() -> None:
    """Random packed words with different (s2, zp) for the low and high nibbles (two groups in one tile)."""
    rng = np.random.default_rng(0)
    n = 200_000
    s_lo, s_hi = rng.integers(1, 128, n), rng.integers(1, 128, n)
    z_lo, z_hi = rng.integers(0, 16, n), rng.integers(0, 16, n)

    def codes(s: np.ndarray, z: np.ndarray) -> np.ndarray:
        reach = 127 // s
        lo, hi = np.maximum(z - reach, 0), np.minimum(z + reach, 15)
        return (lo[:, None] + rng.integers(0, 1 << 30, (n, 4)) % (hi - lo + 1)[:, None]).astype(np.uint32)

    u_lo, u_hi = codes(s_lo, z_lo), codes(s_hi, z_hi)
    b = u_lo | (u_hi << 4)
    word = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16) | (b[:, 3] << 24)
    lo, hi = widen_word(word, s_lo, 128 - s_lo * z_lo, s_hi, 128 - s_hi * z_hi)
    assert np.array_equal(lanes(lo), (s_lo[:, None] * (u_lo.astype(np.int64) - z_lo[:, None])).astype(np.int8))
    assert np.array_equal(lanes(hi), (s_hi[:, None] * (u_hi.astype(np.int64) - z_hi[:, None])).astype(np.int8))


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


@pytest.mark.parametrize("k", [300, 9000])  # one read per row, and chunks
def test_act_quant_takes_one_static_scale_per_row(k: int) -> None:
    """A layer whose first positions have a static scale of their own passes one scale per row (``[M, 1]``): the
    kernel uses each row's, as the reference does; a scale array of another shape is refused."""
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(5, k, generator=gen).half() * 3
    scales = torch.tensor([[0.5], [0.01], [0.01], [0.2], [0.01]])
    q, s = quantize_activations_triton(x.to(DEVICE), scales)
    q_ref, s_ref = quantize_activations(x, scales)
    assert s.shape == (5, 1) and torch.equal(s.cpu(), s_ref) and torch.equal(q.cpu(), q_ref)
    assert not torch.equal(q_ref[0], quantize_activations(x[:1], torch.tensor(0.01))[0][0])  # the row's own scale
    with pytest.raises(ValueError, match="one per row"):
        quantize_activations_triton(x.to(DEVICE), scales[:3])


@pytest.mark.parametrize("k", [300, 4096, 9000, 11008])
@pytest.mark.parametrize("in_registers", [True, False])
@pytest.mark.parametrize("static", [False, True])
def test_act_quant_both_kernels_are_exact(k: int, in_registers: bool, static: bool) -> None:
    """Either kernel, pinned: the row in registers as power-of-two pieces (300 = 256 + 64 masked; 9000 = 8192 +
    512 + 296 in 512; 11008 = 8192 + 2048 + 768 in 1024) or read twice in chunks (the last one partial)."""
    x = (torch.randn(3, k, generator=torch.Generator().manual_seed(k)) * 3).half()
    scale = torch.tensor(0.04) if static else None
    q, s = quantize_activations_triton(x.to(DEVICE), None if scale is None else scale.to(DEVICE),
                                       config=act_quant.AqConfig(in_registers, 4))
    q_ref, s_ref = quantize_activations(x, scale)
    assert torch.equal(q.cpu(), q_ref) and torch.equal(s.cpu(), s_ref.reshape(s.shape))


def test_act_quant_rule() -> None:
    """In registers up to 512 rows and at any M for K <= 4096 or a gate/up row (16 warps below 256 rows, 8 from
    there, 32 elements a thread below K = 4096), chunks by 16 warps for long rows at many rows and beyond
    IN_REGISTERS_MAX; the pieces cover the row with less than one piece's padding."""
    cfg = act_quant.AqConfig
    assert act_quant.config_for(1, 11008) == cfg(True, 16) and act_quant.config_for(256, 28672) == cfg(True, 8)
    assert act_quant.config_for(513, 11008) == cfg(False, 16) and act_quant.config_for(4096, 4096) == cfg(True, 8)
    assert act_quant.config_for(2048, 11008, swiglu=True) == cfg(True, 8)  # a gate/up row: its product formed once
    assert act_quant.config_for(1, 40000) == cfg(False, 16) and act_quant.config_for(9, 576) == cfg(True, 1)
    assert act_quant.row_pieces(11008) == (8192, 2048, 1024) and act_quant.row_pieces(28672) == (16384, 8192, 4096)
    assert act_quant.row_pieces(4096) == (4096, 0, 0) and act_quant.row_pieces(4100) == (4096, 0, 4)
    for k in range(1, 40000, 37):
        p0, p1, p2 = act_quant.row_pieces(k)
        assert p0 + p1 <= k <= p0 + p1 + p2 or (p2 == 0 and p0 + p1 == k)
        assert p2 < 2 * max(k - p0 - p1, 1) and all(p & (p - 1) == 0 for p in (p0, p1, p2))
    assert act_quant.row_block(9000) == 2048 and act_quant.row_block(28672) == 4096
    with pytest.raises(ValueError, match="at least one column"):
        quantize_activations_triton(torch.zeros(2, 0, device=DEVICE))


@pytest.mark.parametrize("k", [96, 5000])  # one read per row, and chunks
@pytest.mark.parametrize("static", [False, True])
def test_act_quant_forms_the_swiglu_product_as_it_reads(k: int, static: bool) -> None:
    """``swiglu=True``: the codes of ``silu(gate) * up`` from a fused gate/up row ``[2K]`` (dgq.formats.swiglu's
    rounding: the SiLU in the row's dtype, then the product).  The kernel's exponential is not torch's, so a
    product may sit one rounding of the dtype away, and its code one step; nothing more.  fp16 only here: the CPU
    interpreter narrows fp32 to bf16 by truncation, not to nearest as the GPU does (bf16: ``pytest -m cuda``)."""
    gen = torch.Generator().manual_seed(k)
    gu = (torch.randn(6, 2 * k, generator=gen) * 4).half()
    scale = torch.tensor(0.02) if static else None
    q, s = quantize_activations_triton(gu.to(DEVICE), scale, swiglu=True)
    q_ref, s_ref = quantize_activations(swiglu(gu), scale)
    assert q.shape == (6, k) and s.shape == s_ref.shape
    assert torch.allclose(s.cpu(), s_ref, rtol=1e-2, atol=0)
    diff = (q.cpu().int() - q_ref.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01
    with pytest.raises(ValueError, match="even width"):
        quantize_activations_triton(gu[:, 1:].to(DEVICE), swiglu=True)


def test_rounding_ties_go_to_even() -> None:
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -2.5, 126.5, 127.0, -126.5]])
    q, _ = quantize_activations_triton(x.to(DEVICE), torch.tensor(1.0))
    assert q.cpu().tolist() == [[0, 2, 2, 0, -2, 126, 127, -126]]


def test_pack_round_trip() -> None:
    u4 = torch.randint(0, 16, (24, 130), dtype=torch.uint8)
    packed = pack_u4(u4)
    assert packed.shape == (65, 24) and torch.equal(unpack_u4(packed), u4)
    assert packed[0, 0] == u4[0, 0] | (u4[0, 1] << 4)


def test_kernel_layout_is_the_layer_buffers() -> None:
    """The kernels read the layer's own buffers (no second copy of the packed weight), in the layout that
    :meth:`KernelWeight.from_dual_grained` builds."""
    gen = torch.Generator().manual_seed(4)
    dg = random_weight(64, 256, 64, gen)
    layer = QuantLinear.from_weight(dg, None, "dynamic")
    kw, ref = layer.kernel_layout(), KernelWeight.from_dual_grained(dg)
    assert kw.codes is layer.codes and kw.s2t is layer.s2t and kw.zpt is layer.zpt and kw.s1 is layer.s1
    assert all(torch.equal(getattr(kw, f), getattr(ref, f)) for f in ("codes", "s2t", "zpt", "s1"))


def test_stored_layout_round_trips_and_reference_follows_writes() -> None:
    """The checkpoint's layout converts exactly both ways; the CPU reference's cached int8 weight is rebuilt
    after an in-place write of a buffer; casts keep the format's scales float32."""
    gen = torch.Generator().manual_seed(5)
    dg = random_weight(32, 192, 64, gen)  # K = 192: tiles of 64
    layer = QuantLinear.from_weight(dg, None, "dynamic")
    stored = layer.stored_tensors()
    assert torch.equal(stored["weight"], pack_u4(dg.u4)) and torch.equal(stored["s2"], dg.s2)
    fresh = QuantLinear(192, 32, 64)
    for name in QuantLinear.STORED:  # as the checkpoint loader's skeleton holds them: not yet buffers
        del fresh._buffers[name]
    fresh.load_stored(stored["weight"], stored["s2"], stored["zp"])
    assert {"codes", "s2t", "zpt", "split_scratch"} <= set(fresh._buffers), "moves and casts must reach them"
    fresh.s1.copy_(dg.s1)
    x = torch.randn(3, 192, generator=gen)
    assert torch.equal(fresh(x), layer(x)) and torch.equal(fresh.dual_grained().u4, dg.u4)
    layer.s2t[0, 0] = 1
    changed = layer.dual_grained()
    q, s = quantize_activations(x)
    assert torch.equal(layer(x), fp32_epilogue(int_matmul(q, changed.int8_weight()), s, dg.s1))
    layer.half()
    assert layer.s1.dtype == layer.act_scale.dtype == torch.float32 and torch.equal(layer.s1, dg.s1)
