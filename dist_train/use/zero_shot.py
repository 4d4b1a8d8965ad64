"""Evaluate a model as it is, with no training: the untrained baseline of a fine-tuning config.

``dist-train zero-shot CONFIG`` reads the same config as ``dist-train train`` and evaluates
``model.pretrained`` itself on the same data, through the task's ``zero_shot``: text_to_text runs the same
evaluation as training (template, generation settings, metrics; k-shot with ``task.few_shot=k``);
classification asks a causal LM which label word follows ``task.template`` (dist_train/tasks/prompting.py). So
every fine-tuning result has a baseline measured the same way.
"""

from __future__ import annotations

import copy

from dist_train.errors import UserError


def zero_shot(cfg, split: str = "test"):
    """(report, task) of ``model.pretrained`` on ``data.<split>`` (test or validation), in one process."""
    from dist_train.engine import SingleEngine
    from dist_train.run.seeding import seed_everything
    from dist_train.tasks import build_task

    cfg = copy.deepcopy(cfg)
    task = build_task(cfg)
    if cfg.model.pretrained is None:
        raise UserError("zero-shot: evaluates a pretrained model as it is; set model.pretrained (model.config "
                        "builds an untrained one)")
    if getattr(cfg.data, split) is None:
        raise UserError(f"zero-shot: data.{split} is not set; give the file to evaluate on "
                        f"(data.{split}=PATH) or --split {'validation' if split == 'test' else 'test'}")
    seed_everything(cfg.train.seed)
    return task.zero_shot(SingleEngine(precision=cfg.train.precision), split), task
