"""Fused projections: one A8W4 GEMM (and one activation quantization) per shared input.

In a Llama-family block, q/k/v read the same normed hidden state, and so do gate/up.  :func:`fuse_projections`
replaces each such group of :class:`~dgq.nn.QuantLinear` layers by ONE layer whose output channels are the group's,
concatenated: the codes, ``zp`` and ``s2`` are per (output channel, group) and ``s1`` and the bias per output
channel, so they concatenate exactly, and a token's dynamic activation scale depends on the token alone.  Every
int32 accumulator, and so every output, is therefore bit-identical to the unfused layers'.

Mechanism, and why.  Transformers' attention calls ``self.q_proj(h)``, ``self.k_proj(h)``, ``self.v_proj(h)`` one
after the other (the MLP ``gate_proj(x)`` and ``up_proj(x)``).  Three ways give one GEMM without rewriting that code:

* cache the fused output keyed on the input tensor's identity: a silent stale read when a tensor is reused, and
  module state that ``torch.compile`` and CUDA graphs handle badly;
* re-implement the attention and MLP forwards: a copy of transformers' code to keep in step with every release;
* (chosen) a forward pre-hook on the parent (``self_attn`` / ``mlp``) that runs the fused layer on the input and
  hands the parent the fused output instead, while ``q_proj``, ``k_proj`` … become :class:`ProjectionSlice`
  modules returning their columns of it (a view: no copy, no state).  This relies on what these families' forwards
  do with their input: only pass it to the fused projections and read its leading shape; which is why fusion is
  limited to the families below, whose forwards are known to (the tests check the logits of each).

Static activation scales: one quantized input needs one scale, so a group whose layers were calibrated to different
static scales (``act_clip_grid`` searches them per layer) cannot fuse exactly.  Fusion is all or nothing: every
group is checked first and any reason not to fuse raises :class:`FusionError` with the model untouched, so a user
who asks for fused projections never gets a silently half-fused model.

The MLP goes one step further on long inputs: from :data:`SWIGLU_MIN_TOKENS` tokens on, its
``down_proj(act_fn(gate) * up)`` becomes ``down_proj(gate_up)``, the down projection taking the fused gate/up output
and forming ``silu(gate) * up`` in the kernel that quantizes its input (:attr:`dgq.nn.QuantLinear.swiglu_input`):
one launch and one pass over the product fewer per block.  Measured on the H100 (Llama-2-7B, benchmarks/notes_e2e.md,
session 11), it paid at prefill and cost at decode, where the one-token GEMV would form the whole row's product in
every CTA (batch 1: 389 -> 370 tok/s), so short inputs keep the compiled SiLU kernel.  This one does replace the
MLP's forward (an instance attribute: a bound method, which copies with the model), because the product is a
tensor operation a hook cannot reach; it is done only where that forward is known, the families below with a SiLU
``act_fn``.  Same arithmetic as transformers' (the SiLU rounded to the activation dtype, then the product), so on
the CPU the logits are bit-identical; on CUDA the kernel's exponential and division are the GPU's fast ones, and a
product may land one fp16 rounding away (the tests bound it).

The fused q/k/v and gate/up layers also take their one-token rows' absmax from the compiled graph
(:attr:`dgq.nn.QuantLinear.absmax_in_graph`): their input is a norm's output, into whose kernel the compiler fuses the
reduction, so their GEMV's CTAs skip reading the whole row (Llama-2-7B batch 1: 387.5 -> 390.9 tok/s; the down
projection, whose input is a pointwise kernel the reduction would split in two, lost: 389 -> 386;
benchmarks/notes_e2e.md, session 12).

Fusion is a load-time step (:func:`dgq.load` with ``fuse=True``): a fused model's state has a new layout
(``qkv_proj``, ``gate_up_proj``) that no dgq checkpoint uses, so :func:`dgq.save` refuses it (:func:`is_fused`).
"""

from __future__ import annotations

import types
from typing import Any, Callable

import torch
from torch import nn

from dgq.errors import DGQError
from dgq.formats import DualGrainedWeight
from dgq.models.adapters import adapter_for
from dgq.nn import QuantLinear

# (parent module, fused layer's name, the projections it replaces in output order), the same in every family below
_GROUPS = (("self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj")),
           ("mlp", "gate_up_proj", ("gate_proj", "up_proj")))
