"""Evaluate a model as it is, with no training: the untrained baseline of a fine-tuning config.

``dist-train zero-shot CONFIG`` reads the same config as ``dist-train train`` and runs the same evaluation
(the same data, prompt template, generation settings and metrics) on ``model.pretrained`` itself: zero-shot
with the template alone, k-shot with ``task.few_shot=k`` training pairs placed before each prompt. So every
fine-tuning result has a baseline measured the same way.
"""

from __future__ import annotations

import copy

from dist_train.errors import UserError


def zero_shot(cfg, split: str = "test"):
    """(report, task) of ``model.pretrained`` on ``data.<split>`` (test or validation), in one process."""
    from dist_train.engine import SingleEngine
    from dist_train.evaluate import evaluate
    from dist_train.seeding import seed_everything
    from dist_train.tasks import TASKS, build_task, task_class

    cfg = copy.deepcopy(cfg)
    task = build_task(cfg)
    if not task.generates_text:
        able = ", ".join(n for n in TASKS if task_class(n).generates_text)
        raise UserError(f"zero-shot: task {cfg.task.name} has no prompt to evaluate without training; it is for "
                        f"{able}")
    if cfg.model.pretrained is None:
        raise UserError("zero-shot: evaluates a pretrained model as it is; set model.pretrained (model.config "
                        "builds an untrained one)")
    if getattr(cfg.data, split) is None:
        raise UserError(f"zero-shot: data.{split} is not set; give the file to evaluate on "
                        f"(data.{split}=PATH) or --split {'validation' if split == 'test' else 'test'}")
    cfg.model.lora = None  # the model as it is: no adapters (they would start as a no-op anyway)
    seed_everything(cfg.train.seed)
    task.load_tokenizer()
    splits = task.prepare(task.tokenizer)  # train too: k-shot prompts draw their examples from it
    engine = SingleEngine(precision=cfg.train.precision)
    engine.prepare(task.build_model())
    engine.train(False)
    return evaluate(engine, task, getattr(splits, split), cfg.train.eval_batch_size, split), task
