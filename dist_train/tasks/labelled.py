"""What the tasks with a fixed set of named labels share: classification (one label per text), multi-label
and token classification (one label per word).

Training learns the label map from the training file (``self.labels``: the classes, their ids and the names
``task.label_names`` gives them); the model's head is sized and named from it; the export writes it beside
the weights (``labels.json``) and predict/eval take it back from there; a teacher's outputs are compared
with the student's over the labelled rows of the logits (the loss's own targets).
"""

from __future__ import annotations

import torch

from dist_train.data.labels import LabelMap
from dist_train.tasks.base import Task


class LabelledTask(Task):
    """A task whose model ends in one logit per label (over a text, or over each of its tokens)."""

    labels: LabelMap | None

    # -- model -----------------------------------------------------------------------------------------
    def head_kwargs(self) -> dict:
        lm = self.labels
        return {"num_labels": lm.num_labels, "id2label": lm.id2label, "label2id": lm.label2id}

    # -- distillation ----------------------------------------------------------------------------------
    def labelled(self, batch: dict) -> torch.Tensor | None:
        """Which rows of the logits carry a target (a boolean mask over their leading dimensions); None: all."""
        return None

    def soft_loss_sum(self, outputs, teacher, batch: dict, temperature: float) -> torch.Tensor:
        """The temperature-softened KL from the teacher's label distribution to the student's, over the rows
        the loss counts (``labelled``)."""
        student, taught, keep = outputs.logits, teacher.logits, self.labelled(batch)
        if keep is not None:
            student, taught = student[keep], taught[keep]
        return self.soft_kl_sum(student, taught, temperature)

    # -- export and use --------------------------------------------------------------------------------
    def save_extras(self, folder) -> None:
        self.labels.save(folder)

    def restore(self, folder: str) -> None:
        from transformers import AutoConfig

        self.labels = LabelMap.load(folder, AutoConfig.from_pretrained(folder))
