"""Tasks: each supplies its data preparation, model head, loss and metrics; the loop is the same for all."""

from __future__ import annotations

from dist_train.tasks.classification import ClassificationTask

TASKS = {ClassificationTask.name: ClassificationTask}


def build_task(cfg):
    return TASKS[cfg.task.name](cfg)
