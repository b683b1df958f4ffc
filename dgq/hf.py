"""dgq as a ``transformers`` quantization method, so a dgq checkpoint is an ordinary Hugging Face model.

``import dgq`` registers :class:`DGQConfig` (the ``quantization_config`` block, ``quant_method: "dgq"``) and
:class:`DGQHfQuantizer` with transformers.  Then ``AutoModelForCausalLM.from_pretrained(dir)`` builds the model on
the meta device, swaps in empty :class:`~dgq.nn.QuantLinear` / :class:`~dgq.nn.FakeQuantLinear` skeletons per the
config's ``modules``, checks every stored tensor's name, shape and dtype against them before a byte is loaded, lets
transformers load the tensors, and validates the dual-grained invariants; ``model.save_pretrained(dir)`` writes
them back.  Sharding, tied weights and the config file are transformers' and safetensors' work.

On disk a ``QuantLinear`` at ``P`` stores the format's own layout (:meth:`~dgq.nn.QuantLinear.stored_tensors`), not
the kernels' layout it holds in memory: the packed 4-bit codes as ``P.weight`` (uint8 ``[in / 2, out]``), ``P.s2`` and
``P.zp`` as ``[out, in / g]``.  The skeleton has the stored tensors, transformers loads into them, and
:meth:`~dgq.nn.QuantLinear.load_stored` converts them (a permutation: saving writes the same bytes back).  The name
``P.weight`` matters: a transformers that does not know dgq (dgq not imported) skips the unknown quantization
method, builds a float ``nn.Linear`` at ``P`` and refuses the checkpoint with a size-mismatch error for ``P.weight``
instead of running randomly initialised weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from dgq import positions
from dgq.config import ConfigError, QuantConfig
from dgq.embedding import QuantEmbedding
from dgq.errors import DGQError
from dgq.formats import FormatError
from dgq.fuse import is_fused
from dgq.int8_rows import Int8Embedding, Int8Linear, Int8Rows
from dgq.nn import FakeQuantLinear, QuantLinear

QUANT_METHOD = "dgq"
FORMAT_VERSION = 2
MODULE_TYPES = {"dgq": QuantLinear, "fake": FakeQuantLinear, "embedding": QuantEmbedding, "int8_linear": Int8Linear,
                "int8_embedding": Int8Embedding}
EMBEDDING_TYPES = ("embedding", "int8_embedding")  # the module types that replace an nn.Embedding


class CheckpointError(DGQError, ValueError):
    """A checkpoint that cannot be written or read; the message names the problem."""


class DGQConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a dgq model: every :class:`QuantConfig` setting (``settings``, authoritative)
    and which module is which quantized class (``modules``).  ``weight_bits``, ``act_bits``, ``group_size`` and
    ``activation`` summarise the settings for tools that do not know dgq; they are derived, never read."""

    def __init__(self, settings: dict[str, Any], modules: dict[str, dict[str, str]],
                 format_version: int = FORMAT_VERSION, quant_method: str = QUANT_METHOD,
                 smoothing_folded: bool = True, **summary: Any) -> None:
        if format_version != FORMAT_VERSION:
            raise CheckpointError(f"unknown dgq format_version {format_version!r} (this dgq reads version "
                                  f"{FORMAT_VERSION}; re-quantize older checkpoints)")
        unknown = sorted(set(summary) - {"weight_bits", "act_bits", "group_size", "activation"})
        if unknown:
            raise CheckpointError(f"unknown quantization_config keys: {', '.join(unknown)}")
        if quant_method != QUANT_METHOD or smoothing_folded is not True:
            raise CheckpointError(f"not a dgq quantization_config (quant_method {quant_method!r}, "
                                  f"smoothing_folded {smoothing_folded!r})")
        try:
            config = QuantConfig.from_dict(settings)
        except (ConfigError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"quantization_config settings: {exc}") from None
        for name, entry in modules.items():
            if not isinstance(entry, dict) or entry.get("type") not in MODULE_TYPES or "act" not in entry:
                raise CheckpointError(f"quantization_config module {name}: {entry!r} is not "
                                      f"{{'type': {' or '.join(MODULE_TYPES)}, 'act': ...}}")
        self.quant_method = QUANT_METHOD
        self.format_version = FORMAT_VERSION
        self.weight_bits, self.act_bits = config.weight_bits, config.act_bits
        self.group_size, self.activation = config.group_size, config.act
        self.smoothing_folded = True  # smoothing scales live in the neighbouring weights: nothing left to apply
        self.settings = config.to_dict()
        self.modules = dict(modules)

    @property
    def quant_config(self) -> QuantConfig:
        return QuantConfig.from_dict(self.settings)

    @classmethod
    def for_model(cls, model: nn.Module, config: QuantConfig) -> "DGQConfig":
        """The config of ``model`` after quantizing it with ``config``."""
        modules = {name: {"type": "dgq" if isinstance(m, QuantLinear) else "fake", "act": m.act_mode}
                   for name, m in model.named_modules() if isinstance(m, (QuantLinear, FakeQuantLinear))}
        kinds = {cls: kind for kind, cls in MODULE_TYPES.items() if kind not in ("dgq", "fake")}
        modules |= {name: {"type": kinds[type(m)], "act": "none"}
                    for name, m in model.named_modules() if type(m) in kinds}
        for name, entry in modules.items():  # only where used, so every other checkpoint's config is unchanged
            if getattr(model.get_submodule(name), "first_scale", False):
                entry["first_scale"] = True
        settings = config.to_dict()
        if settings["calib_data"] is not None:  # the file's name says what was used; its folder is the machine's
            settings["calib_data"] = Path(settings["calib_data"]).name
        return cls(settings, modules)


