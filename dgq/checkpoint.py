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
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from dgq.config import ConfigError, QuantConfig
from dgq.errors import DGQError
from dgq.formats import FormatError
from dgq.nn import FakeQuantLinear, QuantLinear

FORMAT_VERSION = 1
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 * 1024**3
MODULE_TYPES = {"dgq": QuantLinear, "fake": FakeQuantLinear}


class CheckpointError(DGQError, ValueError):
    """A checkpoint that cannot be written or read; the message names the problem."""


def quantization_config(model: nn.Module) -> dict[str, Any]:
    """The ``quantization_config`` block of ``model`` (quantized by :func:`dgq.api.quantize`)."""
    config: QuantConfig | None = getattr(model, "dgq_config", None)
    if config is None:
        raise CheckpointError("model carries no dgq_config: quantize it with dgq first")
    modules = {name: {"type": "dgq" if isinstance(m, QuantLinear) else "fake", "act": m.act_mode}
               for name, m in model.named_modules() if isinstance(m, (QuantLinear, FakeQuantLinear))}
    settings = config.to_dict()
    if settings["calib_data"] is not None:  # the file's name says what was used; its folder is the machine's
        settings["calib_data"] = Path(settings["calib_data"]).name
    # Smoothing scales are always folded into the neighbouring weights: a loader has nothing left to apply.
    return {"quant_method": "dgq", "format_version": FORMAT_VERSION, "weight_bits": config.weight_bits,
            "act_bits": config.act_bits, "group_size": config.group_size, "activation": config.act,
            "smoothing_folded": True, "settings": settings, "modules": modules}


def unique_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``state`` without shared storage (safetensors refuses it): ``aliases`` maps each dropped key to its twin,
    e.g. a tied ``lm_head.weight`` to ``model.embed_tokens.weight``."""
    unique, aliases, seen = {}, {}, {}
    for key, tensor in state.items():
        ptr = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and ptr in seen:
            aliases[key] = seen[ptr]
            continue
        seen[ptr] = key
        unique[key] = tensor.detach().cpu().contiguous()
    return unique, aliases


def _shards(state: dict[str, torch.Tensor], shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Split ``state`` in order into groups of at most ``shard_bytes`` (a larger tensor gets a shard to itself)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    return shards


def write_tensors(state: dict[str, torch.Tensor], folder: Path, shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` plus the index above ``shard_bytes``."""
    shards = _shards(state, shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], folder / SINGLE_FILE, metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    write_json(folder / INDEX_FILE, index)


def write_json(file: Path, obj: dict[str, Any]) -> None:
    """Stable, diffable JSON (sorted keys) so that re-saving a checkpoint reproduces its files."""
    file.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


class PendingDir:
    """An output directory reserved up front: its empty temporary sibling is created at once, so an unwritable or
    taken path fails before the job instead of after it; :meth:`commit` moves the finished contents into place, and
    :meth:`discard` (or leaving a ``with`` block by an exception) removes every trace.

    Writing beside the target keeps the final rename on one filesystem, so readers never see half a checkpoint.
    An existing ``out`` is refused unless ``overwrite``; then it is moved aside, and moved back if the swap fails.
    Errors name ``out``, the user's path, never the hidden temporary one.
    """

    def __init__(self, out: str | Path, overwrite: bool) -> None:
        self.out = Path(out)
        if self.out.exists() and not overwrite:
            raise CheckpointError(f"output directory {self.out} already exists (pass overwrite=True / --overwrite)")
        if self.out.exists() and not self.out.is_dir():
            raise CheckpointError(f"output path {self.out} is a file, not a directory")
        ancestor = next(p for p in (self.out.parent, *self.out.parent.parents) if p.exists())
        if not ancestor.is_dir():
            raise CheckpointError(f"cannot write the output directory {self.out}: {ancestor} is a file")
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{os.getpid()}"
        self._old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            for stale in (self.tmp, self._old):  # left behind by a killed earlier run of this process id
                shutil.rmtree(stale, ignore_errors=True)
            self.tmp.mkdir()
        except OSError as exc:
            raise CheckpointError(f"cannot write the output directory {self.out}: {exc.strerror or exc}") from None

    def commit(self) -> Path:
        """Give every file the mode a plain file in the folder gets (safetensors writes 0600), then swap in."""
        mode = self.tmp.stat().st_mode & 0o666
        try:
            for file in self.tmp.rglob("*"):
                if file.is_file():
                    file.chmod(mode)
            if self.out.exists():
                os.replace(self.out, self._old)
                try:
                    os.replace(self.tmp, self.out)
                except OSError:
                    os.replace(self._old, self.out)
                    raise
                shutil.rmtree(self._old)
            else:
                os.replace(self.tmp, self.out)
        except OSError as exc:
            self.discard()
            raise CheckpointError(f"cannot write the output directory {self.out}: {exc.strerror or exc}") from None
        return self.out

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def write(self, fill: Any) -> Path:
        """Run ``fill(tmp)`` and commit; an ``OSError`` while writing is reported against ``out``."""
        try:
            fill(self.tmp)
        except OSError as exc:
            self.discard()
            raise CheckpointError(f"cannot write the output directory {self.out}: {exc.strerror or exc}") from None
        except BaseException:
            self.discard()
            raise
        return self.commit()


