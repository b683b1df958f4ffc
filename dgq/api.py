"""The one front door: quantize, save, load, evaluate, generate, export and bench.

The command line (``dgq/cli.py``) only parses arguments and calls these functions, so the Python API and the CLI
run the same pipeline with the same defaults.  Errors that are the user's to fix are :class:`dgq.errors.DGQError`
subclasses with a one-line message; anything else escaping from here is a bug.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

import torch
from torch import nn

from dgq.calibrate import CalibrationReport, quantize_blocks
from dgq.config import ConfigError, QuantConfig, preset
from dgq.hf import mark_quantized
from dgq.models import adapter_for
from dgq.quantizer import check_layer
from dgq.rotation import rotate_model

CUDA_NSAMPLES = 128  # the paper's calibration set
# On the CPU, calibration time grows with the samples (two block passes each) and quality barely does past a few:
# SmolLM2-135M's 8-window WikiText-2 perplexity was 22.86 with 8, 22.47 with 10, 22.95 with 12, 22.49 with 16 and
# 22.87-23.06 with 32 sequences (a spread of the order that ulp-level changes to the code cause), and 12 keeps the
# README's job under 5 minutes on 2 cores (benchmarks/notes_first_run.md).
CPU_NSAMPLES = 12


@dataclass
class QuantizeResult:
    model: nn.Module
    config: QuantConfig
    report: CalibrationReport
    seconds: float


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``name`` as a device; ``None`` is CUDA when available, else the CPU.  Asking for CUDA without it is refused."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {str(name)!r}; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(name)!r} asked for, but CUDA is not available on this machine")
    return device


def default_nsamples(device: torch.device) -> int:
    """Calibration sequences when none are asked for: the paper's 128 on CUDA, fewer on the CPU to stay in minutes."""
    return CUDA_NSAMPLES if device.type == "cuda" else CPU_NSAMPLES


def default_method(nsamples: int) -> str:
    """The method when none is asked for: the best preset measured at this calibration budget.

    SmolLM2-135M, WikiText-2 (RESULTS.md, issue 11).  At the paper's 128 sequences the float-output fit wins under the
    full protocol: ``dgq_gptaq`` 24.114 against ``dgq_gptq`` 25.035.  At the CPU's 12 it overfits: ``dgq_gptq`` 21.909
    against 22.537 on the README's 8 windows ("The float-output fit at 12 calibration sequences").  Below 128, where
    only the latter was measured, GPTQ codes alone (2.7-4x faster to calibrate)."""
    return "dgq_gptaq" if nsamples >= CUDA_NSAMPLES else "dgq_gptq"


HEAD_EMBEDDING_OPTIONS = ("quantize_head", "quantize_embedding", "int8_head", "int8_embedding")


def default_head_embedding(model: nn.Module) -> dict[str, bool]:
    """The head and embedding settings when none is asked for: both as int8 rows (:mod:`dgq.int8_rows`) where the
    model allows both, else both kept in float.

    Why both by default: halved bytes at a cost perplexity does not see when the embedding is quantized after
    calibration (SmolLM2-135M, the README's job: 21.909 -> 21.914; RESULTS.md), a 7B model's weights 0.244 GiB
    smaller, and a decode step that reads half the head (H100, Llama-2-7B: 2.48-2.49x -> 2.50-2.54x FP16 at batch
    1; BENCHMARKS.md).  Why both or neither: on a model whose head shares the embedding's matrix (SmolLM2, Gemma3) the
    int8 head alone would add its copy beside the float matrix, while both together replace the shared float
    matrix by two int8 ones of the same bytes.  Reads only module types, so it runs on a meta-device skeleton."""
    from dgq.int8_rows import check_int8_options

    try:
        check_int8_options(model, head=True, embedding=True)
    except ConfigError:  # e.g. Gemma3's scaled embedding, a head with a bias: both stay in float
        return {"int8_head": False, "int8_embedding": False}
    return {"int8_head": True, "int8_embedding": True}


def check_model(model: nn.Module, config: QuantConfig) -> None:
    """Validate every layer that will be quantized before any work starts, so errors come in seconds."""
    adapter = adapter_for(model)
    for i, block in enumerate(adapter.blocks(model)):
        for name in adapter.linear_names():
            check_layer(f"block {i} {name}", block.get_submodule(name), config)
    check_options(model, config)


