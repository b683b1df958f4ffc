"""Export a dgq model to formats other tools load: ``compressed-tensors`` (vLLM) and ``fake-fp16`` (plain HF).

* ``compressed-tensors``: the ``pack-quantized`` layout for int4 group-quantized weights with int8 activations
  (dynamic per token, or static per tensor for ``act="static"`` models).  The two dgq scales fold into one float
  group scale ``s1 * s2``, stored in ``dtype`` (float16 by default): that rounding is the only precision the
  export costs, a relative error <= 2**-11 per weight for float16 and 2**-8 for bfloat16 (a reader that then
  dequantizes in that dtype rounds once more, at most doubling it).  Scales outside float16's normal range are
  refused rather than silently losing precision.  dgq's unsigned codes and
  zero points in [0, 15] shift by -8 to the signed int4 range [-8, 7] that compressed-tensors stores; since code
  and zero point shift together, ``(q - zp)`` and hence every weight is unchanged.  A model quantized with
  ``quantize_head`` or ``quantize_embedding`` is refused: the scheme has no 4-bit embedding, and the head would
  have to leave the ``ignore`` list for a layer type readers do not quantize.
  An int8 LM head or embedding (``int8_head``, ``int8_embedding``) is written dequantized in ``dtype`` (the head
  in the ``ignore`` list): the readers have no weight-only int8 embedding, and one rounding of ``q * s`` costs the
  same relative error as the group scales'.
* ``fake-fp16``: an ordinary checkpoint whose Linear weights are the dequantized ones (``s1 * W_s8``), loadable by
  ``AutoModelForCausalLM.from_pretrained``.  It reproduces the quantized weights but not the int8 activations.
  A 4-bit or int8 input embedding and an int8 head are written dequantized too.

See docs/format.md for the tensor names.  Output directories are written atomically, as checkpoints are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from huggingface_hub import save_torch_state_dict
from torch import nn

from dgq.checkpoint import DEFAULT_SHARD_BYTES, atomic_dir, load, write_json
from dgq.embedding import QuantEmbedding
from dgq.errors import DGQError
from dgq.formats import DualGrainedWeight
from dgq.hf import quant_config, tied_keys
from dgq.int8_rows import Int8Linear, Int8Rows
from dgq.nn import FakeQuantLinear, QuantLinear

FORMATS = ("compressed-tensors", "fake-fp16")
INT4_OFFSET = 8  # dgq's unsigned int4 [0, 15] minus this is compressed-tensors' signed int4 [-8, 7]
NIBBLES_PER_WORD = 8


class ExportError(DGQError, ValueError):
    """A model that cannot be exported to the asked format; the message says why."""


def pack_int4(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Pack signed int4 ``values`` (2-D, in [-8, 7]) eight per int32 along ``dim``, as ``pack-quantized`` does.

    Each value is offset to [0, 15]; element ``8 * w + j`` of a row lands in bits ``4j .. 4j + 3`` of word ``w``; a
    ragged tail is padded with zero nibbles.
    """
    u = values.to(torch.int64) + INT4_OFFSET
    u = u if dim == 1 else u.t()
    u = nn.functional.pad(u, (0, -u.shape[1] % NIBBLES_PER_WORD)).reshape(u.shape[0], -1, NIBBLES_PER_WORD)
    words = (u << torch.arange(0, 32, 4, dtype=torch.int64)).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # reinterpret as two's complement
    return words if dim == 1 else words.t().contiguous()


def _folded_scale(dg: DualGrainedWeight, dtype: torch.dtype) -> torch.Tensor:
    """``s1 * s2`` per (row, group) in ``dtype``, refused where ``dtype`` cannot hold it to its full precision."""
    scale = dg.s1[:, None] * dg.s2.float()
    info = torch.finfo(dtype)
    if scale.min() < info.smallest_normal or scale.max() > info.max:
        raise ExportError(f"group scales s1 * s2 span [{scale.min():.3g}, {scale.max():.3g}], outside the normal "
                          f"range of {dtype}; export with dtype=torch.bfloat16")
    return scale.to(dtype)


