"""Attention of one new token over a static KV cache, split along the cache (flash-decoding), for decode steps.

Why: at batch 1 a decode step's attention has one query row per head, so a kernel that gives each (batch, head) one
program (what SDPA runs with the static cache's explicit mask) keeps 32 programs busy on a 132-SM H100 and reads the
KV cache at about a third of its bandwidth (BENCHMARKS.md: 513 us of a 3.37 ms Llama-2-7B step).  Here the cache
of each (batch, KV head) is cut into ``splits`` chunks, one program each; a second, small kernel merges the chunks'
partial results by their log-sum-exp.  Each program serves all query heads of its KV head (grouped-query attention
reads K and V once), as the rows of one ``tl.dot`` padded to 16.

Masking follows transformers' boolean SDPA mask (``True`` = attend, one row per batch element for the single
query), or attends to the whole cache when there is no mask.  Scores, softmax and the accumulator are fp32; the
probabilities meet V in V's dtype, as flash attention does, so results equal the reference to fp16/bf16 rounding,
not bit for bit.  Like :mod:`dgq.kernels.act_quant`, the kernels reduce with ``tl.reduce`` and build tensors with
``tl.full`` rather than the ``@triton.jit`` helpers (``tl.max``, ``tl.sum``, ``tl.zeros``) that the CPU interpreter
cannot call when triton was imported before it was switched on (the test suite's case).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from dgq.kernels.gemm import _use_asm
from dgq.kernels.pdl import launch_options, wait_then_release

BLOCK_N = 64  # cache positions per inner step
BLOCK_G = 16  # query heads per KV head, padded to the smallest tensor-core tile
# The rule (benchmarks/decode_attention_probe.py on the H100, cold-L2 graphs, BENCHMARKS.md): split each (batch, KV
# head)'s cache into chunks of at least `min_chunk` positions until there are `waves` programs per SM; `block_n`
# positions per inner step; V requested with K (`v_early`); `num_warps` per program.
CONFIG = {"waves": 16, "min_chunk": 128, "block_n": BLOCK_N, "v_early": True, "num_warps": 4}
# On an int8 cache (dgq.kv_cache), from the same probe: ``i8_cvt``, how the codes widen to fp16 (0: Triton's
# conversion, a quarter-rate I2F per element on Hopper; 1: integer add and fp16 subtract on the bit pattern; 2: the
# same in PTX, four codes per xor, two prmt and two packed subtractions), and ``stages`` of the compiler's software
# pipeline over the cache steps (cp.async copies of later steps' K and V while one computes).  V after the scores,
# 8 programs per SM.  Llama-2 heads at batch 32: 127.9 us against 156.9 for the fp16 rule's settings on the int8
# cache and 202.1 for the fp16 cache.  (Triton's CPU interpreter runs i8_cvt 1 and one stage instead.)
CONFIG_INT8 = {"waves": 8, "min_chunk": 128, "block_n": BLOCK_N, "v_early": False, "num_warps": 4, "i8_cvt": 2,
               "stages": 3}


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _i8_to_f16(x):
    """int8 -> fp16, exactly, without Triton's integer-to-float conversion (quarter rate on Hopper): ``x + 128`` lies
    in [0, 255], so ``0x6400 + x + 128`` is the bit pattern of the fp16 ``1024 + x + 128``; less 1152 is ``x``."""
    return (x.to(tl.int16) + 0x6480).to(tl.float16, bitcast=True) - 1152.0


# The same, four codes at a time: the xor makes each byte x + 128, prmt interleaves the bytes with 0x64 into two
# fp16 pairs 1024 + x + 128, and one packed subtraction per pair takes 1152 off.
_I8_TO_F16_PTX = tl.constexpr("""{
.reg .b32 t, c;
xor.b32 t, $2, 0x80808080;
prmt.b32 $0, t, 0x64646464, 0x4140;
prmt.b32 $1, t, 0x64646464, 0x4342;
mov.b32 c, 0x64806480;
sub.f16x2 $0, $0, c;
sub.f16x2 $1, $1, c;
}""")


@triton.jit
def _widen(x, I8_CVT: tl.constexpr):
    """Int8 codes as fp16 by the ``i8_cvt`` method (see :data:`CONFIG_INT8`)."""
    if I8_CVT == 1:
        return _i8_to_f16(x)
    elif I8_CVT == 2:
        return tl.inline_asm_elementwise(_I8_TO_F16_PTX, "=r,=r,r", [x], dtype=tl.float16, is_pure=True, pack=4)
    else:
        return x.to(tl.float16)


@triton.jit
def _attend_step(q, k_row, v_row, ks_row, vs_row, mask_row, offs, end, stride_kn, stride_vn, scale, m_i, l_i, acc,
                 D: tl.constexpr, HAS_MASK: tl.constexpr, V_EARLY: tl.constexpr, INT8_KV: tl.constexpr,
                 I8_CVT: tl.constexpr):
    """One step of the online softmax over cache positions ``offs`` (those at or past ``end`` weigh nothing): the
    running max ``m_i``, sum ``l_i`` and output ``acc``, updated."""
    d = tl.arange(0, D)
    inside = offs < end
    k = tl.load(k_row + offs[:, None] * stride_kn + d[None, :], mask=inside[:, None], other=0)
    if V_EARLY:  # V requested with K, before the scores need K: two blocks of loads in flight, not one
        v = tl.load(v_row + offs[:, None] * stride_vn + d[None, :], mask=inside[:, None], other=0)
    if INT8_KV:
        k = _widen(k, I8_CVT)
    s = tl.dot(q, tl.trans(k.to(q.dtype))).to(tl.float32) * scale
    if INT8_KV:
        s = s * tl.load(ks_row + offs, mask=inside, other=0.0)[None, :]
    keep = inside
    if HAS_MASK:
        keep = keep & (tl.load(mask_row + offs, mask=inside, other=0) != 0)
    s = tl.where(keep[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.reduce(s, 1, _maximum))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing to attend to yet
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    if not V_EARLY:
        v = tl.load(v_row + offs[:, None] * stride_vn + d[None, :], mask=inside[:, None], other=0)
    pv = p
    if INT8_KV:
        pv = p * tl.load(vs_row + offs, mask=inside, other=0.0)[None, :]
        v = _widen(v, I8_CVT)
    acc = acc * alpha[:, None] + tl.dot(pv.to(q.dtype), v.to(q.dtype)).to(tl.float32)
    l_i = l_i * alpha + tl.reduce(p, 1, _add)
    return m_new, l_i, acc


@triton.jit
def _decode_attention_split(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, mask_ptr, o_ptr, lse_ptr, kv_len, chunk, steps, scale,
                            stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                            stride_sb, stride_sh, stride_mb, kv_heads, splits,
                            GROUPS: tl.constexpr, D: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_G: tl.constexpr, V_EARLY: tl.constexpr, INT8_KV: tl.constexpr,
                            I8_CVT: tl.constexpr = 0, STAGES: tl.constexpr = 1, PDL: tl.constexpr = False):
    """Partial attention of the ``GROUPS`` query heads of one KV head over one chunk of the cache.

    ``INT8_KV``: K and V hold int8 codes with one fp32 scale per position (``ks_ptr``/``vs_ptr``, ``[B, Hkv, L]``):
    the codes widen exactly (``I8_CVT``; every int8 is exact in fp16 and bf16), K's scale multiplies the scores, V's
    is folded into the probabilities.  ``PDL``: launched programmatically dependent on the producer of q, K and V
    (:func:`dgq.kernels.pdl.wait_then_release`)."""
    wait_then_release(PDL)
    pid_bh, split = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // kv_heads, pid_bh % kv_heads
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b * stride_qb + (h * GROUPS + g)[:, None] * stride_qh + d[None, :],
                mask=(g < GROUPS)[:, None], other=0.0)
    start = split * chunk
    end = tl.minimum(start + chunk, kv_len)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_G], 0.0, tl.float32)
    acc = tl.full([BLOCK_G, D], 0.0, tl.float32)
    k_row, v_row = k_ptr + b * stride_kb + h * stride_kh, v_ptr + b * stride_vb + h * stride_vh
    ks_row, vs_row, mask_row = ks_ptr + b * stride_sb + h * stride_sh, vs_ptr + b * stride_sb + h * stride_sh, \
        mask_ptr + b * stride_mb
    if STAGES == 1:  # a while loop: Triton's CPU interpreter cannot bound a range by run-time values
        n = start
        while n < end:
            m_i, l_i, acc = _attend_step(q, k_row, v_row, ks_row, vs_row, mask_row, n + tl.arange(0, BLOCK_N), end,
                                         stride_kn, stride_vn, scale, m_i, l_i, acc, D, HAS_MASK, V_EARLY, INT8_KV,
                                         I8_CVT)
            n += BLOCK_N
    else:  # a range the compiler pipelines: later steps' K and V are copied in (cp.async) while this one computes
        for i in tl.range(0, steps, num_stages=STAGES):
            m_i, l_i, acc = _attend_step(q, k_row, v_row, ks_row, vs_row, mask_row,
                                         start + i * BLOCK_N + tl.arange(0, BLOCK_N), end, stride_kn, stride_vn,
                                         scale, m_i, l_i, acc, D, HAS_MASK, V_EARLY, INT8_KV, I8_CVT)
    # A chunk with nothing to attend to has l_i = 0 and m_i = -inf: its output is 0 and its lse -inf.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = m_i + tl.log(l_safe)
    rows = (b * kv_heads * GROUPS + h * GROUPS + g) * splits + split
    tl.store(o_ptr + rows[:, None] * D + d[None, :], out, mask=(g < GROUPS)[:, None])
    tl.store(lse_ptr + rows, lse, mask=g < GROUPS)


@triton.jit
def _decode_attention_merge(o_ptr, lse_ptr, out_ptr, splits, D: tl.constexpr, BLOCK_S: tl.constexpr,
                            PDL: tl.constexpr = False):
    """One query head's output from its chunks' partial outputs, weighted by their log-sum-exp."""
    wait_then_release(PDL)
    row = tl.program_id(0)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, D)
    lse = tl.load(lse_ptr + row * splits + s, mask=s < splits, other=float("-inf"))
    m = tl.reduce(lse, 0, _maximum)
    w = tl.exp(lse - m)  # a chunk with nothing to attend to has lse = -inf and weight 0
    parts = tl.load(o_ptr + (row * splits + s)[:, None] * D + d[None, :], mask=(s < splits)[:, None], other=0.0)
    out = tl.reduce(parts * w[:, None], 0, _add) / tl.reduce(w, 0, _add)
    tl.store(out_ptr + row * D + d, out.to(out_ptr.dtype.element_ty))


@functools.cache
def _sm_count(device: torch.device) -> int:
    """The GPU's SMs (asked once per device: eager decode calls this per layer and step); 8 on the CPU
    interpreter, so that the tests' caches split."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def num_splits(programs: int, kv_len: int, device: torch.device, waves: int = CONFIG["waves"],
               min_chunk: int = CONFIG["min_chunk"], block_n: int = BLOCK_N) -> int:
    """Chunks per (batch, KV head): enough for ``waves`` programs per SM of the GPU, none shorter than ``min_chunk``
    positions (a chunk's partial result costs a write and a merge), halved down to one ``block_n`` step while the
    programs would not cover the SMs once (Llama-3-8B at batch 1: 8 KV heads; 8.8 us in 128-position chunks, 7.6 in
    64-position ones)."""
    sms = _sm_count(device)
    while min_chunk > block_n and programs * triton.cdiv(kv_len, min_chunk) < sms:
        min_chunk //= 2
    return max(1, min(triton.cdiv(waves * sms, programs), triton.cdiv(kv_len, min_chunk)))


