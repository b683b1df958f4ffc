"""Quantized checkpoints: a directory that ``transformers`` tooling recognises, written atomically.

Layout: ``config.json`` (the model's config plus a ``quantization_config`` block with every setting and which
module is which quantized class), ``model.safetensors`` (or shards + index), the tokenizer files and a short
``README.md`` model card.  Loading builds the model on the meta device, swaps in quantized skeletons and assigns
the stored tensors, so the float model is never materialised.  See docs/format.md.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from dgq.config import ConfigError, QuantConfig
from dgq.formats import FormatError
from dgq.nn import FakeQuantLinear, QuantLinear

FORMAT_VERSION = 1
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 * 1024**3


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read; the message names the problem."""


def _module_entry(module: nn.Module) -> dict[str, Any]:
    entry = {"in_features": module.in_features, "out_features": module.out_features, "act": module.act_mode,
             "bias": module.bias is not None}
    if isinstance(module, QuantLinear):
        return {"class": "QuantLinear", "group_size": module.group_size, **entry}
    return {"class": "FakeQuantLinear", "dtype": str(module.weight.dtype).removeprefix("torch."), **entry}


def quantization_config(model: nn.Module) -> dict[str, Any]:
    """The ``quantization_config`` block of ``model`` (quantized by :func:`dgq.api.quantize`)."""
    config: QuantConfig | None = getattr(model, "dgq_config", None)
    if config is None:
        raise CheckpointError("model carries no dgq_config: quantize it with dgq first")
    modules = {name: _module_entry(m) for name, m in model.named_modules()
               if isinstance(m, (QuantLinear, FakeQuantLinear))}
    return {"quant_method": "dgq", "format_version": FORMAT_VERSION, "weight_bits": config.weight_bits,
            "act_bits": config.act_bits, "group_size": config.group_size, "activation": config.act,
            "smoothing_folded": config.smoothing != "none", "settings": config.to_dict(), "modules": modules}


