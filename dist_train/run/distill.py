"""Distillation: a fine-tuned teacher beside the model, its outputs a second target.

    loss_sum = (1 - w) x task.loss_sum(student, labels) + w x task.soft_loss_sum(student, teacher, T)

summed over the same targets the task counts (examples, labelled tokens, windows), so the loop's division by
the global target count makes it a mean as every other loss. The teacher is the task's own model rebuilt
from its folder (as ``dist-train predict`` rebuilds it: labels, pooling), in inference mode, whole on every
process (ZeRO-3 and FSDP2 shard the student only), under the engine's autocast; it has no parameters the
optimizer sees and nothing of it enters a checkpoint. Its outputs depend only on the batch, so a resumed run
sees the same teacher outputs as an uninterrupted one.
"""

from __future__ import annotations

import torch

from dist_train.errors import UserError


def load_teacher(cfg, task, engine):
    """The teacher model named by ``distill.teacher``, checked against the student's task, labels and
    tokenizer, on ``engine``'s device in inference mode."""
    from dist_train.use.inference import ModelFolder
    from dist_train.tasks import task_class

    path = cfg.distill.teacher
    try:
        folder = ModelFolder(path)
    except UserError as exc:
        raise UserError(str(exc).replace("MODEL_DIR", "distill.teacher")) from None
    if folder.task != task.name:
        raise UserError(f"distill.teacher '{path}' is a {folder.task or 'pretrained (no task head)'} model; the "
                        f"student trains {task.name}: give a {task.name} model folder (a run's final/)")
    teacher_task = task_class(folder.task).for_folder(folder.folder, folder.meta, {})
    teacher_task.load_tokenizer()
    teacher_task.restore(folder.folder)
    _check_same_targets(path, task, teacher_task)
    if teacher_task.tokenizer.get_vocab() != task.tokenizer.get_vocab():
        raise UserError(f"distill.teacher '{path}' reads text with another tokenizer than the student; give the "
                        "student the teacher's tokenizer (model.tokenizer, or keep_layers of the teacher)")
    model = teacher_task.build_model()
    model.to(engine.device).eval().requires_grad_(False)
    return model


def _check_same_targets(path: str, task, teacher_task) -> None:
    mine, theirs = getattr(task, "labels", None), getattr(teacher_task, "labels", None)
    if mine is not None and theirs is not None and list(mine.names) != list(theirs.names):
        raise UserError(f"distill.teacher '{path}' predicts the labels {list(theirs.names)}, the student's data has "
                        f"{list(mine.names)}; distil on data with the teacher's labels")
    ranges = task.cfg.task.target_range, teacher_task.cfg.task.target_range
    if ranges[0] != ranges[1]:
        raise UserError(f"distill.teacher '{path}' was trained with task.target_range {ranges[1]}, the student "
                        f"with {ranges[0]}; give the student the teacher's")


class Distiller:
    """``loss_sum(outputs, batch)`` with the teacher's term mixed in; what the loop calls instead of the
    task's own when ``distill.teacher`` is set."""

    def __init__(self, cfg, task, engine):
        self.task, self.engine = task, engine
        self.weight, self.temperature = cfg.distill.weight, cfg.distill.temperature
        self.teacher = load_teacher(cfg, task, engine)

    @torch.no_grad()
    def teacher_outputs(self, batch: dict):
        with self.engine.autocast():
            return self.teacher(**self.task.inputs(batch))

    def loss_sum(self, outputs, batch: dict) -> torch.Tensor:
        soft = self.task.soft_loss_sum(outputs, self.teacher_outputs(batch), batch, self.temperature)
        if self.weight == 1.0:
            return soft
        return (1 - self.weight) * self.task.loss_sum(outputs, batch) + self.weight * soft
