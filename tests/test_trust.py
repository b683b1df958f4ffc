"""Reproducible, portable checkpoints; exact folded Gemma norms in any dtype; one error base class; memory bounds.

The two memory tests depend on the kernel engineer's ``QuantLinear`` (dgq/nn.py): its kernel layout must follow
the layer's device, so a block moved back to the CPU during calibration leaves nothing on the GPU.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import stat
from pathlib import Path

import pytest
import torch

import dgq
from dgq.api import quantize
from dgq.checkpoint import load, save
from dgq.cli import main
from dgq.config import ConfigError, QuantConfig, preset
from dgq.errors import DGQError
from dgq.models import adapter_for
from dgq.nn import QuantLinear
from helpers import make_model, make_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama").save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_same_command_gives_bit_identical_portable_checkpoint(model_dir, data_dir, tmp_path, capsys):
    outs = [tmp_path / "run1", tmp_path / "run2"]
    for out in outs:
        code = main(["quantize", str(model_dir), "--out", str(out), "--nsamples", "4", "--seqlen", "32",
                     "--calib-batch", "2", "--device", "cpu", "--data-dir", str(data_dir), "--eval", "wikitext2",
                     "--windows", "2"])
        assert code == 0, capsys.readouterr().err
    first, second = (_files(o) for o in outs)
    assert first.keys() == second.keys() and "README.md" in first and "model.safetensors" in first
    for name in first:
        assert first[name] == second[name], f"{name} differs between two runs of the same command"
    for name, content in first.items():  # no folder of this machine: not the model's, not the data's, not ours
        text = content.decode("utf-8", errors="replace")
        for local in (str(model_dir), str(data_dir), str(tmp_path), str(Path.cwd())):
            assert local not in text, f"{name} holds the local path {local}"
    modes = {name: stat.S_IMODE((outs[0] / name).stat().st_mode) for name in first}
    assert len(set(modes.values())) == 1, f"file modes differ: {modes}"
    card = (outs[0] / "README.md").read_text()
    assert '"name": "' + model_dir.name + '"' in card and "Quantization took" not in card


def test_checkpoint_records_the_calibration_file_by_name_only(model_dir, data_dir, tmp_path, capsys):
    calib = tmp_path / "deep" / "folder" / "my-calib.txt"
    calib.parent.mkdir(parents=True)
    calib.write_text("alpha beta gamma delta " * 200)
    out = tmp_path / "q"
    assert main(["quantize", str(model_dir), "--out", str(out), "--nsamples", "2", "--seqlen", "32", "--device",
                 "cpu", "--calib", str(calib), "--method", "w4a8_rtn_dg"]) == 0, capsys.readouterr().err
    settings = json.loads((out / "config.json").read_text())["quantization_config"]["settings"]
    assert settings["calib_data"] == "my-calib.txt"


@pytest.mark.parametrize("changes", [dict(weight="none", act="dynamic", smoothing="none", search=False),
                                     dict(weight="none", act="none", smoothing="percentile", search=False),
                                     dict(weight="none", act="none", smoothing="none", search=True)])
def test_a_config_that_does_nothing_is_refused(changes):
    with pytest.raises(ConfigError, match="weight 'none' quantizes no layer"):
        QuantConfig(**changes)
    assert preset("fp").quantizes_weights is False  # the one config that does nothing on purpose


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemma_folded_norm_is_exact_in_any_load_dtype(dtype, tmp_path):
    model = make_model("gemma3")
    ids = torch.randint(0, 96, (2, 32), generator=torch.Generator().manual_seed(0))
    quantize(model, ids, preset("dgq", group_size=64, percentile=5.0), device="cpu", progress=False)
    adapter = adapter_for(model)
    folded = adapter.blocks(model)[0].input_layernorm.weight.detach().clone()
    assert not torch.equal(folded.to(dtype).float(), folded), "a plain cast would lose the folded values"
    save(model, tmp_path / "g")
    loaded = load(tmp_path / "g", dtype=dtype)
    norm = adapter_for(loaded).blocks(loaded)[0].input_layernorm.weight
    assert norm.dtype == torch.float32 and torch.equal(norm, folded)
    assert loaded.model.embed_tokens.weight.dtype == dtype  # the rest does take the asked dtype


def test_gemma_norm_folded_in_a_bf16_model_stays_float32():
    model = make_model("gemma3").to(torch.bfloat16)
    ids = torch.randint(0, 96, (2, 32), generator=torch.Generator().manual_seed(0))
    quantize(model, ids, preset("dgq", group_size=64, percentile=5.0), device="cpu", progress=False)
    for block in adapter_for(model).blocks(model):
        assert block.input_layernorm.weight.dtype == torch.float32
        assert block.pre_feedforward_layernorm.weight.dtype == torch.float32


def test_every_dgq_error_class_derives_from_dgqerror():
    """A user's mistake must print as one line and a bug as a traceback, so every error class dgq defines for
    the user is a DGQError (internal control-flow exceptions are private, with a leading underscore)."""
    classes = []
    for info in pkgutil.walk_packages(dgq.__path__, "dgq."):
        if info.name.startswith(("dgq.kernels", "dgq.bench")):
            continue  # need CUDA / triton at import; the kernels raise no user errors
        module = importlib.import_module(info.name)
        classes += [c for _, c in inspect.getmembers(module, inspect.isclass)
                    if issubclass(c, Exception) and c.__module__ == module.__name__ and not c.__name__.startswith("_")]
    assert len(classes) >= 8
    assert [c.__name__ for c in classes if not issubclass(c, DGQError)] == []


def _tensors_held(module: torch.nn.Module) -> list[torch.Tensor]:
    """Every tensor a module holds, once: parameters, buffers, and any plain attribute (a cache), nested in tuples,
    lists, dicts or dataclasses."""
    found: dict[int, torch.Tensor] = {}

    def visit(value: object) -> None:
        if isinstance(value, torch.Tensor):
            found[id(value)] = value
        elif isinstance(value, (tuple, list)):
            for v in value:
                visit(v)
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif hasattr(value, "__dataclass_fields__"):
            for name in value.__dataclass_fields__:
                visit(getattr(value, name))

    for m in module.modules():
        visit({k: v for k, v in vars(m).items() if k != "_modules"})
    return list(found.values())


def _small_quant_linear() -> QuantLinear:
    model = make_model("llama")
    ids = torch.randint(0, 96, (2, 32), generator=torch.Generator().manual_seed(0))
    quantize(model, ids, preset("w4a8_rtn_dg", group_size=64), device="cpu", progress=False)
    return model.model.layers[0].self_attn.q_proj


def test_cached_layouts_follow_the_layer_device():
    """Whatever the layer caches for its forward or its kernels must move
    (or be dropped) with the layer, or a block sent back to the CPU keeps GPU memory alive."""
    pytest.importorskip("triton", reason="the kernel layout's module needs triton")
    layer = _small_quant_linear()
    layer(torch.randn(3, layer.in_features))  # the CPU reference builds its cache
    layer.kernel_layout()                     # the kernels' layout, built from the CPU tensors
    assert len(_tensors_held(layer)) > len(list(layer.buffers())), "the test needs a cached layout to follow"
    layer.to("meta")
    assert {t.device.type for t in _tensors_held(layer)} == {"meta"}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_calibration_holds_at_most_one_block():
    """While a block is calibrated the GPU holds no tensor of any other block (weights, packed buffers, kernel
    layouts and other caches), and afterwards nothing of any block.

    (An earlier form compared ``memory_allocated`` between blocks 0 and 1; it failed on the H100 by exactly one
    [4, 64, hidden] fp32 activation, which is the calibration's hidden states, not a block's weights.)"""
    import gc

    from dgq.calibrate import quantize_blocks

    model = make_model("llama")
    adapter = adapter_for(model)
    blocks = list(adapter.blocks(model))
    ids = torch.randint(0, 96, (4, 64), generator=torch.Generator().manual_seed(0))
    strays: list[str] = []

    def others_on_gpu(i: int) -> None:
        for j, other in enumerate(blocks):
            on_gpu = [t for m in other.modules() for t in _tensors_held(m) if t.is_cuda]
            if j != i and on_gpu:
                strays.append(f"block {j} holds {len(on_gpu)} CUDA tensors while block {i} runs")

    for i, block in enumerate(blocks):
        block.register_forward_hook(lambda *_, i=i: others_on_gpu(i))
    torch.ones(8, 8, device="cuda") @ torch.ones(8, 8, device="cuda")  # the cuBLAS workspace lives for the process
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    quantize_blocks(model, adapter, ids, preset("dgq", group_size=64), torch.device("cuda"), progress=False)
    gc.collect()
    torch.cuda.synchronize()
    assert not strays, strays[:3]
    assert not [t for m in model.modules() for t in _tensors_held(m) if t.is_cuda]
    packed = sum(b.numel() * b.element_size() for b in blocks[0].buffers())
    assert torch.cuda.memory_allocated() - base < packed / 2, "calibrated blocks left tensors on the GPU"
