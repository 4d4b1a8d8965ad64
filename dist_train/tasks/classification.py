"""Sequence classification: one label per text (or text pair)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dist_train.data.fingerprint import data_fingerprint
from dist_train.data.labels import LabelMap
from dist_train.errors import UserError
from dist_train.data.sources import check_texts, read_table, require_columns
from dist_train.data.tokenize import model_view, tokenize_table
from dist_train.metrics import classification_report
from dist_train.models import build_model
from dist_train.tasks.base import Splits, Task


def read_labelled(path: str, data_cfg, labels: LabelMap | None = None, names: list[str] | None = None):
    """Read and check one labelled file; learn the label map from it if none is given (train)."""
    ds = read_table(path, data_cfg.cache_dir)
    columns = {"data.text_column": data_cfg.text_column, "data.label_column": data_cfg.label_column}
    if data_cfg.text_pair_column:
        columns["data.text_pair_column"] = data_cfg.text_pair_column
    require_columns(ds, path, columns)
    for col in (data_cfg.text_column, data_cfg.text_pair_column):
        if col:
            check_texts(ds, path, col)
    raw = ds[data_cfg.label_column]
    if labels is None:
        labels = LabelMap.from_train(raw, path, names)
    return ds, labels, labels.encode(raw, path)


class ClassificationTask(Task):
    name = "classification"
    metrics = ("accuracy", "f1_macro", "precision_macro", "recall_macro", "loss")

    # -- data ------------------------------------------------------------------------------------------
    def prepare(self, tokenizer) -> Splits:
        self.tokenizer = tokenizer
        d = self.cfg.data
        if not isinstance(d.train, str):
            raise UserError("data.train: classification reads one training file; give one path, not a list")

        def tok(ds, ids):
            return tokenize_table(ds, tokenizer, d.text_column, d.text_pair_column, d.max_length, ids)

        train_raw, labels, train_ids = read_labelled(d.train, d, names=self.cfg.task.label_names)
        self.labels = labels
        train = tok(train_raw, train_ids)
        validation = test = None
        if d.validation:
            validation = tok(*read_labelled(d.validation, d, labels)[::2])
        elif d.validation_split > 0:
            parts = train.train_test_split(test_size=d.validation_split, seed=d.split_seed)
            train, validation = parts["train"], parts["test"]
        if d.test:
            test = tok(*read_labelled(d.test, d, labels)[::2])
        return Splits(train, validation, test, labels)

    @staticmethod
    def lengths(ds) -> list[int]:
        return ds["length"]

    @staticmethod
    def fingerprint(ds) -> dict:
        return data_fingerprint(len(ds), ds["length"], ds["labels"])

    @staticmethod
    def view(ds):
        return model_view(ds)

    def collator(self, epoch: int):
        # Pads each batch to its own longest row (batches are length-grouped, so little is padding).
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(self.tokenizer)

    # -- model -----------------------------------------------------------------------------------------
    @staticmethod
    def auto_model():
        """The transformers auto class of this task's models (export rebuilds models through it)."""
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def build_model(self):
        lm = self.labels
        return build_model(self.cfg.model, self.auto_model(), self.tokenizer, self.cfg.data.max_length,
                           num_labels=lm.num_labels,
                           id2label=lm.id2label, label2id=lm.label2id)

    # -- loss and metrics ------------------------------------------------------------------------------
    @staticmethod
    def count(batch: dict) -> torch.Tensor:
        """How many loss targets the batch holds (examples here), as a float64 tensor on its device."""
        return torch.tensor(float(batch["labels"].numel()), dtype=torch.float64, device=batch["labels"].device)

    @staticmethod
    def loss_sum(outputs, batch: dict) -> torch.Tensor:
        """Summed (not averaged) cross-entropy over the batch's examples.

        The loop divides by the example count of the whole global batch, so every example weighs the
        same however the batch is split into micro-batches and ranks.
        """
        return F.cross_entropy(outputs.logits.float(), batch["labels"], reduction="sum")

    def evaluator(self, device):
        return ClassificationEvaluator(self.labels, device)


class ClassificationEvaluator:
    """Accumulates a confusion matrix and loss sum on device; reduced over ranks before reporting."""

    def __init__(self, labels: LabelMap, device):
        self.labels = labels
        k = labels.num_labels
        self.cm = torch.zeros(k * k, dtype=torch.float64, device=device)
        self.loss = torch.zeros((), dtype=torch.float64, device=device)

    def update(self, outputs, batch) -> None:
        k = self.labels.num_labels
        self.loss += ClassificationTask.loss_sum(outputs, batch).double()
        preds = outputs.logits.argmax(-1)
        self.cm += torch.bincount(batch["labels"] * k + preds, minlength=k * k).double()

    def compute(self, all_reduce_sum) -> dict:
        """Sum the state over ranks with ``all_reduce_sum`` and return the report (same on every rank)."""
        k = self.labels.num_labels
        cm = all_reduce_sum(self.cm).cpu().round().long().view(k, k)
        loss = all_reduce_sum(self.loss).item()
        return classification_report(cm, loss, self.labels.names)
