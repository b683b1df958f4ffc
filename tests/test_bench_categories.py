"""``dgq.bench.category``: the profile breakdown's kernel categories, on kernel names an H100 profile gave."""

from __future__ import annotations

import pytest

from dgq.bench import category


@pytest.mark.parametrize("kernel, want", [
    ("_gemv_kernel", "gemm"),
    ("_ws_a8w4_kernel", "gemm"),
    ("nvjet_sm90_hsh_256x8_64x6_2x1_v_bz_TNT", "gemm"),
    ("_widen_kernel", "gemm"),
    ("_decode_attention_split", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1_cga1x1", "attention"),
    ("_act_quant_kernel", "act_quant"),
    ("_act_quant_row_kernel", "act_quant"),
    ("_write_rows_int8", "other"),  # the int8 KV cache's write: "int8" in its name does not make it a GEMM
    # inductor's kernels are named after the ops of their fused region, the consumers' too
    ("triton_red_fused__to_copy_a8w4_linear_add_mean_mul_pow_rsqrt_view_3", "norm"),
    ("triton_poi_fused_a8w4_linear_mul_silu_slice_view_4", "other"),
    ("triton_poi_fused_add_arange_cat_decode_attention_index_copy_mul_neg_slice_transpose_unsque", "other"),
    ("triton_poi_fused__scaled_dot_product_cudnn_attention_add_cat_mul_neg_scalar_tensor_slice_t", "other"),
])
def test_kernels_fall_in_their_category(kernel: str, want: str) -> None:
    assert category(kernel) == want