def check_options(model: nn.Module, config: QuantConfig) -> None:
    """Refuse a head or embedding that the head and embedding options cannot quantize; reads only types and
    shapes, so it runs on a meta-device skeleton before the weights are loaded."""
    from dgq.calibrate import check_head
    from dgq.embedding import check_embedding
    from dgq.int8_rows import check_int8_options

    if config.quantize_head:
        check_head(model, adapter_for(model), config)
    if config.quantize_embedding:
        check_embedding(model, config)
    check_int8_options(model, config.int8_head, config.int8_embedding)


@torch.no_grad()
def quantize(model: nn.Module, samples: torch.Tensor | None, config: QuantConfig,
             device: torch.device | str | None = None, progress: bool = True) -> QuantizeResult:
    """Quantize ``model`` in place with ``config``, calibrating on token ids ``samples`` ``[n, seqlen]``.

    ``device`` is where each block is calibrated (default: CUDA if available); the rest of the model stays put.
    The settings are recorded in ``model.config.quantization_config`` (a :class:`dgq.hf.DGQConfig`), so the model
    saves with ``save_pretrained`` / :func:`save` and :func:`dgq.hf.quant_config` reads them back.
    """
    from dgq.validate import finite_weights, token_ids_fit

    device = resolve_device(device)
    start = time.perf_counter()
    report = CalibrationReport()
    if config.quantizes_weights:
        finite_weights(model)
        check_model(model, config)
        if samples is None:
            raise ConfigError("quantize() needs calibration token ids `samples` to quantize weights")
        token_ids_fit(samples, model.get_input_embeddings().num_embeddings, "the calibration text")
        if config.rotate:
            rotate_model(model, config.seed)
        report = quantize_blocks(model, adapter_for(model), samples, config, device, progress)
    mark_quantized(model, config)
    return QuantizeResult(model, config, report, time.perf_counter() - start)


def quantize_model(model: nn.Module, tokenizer: Any, config: QuantConfig | None = None,
                   calib_data: str | None = None, device: torch.device | str | None = None,
                   progress: bool = True, data_dir: str | Path | None = None) -> nn.Module:
    """``dgq.quantize(model, tokenizer, config) -> model``: draw the calibration samples ``config`` asks for with
    ``tokenizer`` (default: the C4 calibration half, or ``calib_data``) and quantize ``model`` in place."""
    from dgq.data import calibration_samples

    config = config or preset("dgq")
    samples = calibration_samples(tokenizer, path=calib_data or config.calib_data, nsamples=config.nsamples,
                                  seqlen=config.seqlen, seed=config.seed, root=data_dir)
    return quantize(model, samples, config, device=device, progress=progress).model


@dataclass
class QuantizeRun:
    """What :func:`quantize_pretrained` did: the settings, where it saved, and perplexity before/after."""

    config: QuantConfig
    out: Path
    source: Any  # dgq.loading.ModelSource
    seconds: float
    perplexity_fp: dict[str, float] = field(default_factory=dict)
    perplexity: dict[str, float] = field(default_factory=dict)


