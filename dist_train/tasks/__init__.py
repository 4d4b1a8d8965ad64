"""Tasks: each supplies its data preparation, model head, loss and metrics; the loop is the same for all."""

from __future__ import annotations

from dist_train.tasks.classification import ClassificationTask
from dist_train.tasks.language_modeling import CausalLMTask, MaskedLMTask

TASKS = {task.name: task for task in (ClassificationTask, CausalLMTask, MaskedLMTask)}


def build_task(cfg):
    return TASKS[cfg.task.name](cfg)
