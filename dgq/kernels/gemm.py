"""Triton int8 tensor-core GEMMs: A8W4 dual-grained (fused widening) and plain W8A8, one kernel body.

``out[m, n] = s_x[m] * s1[n] * sum_k x_s8[m, k] * w_s8[n, k]`` (+ bias), int32 accumulation, so the accumulator
equals :func:`dgq.formats.int_matmul` exactly.  The weight comes either

* packed 4-bit (``PACKED``): the [K/2, N] tile of :mod:`dgq.packing` is loaded (coalesced along N) and its raw
  nibbles (0..15, valid int8) go straight into the int8 dots; since a tile lies in one group,
  ``x . (s2 * (u4 - zp)) = s2 * (x . u4 - zp * sum(x))`` is applied to the tile's int32 partial sum, which costs
  per output, not per weight (forming ``s2 * (u4 - zp)`` per weight made the kernel ALU-bound at 1.2 TB/s on H100).
  Low nibbles are the even k, high nibbles the odd k, so instead of interleaving the weight, the activation tile
  is split into its even and odd columns and two int8 dots of depth BLOCK_K/2 run;
* or as int8 ``[N, K]`` (the W8A8 peer, and the prefill path that widens the whole weight once).

Small M is memory-bound: configs with split-K spread K over more programs; partial sums meet in an int32
workspace through atomics, and whichever program completes an output element (per-element arrival counter)
applies the epilogue to it and zeroes workspace and counter again, so no memset launch is needed (the workspace is per device: launches must not run
concurrently on two streams).  K and the group size are compile-time constants: loop trip counts are then
constants (the Triton 3.6 CPU interpreter rejects run-time loop bounds), at the price of one compile per K.  Like :mod:`dgq.kernels.act_quant`, no ``@triton.jit`` helpers of Triton's
standard library are used, so the CPU interpreter runs these kernels whenever triton was imported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class KernelWeight:
    """The A8W4 weight in the layout the kernel reads (derived from ``QuantLinear``'s buffers, never saved).

    ``packed`` uint8 ``[K/2, N]`` (see :mod:`dgq.packing`); ``s2t`` int8 and ``zpt`` uint8 ``[K/g, N]`` are the
    transposes of the format's ``[N, K/g]`` tensors, so a tile's scales are one coalesced row; ``s1`` fp32 ``[N]``.
    """

    packed: torch.Tensor
    s2t: torch.Tensor
    zpt: torch.Tensor
    s1: torch.Tensor
    group_size: int

    @classmethod
    def from_format(cls, packed: torch.Tensor, s2: torch.Tensor, zp: torch.Tensor, s1: torch.Tensor,
                    group_size: int) -> "KernelWeight":
        return cls(packed.contiguous(), s2.t().contiguous(), zp.t().contiguous(), s1.float().contiguous(), group_size)

    @property
    def in_features(self) -> int:
        return self.packed.shape[0] * 2

    @property
    def out_features(self) -> int:
        return self.packed.shape[1]


def _cfg(bm: int, bn: int, bk: int, split_k: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split_k, "GROUP_M": 8},
                         num_warps=warps, num_stages=stages)


# Few configs per M regime (each is one compile per K), chosen for H100 (132 SMs, 228 KB shared memory):
# memory-bound GEMV-like tiles with split-K for M <= 16 (BLOCK_K = the group, or 128), 64-row tiles up to M = 128,
# wgmma-sized 128-row tiles beyond.  The pruner keeps the regime that matches M.
_CONFIGS = [
    *(_cfg(16, bn, bk, sk, 4, 4) for bk in (64, 128) for bn, sk in ((64, 1), (64, 4), (64, 8), (128, 4))),
    _cfg(64, 128, 128, 1, 4, 4), _cfg(64, 256, 128, 1, 8, 3), _cfg(64, 128, 64, 2, 4, 4),
    _cfg(128, 128, 128, 1, 8, 4), _cfg(128, 256, 128, 1, 8, 3), _cfg(128, 256, 64, 1, 8, 4),
    _cfg(128, 128, 64, 1, 4, 4),
]
SMALL_M, MID_M = 16, 128  # regime bounds on M


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    args = {**named_args, **kwargs}
    m, k, group = args["M"], args["K"], args["GROUP"]
    regime_bm = 16 if m <= SMALL_M else 64 if m <= MID_M else 128
    keep = [c for c in configs if c.kwargs["BLOCK_M"] == regime_bm
            and not group % c.kwargs["BLOCK_K"] and not k % c.kwargs["BLOCK_K"]
            and (regime_bm != 16 or c.kwargs["BLOCK_K"] == min(group, 128))]
    if not keep:
        raise ValueError(f"no GEMM config fits K={k}, group={group}: K must be a multiple of 64")
    return keep


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, s2_ptr, zp_ptr, sx_ptr, s1_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
                 M, N, stride_x, stride_o, stride_sx, M_BUCKET,
                 K: tl.constexpr, GROUP: tl.constexpr, PACKED: tl.constexpr, EPILOGUE: tl.constexpr,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped tile order: GROUP_M row-tiles share each weight column-tile while it is in L2.
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    num_m, num_n = (M + BLOCK_M - 1) // BLOCK_M, (N + BLOCK_N - 1) // BLOCK_N
    first_m = (pid // (GROUP_M * num_n)) * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % rows_in_group
    pid_n = (pid % (GROUP_M * num_n)) // rows_in_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_x + tl.arange(0, BLOCK_K)[None, :]
    if PACKED:
        w_ptrs = w_ptr + tl.arange(0, BLOCK_K // 2)[:, None] * N + offs_n[None, :]
    else:
        w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * K + tl.arange(0, BLOCK_K)[:, None]

    # Each split owns TILES consecutive K tiles; the last split's tiles past K load as zeros.
    TILES: tl.constexpr = (K // BLOCK_K + SPLIT_K - 1) // SPLIT_K
    acc = tl.full([BLOCK_M, BLOCK_N], 0, tl.int32)
    for i in range(TILES):
        k0 = (pid_k * TILES + i) * BLOCK_K
        in_k = k0 < K
        a = tl.load(x_ptrs + k0, mask=m_mask[:, None] & in_k, other=0)
        if PACKED:
            # sum_k x * s2 * (u4 - zp) = s2 * (x . u4 - zp * sum_k x) within the tile (one group): the raw nibbles
            # feed the int8 dots, and the group's scale and zero point touch the accumulator, not every weight.
            b = tl.load(w_ptrs + (k0 // 2) * N, mask=n_mask[None, :] & in_k, other=0)
            g = k0 // GROUP
            s2 = tl.load(s2_ptr + g * N + offs_n, mask=n_mask & in_k, other=0).to(tl.int32)
            zp = tl.load(zp_ptr + g * N + offs_n, mask=n_mask & in_k, other=0).to(tl.int32)
            a_even, a_odd = tl.split(tl.reshape(a, [BLOCK_M, BLOCK_K // 2, 2]))
            part = tl.dot(a_even, (b & 15).to(tl.int8), out_dtype=tl.int32)
            part = tl.dot(a_odd, (b >> 4).to(tl.int8), part, out_dtype=tl.int32)
            x_sum = tl.reduce(a.to(tl.int32), 1, _add)
            acc += s2[None, :] * (part - x_sum[:, None] * zp[None, :])
        else:
            b = tl.load(w_ptrs + k0, mask=n_mask[None, :] & in_k, other=0)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)

    out_offs = offs_m.to(tl.int64)[:, None] * stride_o + offs_n[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K > 1:
        # Per-element arrival: each thread adds its partial sum, then (release) counts its element's arrival; the
        # thread that completes an element (acquire) takes the sum and zeroes workspace and counter for the next
        # call.  Per element, so no ordering between threads is needed (a per-tile counter behind a barrier gave
        # wrong outputs now and then at M = 16 on H100, as if other threads' atomics were not yet visible).
        ws_offs = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.atomic_add(ws_ptr + ws_offs, acc, mask=mask, sem="relaxed")
        arrived = tl.atomic_add(cnt_ptr + ws_offs, 1, mask=mask, sem="acq_rel")
        last = mask & (arrived == SPLIT_K - 1)
        acc = tl.atomic_xchg(ws_ptr + ws_offs, 0, mask=last, sem="acquire")
        tl.store(cnt_ptr + ws_offs, 0, mask=last)
        _epilogue(acc, offs_m, offs_n, m_mask, n_mask, last, out_ptr + out_offs, sx_ptr, stride_sx, s1_ptr,
                  bias_ptr, EPILOGUE, HAS_BIAS)
    else:
        _epilogue(acc, offs_m, offs_n, m_mask, n_mask, mask, out_ptr + out_offs, sx_ptr, stride_sx, s1_ptr, bias_ptr,
                  EPILOGUE, HAS_BIAS)


@triton.jit
def _epilogue(acc, offs_m, offs_n, m_mask, n_mask, mask, out_ptrs, sx_ptr, stride_sx, s1_ptr, bias_ptr,
              EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Store the int32 accumulator, or ``(acc * s_x) * s1 (+ bias)`` in fp32 cast to the output's dtype."""
    if EPILOGUE:
        sx = tl.load(sx_ptr + offs_m * stride_sx, mask=m_mask, other=0.0)
        s1 = tl.load(s1_ptr + offs_n, mask=n_mask, other=0.0)
        val = acc.to(tl.float32) * sx[:, None] * s1[None, :]
        if HAS_BIAS:
            val += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, val.to(out_ptrs.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptrs, acc, mask=mask)


_gemm_tuned = triton.autotune(_CONFIGS, key=["M_BUCKET", "N", "K", "GROUP", "PACKED"],
                              prune_configs_by={"early_config_prune": _prune})(_gemm_kernel)

_workspaces: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device, m: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed int32 split-K workspace and arrival counters (>= m*n each) for ``device``; the kernel re-zeroes them."""
    need = max(m, SMALL_M) * n
    ws, cnt = _workspaces.get(device, (None, None))
    if ws is None or ws.numel() < need:
        ws = torch.zeros(need, dtype=torch.int32, device=device)
        cnt = torch.zeros(need, dtype=torch.int32, device=device)  # one arrival counter per output element
        _workspaces[device] = (ws, cnt)
    return ws, cnt


def _launch(x_s8: torch.Tensor, w: torch.Tensor, s2t: torch.Tensor | None, zpt: torch.Tensor | None, n: int,
            group: int, s_x: torch.Tensor | None, s1: torch.Tensor | None, bias: torch.Tensor | None,
            out_dtype: torch.dtype | None, config: triton.Config | None) -> torch.Tensor:
    if x_s8.dtype != torch.int8 or x_s8.dim() != 2:
        raise ValueError(f"x_s8 must be a 2-D int8 tensor, got {x_s8.dtype}{list(x_s8.shape)}")
    x_s8 = x_s8 if x_s8.stride(-1) == 1 else x_s8.contiguous()
    m, k = x_s8.shape
    packed = s2t is not None
    epilogue = out_dtype is not None
    out = torch.empty((m, n), dtype=out_dtype if epilogue else torch.int32, device=x_s8.device)
    if m == 0:
        return out
    ws, cnt = _workspace(x_s8.device, m, n)
    sx = s_x.reshape(-1) if epilogue else ws  # unused pointers get any tensor of the device
    args = (x_s8, w, s2t if packed else ws, zpt if packed else ws, sx, s1 if epilogue else ws,
            bias if bias is not None else ws, out, ws, cnt, m, n, x_s8.stride(0), out.stride(0),
            int(epilogue and sx.numel() > 1), triton.next_power_of_2(m))
    meta = dict(K=k, GROUP=group, PACKED=packed, EPILOGUE=epilogue, HAS_BIAS=bias is not None)

    def grid(c: dict) -> tuple[int, int]:
        return triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"]), c["SPLIT_K"]

    if config is None:
        _gemm_tuned[grid](*args, **meta)
    else:
        if group % config.kwargs["BLOCK_K"] or k % config.kwargs["BLOCK_K"]:
            raise ValueError(f"config {config} does not fit K={k}, group={group}")
        _gemm_kernel[grid(config.kwargs)](*args, **meta, **config.kwargs, num_warps=config.num_warps,
                                          num_stages=config.num_stages)
    return out


def a8w4_matmul(x_s8: torch.Tensor, kw: KernelWeight, s_x: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = torch.float16,
                config: triton.Config | None = None) -> torch.Tensor:
    """A8W4 GEMM with the int4 weight widened in registers: ``(s_x * s1) * (x_s8 @ W_s8ᵀ) (+ bias)``.

    ``out_dtype=None`` returns the raw int32 accumulator (``s_x`` and ``bias`` are then ignored).  ``config``
    pins one kernel configuration instead of autotuning (tests use it to cover every code path).
    """
    if x_s8.shape[-1] != kw.in_features:
        raise ValueError(f"x has K={x_s8.shape[-1]}, weight expects {kw.in_features}")
    return _launch(x_s8, kw.packed, kw.s2t, kw.zpt, kw.out_features, kw.group_size, s_x, kw.s1, bias, out_dtype,
                   config)


def w8a8_matmul(x_s8: torch.Tensor, w_s8: torch.Tensor, s_x: torch.Tensor | None = None,
                s1: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                out_dtype: torch.dtype | None = torch.float16, config: triton.Config | None = None) -> torch.Tensor:
    """Plain int8 GEMM of ``x_s8 [M, K]`` and an int8 weight ``w_s8 [N, K]``, same epilogue as :func:`a8w4_matmul`.

    K must be a multiple of 64 (there is no K tail: every config's BLOCK_K is 64 or 128).
    """
    if w_s8.dtype != torch.int8 or w_s8.shape[1] != x_s8.shape[-1]:
        raise ValueError(f"w_s8 must be int8 [N, {x_s8.shape[-1]}], got {w_s8.dtype}{list(w_s8.shape)}")
    k = w_s8.shape[1]
    return _launch(x_s8, w_s8.contiguous(), None, None, w_s8.shape[0], 128 if k % 128 == 0 else 64, s_x, s1, bias,
                   out_dtype, config)


@triton.jit
def _widen_kernel(w_ptr, s2_ptr, zp_ptr, out_ptr, N, K: tl.constexpr, GROUP: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    k0 = pid_k * BLOCK_K
    b = tl.load(w_ptr + (k0 // 2 + tl.arange(0, BLOCK_K // 2))[:, None] * N + offs_n[None, :],
                mask=n_mask[None, :], other=0).to(tl.int32)
    g = k0 // GROUP
    s2 = tl.load(s2_ptr + g * N + offs_n, mask=n_mask, other=0).to(tl.int32)
    zs = tl.load(zp_ptr + g * N + offs_n, mask=n_mask, other=0).to(tl.int32) * s2
    w_even = ((b & 15) * s2[None, :] - zs[None, :]).to(tl.int8)
    w_odd = ((b >> 4) * s2[None, :] - zs[None, :]).to(tl.int8)
    w = tl.reshape(tl.permute(tl.join(w_even, w_odd), (1, 0, 2)), [BLOCK_N, BLOCK_K])  # [n, k] in k order
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :], w, mask=n_mask[:, None])


def widen_weight(kw: KernelWeight, block_n: int = 128, block_k: int | None = None) -> torch.Tensor:
    """``W_s8 = s2 * (u4 - zp)`` as int8 ``[N, K]`` in one pass (the prefill path's first step).

    ``block_k`` defaults to the group size, at most 128.
    """
    n, k = kw.out_features, kw.in_features
    block_k = block_k or min(kw.group_size, 128)
    if kw.group_size % block_k:
        raise ValueError(f"block_k {block_k} must divide the group size {kw.group_size}")
    out = torch.empty((n, k), dtype=torch.int8, device=kw.packed.device)
    _widen_kernel[(triton.cdiv(n, block_n), k // block_k)](kw.packed, kw.s2t, kw.zpt, out, n, K=k,
                                                           GROUP=kw.group_size, BLOCK_N=block_n, BLOCK_K=block_k)
    return out
