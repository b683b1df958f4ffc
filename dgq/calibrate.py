"""The calibration driver: walk the decoder blocks one at a time, GPTQ-style.

1. Run the model up to its first block on the calibration samples and record, for every block, the keyword
   arguments it is called with (masks and rotary embeddings differ per block type in e.g. Gemma3).
2. For each block: one pass of the float block collects, per activation that feeds linears, ``H = XᵀX`` and the
   per-channel max; smoothing scales are folded into the block; every consumer linear is quantized from the
   statistics (``H`` and the maxima transform exactly under the scales, so no second pass is needed); then the
   QUANTIZED block produces the next block's inputs, so later blocks calibrate on what they will really see.
3. Options around the blocks: with ``quantize_embedding`` the input embedding is quantized first (so every block
   calibrates on the rows it will really get: the 4-bit rounding is large), and with ``quantize_head`` the LM head
   is quantized last, from the statistics of the final norm's output on the quantized model's last hidden states
   (:func:`quantize_head`).  ``int8_head`` and ``int8_embedding`` need no statistics and are applied last
   (:mod:`dgq.int8_rows`): the int8 embedding's rounding is small (SmolLM2-135M's float model: +0.02% perplexity),
   and calibrating the blocks on its rows cost more than that (README's job: 22.115 against 21.914 after;
   RESULTS.md, "An int8 LM head and embedding").
4. With ``float_target`` (asymmetric calibration) the float model's block inputs travel beside the quantized ones,
   and each statistics pass also collects ``Xᵀ(X_fp - X)``, so that every linear is fitted to the float model's
   outputs rather than to its own float outputs on drifted inputs (:func:`dgq.gptq.float_output_target`).

Only the current block lives on the compute device; the model stays where it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from dgq import positions
from dgq.config import ConfigError, QuantConfig
from dgq.embedding import quantize_input_embedding, untie_head
from dgq.formats import amax_abs
from dgq.int8_rows import int8_head, int8_input_embedding
from dgq.models.adapters import Adapter, SmoothPair
from dgq.quantizer import (
    LayerReport, LinearStats, TokenSample, check_layer_shape, quantize_linear, token_sample,
)
from dgq.smooth import (
    column_absmax, expand_for_heads, fold_scales, percentile_scales, reduce_for_heads, smoothquant_scales,
)


class _StopForward(Exception):
    """Ends a forward pass once everything it was run for has been recorded (the capture pass skips the final norm
    and LM head; the statistics pass skips what follows the last consumer's input)."""


class _Recorder(nn.Module):
    """Stands in for a block during capture: records its call and passes the hidden states through."""

    def __init__(self, block: nn.Module, sink: list[dict[str, Any]], first: bool, last: bool) -> None:
        super().__init__()
        self.attention_type = getattr(block, "attention_type", None)  # read by some model loops
        self.sink, self.first, self.last = sink, first, last

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise RuntimeError("dgq expects decoder blocks to receive everything but hidden_states as keywords")
        self.sink.append({"hidden": hidden_states if self.first else None, "kwargs": kwargs})
        if self.last:
            raise _StopForward
        return hidden_states


@dataclass
class BlockInputs:
    """Hidden states per calibration chunk, and the keyword arguments each block is called with per chunk."""

    hidden: list[torch.Tensor]
    kwargs: list[list[dict[str, Any]]]  # [block][chunk]


@dataclass
class CalibrationReport:
    layers: list[LayerReport] = field(default_factory=list)


def _module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, adapter: Adapter, samples: torch.Tensor, batch: int,
                         device: torch.device) -> BlockInputs:
    """Run the model's embedding stage on ``samples`` in chunks of ``batch`` and record every block's inputs."""
    blocks = adapter.blocks(model)
    original = list(blocks)
    sinks: list[list[dict[str, Any]]] = [[] for _ in original]
    recorders = [_Recorder(b, sinks[i], i == 0, i == len(original) - 1) for i, b in enumerate(original)]
    home = next(model.parameters()).device
    for i, r in enumerate(recorders):
        blocks[i] = r
    try:
        model.to(device)
        for start in range(0, samples.shape[0], batch):
            try:
                model(input_ids=samples[start:start + batch].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for i, b in enumerate(original):
            blocks[i] = b
        model.to(home)  # blocks were swapped out, so only the embedding stage and head moved and move back
    hidden = [rec["hidden"] for rec in sinks[0]]
    return BlockInputs(hidden, [[rec["kwargs"] for rec in sink] for sink in sinks])


# Column-block width of the ``H`` accumulation.  ``XᵀX`` is symmetric, so only the blocks on and above the diagonal
# are computed per chunk and the rest is mirrored once at the end: 2/3 of the work for SmolLM2's 1536-wide down_proj
# input (70% of all ``H`` work), 3/4 for the 576-wide ones; 0.11 s less per chunk of 8192 tokens on 2 cores.
_GRAM_BLOCK = 512


def add_gram_upper(h: torch.Tensor, x: torch.Tensor) -> None:
    """``h += xᵀx`` on and above the block diagonal; what lies below it is left for :func:`mirror_upper`."""
    k = x.shape[1]
    width = -(-k // -(-k // _GRAM_BLOCK))  # equal blocks of at most _GRAM_BLOCK columns
    for a in range(0, k, width):
        h[a:a + width, a:].addmm_(x[:, a:a + width].t(), x[:, a:])


def mirror_upper(h: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle (diagonal included) is that of ``h``."""
    return torch.triu(h) + torch.triu(h, 1).t()


def _block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _consumer_inputs(block: nn.Module, pairs: tuple[SmoothPair, ...], hidden: torch.Tensor,
                     kwargs: dict[str, Any], whole: bool = False) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Each pair's input activation ``[tokens, k]`` (float) on one chunk of ``block``'s inputs, and with ``whole``
    the block's output.

    Without ``whole`` the pass stops as soon as every pair has seen its input: the rest of the block (the last
    linear and the residual add, about a tenth of the pass) would produce outputs nobody reads.
    """
    inputs: list[torch.Tensor | None] = [None] * len(pairs)

    def hook(index: int) -> Callable:
        def record(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            inputs[index] = args[0].reshape(-1, args[0].shape[-1]).float()
            if not whole and all(x is not None for x in inputs):
                raise _StopForward
        return record

    handles = [_module(block, p.consumers[0]).register_forward_pre_hook(hook(i)) for i, p in enumerate(pairs)]
    output = None
    try:
        output = _block_output(block(hidden, **kwargs))
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [p.consumers[0] for p, x in zip(pairs, inputs) if x is None]
    if missing:
        raise RuntimeError(f"calibration saw no input for {', '.join(missing)}")
    return inputs, output  # type: ignore[return-value]


@dataclass
class FloatReference:
    """The float model's side of asymmetric calibration: the float block and the float model's inputs to it, one
    tensor per calibration chunk as in ``hidden``.

    When ``outputs`` is a list, the pass of the float block also appends to it the block's output of every chunk
    (the next block's float inputs), which saves a separate pass.  When ``cache`` is a list, it keeps every chunk's
    float activations by consumer name: the float block's activations do not depend on what is quantized, so the
    true-sequential passes read them from there (divided by the smoothing scales, :func:`smooth_block`) instead
    of running the float block again.
    """

    block: nn.Module
    hidden: list[torch.Tensor]
    outputs: list[torch.Tensor] | None = None
    cache: list[dict[str, torch.Tensor]] | None = None

    def activations(self, chunk: int, pairs: tuple[SmoothPair, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
        """The float activation ``X_fp`` of each pair on one chunk, from the cache when it holds the chunk."""
        if self.cache is not None and chunk < len(self.cache):
            return [self.cache[chunk][p.consumers[0]] for p in pairs]
        xs, out = _consumer_inputs(self.block, pairs, self.hidden[chunk], kwargs, whole=self.outputs is not None)
        if self.outputs is not None:
            self.outputs.append(out)  # type: ignore[arg-type]
        if self.cache is not None:
            self.cache.append({p.consumers[0]: x for p, x in zip(pairs, xs)})
        return xs

    def smooth(self, name: str, k_in: torch.Tensor) -> None:
        """Divide the cached activations of consumer ``name`` by its smoothing scales (``x -> x / k``)."""
        for chunk in self.cache or []:
            chunk[name] = chunk[name] / k_in


@torch.no_grad()
def collect_stats(block: nn.Module, pairs: tuple[SmoothPair, ...], hidden: list[torch.Tensor],
                  kwargs: list[dict[str, Any]], sample: Callable[[int, int], TokenSample] | None = None,
                  reference: FloatReference | None = None, gram: tuple[bool, ...] | None = None,
                  ) -> list[LinearStats]:
    """One pass of ``block``, accumulating ``H = XᵀX`` and channel maxima of each pair's activation (and with
    ``sample``, which makes a :class:`TokenSample` for a given token count and sequence length, a sample of it,
    for the static activation scale search).

    With a ``reference``, each chunk also runs through the float block on the float model's inputs, and the drift
    term ``D = Xᵀ(X_fp - X)`` is accumulated (``X_fp`` the float model's activation on the same tokens), so that
    each linear can be fitted to the float model's outputs (:func:`dgq.gptq.float_output_target`).

    ``gram`` says per pair whether its ``H`` (and drift) is needed; the others get their maxima only (``H`` left
    zero): true-sequential collects them again, and the ``k x k`` products are a third of a pass's work.
    """
    stats: list[LinearStats | None] = [None] * len(pairs)
    total = sum(h[..., 0].numel() for h in hidden)
    gram = gram or (True,) * len(pairs)
    for chunk, (h, kw) in enumerate(zip(hidden, kwargs)):
        xs, _ = _consumer_inputs(block, pairs, h, kw)
        x_fps: list[torch.Tensor | None] = [None] * len(xs)
        if reference is not None:
            x_fps = reference.activations(chunk, pairs, kw)  # type: ignore[assignment]
        for index, (x, x_fp) in enumerate(zip(xs, x_fps)):
            st = stats[index]
            if st is None:
                k = x.shape[1]
                st = stats[index] = LinearStats(
                    torch.zeros(k, k, device=x.device), torch.zeros(k, device=x.device), 0,
                    sample(total, h.shape[-2]) if sample else None,
                    None if x_fp is None or not gram[index] else torch.zeros(k, k, device=x.device))
            if gram[index]:
                add_gram_upper(st.h, x)
            if st.drift is not None:  # X_fp - X per token first: H and XᵀX_fp would cancel in float32
                st.drift.addmm_(x.t(), x_fp - x)
            if st.sample is not None:
                st.sample.add(x, x_fp)
            torch.maximum(st.absmax, amax_abs(x, 0), out=st.absmax)
            st.tokens += x.shape[0]
    for st in stats:
        st.h = mirror_upper(st.h)
    return stats  # type: ignore[return-value]


def smoothing_scales(pair: SmoothPair, stats: LinearStats, consumers: list[nn.Linear],
                     config: QuantConfig) -> torch.Tensor | None:
    """Scales per producer channel for this pair, or None if the config or the pair does not smooth."""
    if config.smoothing == "none" or not pair.foldable:
        return None
    absmax = reduce_for_heads(stats.absmax, pair.heads)
    if config.smoothing == "percentile":
        return percentile_scales(absmax, config.percentile)
    wmax = reduce_for_heads(column_absmax([c.weight for c in consumers]), pair.heads)
    return smoothquant_scales(absmax, wmax, config.sq_alpha)


@torch.no_grad()
def smooth_block(block: nn.Module, pairs: tuple[SmoothPair, ...], stats: list[LinearStats],
                 config: QuantConfig, reference: FloatReference | None = None) -> list[LinearStats]:
    """Fold every pair's smoothing scales into the block; return the statistics of the smoothed activations.

    ``x -> x / k`` maps ``H`` to ``H / (k kᵀ)`` and the maxima to ``max / k`` exactly, so no second pass is needed.
    All pairs are folded before anything is quantized, since a value projection is both a consumer of one pair
    and the producer of another.  A ``reference``'s cached float activations are scaled alike.
    """
    smoothed: list[LinearStats] = []
    for pair, st in zip(pairs, stats):
        consumers = [_module(block, c) for c in pair.consumers]
        k = smoothing_scales(pair, st, consumers, config)
        if k is None:
            smoothed.append(st)
            continue
        fold_scales(_module(block, pair.producer), consumers, k, pair)
        k_in = expand_for_heads(k, pair.heads).to(st.h.device)
        if reference is not None:
            reference.smooth(pair.consumers[0], k_in)
        outer = torch.outer(k_in, k_in)
        smoothed.append(LinearStats(st.h / outer, st.absmax / k_in, st.tokens,
                                    None if st.sample is None else st.sample.scaled(k_in),
                                    None if st.drift is None else st.drift / outer))
    return smoothed


def quantize_block(block: nn.Module, prefix: str, pairs: tuple[SmoothPair, ...], stats: list[LinearStats],
                   config: QuantConfig) -> list[LayerReport]:
    """Replace every consumer linear of the block by its quantized module."""
    reports = []
    for pair, st in zip(pairs, stats):
        for name in pair.consumers:
            module, report = quantize_linear(f"{prefix}.{name}", _module(block, name), st, config)
            _set_module(block, name, module)
            reports.append(report)
    return reports


def _outputs(block: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict[str, Any]]) -> list[torch.Tensor]:
    """``block``'s output hidden states, chunk by chunk."""
    return [_block_output(block(h, **kw)) for h, kw in zip(hidden, kwargs)]


@torch.no_grad()
def quantize_blocks(model: nn.Module, adapter: Adapter, samples: torch.Tensor, config: QuantConfig,
                    device: torch.device, progress: bool = True) -> CalibrationReport:
    """Calibrate and quantize every decoder block of ``model`` in place, one block on ``device`` at a time.

    With ``config.float_target`` the float model's block inputs are propagated beside the quantized model's, and
    every statistics pass also runs the float block on them and collects the drift term (one more float pass per
    statistics pass; the first one also yields the next block's float inputs).
    """
    report = CalibrationReport()
    if config.quantize_embedding:
        embedding = _name_of(model, model.get_input_embeddings())
        report.layers.append(LayerReport(embedding, quantize_input_embedding(model, config, device), None))
    inputs = capture_block_inputs(model, adapter, samples, config.calib_batch, device)
    blocks = adapter.blocks(model)
    if config.act_first_scale:  # its layers ask their block which rows are first positions, here and at inference
        positions.install(blocks)
    names = {id(m): n for n, m in model.named_modules()}
    hidden = inputs.hidden
    hidden_fp = inputs.hidden if config.float_target else None
    sample = _token_sampler(config)
    bar = tqdm(range(len(blocks)), desc=f"quantize [{config.method}]", unit="block", disable=not progress)
    for i in bar:
        block = blocks[i]
        home = next(block.parameters()).device
        block.to(device)
        kwargs = inputs.kwargs[i]
        last = i + 1 == len(blocks) and not config.quantize_head  # its outputs would feed nothing
        # the block is still float here; its float outputs are the next block's float inputs
        reference = None if hidden_fp is None else FloatReference(
            block, hidden_fp, None if last else [], [] if config.true_sequential else None)
        gram = tuple(j == 0 or not config.true_sequential for j in range(len(adapter.pairs)))
        stats = collect_stats(block, adapter.pairs, hidden, kwargs, sample, reference, gram)
        if reference is not None and reference.outputs is not None:
            hidden_fp = reference.outputs
        stats = smooth_block(block, adapter.pairs, stats, config, reference)
        for j, pair in enumerate(adapter.pairs):
            if config.true_sequential and j > 0:  # statistics of the (smoothed) block with pairs < j quantized
                stats[j] = collect_stats(block, (pair,), hidden, kwargs, sample, reference)[0]
            report.layers += quantize_block(block, names[id(block)], (pair,), [stats[j]], config)
        del stats, reference  # this block's H matrices (on ``device``) must not live on while the next is calibrated
        if not last:
            hidden = _outputs(block, hidden, kwargs)
        block.to(home)
        worst = max(r.rel_error for r in report.layers[-len(adapter.linear_names()):])
        bar.set_postfix(max_rel_err=f"{worst:.2e}")
    if config.quantize_head:
        report.layers.append(quantize_head(model, adapter, hidden, hidden_fp, config, device))
    elif config.int8_head:  # weight-only, one scale per row: no statistics needed
        report.layers.append(LayerReport(*int8_head(model), None))
    if config.int8_embedding:
        report.layers.append(LayerReport(*int8_input_embedding(model), None))
    return report


def _token_sampler(config: QuantConfig) -> Callable[[int, int], TokenSample] | None:
    """What collects each activation's token sample for the static scale search (only a searched static scale
    needs one), as :func:`collect_stats` takes it: ``(total_tokens, seqlen) -> TokenSample``."""
    return partial(token_sample, config) if config.act == "static" and config.act_clip_grid > 1 else None


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


class _HeadStage(nn.Module):
    """The final norm and the LM head as one block of one smoothing pair (``norm`` -> ``head``), so that the
    block machinery (statistics, smoothing, quantizing, the float reference) serves the head unchanged."""

    PAIR_NAMES = ("norm", ("head",))

    def __init__(self, norm: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.norm, self.head = norm, head

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(hidden_states))


def check_head(model: nn.Module, adapter: Adapter, config: QuantConfig) -> None:
    """Refuse, before any work, a head that :func:`quantize_head` cannot quantize (works on a meta-device
    skeleton: only types and shapes are read)."""
    head = model.get_output_embeddings()
    if not adapter.final_norm or not adapter.head_input_ok(model):
        raise ConfigError(f"quantize_head: in this {adapter.family} model the final norm does not feed the LM head "
                          f"directly (e.g. OPT's project_out), so the head cannot be calibrated on it")
    if not isinstance(head, nn.Linear):
        raise ConfigError(f"quantize_head: the LM head is {type(head).__name__}, not a Linear")
    check_layer_shape(_name_of(model, head), head, config)


@torch.no_grad()
def quantize_head(model: nn.Module, adapter: Adapter, hidden: list[torch.Tensor],
                  hidden_fp: list[torch.Tensor] | None, config: QuantConfig, device: torch.device) -> LayerReport:
    """Quantize the LM head in place from ``hidden``, the quantized model's last hidden states per calibration
    chunk (and with ``float_target`` the float model's, ``hidden_fp``), as a block's linear would be: the final
    norm's output gives ``H`` and the maxima, the smoothing scales fold into the final norm and the head.

    A head tied to the input embedding is given its own copy first (:func:`~dgq.embedding.untie_head`): the
    smoothing scales and the quantization are the head's alone.
    """
    untie_head(model)
    head = model.get_output_embeddings()
    name = _name_of(model, head)
    norm = model.get_submodule(adapter.final_norm)
    home = head.weight.device
    stage = _HeadStage(norm, head).to(device)
    producer, consumers = _HeadStage.PAIR_NAMES
    pair = SmoothPair(producer, consumers, adapter.norm_offset)
    sample = _token_sampler(config)
    reference = None if hidden_fp is None else FloatReference(stage, hidden_fp)
    kwargs: list[dict[str, Any]] = [{} for _ in hidden]
    stats = collect_stats(stage, (pair,), hidden, kwargs, sample, reference)
    stats = smooth_block(stage, (pair,), stats, config, reference)
    module, report = quantize_linear(name, head, stats[0], config)
    del stats, reference
    _set_module(model, name, module.to(home))
    norm.to(home)
    return report