FAMILIES = ("llama", "mistral", "qwen2")


def _silu_classes() -> tuple[type, ...]:
    """The modules that compute ``silu``: torch's, and transformers' own (5.x's ``ACT2FN["silu"]``)."""
    from transformers import activations

    return (nn.SiLU,) + tuple(c for c in (getattr(activations, "SiLUActivation", None),) if c is not None)


_SILU = _silu_classes()
# From this many tokens on, a fused MLP's down projection forms silu(gate) * up itself (module docstring).  Measured
# on the H100: in its first form (IEEE division; the one-token GEMV forming it too) slower at decode, 1-32 tokens;
# in this form faster at every prefill length, 256-8192 tokens.  64 lies between, not measured.
SWIGLU_MIN_TOKENS = 64


class FusionError(DGQError, ValueError):
    """A model whose projections cannot be fused exactly; the message names the layer and the reason."""


class ProjectionSlice(nn.Module):
    """Stands where one projection was: returns its output columns ``[start, stop)`` of the fused layer's output,
    which the parent's pre-hook passes in place of the shared input."""

    def __init__(self, start: int, stop: int, fused_width: int) -> None:
        super().__init__()
        self.start, self.stop, self.fused_width = start, stop, fused_width

    def forward(self, fused_out: torch.Tensor) -> torch.Tensor:
        if fused_out.shape[-1] != self.fused_width:  # called on a hidden state, not from the fused parent
            raise FusionError(f"a fused projection takes the fused output ({self.fused_width} wide), got a tensor "
                              f"{fused_out.shape[-1]} wide; call the parent module, or load without fuse")
        return fused_out[..., self.start:self.stop]

    def extra_repr(self) -> str:
        return f"columns [{self.start}, {self.stop}) of {self.fused_width}"


