"""Zero-shot accuracy through lm-evaluation-harness, on task definitions of our own that read the offline files.

lm-eval's built-in tasks fetch their data from the Hugging Face hub.  Here each task is an lm-eval
``ConfigurableTask`` with lm-eval's standard prompt, answer choices and metrics for that task (the
``lm_eval/tasks/*`` configs of lm-eval 0.4), whose documents come from ``<data>/zeroshot`` (see the data README:
splits, formats, quirks) through ``custom_dataset``, so nothing reaches a network.  The scoring (log-likelihoods
of each choice, ``acc``, ``acc_norm``, LAMBADA's perplexity) is lm-eval's own, run on our model object through its
``HFLM`` wrapper.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn

from dgq.config import ConfigError
from dgq.data import DataError, data_root

Doc = dict[str, Any]


def _jsonl(path: Path) -> list[Doc]:
    try:
        with path.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not json lines: {exc}") from None


def _labels(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()]


def _piqa(folder: Path) -> list[Doc]:
    docs, labels = _jsonl(folder / "valid.jsonl"), _labels(folder / "valid-labels.lst")
    if len(docs) != len(labels):
        raise DataError(f"{folder}: {len(docs)} questions but {len(labels)} labels")
    return [{"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": y} for d, y in zip(docs, labels)]


def _arc(file: str) -> Callable[[Path], list[Doc]]:
    def load(folder: Path) -> list[Doc]:
        docs = []
        for d in _jsonl(folder / file):
            choices = d["question"]["choices"]
            labels = [c["label"] for c in choices]  # "A".."E" or "1".."4"; answerKey names one of them
            docs.append({"id": d["id"], "question": d["question"]["stem"], "choices": [c["text"] for c in choices],
                         "label": labels.index(d["answerKey"])})
        return docs
    return load


def _boolq(folder: Path) -> list[Doc]:
    return [{"passage": d["passage"], "question": d["question"], "label": int(d["answer"])}
            for d in _jsonl(folder / "dev.jsonl")]


def _hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag text clean-up (WikiHow bracket artefacts, doubled spaces); the file already had its
    markers removed, and applying the same rule again keeps queries and endings exactly as lm-eval would see them."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag(folder: Path) -> list[Doc]:
    lines = (folder / "hellaswag_val_full.txt").read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise DataError(f"{folder / 'hellaswag_val_full.txt'} does not hold 6 lines per item ({len(lines)} lines)")
    return [{"query": _hellaswag_clean(lines[i]), "choices": [_hellaswag_clean(e) for e in lines[i + 2:i + 6]],
             "label": int(lines[i + 1])} for i in range(0, len(lines), 6)]


def _winogrande(folder: Path) -> list[Doc]:
    return [{"sentence": d["sentence"], "option1": d["option1"], "option2": d["option2"], "label": int(d["answer"]) - 1}
            for d in _jsonl(folder / "dev.jsonl")]


def _lambada(folder: Path) -> list[Doc]:
    return [{"text": d["text"]} for d in _jsonl(folder / "lambada_test.jsonl")]


def _winogrande_contexts(doc: Doc) -> list[str]:
    """WinoGrande is scored by partial evaluation: each option fills the blank and the model scores the same
    continuation (the rest of the sentence) after each of these two contexts."""
    blank = doc["sentence"].index("_")
    return [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]


def _winogrande_continuation(doc: Doc) -> str:
    return doc["sentence"][doc["sentence"].index("_") + 1:].strip()


ACC = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]
ACC_NORM = ACC + [{"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]


@dataclass(frozen=True)
class ZeroShotTask:
    """One task: where its documents come from and the lm-eval config fields that define prompt and metrics."""

    folder: str
    split: str
    load: Callable[[Path], list[Doc]]
    fields: dict[str, Any]

    def config(self, name: str, root: Path) -> dict[str, Any]:
        import datasets

        folder = root / "zeroshot" / self.folder

        def documents(**_: Any) -> dict[str, Any]:  # lm-eval passes the task metadata; the files need none
            if not folder.is_dir():
                raise DataError(f"zero-shot data for {name} not found at {folder} (point --data-dir or $DGQ_DATA "
                                f"at the data folder)")
            docs = self.load(folder)
            # The fingerprint is given, not left to `datasets` to derive: deriving it pickles the Arrow table with
            # dill, which fails on Python 3.12 with pyarrow 26 (MonthDayNano "not found as builtins").
            fingerprint = hashlib.sha256(json.dumps(docs, sort_keys=True).encode()).hexdigest()[:16]
            table = datasets.table.InMemoryTable.from_pylist(docs)
            return {self.split: datasets.Dataset(table, fingerprint=fingerprint)}

        split_key = {"test": "test_split", "validation": "validation_split"}[self.split]
        return {"task": name, "custom_dataset": documents, split_key: self.split, "num_fewshot": 0,
                "metadata": {"version": 1.0}, **self.fields}


_QUESTION = "Question: {{question}}\nAnswer:"
TASKS: dict[str, ZeroShotTask] = {
    "piqa": ZeroShotTask("piqa", "validation", _piqa, {
        "output_type": "multiple_choice", "doc_to_text": "Question: {{goal}}\nAnswer:", "doc_to_target": "label",
        "doc_to_choice": "{{[sol1, sol2]}}", "metric_list": ACC_NORM}),
    "arc_easy": ZeroShotTask("arc_easy", "test", _arc("ARC-Easy-Test.jsonl"), {
        "output_type": "multiple_choice", "doc_to_text": _QUESTION, "doc_to_target": "label",
        "doc_to_choice": "choices", "metric_list": ACC_NORM}),
    "arc_challenge": ZeroShotTask("arc_challenge", "test", _arc("ARC-Challenge-Test.jsonl"), {
        "output_type": "multiple_choice", "doc_to_text": _QUESTION, "doc_to_target": "label",
        "doc_to_choice": "choices", "metric_list": ACC_NORM}),
    "boolq": ZeroShotTask("boolq", "validation", _boolq, {
        "output_type": "multiple_choice", "doc_to_text": "{{passage}}\nQuestion: {{question}}?\nAnswer:",
        "doc_to_target": "label", "doc_to_choice": ["no", "yes"], "metric_list": ACC}),
    "hellaswag": ZeroShotTask("hellaswag", "validation", _hellaswag, {
        "output_type": "multiple_choice", "doc_to_text": "{{query}}", "doc_to_target": "label",
        "doc_to_choice": "choices", "metric_list": ACC_NORM}),
    "winogrande": ZeroShotTask("winogrande", "validation", _winogrande, {
        "output_type": "multiple_choice", "doc_to_text": lambda doc: doc["label"],
        "doc_to_target": _winogrande_continuation, "doc_to_choice": _winogrande_contexts, "metric_list": ACC}),
    "lambada_openai": ZeroShotTask("lambada_openai", "test", _lambada, {
        "output_type": "loglikelihood", "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}",
        "doc_to_target": "{{' '+text.split(' ')[-1]}}",
        "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False}] + ACC}),
}


def check_tasks(names: list[str] | tuple[str, ...]) -> list[str]:
    """``names``, each a known task (else one :class:`ConfigError` line naming the choices)."""
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ConfigError(f"unknown zero-shot task {unknown[0]!r}; choose from {', '.join(TASKS)}")
    return list(names)


def zeroshot(model: nn.Module, tokenizer: Any, tasks: list[str] | tuple[str, ...], limit: int | None = None,
             root: str | Path | None = None, batch_size: int = 16) -> dict[str, dict[str, float]]:
    """lm-eval's metrics of ``model`` on each of ``tasks`` (its first ``limit`` items, default all), as
    ``{task: {"acc": …, "acc_stderr": …, "acc_norm": …, "n": items}}`` (LAMBADA: ``acc`` and ``perplexity``)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = check_tasks(tasks)
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be at least 1, got {limit}")
    root = data_root(root)
    configs = [TASKS[name].config(name, root) for name in tasks]
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)  # its warnings about model objects and custom datasets concern its own CLI
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
        out = lm_eval.simple_evaluate(model=lm, tasks=configs, limit=limit, bootstrap_iters=1000, log_samples=False,
                                      task_manager=TaskManager(include_defaults=False))
    finally:
        logger.setLevel(level)
    results: dict[str, dict[str, float]] = {}
    for name in tasks:
        # lm-eval keys are "metric,filter" ("acc,none", "acc_stderr,none"); every task here has the one filter
        row = {key.partition(",")[0]: float(value) for key, value in out["results"][name].items()
               if "," in key and isinstance(value, (int, float))}
        row["n"] = out["n-samples"][name]["effective"]
        results[name] = row
    return results
