"""The command line end to end, and its answers to bad input: one line, exit code 2, nothing written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import make_model, make_tokenizer


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "dgq.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def _assert_one_line_error(proc: subprocess.CompletedProcess, message: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr
    assert lines[-1].startswith("error: ") and message in lines[-1], proc.stderr


def test_quantize_save_eval_roundtrip(model_dir, data_dir, tmp_path):
    out = tmp_path / "q"
    common = ["--seqlen", "64", "--data-dir", str(data_dir), "--windows", "3", "--device", "cpu"]
    proc = run_cli("quantize", str(model_dir), "--out", str(out), "--nsamples", "4", "--calib-batch", "2",
                   "--eval", "wikitext2", *common)
    assert proc.returncode == 0, proc.stderr
    table = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(table) if line.startswith("method"))
    row = table[header + 2].split()
    assert row[:4] == ["dgq_gptq", "W4A8", "128", "dynamic"]  # the default method at 4 sequences
    after = float(row[5])
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "dgq" and qc["settings"]["nsamples"] == 4
    proc = run_cli("eval", str(out), "--datasets", "wikitext2", *common)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout.splitlines()[2].split()[-1]) == pytest.approx(after, abs=5e-4)


def test_help_explains():
    proc = run_cli("quantize", "--help")
    assert proc.returncode == 0 and "smollm2-135m" in proc.stdout and "--nsamples" in proc.stdout


@pytest.mark.parametrize("case", ["missing_model", "unsupported", "group", "missing_data", "nan", "exists"])
def test_bad_input_fails_cleanly(case, model_dir, data_dir, tmp_path):
    out = tmp_path / "out"
    model = str(model_dir)
    extra: list[str] = ["--data-dir", str(data_dir)]
    message = {"missing_model": "does not exist", "unsupported": "unsupported architecture 'gpt2'",
               "group": "group size 96 does not divide in_features 128", "missing_data": "not found at",
               "nan": "model weight model.layers.0.self_attn.k_proj.weight holds 1 NaN/Inf", "exists": "already exists"}[case]
    if case == "missing_model":
        model = str(tmp_path / "no-such-model")
    elif case == "unsupported":
        from transformers import GPT2Config, GPT2LMHeadModel

        model = str(tmp_path / "gpt2")
        GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=96)).save_pretrained(model)
        make_tokenizer().save_pretrained(model)
    elif case == "group":
        extra += ["--group-size", "96"]
    elif case == "missing_data":
        extra = ["--data-dir", str(tmp_path / "nodata"), "--eval", "ptb"]
    elif case == "nan":
        broken = make_model("llama")
        with torch.no_grad():
            broken.model.layers[0].self_attn.k_proj.weight[3, 5] = float("nan")
        model = str(tmp_path / "nan-model")
        broken.save_pretrained(model)
        make_tokenizer().save_pretrained(model)
    elif case == "exists":
        out.mkdir()
        (out / "keep.txt").write_text("precious")
    proc = run_cli("quantize", model, "--out", str(out), "--nsamples", "2", "--seqlen", "64", "--device", "cpu",
                   *extra)
    _assert_one_line_error(proc, message)
    if case == "exists":
        assert (out / "keep.txt").read_text() == "precious"
    else:
        assert not out.exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir()), "no temporary directory left behind"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where there is no GPU")
def test_bench_says_it_needs_cuda(tmp_path):
    _assert_one_line_error(run_cli("bench", str(tmp_path)), "needs CUDA")


def test_bench_refuses_an_unknown_mode_before_anything_else(tmp_path):
    from dgq import api
    from dgq.config import ConfigError

    with pytest.raises(ConfigError, match="modes: prefill one of graph, compiled, eager"):
        api.bench(tmp_path, [256], [1], prefill_mode="fast")
    assert "invalid choice" in run_cli("bench", str(tmp_path), "--decode-mode", "fast").stderr
    with pytest.raises(ConfigError, match="attention: one of dgq, sdpa"):
        api.bench(tmp_path, [256], [1], attention="flash")
    assert "invalid choice" in run_cli("bench", str(tmp_path), "--attention", "flash").stderr
    with pytest.raises(ConfigError, match="int8 with dgq's attention only"):
        api.bench(tmp_path, [256], [1], attention="sdpa", kv_cache="int8")


def test_generate_refuses_an_unknown_attention_before_loading(tmp_path):
    from dgq import api
    from dgq.config import ConfigError

    with pytest.raises(ConfigError, match="attention: one of dgq, sdpa"):
        api.generate(tmp_path / "missing", "hello", attention="flash")
    assert "invalid choice" in run_cli("generate", str(tmp_path), "hi", "--attention", "flash").stderr


def test_user_errors_are_one_line_and_bugs_show_their_traceback(monkeypatch, capsys, tmp_path):
    from dgq import api
    from dgq.cli import BUG_LINE, main
    from dgq.config import ConfigError

    def fails_with(exc: Exception):  # noqa: ANN202
        def run(*args, **kwargs):  # noqa: ANN002, ANN003
            raise exc
        return run

    monkeypatch.setattr(api, "export", fails_with(ConfigError("bad setting")))
    args = ["export", str(tmp_path), "--format", "fake-fp16", "--out", str(tmp_path / "o")]
    assert main(args) == 2
    assert capsys.readouterr().err == "error: bad setting\n"
    monkeypatch.setattr(api, "export", fails_with(ValueError("internal invariant broken")))
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ValueError: internal invariant broken" in err and err.endswith(BUG_LINE + "\n")


def test_gptq_flag(model_dir, data_dir, tmp_path):
    common = ["--nsamples", "2", "--seqlen", "64", "--device", "cpu", "--data-dir", str(data_dir)]
    proc = run_cli("quantize", str(model_dir), "--out", str(tmp_path / "q"), "--gptq", *common)
    assert proc.returncode == 0, proc.stderr
    settings = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["settings"]
    assert settings["method"] == "dgq_gptq" and settings["gptq"] and settings["act_order"]  # the default at 2
    proc = run_cli("quantize", str(model_dir), "--out", str(tmp_path / "w8"), "--method", "w8a8_smoothquant",
                   "--gptq", *common)
    _assert_one_line_error(proc, "gptq chooses 4-bit codes")


def test_the_default_method_follows_the_calibration_budget(model_dir, data_dir, tmp_path):
    """Without ``--method``: the best preset measured at the budget (dgq.api.default_method), said in the log."""
    from dgq.api import default_method

    assert (default_method(128), default_method(500), default_method(127), default_method(12)) == \
        ("dgq_gptaq", "dgq_gptaq", "dgq_gptq", "dgq_gptq")
    common = ["--seqlen", "64", "--device", "cpu", "--data-dir", str(data_dir)]
    proc = run_cli("quantize", str(model_dir), "--out", str(tmp_path / "q"), "--nsamples", "2", *common)
    assert proc.returncode == 0, proc.stderr
    assert "method dgq_gptq (default for 2 sequences)" in proc.stdout
    proc = run_cli("quantize", str(model_dir), "--out", str(tmp_path / "m"), "--nsamples", "2", "--method", "dgq",
                   *common)
    assert proc.returncode == 0 and "method dgq ·" in proc.stdout
