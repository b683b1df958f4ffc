"""Checks that run before the work they protect, so that bad input fails in seconds with one line naming it.

The order the front door follows (:mod:`dgq.api`) is the order of cost: argument ranges (microseconds), the output
folder (created at once, so an unwritable path fails before the job, not after it), the data files (read in full:
milliseconds), the model's config and its module structure built on the meta device (no weights; a GGUF file's
metadata takes a few seconds), the tokenizer, and only then the weights, which are checked for NaN/Inf before any
evaluation or calibration touches them.  Every failure is a :class:`~dgq.errors.DGQError`.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from dgq.config import ConfigError
from dgq.errors import DGQError


class ModelCheckError(DGQError, ValueError):
    """A model that dgq must not or cannot process as asked (another method's checkpoint, too few positions,
    non-finite weights, a vocabulary smaller than its tokenizer's)."""


def at_least(name: str, value: int | float | None, minimum: int | float) -> None:
    """``value`` (when given) must be ``>= minimum``.  ``None`` means "absent, use the default"; 0 never does."""
    if value is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")


def int_list(name: str, spec: str) -> list[int]:
    """A comma list of positive integers such as ``"256,1024"``; anything else is refused, naming ``name``."""
    try:
        values = [int(v) for v in spec.split(",")]
    except ValueError:
        raise ConfigError(f"{name} must be a comma list of positive integers, got {spec!r}") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{name} must be a comma list of positive integers, got {spec!r}")
    return values


def foreign_quantization(config: Any, where: str) -> None:
    """Refuse a model that another method already quantized: dgq would either crash on it or re-quantize weights
    that are no longer the originals.  ``where`` names the model for the message."""
    qc = getattr(config, "quantization_config", None)
    if qc is None and isinstance(config, dict):
        qc = config.get("quantization_config")
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    method = getattr(method, "value", method)  # transformers keeps it as a str enum
    if method is not None and method != "dgq":
        raise ModelCheckError(f"{where} is a {method!r} checkpoint, not a dgq checkpoint; dgq evaluates its own "
                              f"checkpoints and quantizes unquantized models")


def max_positions(config: Any) -> int | None:
    """The number of positions the model was built for, from its config (``None`` when the config has none)."""
    return getattr(config, "max_position_embeddings", None)


def seqlen_fits(seqlen: int, config: Any, option: str = "--seqlen") -> None:
    """A window longer than the model's positions would run for many minutes and score a model outside what it was
    trained for (or fail inside the rotary tables), so it is refused before the weights are loaded."""
    positions = max_positions(config)
    if positions is not None and seqlen > positions:
        raise ConfigError(f"{option} {seqlen} exceeds the {positions} positions of this model "
                            f"(max_position_embeddings in its config); use {option} {positions} or less")


def skeleton(config: Any) -> nn.Module:
    """The model's module structure on the meta device: shapes and names, no weights, built in milliseconds."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=True):
        return AutoModelForCausalLM.from_config(config)


def vocabulary_fits(tokenizer: Any, config: Any) -> None:
    """Token ids at or above the embedding's rows would index past it; refuse the pair before any text is run."""
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise ModelCheckError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {vocab} "
                              f"(vocab_size in its config): ids from {vocab} on would index past its embedding")


def token_ids_fit(ids: torch.Tensor, vocab: int, what: str) -> None:
    """The actual ids of a text must index the embedding (a stricter, per-text form of :func:`vocabulary_fits`)."""
    if ids.numel() and int(ids.max()) >= vocab:
        raise ModelCheckError(f"{what} tokenizes to id {int(ids.max())}, outside the model's vocabulary of {vocab}")


def _tensors(model: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    yield from model.named_parameters(remove_duplicate=True)
    yield from model.named_buffers(remove_duplicate=True)


@torch.no_grad()
def finite_weights(model: nn.Module) -> None:
    """Every floating-point parameter and buffer (embeddings, norms, heads, linears) must be finite.

    A NaN found here is named by its own tensor; found later it would surface in whatever layer it flowed into
    (a NaN in a norm first shows in the projections that smoothing folds it into), after minutes of work.
    """
    for name, tensor in _tensors(model):
        if tensor.is_floating_point() and tensor.device.type != "meta":
            bad = ~torch.isfinite(tensor)
            if bad.any():
                first = [int(i) for i in bad.nonzero()[0]]
                raise ModelCheckError(f"model weight {name} holds {int(bad.sum())} NaN/Inf value(s) (first at index "
                                      f"{first}); dgq quantizes only finite weights")


def data_files(datasets: Iterable[str], calib: str | None, root: Any, calibrate: bool = True) -> None:
    """Read every evaluation file of ``datasets`` and the calibration file in full (milliseconds), so that a missing,
    binary or malformed file fails now, named, rather than after the model is loaded or the first evaluation ran."""
    from dgq.data import calibration_texts, load_eval_text

    for name in datasets:
        load_eval_text(name, root)
    if calibrate:
        calibration_texts(calib, root)


def model_structure(spec: str, seqlen: int | None) -> tuple[Any, Any, nn.Module]:
    """``(source, config, skeleton)`` of the model ``spec`` names, checked without reading its weights: it exists,
    is readable (a truncated GGUF says so), is not another method's checkpoint, is a supported family, and has at
    least ``seqlen`` positions."""
    from dgq.loading import load_config, resolve_model
    from dgq.models import adapter_for

    source = resolve_model(spec)
    config = load_config(source)
    foreign_quantization(config, f"model {spec!r}")
    if seqlen is not None:
        seqlen_fits(seqlen, config)
    model = skeleton(config)
    adapter_for(model)
    return source, config, model


def group_size_for(model: nn.Module, asked: int | None, grouped: bool = True,
                   defaults: tuple[int, ...] = (128, 64)) -> int:
    """The group size to use: ``asked`` when given (checked against every quantized layer when the weight format
    is ``grouped``), else the largest of ``defaults`` that divides every layer's input width.  Needs only the
    module structure, so it runs on a meta-device skeleton."""
    from dgq.models import adapter_for
    from dgq.quantizer import LayerError

    adapter = adapter_for(model)
    widths = {f"block {i} {name}": block.get_submodule(name).in_features
              for i, block in enumerate(adapter.blocks(model)) for name in adapter.linear_names()}
    if asked is not None:
        at_least("group size", asked, 2)
        bad = next((name for name, k in widths.items() if k % asked), None)
        if grouped and bad is not None:
            raise LayerError(f"layer {bad}: group size {asked} does not divide in_features {widths[bad]} "
                             f"(choose a group size that divides it, e.g. 64)")
        return asked
    for g in defaults:
        if all(k % g == 0 for k in widths.values()):
            return g
    raise ConfigError(f"no default group size ({', '.join(map(str, defaults))}) divides the layer widths "
                        f"{sorted(set(widths.values()))}; pass --group-size")


def eval_texts_fit(tokenizer: Any, datasets: Iterable[str], seqlen: int, root: Any, vocab: int) -> None:
    """Tokenize the evaluation texts now (the tokens are cached for the evaluation) and check them against the
    model's vocabulary and the window length, before any weight is read."""
    from dgq.eval.perplexity import tokenize_eval

    for name in datasets:
        ids = tokenize_eval(tokenizer, name, root)
        token_ids_fit(ids, vocab, f"the {name} evaluation text")
        if ids.numel() < seqlen:
            raise ConfigError(f"--seqlen {seqlen} is longer than the whole {name} evaluation text "
                                f"({ids.numel()} tokens)")