def _skeleton(linear: nn.Module, entry: dict[str, str], group_size: int) -> nn.Module:
    """An empty (meta) quantized module of the ``modules`` entry, shaped like the ``linear`` it replaces, holding
    the checkpoint's tensors (stored names and layout) until :func:`_restore_layout`."""
    meta = torch.device("meta")
    if entry["type"] == "embedding":  # stored in its own layout: its buffers are the checkpoint's tensors
        return QuantEmbedding(linear.num_embeddings, linear.embedding_dim, group_size, linear.weight.dtype, meta)
    if entry["type"] in ("int8_linear", "int8_embedding"):
        rows = MODULE_TYPES[entry["type"]](*linear.weight.shape, linear.weight.dtype, meta)  # [rows, cols] both
        rows.skeleton_buffers()
        return rows
    bias = getattr(linear, "bias", None)
    if entry["type"] == "dgq":
        module = QuantLinear(linear.in_features, linear.out_features, group_size, entry["act"], bias is not None,
                             device=meta, out_dtype=linear.weight.dtype, first_scale=bool(entry.get("first_scale")))
        stored = module.stored_tensors()  # meta tensors: the stored shapes and dtypes, nothing computed
        for name in (*QuantLinear.STORED, "split_scratch"):  # the scratch is made on the right device by load_stored
            del module._buffers[name]
        for name, tensor in stored.items():
            module.register_buffer(name, tensor)
        return module
    weight = torch.empty_like(linear.weight, device=meta)
    return FakeQuantLinear(weight, None if bias is None else torch.empty_like(bias, device=meta), entry["act"],
                           torch.empty((), device=meta))


def _restore_layout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, (QuantLinear, Int8Rows)) and "weight" in module._buffers:
            module.load_stored(*(module._buffers.pop(stored) for stored in module.STORED.values()))


def stored_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors as the checkpoint stores them (each ``QuantLinear``'s in the format's layout).

    A model with fused projections is refused: its layout is no checkpoint's, and fusion is redone at load time."""
    if is_fused(model):
        raise CheckpointError("this model has fused projections (dgq.load(..., fuse=True)), a load-time layout "
                              "that is never saved; save the model loaded without fuse")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (QuantLinear, Int8Rows))}
    state = {}
    for key, tensor in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in layers and leaf in layers[owner].STORED:
            continue
        state[key] = tensor
    for name, layer in layers.items():
        state.update({f"{name}.{k}": t for k, t in layer.stored_tensors().items()})
    return state


def _format_keys(model: nn.Module) -> set[str]:
    """Stored keys whose dtype the format fixes (quantized modules' tensors other than float weights and bias)."""
    keys = set()
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            keys |= {f"{name}.{b}" for b in module._buffers if b != "bias"}
        elif isinstance(module, FakeQuantLinear):
            keys.add(f"{name}.act_scale")
        elif isinstance(module, QuantEmbedding):
            keys |= {f"{name}.weight", f"{name}.zp"}
        elif isinstance(module, Int8Rows):
            keys.add(f"{name}.weight")
    return keys


def tied_keys(model: nn.Module) -> set[str]:
    """State keys stored once under their twin's name and re-tied on load (e.g. ``lm_head.weight``): those that
    transformers declares tied (on the meta skeleton they are not tied yet) and those that repeat a tensor."""
    seen: set[int] = set()
    tied = set(getattr(model, "all_tied_weights_keys", {}))
    for key, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            tied.add(key)
        seen.add(id(tensor))
    return tied


def check_files(model: nn.Module, files: list[str]) -> None:
    """Compare the safetensors headers of ``files`` (no tensor data is read) with the skeleton ``model``: every
    tensor present, none unexpected, each shape exact, dtypes exact for the format's tensors and float-vs-integer
    for the others (a float dtype may be cast on load).  Raises :class:`CheckpointError`."""
    from safetensors import SafetensorError, safe_open

    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    for file in files:
        if not str(file).endswith(".safetensors"):
            raise CheckpointError(f"{file}: dgq checkpoints are safetensors files")
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    found[key] = (sl.get_dtype(), tuple(sl.get_shape()))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{file} is missing, corrupt or truncated: {exc}") from None
    tied = tied_keys(model)
    expected = {k: t for k, t in model.state_dict().items() if k not in tied}
    missing = sorted(set(expected) - set(found))
    if missing:
        raise CheckpointError(f"missing tensor {missing[0]}")
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        raise CheckpointError(f"unexpected tensor {unexpected[0]}")
    strict = _format_keys(model)
    for key, ref in expected.items():
        dtype, shape = found[key]
        want = _safetensors_dtype(ref.dtype)
        bad_dtype = dtype != want if key in strict else dtype.startswith(("F", "BF")) != ref.is_floating_point()
        if shape != tuple(ref.shape) or bad_dtype:
            raise CheckpointError(f"tensor {key} is {dtype}{list(shape)}, expected {want}{list(ref.shape)}")


