"""What every task shares: its tokenizer, the view of a batch the loop needs, and a DataLoader over a split.

A task supplies what the loop must not know: its data, its model head, its loss and its metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_train.data import make_loader
from dist_train.models import load_tokenizer


@dataclass
class Splits:
    train: object
    validation: object | None
    test: object | None
    labels: object | None = None
    """The label map of a classification task (None for language modelling)."""


class Task:
    name = ""
    metrics: tuple[str, ...] = ()
    """Validation metrics that can pick the best checkpoint; the first is the default."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.labels = None
        self.tokenizer = None

    def load_tokenizer(self):
        m = self.cfg.model
        return load_tokenizer(m.tokenizer or m.pretrained, m.trust_remote_code,
                              what="model.tokenizer" if m.tokenizer else "model.pretrained")

    def loader(self, ds, batches: list[list[int]], epoch: int, num_workers: int = 0, pin_memory: bool = False):
        """A DataLoader over ``batches`` (index lists into ``ds``) of epoch ``epoch``."""
        return make_loader(self.view(ds), batches, self.collator(epoch), num_workers, pin_memory,
                           seed=self.cfg.train.seed)

    @staticmethod
    def tokens(batch: dict) -> torch.Tensor:
        """Real (non-pad) input tokens in the batch, for throughput and MFU."""
        mask = batch.get("attention_mask")
        return mask.sum() if mask is not None else torch.tensor(batch["input_ids"].numel(), device=batch["input_ids"].device)

    @staticmethod
    def inputs(batch: dict) -> dict:
        return {k: v for k, v in batch.items() if k != "labels"}

    @staticmethod
    def count_of(targets: torch.Tensor) -> torch.Tensor:
        """How many loss targets ``targets`` holds (-100 = none), as float64 on its device."""
        return (targets != -100).sum().to(torch.float64)


class SumEvaluator:
    """Loss sum and target count on device, reduced over ranks: exact means however the data is split."""

    def __init__(self, task, device):
        self.task = task
        self.state = torch.zeros(2, dtype=torch.float64, device=device)

    def update(self, outputs, batch) -> None:
        self.state += torch.stack([self.task.loss_sum(outputs, batch).double(), self.task.count(batch)])

    def compute(self, all_reduce_sum) -> dict:
        import math

        loss_sum, n = all_reduce_sum(self.state).tolist()
        loss = loss_sum / max(n, 1)
        return {"n": int(n), "loss": loss, "perplexity": math.exp(min(loss, 700.0))}
