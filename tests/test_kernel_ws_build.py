"""The warp-specialized Hopper GEMM (:mod:`dgq.kernels.gemm_ws`) built for sm_90a on this machine.

Gluon kernels do not run in Triton's CPU interpreter, so the CPU suite checks what it can without a GPU: every
config the dispatch rule can pick compiles (Triton ships ``ptxas``), with the tensor-core instruction it is built
around and within the H100's shared memory; the rule itself and the shapes it refuses.  Bit-exactness on the GPU:
``tests/test_kernels_cuda.py`` (``pytest -m cuda``).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any triton import, as the other kernel tests (shared process)

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton.experimental.gluon", reason="this Triton has no Gluon")

import triton  # noqa: E402

from dgq.kernels import gemm_ws  # noqa: E402
from dgq.kernels.gemm import KernelWeight  # noqa: E402

H100_SHARED = 227 * 1024
RULE_CONFIGS = sorted({gemm_ws.config_for(m, n) for m in (2, 16, 17, 64, 65, 256, 1023, 2047) for n in (4096, 11008, 28672)},
                      key=str)
SPLIT_CONFIG = gemm_ws.WsConfig(128, 64, 4, 3)  # a split of three, with one CTA per SM


def compile_for_hopper(cfg: gemm_ws.WsConfig, group: int, out: str):  # noqa: ANN201 - a triton CompiledKernel
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    swz, plain = repr(gemm_ws._nvmma(64)), repr(gemm_ws._nvmma(0))
    box = f"[{gemm_ws._scale_rows(group, cfg.bn)}, {cfg.bn}]"
    consts = {"GROUP": group, "BN": cfg.bn, "BM": cfg.bm, "STAGES": cfg.stages, "SPLIT": cfg.split,
              "WIDEN_WARPS": cfg.widen_warps, "WIDEN_REGS": cfg.widen_regs, "EPILOGUE": out != "i32",
              "HAS_BIAS": True, "PDL": True}
    sig = {"w_desc": f"tensordesc<u8[{cfg.bn}, 64],{swz}>", "x_desc": f"tensordesc<i8[{cfg.bm}, 64],{swz}>",
           "s2_desc": f"tensordesc<i8{box},{plain}>", "zp_desc": f"tensordesc<u8{box},{plain}>",
           "sx_ptr": "*fp32", "s1_ptr": "*fp32", "bias_ptr": f"*{out}", "out_ptr": f"*{out}", "ws_ptr": "*i32",
           "cnt_ptr": "*i32",
           "M": "i32", "N": "i32", "K": "i32", "stride_sx": "i32", **{name: "constexpr" for name in consts}}
    return triton.compile(GluonASTSource(gemm_ws._ws_a8w4_kernel, sig, consts), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": 4, "maxnreg": cfg.maxnreg})


@pytest.mark.parametrize("cfg", [*RULE_CONFIGS, SPLIT_CONFIG], ids=str)
@pytest.mark.parametrize("group,out", [(128, "fp16"), (64, "bf16"), (128, "i32")])
def test_every_rule_config_builds_for_hopper(cfg: gemm_ws.WsConfig, group: int, out: str) -> None:
    kernel = compile_for_hopper(cfg, group, out)
    assert f"wgmma.mma_async.sync.aligned.m64n{min(cfg.bm, 128)}k32.s32.s8.s8" in kernel.asm["ptx"]
    assert "griddepcontrol.wait" in kernel.asm["ptx"] and "cp.async.bulk.tensor" in kernel.asm["ptx"]
    assert kernel.metadata.shared <= H100_SHARED


def test_rule_fills_the_gpu_with_ctas() -> None:
    # M <= 16: two CTAs per SM, 64-row tiles unless they alone outnumber the SMs, K split while one wave holds them
    assert gemm_ws.config_for(16, 4096) == gemm_ws.WsConfig(64, 16, 6, 4, 80, 80)  # 64 tiles x 4 = 256 <= 264
    assert gemm_ws.config_for(1, 8192) == gemm_ws.WsConfig(64, 16, 6, 2, 80, 80)
    assert gemm_ws.config_for(16, 11008) == gemm_ws.WsConfig(128, 16, 4, 2, 80, 80)
    assert gemm_ws.config_for(16, 28672) == gemm_ws.WsConfig(128, 16, 4, 1, 80, 80)
    # 17..32 tokens: the same, in 32-token tiles
    assert gemm_ws.config_for(17, 11008) == gemm_ws.WsConfig(128, 32, 4, 2, 80, 80)
    assert gemm_ws.config_for(32, 4096) == gemm_ws.WsConfig(64, 32, 6, 4, 80, 80)
    # 33..64 tokens (the layers of few tiles go to the ping-pong kernel, split): 128-row tiles, one CTA per SM while
    # the tiles fit one wave; two per SM only beyond
    assert gemm_ws.config_for(33, 11008) == gemm_ws.config_for(64, 8192) == gemm_ws.WsConfig(128, 64, 4, 1)
    assert gemm_ws.config_for(64, 28672) == gemm_ws.WsConfig(128, 64, 4, 1, 80, 80)
    # more tokens, where the ping-pong kernel's tiles are too few: 128-token rings of 64-row tiles, never split
    assert gemm_ws.config_for(256, 4096) == gemm_ws.config_for(2047, 4096) == gemm_ws.WsConfig(64, 128, 6, 1)
    # a GPU with fewer SMs splits less
    assert gemm_ws.config_for(16, 4096, sms=78).split == 2


@pytest.mark.parametrize("k,n,g,ok", [(4096, 4096, 128, True), (4096, 4096, 64, True), (4096, 4096, 256, True),
                                      (576, 192, 64, False), (4096, 4000, 128, False), (4096, 4096, 192, False)])
def test_supported_layers(k: int, n: int, g: int, ok: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gemm_ws, "_is_hopper", lambda device: True)
    codes = torch.zeros(n, k // 2, dtype=torch.uint8)
    kw = KernelWeight.of(codes, torch.zeros(k // g, n, dtype=torch.int8), torch.zeros(k // g, n, dtype=torch.uint8),
                         torch.ones(n), torch.zeros(2 * n, dtype=torch.int32), g)
    assert gemm_ws.supported(kw, torch.device("cuda")) is ok
    assert not gemm_ws.supported(kw, torch.device("cpu"))


def test_the_paths_meet_where_the_kernel_stops() -> None:
    from dgq.kernels import linear

    assert linear.gemm_ws is gemm_ws and linear.WIDEN_MIN_M == gemm_ws.MAX_M + 1
    # long-K layers stay with the warp-specialized kernel a little longer (measured: module constants)
    assert gemm_ws.takes(2047, 4096, 4096) and not gemm_ws.takes(2048, 4096, 4096)
    assert gemm_ws.takes(2048, 11008, 4096) and gemm_ws.takes(4095, 28672, 8192)
    assert not gemm_ws.takes(4096, 11008, 4096) and not gemm_ws.takes(2048, 8192, 28672)
