"""The ping-pong Hopper GEMM (:mod:`dgq.kernels.gemm_pp`) built for sm_90a on this machine, and its rule.

Gluon kernels do not run in Triton's CPU interpreter: the CPU suite checks that every config the rule picks compiles
(Triton ships ``ptxas``) with two register-operand MMA warpgroups that take registers from the load warp, within the
H100's shared memory and without spilling registers to local memory in the fp16 / bf16 epilogues; bit-exactness on
the GPU: ``tests/test_kernels_cuda.py`` (``pytest -m cuda``).
"""

from __future__ import annotations

import os
import re
import subprocess

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any triton import, as the other kernel tests (shared process)

import pytest

pytest.importorskip("triton.experimental.gluon", reason="this Triton has no Gluon")

import triton

from dgq.kernels import gemm_pp, gemm_ws

H100_SHARED = 227 * 1024
RULE_CONFIGS = sorted({c for m in (32, 33, 64, 65, 256, 512, 1024, 8192) for n in (4096, 8192, 11008, 28672)
                       if (c := gemm_pp.config_for(m, n)) is not None}, key=str)


def compile_for_hopper(cfg: gemm_pp.PpConfig, group: int, out: str):
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    bn = gemm_pp.BN
    swz, plain = repr(gemm_ws._nvmma(64)), repr(gemm_ws._nvmma(0))
    staged = repr(gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32 if out in ("i32", "fp32") else 16, rank=2))
    box = f"[{gemm_ws._scale_rows(group, bn)}, {bn}]"
    consts = {"GROUP": group, "BN": bn, "BM": cfg.bm, "STAGES": cfg.stages, "SPLIT": cfg.split, "EPILOGUE": out != "i32",
              "HAS_BIAS": True, "PDL": True, "MMA_REGS": gemm_pp.MMA_REGS}
    sig = {"w_desc": f"tensordesc<u8[{bn}, 64],{swz}>", "x_desc": f"tensordesc<i8[{cfg.bm}, 64],{swz}>",
           "s2_desc": f"tensordesc<i8{box},{plain}>", "zp_desc": f"tensordesc<u8{box},{plain}>",
           "sx_ptr": "*fp32", "s1_ptr": "*fp32", "bias_ptr": f"*{out}", "out_ptr": f"*{out}",
           "out_desc": f"tensordesc<{out}[{min(cfg.bm // cfg.split, 64)}, {32 if out in ('i32', 'fp32') else 64}],{staged}>", "ws_ptr": "*i32",
           "cnt_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "stride_sx": "i32",
           **{name: "constexpr" for name in consts}}
    return triton.compile(GluonASTSource(gemm_pp._pp_a8w4_kernel, sig, consts), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": 4, "maxnreg": gemm_pp.MAXNREG})


def spill_bytes(ptx: str, tmp_path) -> int:
    """Bytes ptxas spills to local memory for this PTX (its ``-v`` report)."""
    src = tmp_path / "k.ptx"
    src.write_text(ptx)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
    report = subprocess.run([ptxas, "-arch=sm_90a", "-v", str(src), "-o", str(tmp_path / "k.cubin")],
                            capture_output=True, text=True, check=True).stderr
    return sum(int(b) for b in re.findall(r"(\d+) bytes spill stores", report))


def test_rule_picks_ping_pong_tiles_where_they_fill_the_gpu() -> None:
    assert gemm_pp.config_for(64, 28672) is None  # the warp-specialized kernel's small tiles
    assert gemm_pp.config_for(16, 4096) is None and gemm_pp.config_for(64, 11008) is None  # 86 tiles: no split
    assert gemm_pp.config_for(17, 4096) == gemm_pp.config_for(32, 4096) == gemm_pp.PpConfig(32, 8, 4)
    assert gemm_pp.config_for(32, 8192) == gemm_pp.PpConfig(32, 8, 2)
    assert gemm_pp.config_for(32, 320) is None  # 3 tiles x 4: too few CTAs to be worth a split
    assert gemm_pp.config_for(33, 4096) == gemm_pp.config_for(64, 4096) == gemm_pp.PpConfig(64, 8, 4)  # 32 tiles
    assert gemm_pp.config_for(64, 8192) == gemm_pp.PpConfig(64, 8, 2)  # 64 tiles x 4 > 132 SMs
    assert gemm_pp.config_for(64, 4096, sms=78) == gemm_pp.PpConfig(64, 8, 2)
    assert gemm_pp.config_for(128, 4096) == gemm_pp.PpConfig(128, 6, 4)  # K splits of one wave up to 256 tokens
    assert gemm_pp.config_for(128, 8192) == gemm_pp.PpConfig(128, 6, 2)
    assert gemm_pp.config_for(256, 4096) == gemm_pp.PpConfig(128, 6, 2)  # 2 x 32 tiles x 2 splits = 128 CTAs
    assert gemm_pp.config_for(256, 8192) == gemm_pp.PpConfig(256, 4, 2)
    assert gemm_pp.config_for(256, 1024) is None  # 8 tiles x 2: too few CTAs to be worth a split
    assert all(gemm_pp.one_wave(gemm_pp.config_for(m, n), m, n, 132) for m in range(33, 257, 7)
               for n in (4096, 8192) if gemm_pp.config_for(m, n).split > 1)
    assert gemm_pp.config_for(129, 11008) == gemm_pp.config_for(8192, 4096) == gemm_pp.PpConfig(256, 4)
    assert gemm_pp.config_for(65, 11008) == gemm_pp.config_for(128, 28672) == gemm_pp.PpConfig(128, 6)  # no padding
    assert gemm_pp.config_for(256, 11008) == gemm_pp.PpConfig(256, 4)  # 86 tiles of 256 tokens
    assert gemm_pp.config_for(512, 4096) == gemm_pp.PpConfig(128, 6)  # 64 of 256, 128 of 128 tokens
    assert gemm_pp.config_for(300, 4096) is None  # 64 tiles of 256 or 96 of 128 tokens: too few
    assert gemm_pp.config_for(1024, 4096) == gemm_pp.PpConfig(256, 4)
    assert len(RULE_CONFIGS) == 9  # 256 and 128 tokens unsplit; 256 split in 2; 128, 64 and 32 in 2 and 4


# unsplit configs in every output and group; the split ones (same main loop) in fp16 at group 128, for suite time
BUILDS = [(cfg, group, out) for cfg in RULE_CONFIGS
          for group, out in ([(128, "fp16"), (64, "bf16"), (128, "i32")] if cfg.split == 1 else [(128, "fp16")])]


@pytest.mark.parametrize("cfg,group,out", BUILDS, ids=str)
def test_every_rule_config_builds_for_hopper(cfg: gemm_pp.PpConfig, group: int, out: str, tmp_path) -> None:
    kernel = compile_for_hopper(cfg, group, out)
    ptx = kernel.asm["ptx"]
    instr = f"wgmma.mma_async.sync.aligned.m64n{min(cfg.bm, 128)}k32.s32.s8.s8"
    mmas = [line for line in ptx.splitlines() if instr in line]
    # the weight operand from four registers, the activations from a shared-memory descriptor: "}, {%r..x4}, %rd"
    assert mmas and all(re.search(r"\}, \{%r\d+,%r\d+,%r\d+,%r\d+\}, %rd\d+", line) for line in mmas)
    assert f"setmaxnreg.inc.sync.aligned.u32 \t{gemm_pp.MMA_REGS}" in ptx and "griddepcontrol.wait" in ptx
    assert kernel.metadata.shared <= H100_SHARED
    if out != "i32":  # the int32 output (tests only) spills in its layout conversion; the float epilogues must not
        assert spill_bytes(ptx, tmp_path) == 0
        # and store through the copy engine (one elected thread per warpgroup issues the copies)
        assert "elect.sync" in ptx and "cp.async.bulk.tensor.2d.global.shared::cta" in ptx