def quantize_pretrained(model: str, out: str | Path, method: str | None = None, *, group_size: int | None = None,
                        nsamples: int | None = None, device: str | torch.device | None = None,
                        eval_datasets: tuple[str, ...] | list[str] = (), windows: int | None = None,
                        data_dir: str | Path | None = None, overwrite: bool = False,
                        log: Callable[[str], None] = print, **settings: Any) -> QuantizeRun:
    """Load ``model`` (an alias, .gguf, directory or hub id), quantize it with ``method`` (default:
    :func:`default_method` for the calibration budget) and save it to ``out``.

    ``settings`` override :class:`QuantConfig` fields (``act``, ``seqlen``, ``seed``, ``calib_data``, search
    grids, …); unless one of :data:`HEAD_EMBEDDING_OPTIONS` is among them, the LM head and the input embedding
    follow :func:`default_head_embedding`.  ``group_size`` defaults to the largest of 128, 64 that divides the layer widths, ``nsamples`` to
    :func:`default_nsamples`; a default applies only when the argument is absent (``None``), never for 0.  With
    ``eval_datasets``, perplexity is measured before and after (``windows`` per dataset) and recorded in the model
    card.  Everything that can be checked is checked before the weights are read, in order of cost
    (:mod:`dgq.validate`); ``out`` is reserved first, so an unwritable path fails at once, and no failure leaves
    anything behind.
    """
    from dgq import validate
    from dgq.checkpoint import PendingDir
    from dgq.checkpoint import save as write_checkpoint
    from dgq.data import calibration_samples
    from dgq.loading import load_tokenizer, load_weights

    for flag, value, minimum in (("--group-size", group_size, 2), ("--nsamples", nsamples, 1),
                                 ("--seqlen", settings.get("seqlen"), 1), ("--calib-batch", settings.get("calib_batch"), 1),
                                 ("--windows", windows, 1)):
        validate.at_least(flag, value, minimum)
    datasets = check_datasets(eval_datasets)
    device = resolve_device(device)
    asked_nsamples = nsamples is not None
    nsamples = nsamples if asked_nsamples else default_nsamples(device)
    asked_method = method is not None
    method = method if asked_method else default_method(nsamples)
    config = preset(method, nsamples=nsamples, **settings)  # every setting but the group size, checked now
    pending = PendingDir(out, overwrite)
    try:
        validate.data_files(datasets, config.calib_data, data_dir, calibrate=config.quantizes_weights)
        source, hf_config, skeleton = validate.model_structure(model, config.seqlen)
        config = config.with_(group_size=validate.group_size_for(skeleton, group_size,
                                                                 grouped=config.weight in ("dual", "group")))
        asked_rows = any(name in settings for name in HEAD_EMBEDDING_OPTIONS)
        if not asked_rows and config.quantizes_weights:
            config = config.with_(**default_head_embedding(skeleton))
        check_options(skeleton, config)
        tokenizer = load_tokenizer(source)
        validate.vocabulary_fits(tokenizer, hf_config)
        validate.eval_texts_fit(tokenizer, datasets, config.seqlen, data_dir, hf_config.vocab_size)
        samples = calibration_samples(tokenizer, path=config.calib_data, nsamples=nsamples, seqlen=config.seqlen,
                                      seed=config.seed, root=data_dir) if config.quantizes_weights else None
        why = "paper setting" if nsamples == CUDA_NSAMPLES else "as asked" if asked_nsamples else \
            f"CPU default; --nsamples {CUDA_NSAMPLES} for the paper setting"
        chosen = "" if asked_method else f" (default for {nsamples} sequences)"
        rows = _head_embedding_label(config) + ("" if asked_rows else " (default)")
        log(f"model {source.display_name} · method {config.method}{chosen} · "
            f"W{config.weight_bits}A{config.act_bits} · "
            f"group {config.group_size} · act {config.act} · calibration {nsamples} x {config.seqlen} tokens ({why})"
            f" · head/embedding {rows}")
        fp_model = load_weights(source, hf_config)
        validate.finite_weights(fp_model)
        before = evaluate(fp_model, tokenizer, datasets=datasets, windows=windows, seqlen=config.seqlen,
                          data_dir=data_dir, device=device).perplexity if datasets else {}
        fp_model.to("cpu")
        result = quantize(fp_model, samples, config, device=device)
        after = evaluate(fp_model, tokenizer, datasets=datasets, windows=windows, seqlen=config.seqlen,
                         data_dir=data_dir, device=device).perplexity if datasets else {}
        fp_model.to("cpu")
        card = {"base_model": source.card_dict(), "perplexity": after, "perplexity_fp": before, "windows": windows,
                "seqlen": config.seqlen}
        write_checkpoint(fp_model, pending, tokenizer=tokenizer, card=card)
    except BaseException:
        pending.discard()
        raise
    return QuantizeRun(config, Path(out), source, result.seconds, before, after)


def _head_embedding_label(config: QuantConfig) -> str:
    """How the settings store the LM head and the input embedding, for the log line."""
    def one(four_bit: bool, int8: bool) -> str:
        return "4-bit" if four_bit else "int8" if int8 else "float"

    return (f"{one(config.quantize_head, config.int8_head)}/"
            f"{one(config.quantize_embedding, config.int8_embedding)}")


def save(model: nn.Module, out: str | Path, tokenizer: Any = None, overwrite: bool = False,
         card: dict[str, Any] | None = None) -> Path:
    """Write the quantized ``model`` (and ``tokenizer``) to the directory ``out``, atomically."""
    from dgq import checkpoint

    return checkpoint.save(model, out, tokenizer=tokenizer, overwrite=overwrite, card=card)


