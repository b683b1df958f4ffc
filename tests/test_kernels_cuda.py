"""The real kernels on a CUDA GPU (``pytest -m cuda``; skipped without one): what the CPU interpreter cannot show.

The inline-PTX widening, the autotuned configs of every M regime, split-K's atomics under real concurrency, and
CUDA-graph capture with programmatic dependent launches.  Accumulators must equal :func:`dgq.formats.int_matmul` bit for bit on random and adversarial
inputs (s2 at its bounds with codes at the ends of their windows, ±127 activations, zero rows).
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="needs compiled kernels")]

if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    # test_kernels (imported below) defaults the variable to "1" for the CPU suite; in this process inductor's own
    # Triton kernels, generated later by the compile tests, would then run in the interpreter
    os.environ["TRITON_INTERPRET"] = "0"
    from dgq.formats import int_matmul, quantize_activations, row_absmax_bits, swiglu
    from dgq.kernels import act_quant, gemm_pp, gemm_ws, gemv, gemv_tma, int8_gemm
    from dgq.kernels.act_quant import quantize_activations_triton
    from dgq.kernels.gemm import _CONFIGS, KernelWeight, a8w4_matmul, regime, widen_weight
    from dgq.kernels.linear import a8w4_linear
    from dgq.nn import QuantLinear
    from test_kernels import fp32_epilogue, random_acts, random_weight

MS = [1, 3, 16, 17, 64, 255, 1000, 1500]  # 1: the GEMV; 1500: widen + int8 GEMM (dgq.kernels.linear)
SHAPES = [(4096, 320, 128), (576, 192, 64), (1024, 256, 64)]  # (K, N, group): K tiles of 128 and 64


def layout(dg) -> "KernelWeight":  # noqa: ANN001
    return KernelWeight.from_dual_grained(dg.to("cuda"))


@pytest.fixture(autouse=True)
def _exact_reference():
    torch.backends.cuda.matmul.allow_tf32 = False


@pytest.mark.parametrize("k,n,g", SHAPES)
@pytest.mark.parametrize("kind", ["random", "extreme"])
def test_every_config_is_bit_exact(k: int, n: int, g: int, kind: str) -> None:
    gen = torch.Generator().manual_seed(k + n)
    dg = random_weight(n, k, g, gen, kind)
    kw = layout(dg)
    assert torch.equal(widen_weight(kw).cpu(), dg.int8_weight())  # the large-M path's widening (inline PTX)
    for m in MS:
        x = random_acts(m, k, gen, kind)
        if kind == "random" and m > 2:
            x[m // 3] = 0  # a zero row
        ref = int_matmul(x, dg.int8_weight())
        assert torch.equal(a8w4_matmul(x.cuda(), kw, out_dtype=None).cpu(), ref), f"autotuned, M={m}"
        for cfg in _CONFIGS[regime(m)] if k != 4096 else ():  # pinned configs on the short-K shapes (compile time)
            got = a8w4_matmul(x.cuda(), kw, out_dtype=None, config=cfg).cpu()
            assert torch.equal(got, ref), f"M={m} {cfg}"
        s_x = torch.rand(m, 1, generator=gen) * 0.05 + 1e-3
        want = fp32_epilogue(ref, s_x, dg.s1)  # the fp32 epilogue's exact result: checks the accumulator bit for bit
        if m <= 3:
            for cfg in gemv.CONFIGS:
                got = gemv.a8w4_gemv(x.cuda(), kw, s_x.cuda(), out_dtype=torch.float32, config=cfg).cpu()
                assert torch.equal(got, want), f"GEMV M={m} {cfg}"
        if m >= 17:
            for cfg in int8_gemm.CONFIGS:
                got = int8_gemm.int8_matmul(x.cuda(), widen_weight(kw), s_x.cuda(), kw.s1, out_dtype=torch.float32,
                                            config=cfg).cpu()
                assert torch.equal(got, want), f"int8 GEMM M={m} {cfg}"


@pytest.mark.parametrize("m", [2048, 2100])
def test_large_m_path_is_bit_exact(m: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """From WIDEN_MIN_M tokens a8w4_linear widens the weight (inline PTX) and runs the int8 GEMM's fixed large-M
    config (no autotuning): the exact reference, bit for bit, with an N that is no multiple of the 256-row tile;
    the same in chunks of 256 and 512 rows widened into one buffer, with and without a bias."""
    from dgq.kernels import linear

    assert m >= linear.WIDEN_MIN_M and m >= int8_gemm.LARGE_M
    gen = torch.Generator().manual_seed(m)
    k, n = 4096, 1000
    dg = random_weight(n, k, 128, gen, "extreme")
    kw = layout(dg)
    x = (torch.randn(m, k, generator=gen) * 3).half()
    x_q, s_x = quantize_activations(x)
    want = fp32_epilogue(int_matmul(x_q, dg.int8_weight()), s_x, dg.s1)
    assert torch.equal(a8w4_linear(x.cuda(), kw, out_dtype=torch.float32).cpu(), want)
    b = torch.randn(n, generator=gen).cuda()
    with_bias = linear.widen_once_matmul(x_q.cuda(), s_x.cuda(), kw, b, torch.float32)
    for wave in (256, 512):
        monkeypatch.setattr(linear, "whole_wave_rows", lambda m, device, _w=wave: _w)
        got = linear.widen_once_matmul(x_q.cuda(), s_x.cuda(), kw, None, torch.float32, chunk_bytes=wave * k)
        assert torch.equal(got.cpu(), want), f"chunks of {wave} rows"
        # with a bias the GPU's epilogue may fuse the last multiply-add: compare with the unchunked path
        got = linear.widen_once_matmul(x_q.cuda(), s_x.cuda(), kw, b, torch.float32, chunk_bytes=wave * k)
        assert torch.equal(got, with_bias), f"chunks of {wave} rows, bias"


@pytest.mark.parametrize("k,n,g", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("static", [False, True])
def test_production_path_matches_the_exact_reference(k: int, n: int, g: int, dtype: torch.dtype,
                                                     static: bool) -> None:
    gen = torch.Generator().manual_seed(n)
    dg = random_weight(n, k, g, gen)
    kw = layout(dg)
    bias = torch.randn(n, generator=gen).to(dtype)
    scale = torch.tensor(0.05) if static else None
    for m in MS:
        x = (torch.randn(m, k, generator=gen) * torch.logspace(-2, 1, m)[:, None]).to(dtype)
        x[m // 2] = 0
        out = a8w4_linear(x.cuda(), kw, scale, bias.cuda(), dtype)
        x_q, s_x = quantize_activations(x, scale)  # the CPU definition
        want = int_matmul(x_q, dg.int8_weight()).double() * s_x.double() * dg.s1.double() + bias.double()
        eps = torch.finfo(dtype).eps
        bad = (out.cpu().double() - want).abs() > want.abs() * eps + 4 * eps * want.abs().max()
        assert not bad.any(), f"M={m}: {int(bad.sum())} outputs off by more than the output's rounding"


@pytest.mark.parametrize("k,n,g", SHAPES + [(28672, 256, 128)])  # + a K the absmax reads in seven steps
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gemv_quantizing_inside_equals_the_two_launches(k: int, n: int, g: int, dtype: torch.dtype) -> None:
    """The one-launch GEMV (its own absmax and rounding, inline PTX) equals act-quant + GEMV bit for bit, dynamic
    and static, with every pinned config and the rule's."""
    gen = torch.Generator().manual_seed(k + n + 2)
    kw = layout(random_weight(n, k, g, gen, "extreme"))
    for m in (1, 3):
        x = (torch.randn(m, k, generator=gen) * torch.logspace(-3, 2, k)[torch.randperm(k, generator=gen)]).to(dtype)
        for scale in (None, torch.tensor(0.05)):
            q, s_x = quantize_activations_triton(x.cuda(), scale)
            for cfg in [None, *gemv.CONFIGS]:
                got = gemv.a8w4_gemv_float(x.cuda(), kw, None if scale is None else scale.cuda(),
                                           out_dtype=torch.float32, config=cfg)
                want = gemv.a8w4_gemv(q, kw, s_x, out_dtype=torch.float32, config=cfg)
                assert torch.equal(got, want), f"M={m} static={scale is not None} {cfg}"
                assert not kw.split_scratch.any()


