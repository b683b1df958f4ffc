"""Writing new keys and values into the int8 KV cache (:mod:`dgq.kv_cache`): rounded and stored in one launch.

Why a kernel: written as torch operations (round each row, then ``index_copy_`` codes and scales), a compiled decode
step spent four to five inductor kernels per layer on it, about 0.5 ms of a 7.9 ms Llama-2-7B step at batch 32 on the
H100 (benchmarks/notes_e2e.md, session 8).  Here one program rounds one key or value row (per-token dynamic int8:
the activation quantization's own helpers, so the codes and scales are bit-identical to
:func:`dgq.kv_cache.quantize_rows` on the CPU; torch on CUDA divides by a Python number through its reciprocal, one
ulp off at times) and stores it at its cache position, the cache's length on the GPU plus the
row's index among the new positions.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dgq.kernels.act_quant import _dynamic_scale, _round_clamp_s8


@triton.jit
def _write_rows_int8(k_ptr, v_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, start_ptr, heads, new_len,
                     stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
                     stride_cb, stride_ch, stride_cl, stride_sb, stride_sh, D: tl.constexpr):
    """Program ``(row, which)``: row ``(b, h, l)`` of the new keys (``which`` 0) or values (1), rounded and stored at
    position ``start + l``."""
    row, which = tl.program_id(0).to(tl.int64), tl.program_id(1)  # (64-bit offsets: a large cache passes 2**31)
    b = row // (heads * new_len)
    h = (row // new_len) % heads
    pos = row % new_len
    d = tl.arange(0, D)
    if which == 0:
        x = tl.load(k_ptr + b * stride_kb + h * stride_kh + pos * stride_kl + d).to(tl.float32)
        codes, scales = kc_ptr, ks_ptr
    else:
        x = tl.load(v_ptr + b * stride_vb + h * stride_vh + pos * stride_vl + d).to(tl.float32)
        codes, scales = vc_ptr, vs_ptr
    pos += tl.load(start_ptr)
    scale = _dynamic_scale(tl.abs(x))
    tl.store(codes + b * stride_cb + h * stride_ch + pos * stride_cl + d, _round_clamp_s8(tl.math.div_rn(x, scale)))
    tl.store(scales + b * stride_sb + h * stride_sh + pos, scale)


def write_int8(key_states: torch.Tensor, value_states: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               key_scales: torch.Tensor, value_scales: torch.Tensor, start: torch.Tensor) -> None:
    """Round ``key_states``/``value_states [B, H, L, D]`` per row and write them, in place, at positions
    ``start .. start + L - 1`` of ``keys``/``values [B, H, max_len, D]`` (int8) and their fp32 scales
    ``key_scales``/``value_scales [B, H, max_len]``; ``start`` is a one-element integer tensor on the same device
    (the cache's length, read on the GPU, so a captured step writes where the cache has grown to)."""
    batch, heads, new_len, dim = key_states.shape
    if value_states.shape != key_states.shape or keys.shape[:2] != (batch, heads) or keys.shape[-1] != dim:
        raise ValueError(f"keys and values [B, H, L, D] must match the cache [B, H, max_len, D]; got "
                         f"{list(key_states.shape)}, {list(value_states.shape)} into {list(keys.shape)}")
    if dim & (dim - 1) or key_states.stride(-1) != 1 or value_states.stride(-1) != 1:
        raise ValueError(f"the head dimension must be a power of two, contiguous; got {dim}")
    if keys.stride() != values.stride() or key_scales.stride() != value_scales.stride() or keys.stride(-1) != 1 \
            or key_scales.stride(-1) != 1:
        raise ValueError("the cache's keys and values (and their scales) must share one contiguous layout")
    _write_rows_int8[(batch * heads * new_len, 2)](
        key_states, value_states, keys, values, key_scales, value_scales, start, heads, new_len,
        *key_states.stride()[:3], *value_states.stride()[:3], *keys.stride()[:3], *key_scales.stride()[:2],
        D=dim, num_warps=1)