def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         fuse: bool = False) -> nn.Module:
    """The quantized model saved at ``path``, its packed tensors validated.

    ``fuse``: one A8W4 layer for q/k/v and one for gate/up in each block (:func:`dgq.fuse.fuse_projections`):
    the same outputs, bit for bit, from one activation quantization and one GEMM per shared input.  A fused model
    cannot be saved (fusion is a load-time step); a model whose projections cannot fuse exactly is refused with a
    :class:`~dgq.fuse.FusionError` naming the layer.
    """
    from dgq import checkpoint
    from dgq.fuse import fuse_projections

    model = checkpoint.load(path, device=resolve_device(device), dtype=dtype)
    return fuse_projections(model) if fuse else model


def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a directory written by dgq (its config carries a dgq ``quantization_config``); another
    method's checkpoint is refused, named, rather than handed to transformers."""
    import json

    from dgq.checkpoint import CheckpointError
    from dgq.validate import foreign_quantization

    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        hf_config = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config} is not valid JSON: {exc}") from None
    foreign_quantization(hf_config, str(path))
    return (hf_config.get("quantization_config") or {}).get("quant_method") == "dgq"


@dataclass
class Prepared:
    """A model checked up to its weights: its config and tokenizer, and how to read the weights."""

    config: Any
    tokenizer: Any
    label: str
    read_weights: Callable[[], nn.Module]


def prepare_any(spec: str, seqlen: int | None = None, device: str | torch.device = "cpu") -> Prepared:
    """A dgq checkpoint or any model spec :func:`quantize_pretrained` takes (then unquantized), checked from its
    config and tokenizer alone (another method's checkpoint, too few positions for ``seqlen``, a vocabulary smaller
    than the tokenizer's) before :attr:`Prepared.read_weights` reads anything heavy."""
    import json

    from transformers import AutoConfig, AutoTokenizer

    from dgq import validate
    from dgq.checkpoint import check_directory
    from dgq.loading import load_tokenizer, load_weights

    if is_checkpoint(spec):
        check_directory(spec)
        config = AutoConfig.from_pretrained(spec)
        if seqlen is not None:
            validate.seqlen_fits(seqlen, config)
        method = json.loads((Path(spec) / "config.json").read_text())["quantization_config"]["settings"]["method"]
        prepared = Prepared(config, AutoTokenizer.from_pretrained(spec), f"{spec} ({method})",
                            lambda: load(spec, device=device))
    else:
        source, config, _ = validate.model_structure(spec, seqlen)
        prepared = Prepared(config, load_tokenizer(source), f"{source.display_name} (unquantized)",
                            lambda: load_weights(source, config, device=resolve_device(device)))
    validate.vocabulary_fits(prepared.tokenizer, config)
    return prepared


def load_any(spec: str, device: str | torch.device = "cpu") -> tuple[nn.Module, Any, str]:
    """``(model, tokenizer, label)`` for a dgq checkpoint or for any model spec :func:`quantize_pretrained` takes
    (then unquantized), so before and after are evaluated through the same path; checked as :func:`prepare_any`
    does, and the weights for NaN/Inf."""
    from dgq.validate import finite_weights

    prepared = prepare_any(spec, device=device)
    model = prepared.read_weights()
    finite_weights(model)
    return model, prepared.tokenizer, prepared.label


def check_datasets(names: tuple[str, ...] | list[str] | None) -> list[str]:
    """The perplexity datasets named, each known (else a :class:`~dgq.data.DataError` naming the choices)."""
    from dgq.data import DATASETS, DataError

    names = list(names or [])
    unknown = [d for d in names if d not in DATASETS]
    if unknown:
        raise DataError(f"unknown dataset {unknown[0]!r}; choose from {', '.join(DATASETS)}")
    return names


@dataclass
class Evaluation:
    """Perplexity per dataset and lm-eval's zero-shot metrics per task, and the settings they were measured with."""

    perplexity: dict[str, float] = field(default_factory=dict)
    zeroshot: dict[str, dict[str, float]] = field(default_factory=dict)
    seqlen: int = 2048
    windows: int | None = None
    limit: int | None = None
    seconds: float = 0.0
    label: str = ""  # what was evaluated, for tables: the checkpoint and its method, or the unquantized model