@contextmanager
def atomic_dir(out_dir: str | Path, overwrite: bool) -> Iterator[Path]:
    """Yield the empty temporary sibling of ``out_dir`` (see :class:`PendingDir`); on success it replaces
    ``out_dir``, on failure it vanishes."""
    pending = PendingDir(out_dir, overwrite)
    try:
        yield pending.tmp
    except BaseException:
        pending.discard()
        raise
    pending.commit()


def _model_card(qc: dict[str, Any], card: dict[str, Any]) -> str:
    s = qc["settings"]
    lines = [f"# {card.get('name', 'dgq quantized model')}", "",
             f"Quantized with dgq (Dual Grained Quantization), method `{s['method']}`: "
             f"W{qc['weight_bits']}A{qc['act_bits']}, weight format `{s['weight']}`, group size {s['group_size']}, "
             f"activations `{s['act']}`, smoothing `{s['smoothing']}`, search {'on' if s['search'] else 'off'}, "
             f"calibration {s['nsamples']} x {s['seqlen']} tokens (seed {s['seed']}).", ""]
    if card.get("base_model"):
        lines += [f"Base model: `{json.dumps(card['base_model'], sort_keys=True)}`", ""]
    ppl, fp = card.get("perplexity") or {}, card.get("perplexity_fp") or {}
    if ppl:
        lines += [f"Perplexity (seqlen {card.get('seqlen')}, windows {card.get('windows') or 'all'}):", "",
                  "| dataset | before | after |", "|---|---|---|"]
        lines += [f"| {d} | {fp.get(d, float('nan')):.3f} | {p:.3f} |" for d, p in ppl.items()] + [""]
    lines += ["Load with `dgq.load(path)`; docs/format.md of dgq describes the tensors.", ""]
    return "\n".join(lines)


