"""``out = x @ (q * s)ᵀ`` for a weight stored as int8 rows ``q [N, K]`` with one float scale ``s`` per row: the
int8 LM head (:class:`dgq.int8_rows.Int8Linear`).

Why a kernel: the head of a 7B model is the largest single matrix a decode step reads (32000 x 4096), and in int8 it
is half the fp16 bytes only if the GPU reads the int8 codes; a float ``linear`` on ``q.to(x.dtype)`` would first
write and read a float copy.  The activations stay in the model's dtype (weight-only: no activation rounding before
the logits), so the codes are widened to that dtype in registers and multiplied on the tensor cores with fp32
accumulation; the row scale multiplies the fp32 sum.

Layout: the output is computed transposed, ``outᵀ [N, M] = Q [N, K] @ xᵀ [K, M]``: the widened weight tile is the
MMA's left operand, which Triton keeps in registers on Hopper (no shared-memory round trip for the widened copy), and
the tokens are its narrow right side, so one program shape serves one token (padded to 16) and a batch.

Widening (``MAGIC``): for fp16, the byte ``q + 128`` placed in the low mantissa bits of 1024.0 (``0x6400``) is the
fp16 number ``1024 + q + 128`` exactly, and subtracting 1152 gives ``q``: two integer operations and one subtraction
instead of the integer-to-float conversion instruction, which runs at a quarter of the arithmetic rate.  bf16 has 7
mantissa bits, too few for a byte, so bf16 converts.  Both give the exact integer, so results do not depend on it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dgq.kernels.pdl import launch_options


@triton.jit
def _int8_rows_kernel(x_ptr, q_ptr, s_ptr, out_ptr, M, N, stride_x, stride_o, K: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MAGIC: tl.constexpr,
                      PDL: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask, m_mask = offs_n < N, offs_m < M
    q_ptrs = q_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
    x_ptrs = x_ptr + offs_m.to(tl.int64)[None, :] * stride_x + offs_k[:, None]
    if PDL:
        tl.extra.cuda.gdc_wait()  # launched early (programmatic dependent launch): x comes from the kernel before
    acc = tl.full([BLOCK_N, BLOCK_M], 0.0, tl.float32)  # (not tl.zeros: dgq.kernels.act_quant says why)
    for k0 in range(0, K, BLOCK_K):  # K constexpr: one build per head width (the interpreter needs it too)
        k_mask = offs_k + k0 < K
        q = tl.load(q_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0)
        xt = tl.load(x_ptrs, mask=k_mask[:, None] & m_mask[None, :], other=0.0)
        if MAGIC:
            bits = (q.to(tl.uint8, bitcast=True) ^ 0x80).to(tl.uint16) | 0x6400
            w = bits.to(tl.float16, bitcast=True) - 1152.0
        else:
            w = q.to(xt.dtype)
        acc = tl.dot(w, xt, acc)
        q_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    s = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    val = acc * s[:, None]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[None, :] * stride_o + offs_n[:, None]
    tl.store(out_ptrs, val.to(out_ptrs.dtype.element_ty), mask=n_mask[:, None] & m_mask[None, :])


def int8_rows_config(m: int) -> dict[str, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) by the number of rows ``m``: a fixed rule, not an autotuner
    (no first-call tuning, no benchmark buffers).  Up to 32 tokens: 64-row programs over 128-wide K tiles, three
    stages, so that a 32000-row head spreads over 500 programs that stream its codes (H100,
    ``benchmarks/int8_head_probe.py``: the best of 41 configs at 1, 8 and 32 tokens on Llama-2-7B's and Llama-3-8B's
    heads, within 2% of each case's best; 53.6 us at one token on Llama-2-7B against cuBLAS FP16's 103.4).  More
    tokens (a whole sequence's logits in an evaluation): square tiles that reuse each code tile across 64 tokens."""
    if m <= 32:
        return dict(BLOCK_M=16 if m <= 16 else 32, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4)


def int8_rows_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, config: dict[str, int] | None = None,
                     magic: bool | None = None) -> torch.Tensor:
    """``x [M, K] @ (q * scale[:, None])ᵀ`` in ``x``'s dtype: ``q`` int8 ``[N, K]`` (contiguous), ``scale [N]``.

    ``config`` pins the launch (the tests and the probe try each); ``magic`` the widening (default: fp16 on a GPU;
    Triton's CPU interpreter runs the conversion, which gives the same integers)."""
    if x.dim() != 2 or q.dim() != 2 or x.shape[1] != q.shape[1] or scale.shape != (q.shape[0],):
        raise ValueError(f"int8_rows_matmul: x {list(x.shape)}, q {list(q.shape)}, scale {list(scale.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16):  # fp32 would multiply in tf32 on the tensor cores
        raise ValueError(f"int8_rows_matmul: activations must be fp16 or bf16, got {x.dtype}")
    if q.dtype != torch.int8 or not q.is_contiguous() or x.stride(1) != 1:
        raise ValueError("int8_rows_matmul: q must be contiguous int8 and x contiguous along K")
    m, k = x.shape
    n = q.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    cfg = dict(config or int8_rows_config(m))
    if magic is None:
        magic = x.dtype == torch.float16 and x.device.type == "cuda"
    elif magic and x.dtype != torch.float16:
        raise ValueError(f"int8_rows_matmul: the magic widening is for fp16 activations, not {x.dtype}")
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    pdl = launch_options(x.device)
    _int8_rows_kernel[grid](x, q, scale, out, m, n, x.stride(0), out.stride(0), k, MAGIC=magic, PDL=bool(pdl),
                            **cfg, **pdl)
    return out