def _run_fused(name: str) -> Callable[..., tuple[tuple, dict[str, Any]]]:
    """The parent's forward pre-hook: its input replaced by the output of its fused layer ``name`` (looked up by
    name on each call, so a deep copy or a device move of the model keeps the hook right)."""
    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        fused = module.get_submodule(name)
        if args:  # the MLP is called as mlp(x), the attention as self_attn(hidden_states=...)
            return (fused(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": fused(kwargs["hidden_states"])}
    return hook


def _check_group(where: str, layers: list[tuple[str, nn.Module]]) -> None:
    """Raise :class:`FusionError` unless ``layers`` can share one quantized input and one GEMM exactly."""
    for layer_name, layer in layers:
        if isinstance(layer, ProjectionSlice):
            raise FusionError(f"{where}.{layer_name} is already fused")
        if not isinstance(layer, QuantLinear):
            raise FusionError(f"{where}.{layer_name} is a {type(layer).__name__}; only dgq A8W4 layers "
                              f"(QuantLinear) fuse")
    first_name, first = layers[0]
    for layer_name, layer in layers[1:]:
        for attr in ("in_features", "group_size", "act_mode", "first_scale"):
            if getattr(layer, attr) != getattr(first, attr):
                raise FusionError(f"{where}.{layer_name} has {attr} {getattr(layer, attr)}, {first_name} "
                                  f"{getattr(first, attr)}: they cannot share one input")
        if first.act_mode == "static" and not torch.equal(layer.act_scale, first.act_scale):
            raise FusionError(f"{where}.{layer_name} and {first_name} have different static activation scales "
                              f"({float(layer.act_scale):.6g}, {float(first.act_scale):.6g}), so one quantized "
                              f"input cannot serve both; load without fuse")
        if first.first_scale and not torch.equal(layer.act_scale_first, first.act_scale_first):
            raise FusionError(f"{where}.{layer_name} and {first_name} have different first-position activation "
                              f"scales, so one quantized input cannot serve both; load without fuse")


def _check_swiglu(where: str, mlp: nn.Module) -> None:
    """Raise :class:`FusionError` unless the MLP computes ``down_proj(silu(gate) * up)`` with a dgq down projection
    that can take the fused gate/up output."""
    if not isinstance(getattr(mlp, "act_fn", None), _SILU):
        raise FusionError(f"{where} has activation {type(getattr(mlp, 'act_fn', None)).__name__}; fused MLPs need "
                          f"SiLU (SwiGLU); load without fuse")
    down = getattr(mlp, "down_proj", None)
    if not isinstance(down, QuantLinear):
        raise FusionError(f"{where}.down_proj is a {type(down).__name__}; only a dgq A8W4 layer (QuantLinear) takes "
                          f"the fused gate/up output")
    if down.in_features != mlp.gate_proj.out_features or mlp.gate_proj.out_features != mlp.up_proj.out_features:
        raise FusionError(f"{where}: gate {mlp.gate_proj.out_features}, up {mlp.up_proj.out_features} and "
                          f"down_proj's input {down.in_features} wide differ")


def _swiglu_forward(mlp: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    """A fused MLP's forward (bound to it): its pre-hook has already run ``gate_up_proj``.  From
    :data:`SWIGLU_MIN_TOKENS` tokens on, the down projection forms ``silu(gate) * up`` itself; below, the MLP's own
    forward runs on the fused output (its slices, its ``act_fn``)."""
    if gate_up.numel() >= SWIGLU_MIN_TOKENS * gate_up.shape[-1]:
        return mlp.down_proj(gate_up)
    return type(mlp).forward(mlp, gate_up)


def _fused_layer(layers: list[QuantLinear]) -> QuantLinear:
    """One :class:`QuantLinear` whose output channels are those of ``layers``, in order."""
    parts = [layer.dual_grained() for layer in layers]
    dg = DualGrainedWeight(**{f: torch.cat([getattr(p, f) for p in parts]) for f in ("u4", "zp", "s2", "s1")},
                           group_size=layers[0].group_size)
    bias = None
    if any(layer.bias is not None for layer in layers):  # a missing bias is an exact zero
        dtype = next(layer.bias.dtype for layer in layers if layer.bias is not None)
        bias = torch.cat([layer.bias if layer.bias is not None else
                          torch.zeros(layer.out_features, dtype=dtype, device=layer.s1.device) for layer in layers])
    first = layers[0].act_scale_first if layers[0].first_scale else None
    return QuantLinear.from_weight(dg, bias, layers[0].act_mode, layers[0].act_scale, first)


def fuse_projections(model: nn.Module) -> nn.Module:
    """Fuse, in place, each block's q/k/v into one ``qkv_proj`` and gate/up into one ``gate_up_proj``
    :class:`QuantLinear`, whose output the down projection takes (see the module docstring); returns ``model``.
    Outputs are bit-identical to the unfused model's on the CPU.  Raises :class:`FusionError`, before changing
    anything, for a family other than :data:`FAMILIES`, layers that are not dgq A8W4 layers, a group that cannot
    share one quantized input, or an MLP that is not a SwiGLU over dgq layers."""
    family = getattr(getattr(model, "config", None), "model_type", None)
    if family not in FAMILIES:
        raise FusionError(f"fusing projections supports {', '.join(FAMILIES)}; this model is {family!r}")
    blocks = adapter_for(model).blocks(model)
    plan = []
    for i, block in enumerate(blocks):
        for parent_name, fused_name, names in _GROUPS:
            parent = block.get_submodule(parent_name)
            layers = [(n, getattr(parent, n)) for n in names]
            _check_group(f"block {i} {parent_name}", layers)
            if parent_name == "mlp":
                _check_swiglu(f"block {i} mlp", parent)
            plan.append((parent, fused_name, names, [layer for _, layer in layers]))
    for parent, fused_name, names, layers in plan:
        fused = _fused_layer(layers)
        fused.absmax_in_graph = True  # its input is a norm's output (dgq.nn.QuantLinear.absmax_in_graph)
        parent.add_module(fused_name, fused)
        width, start = sum(layer.out_features for layer in layers), 0
        for name, layer in zip(names, layers):
            setattr(parent, name, ProjectionSlice(start, start + layer.out_features, width))
            start += layer.out_features
        parent.register_forward_pre_hook(_run_fused(fused_name), with_kwargs=True)
        if fused_name == "gate_up_proj":
            parent.down_proj.swiglu_input = True
            parent.forward = types.MethodType(_swiglu_forward, parent)
    return model


def is_fused(model: nn.Module) -> bool:
    """Whether :func:`fuse_projections` changed ``model``."""
    return any(isinstance(m, ProjectionSlice) for m in model.modules())
