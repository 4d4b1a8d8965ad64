"""Sequence classification: one label per text (or text pair)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dist_train.data.labels import LabelMap
from dist_train.errors import UserError
from dist_train.evaluation.metrics import classification_report
from dist_train.tasks.labelled import LabelledTask
from dist_train.tasks.sequence import SequenceTask, read_rows


def read_labelled(path: str, data_cfg, labels: LabelMap | None = None, names: list[str] | None = None):
    """Read and check one labelled file; learn the label map from it if none is given (train)."""
    ds = read_rows(path, data_cfg)
    raw = ds[data_cfg.label_column]
    if labels is None:
        labels = LabelMap.from_train(raw, path, names)
    return ds, labels, labels.encode(raw, path)


class ClassificationTask(LabelledTask, SequenceTask):
    name = "classification"
    metrics = ("accuracy", "f1_macro", "precision_macro", "recall_macro", "loss")
    architectures = ("ForSequenceClassification",)
    summary = ("loss", "accuracy", "f1_macro")

    task_fields = frozenset({"template", "label_words"})

    @classmethod
    def check_config(cls, cfg) -> None:
        t = cfg.task
        if (t.label_words is None) != (t.template is None):
            raise UserError("config: task.label_words and task.template go together (classification by prompting a "
                            "causal LM, dist-train zero-shot): set both or neither")
        if t.template is not None and "{source}" not in t.template:
            raise UserError(f"config: task.template must contain {{source}} where each text goes, got {t.template[:80]!r}")

    def zero_shot(self, engine, split: str) -> dict:
        """Accuracy of a causal LM answering with the label word most likely after ``task.template`` (raw and
        calibrated: dist_train/tasks/prompting.py); no training, no classification head."""
        from dist_train.model.files import load_pretrained
        from dist_train.tasks.prompting import zero_shot_classification
        from transformers import AutoModelForCausalLM

        t, d = self.cfg.task, self.cfg.data
        if t.label_words is None:
            raise UserError("zero-shot: classification by prompting needs task.template (with {source}) and "
                            "task.label_words (one word per label), e.g. task.template='Review: {source} "
                            "Sentiment:' task.label_words=[negative,positive]")
        if d.text_pair_column:
            raise UserError("zero-shot: classification by prompting reads one text per row; remove data.text_pair_column")
        self.read(d.train)  # the label map, as training learns it
        if len(t.label_words) != self.labels.num_labels:
            raise UserError(f"task.label_words has {len(t.label_words)} words for {self.labels.num_labels} labels "
                            f"({', '.join(self.labels.names)}); give one word per label, in that order")
        rows, gold = self.read(getattr(d, split))
        tokenizer = self.load_tokenizer()
        model, _ = load_pretrained(self.cfg.model.pretrained, AutoModelForCausalLM, self.cfg.model.trust_remote_code)
        engine.prepare(model)
        engine.train(False)
        return zero_shot_classification(engine, tokenizer, t.template, t.label_words, list(rows[d.text_column]), gold,
                                        self.labels.names, self.cfg.train.eval_batch_size)

    def read(self, path: str):
        ds, self.labels, ids = read_labelled(path, self.cfg.data, self.labels, self.cfg.task.label_names)
        return ds, ids

    def strata(self, ds) -> list:
        return ds["labels"]  # data.train_rows keeps each label's share

    # -- loss and metrics ------------------------------------------------------------------------------
    def loss_sum(self, outputs, batch: dict) -> torch.Tensor:
        """Summed (not averaged) cross-entropy over the batch's examples."""
        return F.cross_entropy(outputs.logits.float(), batch["labels"], reduction="sum")

    def evaluator(self, device, ds=None):
        return ClassificationEvaluator(self, device)

    # -- export and use --------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, engine, texts: list[str], pairs: list[str] | None, batch_size: int) -> list[dict]:
        """The most probable label, its probability and every label's, for each text."""
        results = []
        for logits in self.logits(engine, texts, pairs, batch_size):
            for row in torch.softmax(logits, dim=-1):
                k = int(row.argmax())
                results.append({"label": self.labels.names[k], "probability": float(row[k]),
                                "probabilities": row.tolist()})
        return results

    def format_prediction(self, text: str, prediction: dict) -> str:
        return f"{prediction['label']}\t{prediction['probability']:.4f}\t{text}"

    def prediction_columns(self, prediction: dict) -> dict[str, str]:
        return {"prediction": prediction["label"], "probability": f"{prediction['probability']:.6f}",
                **{f"p_{n}": f"{p:.6f}" for n, p in zip(self.labels.names, prediction["probabilities"])}}


class ClassificationEvaluator:
    """Accumulates a confusion matrix and loss sum on device; reduced over ranks before reporting."""

    def __init__(self, task: ClassificationTask, device):
        self.task, self.labels = task, task.labels
        k = self.labels.num_labels
        self.cm = torch.zeros(k * k, dtype=torch.float64, device=device)
        self.loss = torch.zeros((), dtype=torch.float64, device=device)

    def update(self, outputs, batch) -> None:
        k = self.labels.num_labels
        self.loss += self.task.loss_sum(outputs, batch).double()
        preds = outputs.logits.argmax(-1)
        self.cm += torch.bincount(batch["labels"] * k + preds, minlength=k * k).double()

    def compute(self, all_reduce_sum) -> dict:
        """Sum the state over ranks with ``all_reduce_sum`` and return the report (same on every rank)."""
        k = self.labels.num_labels
        cm = all_reduce_sum(self.cm).cpu().round().long().view(k, k)
        loss = all_reduce_sum(self.loss).item()
        return classification_report(cm, loss, self.labels.names)
