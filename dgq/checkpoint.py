"""Quantized checkpoints: what is ours around transformers' ``save_pretrained`` / ``from_pretrained``.

A dgq checkpoint is a Hugging Face model directory (see :mod:`dgq.hf` for the registered quantizer that reads and
writes it, and docs/format.md for the tensors).  This module keeps what transformers does not do: the atomic
directory write (a temporary sibling renamed into place), the model card, and the checks that make
:func:`load` refuse a directory that is not a dgq checkpoint with one line instead of loading a float model.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from dgq.hf import FORMAT_VERSION, QUANT_METHOD, CheckpointError, DGQConfig

SINGLE_FILE = "model.safetensors"
DEFAULT_SHARD_BYTES = 2 * 1024**3


def write_json(file: Path, obj: dict[str, Any]) -> None:
    """Stable, diffable JSON (sorted keys) so that re-saving a checkpoint reproduces its files."""
    file.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


class PendingDir:
    """An output directory reserved up front: its empty temporary sibling is created at once, so an unwritable or
    taken path fails before the job instead of after it; :meth:`write` fills it and moves it into place, and
    :meth:`discard` removes every trace.

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
        return self.out

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def write(self, fill: Callable[[Path], None]) -> Path:
        """Run ``fill(tmp)`` and move the result into place; on any failure nothing is left, and an ``OSError`` is
        reported against ``out``."""
        try:
            fill(self.tmp)
            return self.commit()
        except OSError as exc:
            raise CheckpointError(f"cannot write the output directory {self.out}: {exc.strerror or exc}") from None
        finally:
            self.discard()


@contextmanager
def atomic_dir(out_dir: str | Path, overwrite: bool) -> Iterator[Path]:
    """Yield the empty temporary sibling of ``out_dir`` (see :class:`PendingDir`); on success it replaces
    ``out_dir``, on failure it vanishes."""
    pending = PendingDir(out_dir, overwrite)
    try:
        yield pending.tmp
        pending.commit()
    finally:
        pending.discard()


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


@contextmanager
def _quiet() -> Iterator[None]:
    """Without transformers' per-file progress bars: a checkpoint of a small model loads in a second, and the bars
    would bury the one line a command prints."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


def save(model: nn.Module, out_dir: str | Path | PendingDir, tokenizer: Any = None, overwrite: bool = False,
         card: dict[str, Any] | None = None, shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write the quantized ``model`` (and ``tokenizer``) to ``out_dir`` atomically with ``save_pretrained``;
    returns the output path.

    ``out_dir`` may be a :class:`PendingDir` reserved before the job started (then ``overwrite`` was decided there).
    ``card`` fills the model card: ``name``, ``base_model`` (no paths of this machine: see
    ``ModelSource.card_dict``), ``perplexity`` / ``perplexity_fp`` (dataset → value), ``seqlen``, ``windows``; it
    holds no timings, so the same job gives the same files.  Above ``shard_bytes`` transformers shards the tensors.
    """
    qc = getattr(model.config, "quantization_config", None)
    if not isinstance(qc, DGQConfig):
        raise CheckpointError("model is not quantized with dgq: quantize it with dgq.quantize first")
    pending = out_dir if isinstance(out_dir, PendingDir) else PendingDir(out_dir, overwrite)

    def fill(tmp: Path) -> None:
        with _quiet():
            model.save_pretrained(tmp, max_shard_size=shard_bytes)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(_model_card(qc.to_dict(), card or {}))

    return pending.write(fill)


def check_directory(path: str | Path) -> None:
    """Refuse, with one line, a directory that ``from_pretrained`` would load as something other than a dgq model
    (no config, no dgq ``quantization_config``, an unknown format version)."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{path} is not a dgq checkpoint: no config.json")
    try:
        qc = json.loads(file.read_text()).get("quantization_config")
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file} is not valid JSON: {exc}") from None
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method is not None and method != QUANT_METHOD:
        raise CheckpointError(f"{path} is a {method!r} checkpoint, not a dgq checkpoint")
    if method is None:
        raise CheckpointError(f"{path} is not a dgq checkpoint: {file.name} has no dgq quantization_config")
    if qc.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"unknown dgq format_version {qc.get('format_version')!r} in {file} "
                              f"(this dgq reads version {FORMAT_VERSION}; re-quantize older checkpoints)")


def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """The quantized ``transformers`` model saved at ``path`` (``AutoModelForCausalLM.from_pretrained`` through
    dgq's registered quantizer), with real :class:`~dgq.nn.QuantLinear` layers, in eval mode on ``device``.

    ``dtype`` is the float dtype of the tensors outside the quantized format (embeddings, norms, biases, fake
    quantized weights); the format's own tensors keep their dtypes.  Raises :class:`CheckpointError`.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    check_directory(path)
    try:
        with _quiet():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto")
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return model.to(device).eval()