def _unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict without shared storage (safetensors refuses it): ``aliases`` maps a dropped key to its twin."""
    state, aliases, seen = {}, {}, {}
    for key, tensor in model.state_dict().items():
        ptr = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and ptr in seen:
            aliases[key] = seen[ptr]
            continue
        seen[ptr] = key
        state[key] = tensor.detach().contiguous()
    return state, aliases


def _write_tensors(state: dict[str, torch.Tensor], folder: Path, shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], folder / SINGLE_FILE, metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2))


def _model_card(qc: dict[str, Any], card: dict[str, Any]) -> str:
    s = qc["settings"]
    lines = [f"# {card.get('name', 'dgq quantized model')}", "",
             f"Quantized with [dgq](https://pypi.org/project/dgq/) method `{s['method']}`: "
             f"W{qc['weight_bits']}A{qc['act_bits']}, weight format `{s['weight']}`, group size {s['group_size']}, "
             f"activations `{s['act']}`, smoothing `{s['smoothing']}`, search {'on' if s['search'] else 'off'}, "
             f"calibration {s['nsamples']} x {s['seqlen']} tokens (seed {s['seed']}).", ""]
    if card.get("base_model"):
        lines += [f"Base model: `{json.dumps(card['base_model'])}`", ""]
    ppl, fp = card.get("perplexity") or {}, card.get("perplexity_fp") or {}
    if ppl:
        lines += [f"Perplexity (seqlen {card.get('seqlen')}, windows {card.get('windows') or 'all'}):", "",
                  "| dataset | before | after |", "|---|---|---|"]
        lines += [f"| {d} | {fp.get(d, float('nan')):.3f} | {p:.3f} |" for d, p in ppl.items()] + [""]
    lines += ["Load with `dgq.load(path)`; see docs/format.md of dgq for the tensor layout.", ""]
    return "\n".join(lines)


def save(model: nn.Module, out_dir: str | Path, tokenizer: Any = None, overwrite: bool = False,
         card: dict[str, Any] | None = None, shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write ``model`` to ``out_dir`` via a temporary sibling directory renamed into place."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise CheckpointError(f"output directory {out} already exists (pass overwrite=True / --overwrite)")
    qc = quantization_config(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        state, aliases = _unique_state(model)
        qc["aliases"] = aliases
        _write_tensors(state, tmp, shard_bytes)
        config = model.config.to_dict()
        config["quantization_config"] = qc
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(_model_card(qc, card or {}))
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _read_config(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    file = path / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{path} is not a dgq checkpoint: no config.json")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file} is not valid JSON: {exc}") from None
    qc = config.pop("quantization_config", None)
    if not isinstance(qc, dict) or qc.get("quant_method") != "dgq":
        raise CheckpointError(f"{file} has no dgq quantization_config")
    if qc.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"unknown dgq format_version {qc.get('format_version')!r} in {file} "
                              f"(this dgq reads version {FORMAT_VERSION})")
    return config, qc


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    files = ([path / SINGLE_FILE] if (path / SINGLE_FILE).is_file() else
             sorted({path / f for f in json.loads((path / INDEX_FILE).read_text())["weight_map"].values()})
             if (path / INDEX_FILE).is_file() else [])
    if not files:
        raise CheckpointError(f"{path} holds no {SINGLE_FILE} or {INDEX_FILE}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(f))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{f.name} is corrupt or truncated: {exc}") from None
    return state


def _skeleton(entry: dict[str, Any], name: str) -> nn.Module:
    meta = torch.device("meta")
    if entry["class"] == "QuantLinear":
        return QuantLinear(entry["in_features"], entry["out_features"], entry["group_size"], entry["act"],
                           entry["bias"], device=meta)
    if entry["class"] == "FakeQuantLinear":
        dtype = getattr(torch, entry["dtype"])
        weight = torch.empty(entry["out_features"], entry["in_features"], device=meta, dtype=dtype)
        bias = torch.empty(entry["out_features"], device=meta, dtype=dtype) if entry["bias"] else None
        return FakeQuantLinear(weight, bias, entry["act"], torch.empty((), device=meta))
    raise CheckpointError(f"module {name}: unknown class {entry['class']!r}")


def load(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The quantized ``transformers`` model saved at ``path``, with real :class:`QuantLinear` layers."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    config_dict, qc = _read_config(path)
    try:
        settings = QuantConfig.from_dict(qc["settings"])
        hf_config = AutoConfig.for_model(**config_dict)
    except (ConfigError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path / 'config.json'}: {exc}") from None
    with init_empty_weights():  # parameters on meta; non-persistent buffers (rotary tables) stay real
        model = AutoModelForCausalLM.from_config(hf_config)
    for name, entry in qc["modules"].items():
        try:
            model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"module {name} of the checkpoint does not exist in a {hf_config.model_type} model") from None
        model.set_submodule(name, _skeleton(entry, name))
    state = _read_tensors(path)
    expected = {k: v for k, v in model.state_dict().items() if k not in qc.get("aliases", {})}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what = f"missing tensor {missing[0]}" if missing else f"unexpected tensor {unexpected[0]}"
        raise CheckpointError(f"{path}: {what}")
    for key, ref in expected.items():
        t = state[key]
        if tuple(t.shape) != tuple(ref.shape) or (ref.dtype != t.dtype and key.rsplit(".", 1)[-1] in
                                                  ("qweight", "s2", "zp", "s1")):
            raise CheckpointError(f"{path}: tensor {key} is {t.dtype}{list(t.shape)}, expected "
                                  f"{ref.dtype}{list(ref.shape)}")
    for alias, twin in qc.get("aliases", {}).items():
        state[alias] = state[twin]
    model.load_state_dict(state, assign=True, strict=True)
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            try:
                module.dual_grained().validate(name)
            except FormatError as exc:
                raise CheckpointError(f"{path}: {exc}") from None
    model.tie_weights()
    model.dgq_config = settings
    return model.to(device).eval()
