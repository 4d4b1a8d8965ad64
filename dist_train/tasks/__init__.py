"""Tasks: each supplies its data preparation, model head, loss, metrics and use; the loop is the same for all.

The registry maps ``task.name`` to its class ("module:Class", imported on use, so that reading a config
imports no model code). A new task is one module here and one line below.
"""

from __future__ import annotations

import importlib

TASKS = {
    "classification": "dist_train.tasks.classification:ClassificationTask",
    "multi_label": "dist_train.tasks.multi_label:MultiLabelTask",
    "regression": "dist_train.tasks.regression:RegressionTask",
    "causal_lm": "dist_train.tasks.language_modeling:CausalLMTask",
    "masked_lm": "dist_train.tasks.language_modeling:MaskedLMTask",
    "token_classification": "dist_train.tasks.token_classification:TokenClassificationTask",
    "text_to_text": "dist_train.tasks.text_to_text:TextToTextTask",
    "question_answering": "dist_train.tasks.question_answering:QuestionAnsweringTask",
}


def task_class(name: str):
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_task(cfg, is_main: bool = True):
    """The task of ``cfg``; ``is_main``: whether this process is rank 0 (the one that prints notes)."""
    task = task_class(cfg.task.name)(cfg)
    task.is_main = is_main
    return task


def task_of_architectures(architectures: list[str]) -> str | None:
    """The task of a Hugging Face folder that dist-train did not write, from its model class names."""
    for name in TASKS:
        if any(arch.endswith(task_class(name).architectures) for arch in architectures):
            return name
    return None
