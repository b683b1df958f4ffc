"""The TMA-fed one-token GEMV (:mod:`dgq.kernels.gemv_tma`) built for sm_90a on this machine, and its rule.

Gluon does not run in Triton's CPU interpreter: the CPU suite checks that every config the rule can pick compiles
(Triton ships ``ptxas``) with the instructions the kernel is built around (bulk tensor copies, ``dp4a``, the wait for
the act-quant), within the H100's shared memory and without spills, from codes and quantizing inside.
Bit-exactness on the GPU: ``tests/test_kernels_cuda.py`` (``pytest -m cuda``).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any triton import, as the other kernel tests (shared process)

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton.experimental.gluon", reason="this Triton has no Gluon")

import triton  # noqa: E402

from dgq.kernels import gemm_ws, gemv_tma  # noqa: E402
from dgq.kernels.gemm import KernelWeight  # noqa: E402

H100_SHARED = 227 * 1024
# (K, N) of the benchmark's and Llama-2/3 decode layers
LAYERS = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 28672), (28672, 8192), (4096, 12288), (4096, 22016),
          (4096, 6144), (14336, 4096)]
RULE = sorted({(gemv_tma.config_for(n, k, inside), k, inside) for k, n in LAYERS for inside in (False, True)}, key=str)


def compile_for_hopper(cfg: gemv_tma.TmaGemvConfig, k: int, group: int, fuse: bool, out: str = "fp16",  # noqa: ANN201
                       absmax: bool = False):
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    plain = repr(gemm_ws._nvmma(0))
    box = f"[{gemv_tma.slot_scale_rows(group, cfg)}, {cfg.bn}]"
    consts = {"K": k, "GROUP": group, "BN": cfg.bn, "STAGES": cfg.stages, "SPLIT": cfg.split, "HAS_BIAS": True,
              "PDL": True, "FUSE": fuse, "DYNAMIC": True,
              "XQ": gemv_tma.code_buffer_bytes(k, cfg) if fuse else 0, "ABSMAX": absmax}
    sig = {"w_desc": f"tensordesc<u8[{cfg.bn}, {64 * cfg.kt}],{plain}>", "x_desc": f"tensordesc<i8[1, 128],{plain}>",
           "s2_desc": f"tensordesc<i8{box},{plain}>", "zp_desc": f"tensordesc<u8{box},{plain}>",
           "x_ptr": "*fp16" if fuse else "*i8", "sx_ptr": "*i16" if absmax else "*fp32", "s1_ptr": "*fp32",
           "bias_ptr": f"*{out}", "out_ptr": f"*{out}", "ws_ptr": "*i32", "cnt_ptr": "*i32", "M": "i32", "N": "i32", "stride_x": "i32",
           "stride_sx": "i32", **{name: "constexpr" for name in consts}}
    options = {"num_warps": cfg.warps}
    # the specialization the launcher gives 16-byte-aligned pointers and multiples of 16 (so loads can be vectorized)
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(sig)
               if name.endswith("_ptr") or name in ("N", "stride_x")}
    return triton.compile(GluonASTSource(gemv_tma._tma_gemv_kernel, sig, consts, aligned),
                          target=GPUTarget("cuda", 90, 32), options=options)


@pytest.mark.parametrize("cfg,k,fuse", RULE + [(gemv_tma.TmaGemvConfig(256, 8, 2, 8), 4096, False)], ids=str)
@pytest.mark.parametrize("group", [128, 64])
def test_every_rule_config_builds_for_hopper(cfg: gemv_tma.TmaGemvConfig, k: int, group: int, fuse: bool) -> None:
    kernel = compile_for_hopper(cfg, k, group, fuse)
    ptx = kernel.asm["ptx"]
    assert "dp4a.s32.s32" in ptx and "cp.async.bulk.tensor" in ptx and "mbarrier.try_wait" in ptx
    assert "griddepcontrol.wait" in ptx
    assert kernel.metadata.shared <= H100_SHARED
    assert "local" not in ptx  # nothing spilled to local memory
    if fuse:  # the row is read in 16-byte loads, all issued before the absmax's first barrier (one trip to L2)
        head = ptx[ptx.index("griddepcontrol.wait"):]
        head = head[:head.index("bar.sync")]
        assert head.count("ld.global.v4.b32") >= k // (8 * 32 * cfg.warps) and "ld.global.b16" not in head


@pytest.mark.parametrize("k,n", [(4096, 12288), (4096, 22016)])  # the fused q/k/v and gate/up of Llama-2-7B
def test_given_row_absmax_skips_the_whole_row_read(k: int, n: int) -> None:
    """With the row's absmax given (``ABSMAX``), a CTA loads its own K range only: fewer global loads than the
    whole-row read, no reduction barrier before the codes, and the scale still by IEEE division (the reference's)."""
    cfg = gemv_tma.config_for(n, k, True)
    whole, given = (compile_for_hopper(cfg, k, 128, True, absmax=a).asm["ptx"] for a in (False, True))
    assert "local" not in given and "div.rn.f32" in given and "griddepcontrol.wait" in given
    loads = [ptx.count("ld.global") for ptx in (whole, given)]
    assert loads[1] < loads[0], loads
    assert given.count("bar.sync") < whole.count("bar.sync")


def test_rule_keeps_the_gpu_busy_with_small_ctas() -> None:
    c, C = gemv_tma.config_for, gemv_tma.TmaGemvConfig
    assert c(4096, 4096) == C(64, 2, 4, kt=2)  # 64 tiles x 4; 8 would leave 4 K tiles per CTA
    assert c(4096, 11008) == C(64, 2, 8, kt=2)  # long K: 86 tiles -> 10-11 per CTA, slots of 2
    assert c(11008, 4096) == C(64, 2, 4, kt=2)  # 172 tiles x 4 = 688 CTAs
    assert c(22016, 4096) == C(64, 2, 2, kt=4)  # 16 K tiles per split: slots of 4
    assert c(28672, 8192) == C(128, 2, 1, kt=4)  # wide: 128 rows, unsplit
    for k, n in LAYERS:
        cfg = c(n, k)
        assert k // 128 // cfg.split >= gemv_tma.MIN_SPLIT_TILES or cfg.split == 1
    # quantizing inside: long rows on narrow layers take wider CTAs with 8 warps to read the row; wide layers split
    # less; slots of 2 K tiles (the CTA's codes take shared memory too)
    assert c(4096, 11008, True) == c(8192, 28672, True) == C(128, 2, 8, 8, kt=2)
    assert c(28672, 8192, True) == C(64, 2, 2, kt=2)
    assert c(4096, 4096, True) == C(64, 2, 4, kt=2) and c(11008, 4096, True) == C(64, 2, 4, kt=2)


def test_code_buffer_is_a_power_of_two_holding_the_ctas_range() -> None:
    cfg = gemv_tma.TmaGemvConfig(64, 4, 8)
    assert gemv_tma.code_buffer_bytes(11008, cfg) == 2048  # 11 tiles of 128 codes
    assert gemv_tma.code_buffer_bytes(4096, gemv_tma.TmaGemvConfig(64, 4, 4)) == 1024
    assert gemv_tma.code_buffer_bytes(28672, gemv_tma.TmaGemvConfig(128, 4, 1)) == 32768
    # splits of whole slots: 86 tiles in 8 splits of 4-tile slots is 12 tiles each (the last takes 2)
    assert gemv_tma.split_tiles(11008, gemv_tma.TmaGemvConfig(64, 2, 8, kt=4)) == 12
    assert gemv_tma.code_buffer_bytes(11008, gemv_tma.TmaGemvConfig(64, 2, 8, kt=4)) == 2048
    assert gemv_tma.split_tiles(1152, gemv_tma.TmaGemvConfig(64, 2, 3, kt=4)) == 4


def test_layers_it_cannot_take_are_refused_clearly() -> None:
    codes = torch.zeros(96, 128, dtype=torch.uint8)
    kw = KernelWeight.of(codes, torch.zeros(4, 96, dtype=torch.int8), torch.zeros(4, 96, dtype=torch.uint8),
                         torch.ones(96), torch.zeros(192, dtype=torch.int32), 64)
    with pytest.raises(ValueError, match="the TMA GEMV needs Hopper"):
        gemv_tma.tma_gemv(torch.zeros(1, 256, dtype=torch.int8), kw, torch.ones(1, 1))