@pytest.mark.parametrize("k,n,g", [(4096, 320, 128), (11008, 256, 128), (1152, 192, 64)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_swiglu_input_is_formed_as_the_reference_forms_it(k: int, n: int, g: int, dtype: torch.dtype) -> None:
    """A down projection fed the fused gate/up output: the act-quant kernel's codes are those of
    :func:`dgq.formats.swiglu` in torch on the GPU, up to one step where the fast exponential and division differ,
    dynamic and static, and the layer's output is the exact epilogue of those codes at every M."""
    gen = torch.Generator().manual_seed(k + n + 5)
    dg = random_weight(n, k, g, gen, "random")
    kw = layout(dg)
    for m in (1, 3, 64, 300):
        gu = (torch.randn(m, 2 * k, generator=gen) * 3).to(dtype).cuda()
        for scale in (None, torch.tensor(0.05, device="cuda")):
            q, s_x = quantize_activations_triton(gu, scale, swiglu=True)
            q_ref, s_ref = quantize_activations(swiglu(gu), scale)
            diff = (q.int() - q_ref.int()).abs()
            assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3, f"M={m} {dtype}"
            assert torch.allclose(s_x, s_ref, rtol=1e-2, atol=0)
            got = a8w4_linear(gu, kw, scale, out_dtype=torch.float32, swiglu=True).cpu()
            want = fp32_epilogue(int_matmul(q.cpu(), dg.int8_weight()), s_x.cpu().reshape(-1, 1), dg.s1)
            assert torch.equal(got, want), f"M={m} {dtype} static={scale is not None}"
            assert not kw.split_scratch.any()


WS_SHAPES = [(4096, 320, 128), (1024, 256, 64), (2048, 8448, 256)]  # (K, N, group) the warp-specialized kernel takes
WS_CONFIGS = sorted({gemm_ws.config_for(m, n) for m in (16, 32, 64, 256, 1023) for n in (4096, 8192, 11008, 28672)},
                    key=str) + [gemm_ws.WsConfig(128, 64, 4, 3), gemm_ws.WsConfig(64, 16, 6, 3, 80, 80),
                                gemm_ws.WsConfig(128, 64, 4, 2), gemm_ws.WsConfig(128, 128, 6, 1, 128)] \
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else []
# + splits of three and two (a split the ping-pong kernel now takes at 33-64 tokens), and 128-token tiles


TMA_SHAPES = [(4096, 320, 128), (1024, 256, 64), (2048, 8448, 256), (28672, 256, 128), (1152, 192, 64)]
TMA_CONFIGS = [gemv_tma.TmaGemvConfig(bn, 4, sp) for bn, sp in ((64, 1), (64, 2), (64, 8), (128, 1), (128, 4))] + [
    gemv_tma.TmaGemvConfig(256, 8, 2, 8), gemv_tma.TmaGemvConfig(64, 4, 3), gemv_tma.TmaGemvConfig(64, 2, 2, kt=2),
    gemv_tma.TmaGemvConfig(128, 2, 1, kt=4), gemv_tma.TmaGemvConfig(64, 2, 3, kt=4),
    gemv_tma.TmaGemvConfig(128, 2, 8, 8, kt=2)] \
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else []
# + 8 warps, a split of 3, and slots of 2 and 4 K tiles (a K not a multiple of the slot: the last slot part past K)


@pytest.mark.parametrize("k,n,g", TMA_SHAPES)
@pytest.mark.parametrize("kind", ["random", "extreme"])
def test_tma_gemv_is_bit_exact(k: int, n: int, g: int, kind: str) -> None:
    """The TMA-fed GEMV, the rule's config and pinned ones (splits that leave some CTAs no K tiles, 8 warps):
    from codes, the fp32 epilogue's exact result with per-token and static scales; quantizing inside, equal to the
    act-quant + itself, dynamic and static, fp16 and bf16 activations (a K whose absmax takes 28 steps)."""
    gen = torch.Generator().manual_seed(k + n + 3)
    dg = random_weight(n, k, g, gen, kind)
    kw = layout(dg)
    for m in (1, 3):
        x = random_acts(m, k, gen, kind)
        if m == 3:
            x[1] = 0  # a zero row
        ref = int_matmul(x, dg.int8_weight())
        for s_x in (torch.rand(m, 1, generator=gen) * 0.05 + 1e-3, torch.tensor(0.02)):
            want = fp32_epilogue(ref, s_x.reshape(-1, 1), dg.s1)
            for cfg in [None, *TMA_CONFIGS]:
                got = gemv_tma.tma_gemv(x.cuda(), kw, s_x.cuda(), out_dtype=torch.float32, config=cfg).cpu()
                assert torch.equal(got, want), f"M={m} {cfg or 'rule'}"
                assert not kw.split_scratch.any(), f"M={m} {cfg or 'rule'}: split-K counts left armed"
        for dtype in (torch.float16, torch.bfloat16):
            xf = (torch.randn(m, k, generator=gen) * torch.logspace(-3, 2, k)[torch.randperm(k, generator=gen)])
            xf = xf.to(dtype).cuda()
            for scale in (None, torch.tensor(0.05, device="cuda")):
                q, s_x = quantize_activations_triton(xf, scale)
                for cfg in [None, *TMA_CONFIGS[::2]]:
                    got = gemv_tma.tma_gemv_float(xf, kw, scale, out_dtype=dtype, config=cfg)
                    want = gemv_tma.tma_gemv(q, kw, s_x, out_dtype=dtype, config=cfg)
                    assert torch.equal(got, want), f"inside M={m} {dtype} static={scale is not None} {cfg}"
                    if scale is None:  # the row's absmax given, as a compiled graph computes it beside the producer
                        got = gemv_tma.tma_gemv_float(xf, kw, out_dtype=dtype, config=cfg,
                                                      row_absmax=row_absmax_bits(xf))
                        assert torch.equal(got, want), f"given absmax M={m} {dtype} {cfg}"


@pytest.mark.parametrize("k,n,g", WS_SHAPES)
@pytest.mark.parametrize("kind", ["random", "extreme"])
def test_warp_specialized_kernel_is_bit_exact(k: int, n: int, g: int, kind: str) -> None:
    """Every config the rule can pick, at every M of the suite up to the kernel's range, on random and adversarial
    inputs: int32 accumulators equal to ``int_matmul``, and the fp32 epilogue's exact result with per-token and
    static scales."""
    gen = torch.Generator().manual_seed(k + n + 1)
    dg = random_weight(n, k, g, gen, kind)
    kw = layout(dg)
    assert gemm_ws.supported(kw, torch.device("cuda"))
    for m in [m for m in MS if m <= gemm_ws.MAX_M]:
        x = random_acts(m, k, gen, kind)
        if kind == "random" and m > 2:
            x[m // 3] = 0  # a zero row
        ref = int_matmul(x, dg.int8_weight())
        for cfg in [None, *WS_CONFIGS]:
            got = gemm_ws.ws_a8w4_matmul(x.cuda(), kw, out_dtype=None, config=cfg).cpu()
            assert torch.equal(got, ref), f"M={m} {cfg or 'rule'}"
            assert not kw.split_scratch.any(), f"M={m} {cfg or 'rule'}: split-K counts left armed"
        for s_x in (torch.rand(m, 1, generator=gen) * 0.05 + 1e-3, torch.tensor(0.02)):
            got = gemm_ws.ws_a8w4_matmul(x.cuda(), kw, s_x.cuda(), out_dtype=torch.float32).cpu()
            assert torch.equal(got, fp32_epilogue(ref, s_x.reshape(-1, 1), dg.s1)), f"M={m} epilogue"


PP_CONFIGS = [None, *(gemm_pp.PpConfig(*c) for c in ((256, 4), (128, 6), (64, 8, 2), (64, 8, 4), (128, 6, 2),
                                                    (128, 6, 4), (256, 4, 2), (32, 8, 4), (32, 8, 2)))] \
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else []


@pytest.mark.parametrize("k,n,g", WS_SHAPES)
@pytest.mark.parametrize("kind", ["random", "extreme"])
def test_ping_pong_kernel_is_bit_exact(k: int, n: int, g: int, kind: str) -> None:
    """The ping-pong kernel's rule and pinned configs, split in K too (where the splits fit one wave), from 1 token
    (a tile almost all padding) to 2600 (several units per CTA at N = 8448): int32 accumulators equal to
    ``int_matmul`` (split: the counts left zeroed), the fp32 epilogue's exact result with per-token and static
    scales, and its fp16 / bf16 outputs with a bias equal to the warp-specialized kernel's."""
    gen = torch.Generator().manual_seed(k + n + 7)
    dg = random_weight(n, k, g, gen, kind)
    kw = layout(dg)
    bias = torch.randn(n, generator=gen).cuda()
    for m in (1, 17, 255, 1000, 2600):
        x = random_acts(m, k, gen, kind)
        if kind == "random" and m > 2:
            x[m // 3] = 0  # a zero row
        ref = int_matmul(x, dg.int8_weight())
        xc = x.cuda()
        for cfg in PP_CONFIGS:
            if cfg is not None and cfg.split > 1 and not gemm_pp.one_wave(cfg, m, n, gemm_ws._sm_count(xc.device)):
                continue  # (refused: the splits of a tile wait for each other)
            assert torch.equal(gemm_pp.pp_a8w4_matmul(xc, kw, out_dtype=None, config=cfg).cpu(), ref), f"M={m} {cfg}"
            assert not kw.split_scratch.any(), f"M={m} {cfg}: split-K counts left armed"
            for s_x in (torch.rand(m, 1, generator=gen) * 0.05 + 1e-3, torch.tensor(0.02)):
                got = gemm_pp.pp_a8w4_matmul(xc, kw, s_x.cuda(), out_dtype=torch.float32, config=cfg).cpu()
                assert torch.equal(got, fp32_epilogue(ref, s_x.reshape(-1, 1), dg.s1)), f"M={m} {cfg} epilogue"
            s_x = (torch.rand(m, 1, generator=gen) * 0.05 + 1e-3).cuda()
            for dtype in (torch.float16, torch.bfloat16):
                got = gemm_pp.pp_a8w4_matmul(xc, kw, s_x, bias.to(dtype), dtype, config=cfg)
                want = gemm_ws.ws_a8w4_matmul(xc, kw, s_x, bias.to(dtype), dtype)
                assert torch.equal(got, want), f"M={m} {cfg} {dtype} with bias"


def test_many_tokens_on_a_wide_layer_take_the_ping_pong_kernel() -> None:
    """The dispatch's rule on the GPU: 1500 tokens of a layer of 66 tile rows go to the ping-pong kernel, and the
    layer's output equals the exact reference up to the output's rounding (the act-quant in front)."""
    gen = torch.Generator().manual_seed(21)
    dg = random_weight(8448, 2048, 128, gen)
    kw = layout(dg)
    x = torch.randn(1500, 2048, generator=gen).half()
    assert gemm_pp.config_for(1500, 8448) == gemm_pp.PpConfig(256, 4)
    got = a8w4_linear(x.cuda(), kw, out_dtype=torch.float32).cpu()
    q, s_x = quantize_activations(x)
    assert torch.equal(got, fp32_epilogue(int_matmul(q, dg.int8_weight()), s_x, dg.s1))


def _act_quant_cases() -> list[torch.Tensor]:
    """CPU rows for the act-quant's division: every finite fp16 value (62 rows of 1024, shuffled) clipped under 90
    absmaxes (powers of two 2**-30..2**15, whose quotients hit exact .5 ties; random ones; below the 1e-8 floor and
    fp16's largest), bf16 rows of magnitudes 1e-40 to 1e30 (denormal to huge), fp32 rows."""
    gen = torch.Generator().manual_seed(18)
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16)
    rows = every[torch.isfinite(every)][torch.randperm(63488, generator=gen)].reshape(62, 1024)
    limits = torch.cat([2.0 ** torch.arange(-30, 16), torch.rand(40, generator=gen) * 1000,
                        torch.tensor([1e-9, 65504.0])])
    cases = []
    for lim in limits:
        r = rows.float().clamp(-lim, lim).half()
        r[:, 0] = lim.half()  # the limit itself present: the absmax
        cases.append(r)
    cases.append((torch.randn(64, 4096, generator=gen) * torch.logspace(-40, 30, 64)[:, None]).bfloat16())
    cases.append(torch.randn(8, 3000, generator=gen) * 7)
    return cases


def test_act_quant_division_fast_path_is_the_definition() -> None:
    """The act-quant's codes through the division's fast path (inline PTX, which the interpreter cannot run; module
    docstring of :mod:`dgq.kernels.act_quant`), in both kernels and the rule, dynamic, static and static per row,
    equal the CPU definition bit for bit on :func:`_act_quant_cases`, a K cut short of each row (a masked piece)
    and the full one."""
    for x in _act_quant_cases():
        for k in (x.shape[1], x.shape[1] - 24):
            xc = x[:, :k].contiguous()
            m = xc.shape[0]
            per_row = torch.rand(m, 1, generator=torch.Generator().manual_seed(k)) * 0.1 + 1e-3
            for static in (None, torch.tensor(0.02), per_row):
                q_ref, s_ref = quantize_activations(xc, static)
                q, s_x = quantize_activations_triton(xc.cuda(), None if static is None else static.cuda())
                assert torch.equal(q.cpu(), q_ref) and torch.equal(s_x.cpu(), s_ref.reshape(s_x.shape)), \
                    f"rule {xc.dtype} K={k} static={static is not None}"
                if static is None:
                    for pinned in ((True, 16), (False, 16)):
                        q, s_x = quantize_activations_triton(xc.cuda(), config=act_quant.AqConfig(*pinned))
                        assert torch.equal(q.cpu(), q_ref) and torch.equal(s_x.cpu(), s_ref), \
                            f"{pinned} {xc.dtype} K={k} absmax {xc.float().abs().amax():g}"


@pytest.mark.parametrize("k,n,g", [(4096, 320, 128), (2048, 8448, 64)])
def test_per_row_static_scales_are_exact(k: int, n: int, g: int) -> None:
    """A layer whose first positions have their own static scale passes one scale per row: the one-token GEMVs
    (the row's scale) and the act-quant kernel with the warp-specialized kernel, each with the fp32 epilogue's exact
    result."""
    gen = torch.Generator().manual_seed(k + n + 5)
    dg = random_weight(n, k, g, gen)
    kw = layout(dg)
    for m in MS:
        x = (torch.randn(m, k, generator=gen) * 4).half()
        scales = torch.full((m, 1), 0.02)
        scales[::7] = 0.5  # the rows of each sequence's first position, say
        got = a8w4_linear(x.cuda(), kw, scales.cuda(), out_dtype=torch.float32).cpu()
        x_q, s_x = quantize_activations(x, scales)
        assert torch.equal(got, fp32_epilogue(int_matmul(x_q, dg.int8_weight()), s_x, dg.s1)), f"M={m}"


def test_split_k_is_deterministic_under_concurrency() -> None:
    gen = torch.Generator().manual_seed(9)
    dg = random_weight(4096, 4096, 128, gen)
    kw = layout(dg)
    x = random_acts(16, 4096, gen).cuda()
    ref = int_matmul(x.cpu(), dg.int8_weight())
    for cfg in [c for c in _CONFIGS[16] if c.kwargs["SPLIT_K"] > 1]:
        outs = [a8w4_matmul(x, kw, out_dtype=None, config=cfg) for _ in range(30)]
        assert all(torch.equal(o.cpu(), ref) for o in outs), str(cfg)
    for cfg in [c for c in WS_CONFIGS if c.split > 1]:
        outs = [gemm_ws.ws_a8w4_matmul(x, kw, out_dtype=None, config=cfg) for _ in range(30)]
        assert all(torch.equal(o.cpu(), ref) for o in outs), str(cfg)
    for cfg in [c for c in PP_CONFIGS if c is not None and c.split > 1]:  # splits that wait for each other
        outs = [gemm_pp.pp_a8w4_matmul(x, kw, out_dtype=None, config=cfg) for _ in range(30)]
        assert all(torch.equal(o.cpu(), ref) for o in outs), str(cfg)
        assert not kw.split_scratch.any(), str(cfg)
    for cfg in [c for c in gemv.CONFIGS if c.kwargs["SPLIT_K"] > 1]:
        s_x = torch.full((1, 1), 0.01, device="cuda")
        want = fp32_epilogue(ref[:1], s_x.cpu(), dg.s1)
        outs = [gemv.a8w4_gemv(x[:1], kw, s_x, out_dtype=torch.float32, config=cfg) for _ in range(30)]
        assert all(torch.equal(o.cpu(), want) for o in outs), str(cfg)


def test_captured_graph_survives_a_larger_call() -> None:
    """Split-K buffers are per call: a graph captured at M=1 (the GEMV, launched programmatically dependent on the
    act-quant) still replays right after an eager M=16 call."""
    gen = torch.Generator().manual_seed(10)
    dg = random_weight(4096, 4096, 128, gen)
    kw = layout(dg)
    x = torch.randn(1, 4096, generator=gen).half().cuda()
    a8w4_linear(x, kw)  # autotune outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = a8w4_linear(x, kw)
    big = torch.randn(16, 4096, generator=gen).half().cuda()
    big_out = a8w4_linear(big, kw)
    for _ in range(3):
        x.copy_(torch.randn(1, 4096, generator=gen).half())
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, a8w4_linear(x, kw))
    assert torch.equal(big_out, a8w4_linear(big, kw))


@pytest.mark.parametrize("in_graph", [False, True])
def test_warp_specialized_layer_compiles_and_replays(in_graph: bool, monkeypatch) -> None:
    """A layer on the warp-specialized path (K tiles of 128, N a multiple of 64) under ``torch.compile(fullgraph)``
    and replayed from a CUDA graph gives the eager kernels' output at 40 tokens: through dgq's whole-layer operator,
    and with the act-quant in the graph (:data:`dgq.kernels.ops.ACT_QUANT_IN_GRAPH`) when inductor divides exactly
    (``eager_numerics.division_rounding``; without it 4 of 40 row scales differed on the H100)."""
    from dgq.bench import captured
    from dgq.kernels import ops

    monkeypatch.setitem(ops.ACT_QUANT_IN_GRAPH, "cuda", in_graph)
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(13)
    layer = QuantLinear.from_weight(random_weight(256, 1024, 128, gen), None, "dynamic").cuda()
    x = torch.randn(40, 1024, generator=gen).half().cuda()
    assert gemm_ws.supported(layer.kernel_layout(), x.device)
    with torch.inference_mode(), torch._inductor.config.patch({"eager_numerics.division_rounding": in_graph,
                                                                "emulate_precision_casts": in_graph}):
        want = layer(x)
        compiled = torch.compile(layer, fullgraph=True)
        out = torch.empty_like(want)
        replay = captured(lambda: out.copy_(compiled(x)))
        replay()
        torch.cuda.synchronize()
    assert torch.equal(out, want)


def test_layer_layout_follows_the_device() -> None:
    gen = torch.Generator().manual_seed(12)
    layer = QuantLinear.from_weight(random_weight(256, 512, 64, gen), None, "dynamic").cuda()
    x = torch.randn(2, 512, generator=gen).half().cuda()
    layer(x)
    assert layer.kernel_layout().codes is layer.codes and layer.codes.is_cuda
    layer.cpu()
    assert all(not t.is_cuda for t in layer.buffers()) and layer._int8 is None


def _quantized_tiny_llama(act: str = "dynamic"):  # noqa: ANN202
    from dgq.api import quantize
    from dgq.config import preset
    from helpers import make_model

    model = make_model("llama")
    ids = torch.randint(0, 96, (2, 32), generator=torch.Generator().manual_seed(0))
    quantize(model, ids, preset("dgq" if act == "dynamic" else "dgq_static", group_size=64), device="cpu",
             progress=False)
    return model.cuda().half()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_absmax_in_graph_gives_the_kernels_codes(dtype: torch.dtype) -> None:
    """A one-token layer with ``absmax_in_graph`` compiled behind an RMSNorm: the graph's absmax (fused into the
    norm's kernel) gives the GEMV the scale its own whole-row read finds, so the output equals the eager layer on
    the compiled norm's output bit for bit; and the compiled graph does run the GEMV with the absmax given."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(11)
    layer = QuantLinear.from_weight(random_weight(12288, 4096, 128, gen, "random"), None, "dynamic").cuda()
    layer.absmax_in_graph = True
    weight = (torch.rand(4096, generator=gen) + 0.5).to(dtype).cuda()

    def block(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = (h.float() * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype) * weight
        return y, layer(y)

    compiled = torch.compile(block, fullgraph=True)
    seen = []
    real = gemv_tma.tma_gemv_float
    with torch.inference_mode(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(gemv_tma, "tma_gemv_float", lambda *a, **k: seen.append(k.get("row_absmax")) or real(*a, **k))
        for seed in range(3):
            h = (torch.randn(1, 4096, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype).cuda()
            y, out = compiled(h)
            assert torch.equal(out, layer(y)), f"seed {seed}"
    assert any(a is not None for a in seen)


@pytest.mark.parametrize("act", ["dynamic", "static"])
def test_compiled_fused_model_equals_eager(act: str) -> None:
    """The fused model compiled whole (dgq's operators) and replayed from a CUDA graph
    gives the eager kernels' logits, at one token (the GEMV), at 40 (the tensor-core kernel) and at 80, where the
    down projection forms the SwiGLU product in its quantizer (fast exponential and division: the fused eager
    logits equal the unfused ones to a code step, not bit for bit)."""
    from dgq.bench import captured
    from dgq.fuse import SWIGLU_MIN_TOKENS, fuse_projections

    torch._dynamo.reset()
    model = _quantized_tiny_llama(act)
    inputs = [torch.randint(0, 96, (1, m), device="cuda") for m in (1, 40, 80)]
    with torch.inference_mode():
        unfused = [model(ids).logits for ids in inputs]
        fuse_projections(model)
        compiled = torch.compile(model, fullgraph=True)
        for ids, want in zip(inputs, unfused):
            if ids.shape[1] < SWIGLU_MIN_TOKENS:
                assert torch.equal(model(ids).logits, want)
            else:
                assert torch.allclose(model(ids).logits.float(), want.float(), rtol=2e-2, atol=2e-2)
            out = torch.empty_like(want)
            replay = captured(lambda: out.copy_(compiled(ids).logits))  # noqa: B023
            replay()
            torch.cuda.synchronize()
            # inductor computes the norms' float reductions in another order, which may move an activation code
            assert torch.allclose(out.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_generate_compiles_the_static_cache_step() -> None:
    """On CUDA ``dgq generate`` decodes with transformers' static cache and compiled step, and gives the same
    greedy tokens as the eager dynamic-cache decode (a tiny model, where one code step rarely flips an argmax)."""
    from dgq.generate import GenerationSettings, generate_ids
    from helpers import make_tokenizer

    torch._dynamo.reset()
    model, tok = _quantized_tiny_llama(), make_tokenizer()
    fast = generate_ids(model, tok, "a cat sat on the mat", GenerationSettings(max_new_tokens=8))
    slow = generate_ids(model, tok, "a cat sat on the mat", GenerationSettings(max_new_tokens=8, compile=False))
    assert fast.shape == slow.shape == (8,) and (fast == slow).float().mean() >= 0.75


@pytest.mark.parametrize("batch, q_heads, kv_heads", [(1, 32, 32), (8, 32, 8)])  # Llama-2-7B, Llama-3-8B heads
@pytest.mark.parametrize("int8", [False, True])
def test_decode_attention_on_a_real_cache_and_in_a_graph(batch, q_heads, kv_heads, int8):
    """The split-KV decode attention at model shapes, with a static cache's mask, eagerly and replayed from a CUDA
    graph (its chunk count follows the SM count here, unlike in the interpreter); on an fp16 cache, and on an int8
    one (:mod:`dgq.kv_cache`), against the reference on the same cache dequantized."""
    from dgq.kernels.decode_attention import decode_attention
    from dgq.kv_cache import dequantize_rows, quantize_rows
    from test_decode_attention import reference

    kv_len, dim = 1100, 128
    gen = torch.Generator(device="cuda").manual_seed(11)
    q = torch.randn(batch, q_heads, 1, dim, device="cuda", generator=gen).half()
    k, v = (torch.randn(batch, kv_heads, kv_len, dim, device="cuda", generator=gen).half() for _ in range(2))
    mask = (torch.arange(kv_len, device="cuda") < 1030)[None, None, None, :].expand(batch, 1, 1, kv_len)
    cache: tuple = (k, v)
    if int8:
        (k8, ks), (v8, vs) = quantize_rows(k), quantize_rows(v)
        k, v, cache = dequantize_rows(k8, ks, torch.float32), dequantize_rows(v8, vs, torch.float32), (k8, v8)
        scales = (ks, vs)
    else:
        scales = (None, None)
    want = reference(q, k, v, mask, dim ** -0.5)
    got = decode_attention(q, *cache, mask, dim ** -0.5, None, *scales)
    torch.testing.assert_close(got.float(), want, atol=2e-3, rtol=2e-3)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, *cache, mask, dim ** -0.5, None, *scales)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out.float(), want, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("attention,kv_cache", [("dgq", "fp16"), ("sdpa", "fp16"), ("dgq", "int8")])
def test_bench_measures_a_saved_model(attention: str, kv_cache: str, tmp_path) -> None:
    """``dgq bench`` on a saved tiny DGQ model, with either decode attention and either KV cache: fused, compiled
    and captured, and every row a positive figure that says how it was made."""
    from dgq.api import bench, quantize, save
    from dgq.config import preset
    from helpers import make_model, make_tokenizer

    torch._dynamo.reset()
    model = make_model("llama")
    ids = torch.randint(0, 96, (2, 32), generator=torch.Generator().manual_seed(0))
    quantize(model, ids, preset("dgq", group_size=64), device="cpu", progress=False)
    save(model, tmp_path / "tiny", tokenizer=make_tokenizer())
    rows = bench(tmp_path / "tiny", [32], [1, 4], context=64, decode_steps=4, repeats=2, attention=attention,
                 kv_cache=kv_cache)
    assert [r["phase"] for r in rows] == ["prefill", "decode", "decode"]
    assert all(r["fused"] and r["attention"] == attention and r["kv_cache"] == kv_cache for r in rows)
    assert all((r.get("ms") or r.get("tokens_per_s")) > 0 for r in rows)


@pytest.mark.parametrize("attention", ["dgq", "sdpa"])
def test_api_generate_streams_on_cuda(attention: str, tmp_path) -> None:
    """``dgq generate`` as the command runs it (the API, streaming pieces as they come) decodes with the static
    cache and transformers' compiled step, projections fused and either decode attention, and gives the eager
    decode's text.  Session 7 saw the compiled step fail
    when the API decoded in a worker thread (inductor's CUDA-graph trees keep per-thread state: ``assert
    torch._C._is_key_in_tls('tree_manager_containers')``, pytorch/pytorch#123177); it now decodes in the caller's
    thread."""
    from dgq.api import generate, quantize, save
    from dgq.config import preset
    from dgq.generate import GenerationSettings
    from helpers import make_model, make_tokenizer

    torch._dynamo.reset()
    model = make_model("llama")
    ids = torch.randint(0, 96, (2, 32), generator=torch.Generator().manual_seed(0))
    quantize(model, ids, preset("dgq", group_size=64), device="cpu", progress=False)
    save(model, tmp_path / "tiny", tokenizer=make_tokenizer())
    fast = generate(tmp_path / "tiny", "a cat sat on the mat", GenerationSettings(max_new_tokens=8),
                    attention=attention)
    slow = generate(tmp_path / "tiny", "a cat sat on the mat", GenerationSettings(max_new_tokens=8, compile=False))
    assert fast == slow


def test_int8_kv_cache_decode_compiles_and_replays() -> None:
    """The benchmark's decode step over an int8 KV cache (dgq's attention, compiled blocks, the step captured in a
    CUDA graph) runs and, replayed, writes each step's codes and scales at the next position."""
    from dgq.attention import use_decode_attention
    from dgq.bench import DecodeStep

    torch._dynamo.reset()
    model = use_decode_attention(_quantized_tiny_llama())
    with torch.inference_mode():
        step = DecodeStep(model, 2, 32, 96, "compiled", steps=8, kv_cache="int8")
        layer = step.cache.layers[0]
        written = int((layer.key_scales[0, 0] > 0).sum())  # the 32-token prefill, warm-up and capture steps
        for _ in range(3):
            step.run()
        torch.cuda.synchronize()
    assert layer.keys.dtype == torch.int8 and int((layer.key_scales[0, 0] > 0).sum()) == written + 3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_int8_rows_kernel_is_exact_and_compiles(dtype: torch.dtype) -> None:
    """The int8 head's kernel (the magic widening for fp16, the conversion for bf16) gives the float64 product's
    bits on integer-valued activations, whose partial sums are exact in fp32, at every M regime and with tails;
    on random activations it is within fp32 summation error; compiled and replayed in a CUDA graph it gives the
    eager output."""
    from dgq.int8_rows import Int8Linear
    from dgq.kernels.int8_rows import int8_rows_matmul

    gen = torch.Generator().manual_seed(1)
    n, k = 4000, 4096 + 128
    q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    q[0], q[-1] = 127, -127
    scale = (torch.rand(n, generator=gen) * 1e-2 + 1e-4).to(dtype)
    qc, sc = q.cuda(), scale.cuda()
    for m in (1, 3, 8, 16, 17, 32, 33, 300):
        x = torch.randint(-4, 5, (m, k), generator=gen).to(dtype)
        exact = ((x.double() @ q.double().t()).float() * scale.float()).to(dtype)
        assert torch.equal(int8_rows_matmul(x.cuda(), qc, sc).cpu(), exact), f"M={m}"
        xr = torch.randn(m, k, generator=gen).to(dtype)
        ref = (xr.double() @ q.double().t()) * scale.double()
        got = int8_rows_matmul(xr.cuda(), qc, sc).cpu().double()
        assert ((got - ref).abs() <= ref.abs() * 2 * torch.finfo(dtype).eps + 1e-3 * ref.abs().max()).all(), m
    head = Int8Linear(n, k, dtype, "cuda")
    head.codes.copy_(qc)
    head.scale.copy_(sc)
    x = torch.randn(1, 1, k, device="cuda", dtype=dtype)
    eager = head(x)
    compiled = torch.compile(head, fullgraph=True)
    assert torch.equal(compiled(x), eager)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = compiled(x)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