def evaluate(model: nn.Module | str, tokenizer: Any = None, *, datasets: tuple[str, ...] | list[str] = (),
             tasks: tuple[str, ...] | list[str] = (), windows: int | None = None, seqlen: int = 2048,
             limit: int | None = None, batch_size: int = 16, data_dir: str | Path | None = None,
             device: str | torch.device | None = None, progress: bool = True) -> Evaluation:
    """Evaluate ``model`` (a module with its ``tokenizer``, or anything :func:`load_any` takes: a dgq checkpoint,
    or an unquantized model to compare with).

    ``datasets``: perplexity (GPTQ protocol) over the first ``windows`` windows of ``seqlen`` tokens (default all;
    C4 at most 256).  ``tasks``: zero-shot accuracy through lm-evaluation-harness on the first ``limit`` items of
    each task (default all; see :mod:`dgq.eval.zeroshot`).  Given a spec, everything is checked before the weights
    are read: the ranges, the names, the data files, the model's config and tokenizer against the texts
    (:func:`prepare_any`).
    """
    from dgq import validate
    from dgq.eval.perplexity import perplexity
    from dgq.eval.zeroshot import check_tasks, zeroshot

    validate.at_least("--windows", windows, 1)
    validate.at_least("--seqlen", seqlen, 1)
    validate.at_least("--limit", limit, 1)
    datasets, tasks = check_datasets(datasets), check_tasks(tasks)
    if not datasets and not tasks:
        raise ConfigError("nothing to evaluate: name perplexity datasets and/or zero-shot tasks")
    device = resolve_device(device)
    if isinstance(model, (str, Path)):
        validate.data_files(datasets, None, data_dir, calibrate=False)
        prepared = prepare_any(str(model), seqlen if datasets else None)
        validate.eval_texts_fit(prepared.tokenizer, datasets, seqlen, data_dir, prepared.config.vocab_size)
        model, tokenizer, label = prepared.read_weights(), prepared.tokenizer, prepared.label
        validate.finite_weights(model)
    else:
        label = getattr(model.config, "name_or_path", "") or type(model).__name__
    start = time.perf_counter()
    model.to(device)
    ppl = {d: perplexity(model, tokenizer, d, seqlen=seqlen, windows=windows, root=data_dir, device=device,
                         progress=progress).ppl for d in datasets}
    accuracy = zeroshot(model, tokenizer, tasks, limit=limit, root=data_dir, batch_size=batch_size) if tasks else {}
    return Evaluation(ppl, accuracy, seqlen, windows, limit, time.perf_counter() - start, label)


def generate(path: str | Path, prompt: str, settings: Any = None, device: str | torch.device | None = None,
             out: TextIO | None = None, attention: str = "dgq") -> str:
    """Text generated from the checkpoint at ``path`` for ``prompt`` (``settings``: a
    :class:`~dgq.generate.GenerationSettings`, default greedy), streamed to ``out`` when given.

    Where the decode step is compiled (CUDA by default), the model is prepared as ``dgq bench`` measures it
    (:func:`prepare_decode`): q/k/v and gate/up fused where the model allows it, and the one-token steps on dgq's
    split-KV attention (``attention="dgq"``) or transformers' SDPA (``"sdpa"``).  Eager decoding (the CPU,
    ``compile=False``) runs the checkpoint as loaded.
    """
    from transformers import AutoTokenizer

    from dgq.generate import GenerationSettings, generate as run

    check_attention(attention)
    settings = settings or GenerationSettings()
    model = load(path, device=resolve_device(device))
    if settings.compiles(model.device):
        prepare_decode(model, attention)
    return run(model, AutoTokenizer.from_pretrained(path), prompt, settings, out=out)


def export(path: str | Path, out: str | Path, format: str, overwrite: bool = False) -> Path:
    """Convert the checkpoint at ``path`` to ``format`` (see :mod:`dgq.export`) in the directory ``out``."""
    from dgq.export import export as run

    return run(path, out, format, overwrite=overwrite)


ATTENTIONS = ("dgq", "sdpa")


def check_attention(attention: str) -> None:
    """Refuse an attention name other than :data:`ATTENTIONS`."""
    if attention not in ATTENTIONS:
        raise ConfigError(f"attention: one of {', '.join(ATTENTIONS)}; got {attention!r}")