def save(model: nn.Module, out_dir: str | Path | PendingDir, tokenizer: Any = None, overwrite: bool = False,
         card: dict[str, Any] | None = None, shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write the quantized ``model`` (and ``tokenizer``) to ``out_dir`` atomically; returns the output path.

    ``out_dir`` may be a :class:`PendingDir` reserved before the job started (then ``overwrite`` was decided there).
    ``card`` fills the model card: ``name``, ``base_model`` (no paths of this machine: see
    ``ModelSource.card_dict``), ``perplexity`` / ``perplexity_fp`` (dataset → value), ``seqlen``, ``windows``; it
    holds no timings, so the same job gives the same files.  ``shard_bytes`` is the largest safetensors file before
    the tensors are sharded.
    """
    qc = quantization_config(model)
    pending = out_dir if isinstance(out_dir, PendingDir) else PendingDir(out_dir, overwrite)

    def fill(tmp: Path) -> None:
        state, aliases = unique_tensors(model.state_dict())
        qc["aliases"] = aliases
        write_tensors(state, tmp, shard_bytes)
        config = model.config.to_dict()
        config.pop("_name_or_path", None)  # the folder the base model was read from, on this machine
        config["quantization_config"] = qc
        write_json(tmp / "config.json", config)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(_model_card(qc, card or {}))

    return pending.write(fill)


def read_quantization_config(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(hf_config_dict, quantization_config)`` of the checkpoint at ``path``, its version checked."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{path} is not a dgq checkpoint: no config.json")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file} is not valid JSON: {exc}") from None
    qc = config.pop("quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method is not None and method != "dgq":
        raise CheckpointError(f"{path} is a {method!r} checkpoint, not a dgq checkpoint")
    if method is None:
        raise CheckpointError(f"{path} is not a dgq checkpoint: {file.name} has no dgq quantization_config")
    if qc.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"unknown dgq format_version {qc.get('format_version')!r} in {file} "
                              f"(this dgq reads version {FORMAT_VERSION})")
    return config, qc


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint at ``path`` (single file or shards), corrupt files reported by name."""
    path = Path(path)
    if (path / SINGLE_FILE).is_file():
        files = [path / SINGLE_FILE]
    elif (path / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path / INDEX_FILE} is not a valid shard index: {exc}") from None
        files = [path / f for f in sorted(set(weight_map.values()))]
    else:
        raise CheckpointError(f"{path} holds no {SINGLE_FILE} or {INDEX_FILE}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(f))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{f.name} is missing, corrupt or truncated: {exc}") from None
    return state


def _skeleton(linear: nn.Module, entry: dict[str, Any], group_size: int) -> nn.Module:
    """An empty (meta) quantized module of the ``modules`` entry, shaped like the ``linear`` it replaces."""
    meta = torch.device("meta")
    has_bias = getattr(linear, "bias", None) is not None
    if entry.get("type") == "dgq":
        return QuantLinear(linear.in_features, linear.out_features, group_size, entry["act"], has_bias, device=meta)
    if entry.get("type") == "fake":
        weight = torch.empty_like(linear.weight, device=meta)
        bias = torch.empty_like(linear.bias, device=meta) if has_bias else None
        return FakeQuantLinear(weight, bias, entry["act"], torch.empty((), device=meta))
    raise ValueError(f"unknown module type {entry.get('type')!r} (expected one of {', '.join(MODULE_TYPES)})")


def _format_keys(model: nn.Module) -> set[str]:
    """State keys whose dtype the format fixes (quantized modules' buffers other than the bias)."""
    return {f"{name}.{b}" for name, m in model.named_modules() if isinstance(m, tuple(MODULE_TYPES.values()))
            for b, _ in m.named_buffers(recurse=False) if b != "bias"}


def _offset_norm_keys(model: nn.Module) -> set[str]:
    """Weights of norms that scale by ``1 + w`` and absorbed smoothing (Gemma): they stay float32 in any dtype.

    The folded weight is ``(w + 1) / k - 1``; for a large ``k`` it sits near -1 and ``1 + w`` is a small difference
    of two numbers near 1, which bf16/fp16 would wipe out (a relative error up to 100% of the scale).  Such norms
    compute in float32 anyway (``x.float() * (1 + w.float())``), so keeping their weights float32 is exact and free.
    """
    from dgq.models import UnsupportedModelError, adapter_for

    try:
        adapter = adapter_for(model)
    except UnsupportedModelError:
        return set()
    blocks = adapter.blocks(model)
    prefix = next(name for name, module in model.named_modules() if module is blocks)
    producers = [pair.producer for pair in adapter.pairs if pair.norm_offset]
    return {f"{prefix}.{i}.{producer}.weight" for i in range(len(blocks)) for producer in producers}


def _check_state(path: Path, state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                 strict_dtype: set[str]) -> None:
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{path}: missing tensor {missing[0]}")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor {unexpected[0]}")
    for key, ref in expected.items():
        t = state[key]
        bad_dtype = t.dtype != ref.dtype if key in strict_dtype else t.is_floating_point() != ref.is_floating_point()
        if tuple(t.shape) != tuple(ref.shape) or bad_dtype:
            raise CheckpointError(f"{path}: tensor {key} is {t.dtype}{list(t.shape)}, expected "
                                  f"{ref.dtype}{list(ref.shape)}")


def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """The quantized ``transformers`` model saved at ``path``, with real :class:`QuantLinear` layers.

    ``dtype`` casts the float tensors that are not part of the quantized format (embeddings, norms, biases, fake
    quantized weights); the format's own tensors keep their dtypes.  Raises :class:`CheckpointError`.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    config_dict, qc = read_quantization_config(path)
    try:
        settings = QuantConfig.from_dict(qc["settings"])
        hf_config = AutoConfig.for_model(**config_dict)
        with init_empty_weights():  # parameters on meta; non-persistent buffers (rotary tables) stay real
            model = AutoModelForCausalLM.from_config(hf_config)
        for name, entry in qc["modules"].items():
            model.set_submodule(name, _skeleton(model.get_submodule(name), entry, settings.group_size))
    except (ConfigError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{path / 'config.json'}: {type(exc).__name__}: {exc}") from None
    aliases: dict[str, str] = qc.get("aliases", {})
    state = read_tensors(path)
    expected = {k: v for k, v in model.state_dict().items() if k not in aliases}
    strict = _format_keys(model)
    _check_state(path, state, expected, strict)
    if dtype is not None:
        keep = strict | _offset_norm_keys(model)
        state = {k: t.to(dtype) if t.is_floating_point() and k not in keep else t for k, t in state.items()}
    state.update({alias: state[twin] for alias, twin in aliases.items()})
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