def _compressed_tensors_module(module: QuantLinear, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    dg = module.dual_grained()
    tensors = {
        "weight_packed": pack_int4(dg.u4.to(torch.int32) - INT4_OFFSET, dim=1),
        "weight_scale": _folded_scale(dg, dtype),
        "weight_zero_point": pack_int4(dg.zp.to(torch.int32) - INT4_OFFSET, dim=0),
        "weight_shape": torch.tensor(dg.shape, dtype=torch.int64),
    }
    if module.act_mode == "static":
        tensors["input_scale"] = module.act_scale.reshape(1).to(dtype)
    return tensors


def _dequantized_module(module: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    if isinstance(module, QuantLinear):
        return {"weight": module.dual_grained().dequantize(dtype)}
    if isinstance(module, (QuantEmbedding, Int8Rows)):
        return {"weight": module.dequantize().to(dtype)}
    return {"weight": module.weight.to(dtype)}


def _compressed_or_float(module: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A dual-grained layer in ``pack-quantized``; an int8 head or embedding dequantized (the head is in the
    ``ignore`` list), as compressed-tensors has no per-row weight-only int8 embedding."""
    return _compressed_tensors_module(module, dtype) if isinstance(module, QuantLinear) \
        else _dequantized_module(module, dtype)


def _export_state(model: nn.Module, convert: Callable[[nn.Module, torch.dtype], dict[str, torch.Tensor]],
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's tensors with each quantized module's replaced by ``convert``'s, floats cast to ``dtype``.

    Tied tensors are dropped first (the config's ``tie_word_embeddings`` re-ties them on load), so that a cast
    cannot turn one shared tensor into two copies.
    """
    quantized = {name: m for name, m in model.named_modules()
                 if isinstance(m, (QuantLinear, FakeQuantLinear, QuantEmbedding, Int8Rows))}
    tied = tied_keys(model)
    state = {k: t for k, t in model.state_dict().items() if k not in tied}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        owner, _, leaf = key.rpartition(".")
        if owner in quantized and leaf != "bias":
            continue
        out[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    for name, module in quantized.items():
        out.update({f"{name}.{k}": v.contiguous() for k, v in convert(module, dtype).items()})
    return out


def _act_args(act: str) -> dict[str, Any]:
    if act == "dynamic":
        return {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    return {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor", "dynamic": False}


def compressed_tensors_config(model: nn.Module) -> dict[str, Any]:
    """The ``quantization_config`` block vLLM / compressed-tensors read for this dual-grained model."""
    config = quant_config(model)
    ignore = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Int8Linear))]
    weights = {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group",
               "group_size": config.group_size, "dynamic": False, "actorder": None}
    scheme = {"targets": ["Linear"], "weights": weights, "input_activations": _act_args(config.act),
              "output_activations": None, "format": "pack-quantized"}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": scheme}, "ignore": ignore, "kv_cache_scheme": None,
            "global_compression_ratio": None}


def _check_dual(model: nn.Module) -> None:
    config = quant_config(model)
    if config.quantize_head or config.quantize_embedding:
        raise ExportError("compressed-tensors export has no 4-bit input embedding and leaves the LM head in float; "
                          "this model was quantized with quantize_head/quantize_embedding (export it as fake-fp16, "
                          "or quantize without them)")
    if config.weight != "dual" or any(isinstance(m, FakeQuantLinear) for m in model.modules()):
        raise ExportError(f"compressed-tensors export needs dual-grained weights (a 'dual' method such as dgq); "
                          f"this model was quantized with method {config.method!r} (weight format {config.weight!r})")
    if config.act_first_scale:
        raise ExportError(f"method {config.method!r} quantizes each sequence's first position with a static scale of "
                          f"its own (act_first_scale); compressed-tensors has no such scale, so it cannot be exported")


def _source(path_or_model: str | Path | nn.Module, tokenizer: Any) -> tuple[nn.Module, Any]:
    if isinstance(path_or_model, nn.Module):
        return path_or_model, tokenizer
    path = Path(path_or_model)
    model = load(path)
    if tokenizer is None and (path / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def export(path_or_model: str | Path | nn.Module, out: str | Path, format: str, tokenizer: Any = None,
           overwrite: bool = False, dtype: torch.dtype = torch.float16,
           shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write the dgq checkpoint directory (or quantized model) ``path_or_model`` to ``out`` in ``format``.

    The model is never modified.  ``tokenizer`` defaults to the one saved in the checkpoint directory.  Everything
    is checked before anything is written; raises :class:`ExportError` or ``CheckpointError``.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose from {', '.join(FORMATS)}")
    if Path(out).exists() and not overwrite:
        raise ExportError(f"output directory {out} already exists (pass overwrite=True / --overwrite)")
    model, tokenizer = _source(path_or_model, tokenizer)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = str(dtype).removeprefix("torch.")
    if format == "compressed-tensors":
        _check_dual(model)
        state = _export_state(model, _compressed_or_float, dtype)
        config["quantization_config"] = compressed_tensors_config(model)
    else:
        quant_config(model)  # refuses a model dgq did not quantize
        state = _export_state(model, _dequantized_module, dtype)
    with atomic_dir(out, overwrite) as tmp:
        save_torch_state_dict(state, tmp, max_shard_size=shard_bytes, metadata={"format": "pt"})
        write_json(tmp / "config.json", config)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)