def prepare_decode(model: nn.Module, attention: str) -> dict[str, Any]:
    """Make a loaded model ready for fast decoding, in place: q/k/v and gate/up fused where the model allows it (the
    same outputs, fewer launches) and, with ``attention="dgq"``, one-token steps on dgq's split-KV kernel.  Returns
    what was done, as :func:`bench` reports it on every row: ``fused`` (with ``not_fused``, why not) and
    ``attention``.  A model whose heads the kernel cannot serve is refused, the way out named."""
    from dgq.fuse import FusionError, fuse_projections

    done: dict[str, Any] = {"fused": True}
    try:
        fuse_projections(model)
    except FusionError as exc:  # runs unfused, and the caller is told why
        done = {"fused": False, "not_fused": str(exc)}
    if attention == "dgq":
        from dgq.attention import use_decode_attention

        try:
            use_decode_attention(model)
        except ConfigError as exc:
            raise ConfigError(f"{exc}; use --attention sdpa") from None
    done["attention"] = attention
    return done


def bench(path: str | Path, seqlens: list[int], decode_batches: list[int], context: int = 1024,
          decode_steps: int = 50, repeats: int = 10, prefill_mode: str = "graph",
          decode_mode: str = "compiled", attention: str = "dgq", kv_cache: str = "fp16") -> list[dict[str, Any]]:
    """Prefill latency (batch 1, each of ``seqlens``) and decode tokens/s (each of ``decode_batches``) of the
    checkpoint at ``path`` on the local GPU, one dict per measurement; the modes are :mod:`dgq.bench`'s.  The
    projections are fused where the model allows it (the same outputs, fewer launches; each row says).  Decode
    steps attend with dgq's split-KV kernel (``attention="dgq"``, :mod:`dgq.attention`; what BENCHMARKS.md's
    end-to-end figures use) or transformers' SDPA; the KV cache in the model's dtype or int8 (:mod:`dgq.kv_cache`,
    with dgq's attention only)."""
    from dgq.bench import DECODE_MODES, KV_CACHES, PREFILL_MODES, decode, prefill
    from dgq.errors import DGQError
    from dgq.validate import at_least

    for flag, value in (("--context", context), ("--decode-steps", decode_steps), ("--repeats", repeats)):
        at_least(flag, value, 1)
    if prefill_mode not in PREFILL_MODES or decode_mode not in DECODE_MODES:
        raise ConfigError(f"modes: prefill one of {', '.join(PREFILL_MODES)}, decode one of "
                          f"{', '.join(DECODE_MODES)}; got {prefill_mode!r}, {decode_mode!r}")
    check_attention(attention)
    if kv_cache not in KV_CACHES or (kv_cache == "int8" and attention != "dgq"):
        raise ConfigError(f"KV cache: one of {', '.join(KV_CACHES)}, int8 with dgq's attention only (SDPA cannot read "
                          f"int8 codes); got {kv_cache!r} with {attention!r}")
    if not torch.cuda.is_available():
        raise DGQError("dgq bench measures GPU speed and needs CUDA; none is available on this machine")
    model = load(path, device="cuda", dtype=torch.float16)
    fused = prepare_decode(model, attention)
    if kv_cache == "int8":  # a model the cache cannot serve is refused here, before anything is measured
        from dgq.kv_cache import Int8StaticCache

        Int8StaticCache(config=model.config, max_cache_len=context)  # (its layers allocate lazily: nothing held)
    fused["kv_cache"] = kv_cache
    vocab = model.config.vocab_size
    rows: list[dict[str, Any]] = []
    for seqlen in seqlens:
        ms, peak, warm = prefill(model, 1, seqlen, vocab, repeats, prefill_mode)
        rows.append({"phase": "prefill", "batch": 1, "seqlen": seqlen, "ms": ms, "peak_bytes": peak,
                     "warm_peak_bytes": warm, "mode": prefill_mode, **fused})
    for batch in decode_batches:
        tps, peak = decode(model, batch, context, decode_steps, vocab, decode_mode, kv_cache)
        rows.append({"phase": "decode", "batch": batch, "seqlen": context, "tokens_per_s": tps,
                     "peak_bytes": peak, "mode": decode_mode, **fused})
    return rows