def _interpretable(cfg: dict, device: torch.device) -> tuple[int, int]:
    """``(i8_cvt, stages)`` as asked, except in Triton's CPU interpreter, which cannot run PTX (it runs the same
    identity in Triton, 1, instead of 2) nor bound a pipelined range by run-time values (one stage: the while loop)."""
    i8_cvt, stages = cfg.get("i8_cvt", 0), cfg.get("stages", 1)
    return (i8_cvt, stages) if _use_asm(device) else (1 if i8_cvt == 2 else i8_cvt, 1)


def supports(q_heads: int, kv_heads: int, dim: int) -> bool:
    """Whether the kernel serves these heads: whole groups of at most ``BLOCK_G`` query heads per KV head, and a
    power-of-two head dim of 16 to 256 (a ``tl.arange`` extent and a tensor-core depth)."""
    return q_heads % kv_heads == 0 and q_heads // kv_heads <= BLOCK_G and 16 <= dim <= 256 and dim & (dim - 1) == 0


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scale: float, config: dict | None = None, k_scale: torch.Tensor | None = None,
                     v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax(q kᵀ · scale, masked) v`` for one query token: ``q [B, Hq, 1, D]``, ``k``/``v [B, Hkv, L, D]``
    (``Hq`` a multiple of ``Hkv``), ``mask`` bool ``[B, 1, 1, L]`` or ``None``; returns ``[B, 1, Hq, D]`` (the layout
    transformers' attention functions return).  ``config`` (keys of :data:`CONFIG`) replaces the rule's values (the
    probe's variants).

    An int8 K and V (a cache at half the bytes) come with their fp32 scales per position, ``k_scale``/``v_scale``
    ``[B, Hkv, L]``: position ``j`` of K is ``k[..., j, :] * k_scale[..., j]``, as :mod:`dgq.kv_cache` stores them.
    ``benchmarks/kv8_accuracy.py`` measured what that rounding costs (RESULTS.md)."""
    int8_kv = k.dtype == torch.int8
    cfg = {**(CONFIG_INT8 if int8_kv else CONFIG), **(config or {})}
    batch, q_heads, q_len, dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    if q_len != 1 or not supports(q_heads, kv_heads, dim):
        raise ValueError(f"decode attention takes one query token, a power-of-two head dim of 16 to 256 and at most "
                         f"{BLOCK_G} query heads per KV head; got q {list(q.shape)}, k {list(k.shape)}")
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("decode attention needs K and V contiguous in the head dimension")
    if int8_kv != (v.dtype == torch.int8) or int8_kv != (k_scale is not None and v_scale is not None):
        raise ValueError(f"an int8 K and V need both, with k_scale and v_scale; got K {k.dtype}, V {v.dtype}, "
                         f"scales {'given' if k_scale is not None else 'none'}")
    if int8_kv and (k_scale.shape != k.shape[:3] or v_scale.shape != k.shape[:3] or k_scale.stride() != v_scale.stride()
                    or k_scale.stride(-1) != 1 or k_scale.dtype != torch.float32 or v_scale.dtype != torch.float32):
        raise ValueError(f"k_scale and v_scale must be float32 {list(k.shape[:3])}, alike and contiguous in L")
    q = q.reshape(batch, q_heads, dim).contiguous()
    if mask is not None:
        if mask.dtype != torch.bool or mask.shape[-1] != kv_len:
            raise ValueError(f"decode attention takes a boolean mask over the {kv_len} cache positions, got "
                             f"{mask.dtype}{list(mask.shape)}")
        mask = mask.reshape(mask.shape[0], -1, kv_len)[:, -1].expand(batch, kv_len).view(torch.uint8)
    block_n = cfg["block_n"]
    splits = num_splits(batch * kv_heads, kv_len, q.device, cfg["waves"], max(cfg["min_chunk"], block_n), block_n)
    chunk = triton.cdiv(triton.cdiv(kv_len, splits), block_n) * block_n
    splits = triton.cdiv(kv_len, chunk)
    partial = torch.empty(batch * q_heads * splits, dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch * q_heads * splits, dtype=torch.float32, device=q.device)
    ks, vs = (k_scale, v_scale) if int8_kv else (lse, lse)  # (lse: an unread stand-in)
    i8_cvt, stages = _interpretable(cfg, q.device)
    pdl = launch_options(q.device)
    _decode_attention_split[(batch * kv_heads, splits)](
        q, k, v, ks, vs, mask if mask is not None else lse, partial, lse, kv_len, chunk, chunk // block_n, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        ks.stride(0) if int8_kv else 0, ks.stride(1) if int8_kv else 0, mask.stride(0) if mask is not None else 0,
        kv_heads, splits, GROUPS=q_heads // kv_heads, D=dim, HAS_MASK=mask is not None, BLOCK_N=block_n,
        BLOCK_G=BLOCK_G, V_EARLY=cfg["v_early"], INT8_KV=int8_kv, I8_CVT=i8_cvt, STAGES=stages,
        PDL=bool(pdl), num_warps=cfg["num_warps"], **pdl)
    out = torch.empty(batch, 1, q_heads, dim, dtype=q.dtype, device=q.device)
    _decode_attention_merge[(batch * q_heads,)](partial, lse, out, splits, D=dim,
                                                BLOCK_S=triton.next_power_of_2(splits), PDL=bool(pdl), **pdl)
    return out