def _safetensors_dtype(dtype: torch.dtype) -> str:
    return {torch.uint8: "U8", torch.int8: "I8", torch.float32: "F32", torch.float16: "F16",
            torch.bfloat16: "BF16", torch.int32: "I32", torch.int64: "I64"}[dtype]


def _local_files(path: str) -> list[str]:
    """The safetensors files of a local checkpoint directory (empty for anything else, e.g. a hub id)."""
    from pathlib import Path

    folder = Path(path)
    return sorted(str(f) for f in folder.glob("*.safetensors")) if folder.is_dir() else []


def validate(model: nn.Module) -> None:
    """Every ``QuantLinear``'s dual-grained invariants (codes, scales, int8 range) and every ``QuantEmbedding``'s
    and int8-rows module's format; raises :class:`CheckpointError`."""
    for name, module in model.named_modules():
        try:
            if isinstance(module, QuantLinear):
                module.dual_grained().validate(name)
            elif isinstance(module, (QuantEmbedding, Int8Rows)):
                module.validate(name)
        except FormatError as exc:
            raise CheckpointError(str(exc)) from None


def quant_config(model: nn.Module) -> QuantConfig:
    """The settings ``model`` was quantized with, from ``model.config.quantization_config``."""
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if not isinstance(qc, DGQConfig):
        raise CheckpointError("model is not quantized with dgq (its config has no dgq quantization_config)")
    return qc.quant_config


def mark_quantized(model: PreTrainedModel, config: QuantConfig) -> None:
    """Record ``config`` in ``model.config.quantization_config`` and attach the quantizer, as ``from_pretrained``
    does for a loaded checkpoint, so a freshly quantized model saves with ``save_pretrained`` like a loaded one."""
    quantizer = DGQHfQuantizer(DGQConfig.for_model(model, config), pre_quantized=True)
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)


def folded_offset_norms(model: nn.Module) -> set[str]:
    """Norms that scale by ``1 + w`` and absorbed smoothing scales (Gemma): they load in float32 in any dtype.

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
    return {f"{prefix}.{i}.{producer}" for i in range(len(blocks)) for producer in producers}


class DGQHfQuantizer(HfQuantizer):
    """Loads and saves pre-quantized dgq checkpoints; dgq quantizes through :func:`dgq.api.quantize`, which needs
    calibration data, so quantizing on the fly in ``from_pretrained`` is refused."""

    requires_calibration = True
    quantization_config: DGQConfig

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and {"disk"} & set(map(str, device_map.values())):
            raise CheckpointError("dgq models cannot be offloaded to disk")

    def _process_model_before_weight_loading(self, model: PreTrainedModel, checkpoint_files: list[str] | None = None,
                                             **kwargs: Any) -> PreTrainedModel:
        qc = self.quantization_config
        for name, entry in qc.modules.items():
            try:
                linear = model.get_submodule(name)
            except AttributeError:
                raise CheckpointError(f"quantization_config names module {name}, which the model does not have") \
                    from None
            expected = nn.Embedding if entry["type"] in EMBEDDING_TYPES else nn.Linear
            if not isinstance(linear, expected):
                raise CheckpointError(f"quantization_config module {name} is a {entry['type']!r} module, but the model "
                                      f"has a {type(linear).__name__} there, not an {expected.__name__}")
            model.set_submodule(name, _skeleton(linear, entry, qc.group_size))
        # transformers reads this set when it decides each tensor's dtype, after this hook
        model._keep_in_fp32_modules_strict = set(model._keep_in_fp32_modules_strict or ()) | folded_offset_norms(model)
        files = checkpoint_files or _local_files(model.config.name_or_path)  # older transformers pass no files
        if not files:
            raise CheckpointError("dgq checkpoints load from safetensors files; none were found")
        check_files(model, files)
        return model

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs: Any) -> PreTrainedModel:
        _restore_layout(model)
        validate(model)
        if any(getattr(m, "first_scale", False) for m in model.modules()):  # its layers ask their block for positions
            from dgq.models.adapters import adapter_for

            positions.install(adapter_for(model).blocks(model))
        return model

    def get_state_dict_and_metadata(self, model: PreTrainedModel) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        return stored_state(model), {}

    def is_serializable(self, **kwargs: Any) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        """dgq's kernels are PyTorch operators (:mod:`dgq.kernels.ops`): ``generate`` may compile the decode step."""
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Make ``quant_method: "dgq"`` known to transformers (once; ``import dgq`` calls this)."""
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is DGQHfQuantizer:
        return
    register_quantization_config(QUANT_METHOD)(DGQConfig)
    register_quantizer(QUANT_METHOD)(DGQHfQuantizer)
