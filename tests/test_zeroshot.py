"""Zero-shot evaluation through lm-evaluation-harness on our own task definitions over the offline files."""

from __future__ import annotations

import math

import pytest
import torch

from dgq.api import evaluate, quantize
from dgq.config import preset
from dgq.data import data_root
from dgq.eval.zeroshot import TASKS, zeroshot
from helpers import LAMBADA_TARGET_TOKENS, VOCAB, ZEROSHOT_CORRECT, make_model
from test_cli import _assert_one_line_error, run_cli


def uniform(model: torch.nn.Module) -> torch.nn.Module:
    """Every next-token distribution uniform: each choice then scores -(its tokens) * log(VOCAB) exactly."""
    with torch.no_grad():
        model.lm_head.weight.zero_()
    return model


@pytest.fixture(scope="module")
def quantized_uniform() -> torch.nn.Module:
    model = make_model("llama")
    samples = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    quantize(model, samples, preset("w4a8_rtn_dg", group_size=64, nsamples=2, seqlen=32), device="cpu",
             progress=False)
    return uniform(model)


def test_every_task_scores_its_known_answer_count(quantized_uniform, tokenizer, data_dir):
    results = zeroshot(quantized_uniform, tokenizer, list(TASKS), root=data_dir)
    for task, (items, acc, acc_norm) in ZEROSHOT_CORRECT.items():
        row = results[task]
        assert row["n"] == items and row["acc"] * items == pytest.approx(acc), task
        assert (row["acc_norm"] * items == pytest.approx(acc_norm)) if acc_norm is not None else "acc_norm" not in row
    lambada = results["lambada_openai"]
    assert lambada["n"] == 2 and lambada["acc"] == 0.0  # a uniform model's greedy token is <unk>, never the word
    mean_tokens = sum(LAMBADA_TARGET_TOKENS) / len(LAMBADA_TARGET_TOKENS)
    assert lambada["perplexity"] == pytest.approx(math.exp(mean_tokens * math.log(VOCAB)), rel=1e-5)


def test_limit_takes_the_first_items(quantized_uniform, tokenizer, data_dir):
    result = evaluate(quantized_uniform, tokenizer, tasks=["piqa", "hellaswag"], limit=1, data_dir=data_dir)
    piqa = result.zeroshot["piqa"]
    assert (piqa["n"], piqa["acc"], piqa["acc_norm"]) == (1, 1.0, 0.0)  # first item: shortest is right, longest not
    hellaswag = result.zeroshot["hellaswag"]
    assert (hellaswag["n"], hellaswag["acc"], hellaswag["acc_norm"]) == (1, 0.0, 1.0)
    assert result.perplexity == {}


def test_cli_eval_tasks_on_an_unquantized_directory(data_dir, tmp_path, tokenizer):
    path = tmp_path / "fp"
    uniform(make_model("llama")).save_pretrained(path)
    tokenizer.save_pretrained(path)
    proc = run_cli("eval", str(path), "--tasks", "boolq,winogrande", "--limit", "2", "--data-dir", str(data_dir),
                   "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if line.split()}
    assert rows["boolq"][1:4] == ["2", "0.5000", "-"]  # first two answers: true, false; "no" is always chosen
    assert rows["winogrande"][1:4] == ["2", "0.5000", "-"]
    assert "(unquantized)" in proc.stdout


def test_unknown_task_is_one_line_before_loading(tmp_path):
    proc = run_cli("eval", str(tmp_path / "not-even-there"), "--tasks", "piqa,mmlu")
    _assert_one_line_error(proc, "unknown zero-shot task 'mmlu'; choose from piqa, arc_easy")


@pytest.mark.skipif(not (data_root() / "zeroshot").is_dir(), reason="needs the shared zero-shot files")
def test_real_files_parse_to_their_documented_item_counts():
    counts = {"piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "boolq": 3270, "hellaswag": 10042,
              "winogrande": 1267, "lambada_openai": 5153}
    for name, task in TASKS.items():
        docs = task.load(data_root() / "zeroshot" / task.folder)
        assert len(docs) == counts[name], name
        if "choices" in docs[0]:
            assert all(0 <= d["label"] < len(d["choices"]) for d in docs), name
