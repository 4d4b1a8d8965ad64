"""Multi-label classification: any number of labels per text (or text pair), none included.

Tables, tokenizing, batching, the label file and the export's columns are classification's; what differs
is a row's target (a list of labels as a multi-hot vector, ``dist_train.data.label_lists``), the head (one
sigmoid per label), the loss and the metrics.

The loss is binary cross-entropy with logits, one target per (example, label) pair: ``count`` (the table
tasks' ``labels.numel()``) is examples x labels, so the loop's mean is over label decisions - the unit of
Hugging Face's own multi-label loss (``BCEWithLogitsLoss``, a mean over every element) - however the batch
is split.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dist_train.data.label_lists import learn_label_set, multi_hot, read_label_lists
from dist_train.errors import UserError
from dist_train.tasks.base import Task
from dist_train.tasks.classification import ClassificationTask
from dist_train.tasks.sequence import read_rows


class MultiLabelTask(ClassificationTask):
    name = "multi_label"
    metrics = ("f1_micro", "f1_macro", "subset_accuracy", "hamming_loss", "loss")
    lower_is_better = frozenset({"loss", "hamming_loss"})
    architectures = ()  # a folder without dist_train.json says nothing of its labels' independence
    summary = ("loss", "f1_micro", "f1_macro", "subset_accuracy")
    task_fields = frozenset()  # no classification by prompting: one label word cannot say "several or none"
    zero_shot = Task.zero_shot

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.data.label_separator == "":
            raise UserError("config: data.label_separator is empty; give what separates a row's labels in a "
                            ".tsv/.csv cell, in quotes: '|' (bare, YAML reads | as empty text), or leave it unset "
                            "for JSON lists")

    # -- data ------------------------------------------------------------------------------------------
    def read(self, path: str):
        d = self.cfg.data
        ds = read_rows(path, d)
        rows = read_label_lists(ds[d.label_column], path, d.label_separator)
        if self.labels is None:
            self.labels = learn_label_set(rows, path, self.cfg.task.label_names)
        # The raw column goes: it may itself be called "labels", the name of the multi-hot targets.
        return ds.remove_columns(d.label_column), multi_hot(rows, self.labels, path)

    # -- model, loss and metrics -----------------------------------------------------------------------
    def head_kwargs(self) -> dict:
        # problem_type makes the exported model's pipeline score labels by sigmoid, each on its own.
        return {**super().head_kwargs(), "problem_type": "multi_label_classification"}

    def loss_sum(self, outputs, batch: dict) -> torch.Tensor:
        """Binary cross-entropy summed over every (example, label) pair."""
        return F.binary_cross_entropy_with_logits(outputs.logits.float(), batch["labels"].float(), reduction="sum")

    def soft_loss_sum(self, outputs, teacher, batch: dict, temperature: float) -> torch.Tensor:
        """T^2 x binary cross-entropy against the teacher's probability of each label at temperature T."""
        t = temperature
        return F.binary_cross_entropy_with_logits(outputs.logits.float() / t, torch.sigmoid(teacher.logits.float() / t),
                                                  reduction="sum") * t * t

    def predicted(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities, which labels are predicted: probability above ``task.threshold``)."""
        probs = torch.sigmoid(logits.float())
        return probs, probs > self.cfg.task.threshold

    def evaluator(self, device, ds=None):
        return MultiLabelEvaluator(self, device)

    # -- export and use --------------------------------------------------------------------------------
    def same_predictions(self, want, got, batch) -> torch.Tensor:
        """The same set of labels above ``task.threshold``."""
        return (self.predicted(got)[1] == self.predicted(want)[1]).all(-1)

    def export_meta(self) -> dict:
        return {**super().export_meta(), "label_separator": self.cfg.data.label_separator,
                "threshold": self.cfg.task.threshold}

    @torch.no_grad()
    def predict(self, engine, texts: list[str], pairs: list[str] | None, batch_size: int) -> list[dict]:
        """Every label's probability, and the labels above the threshold (most probable first)."""
        results = []
        for logits in self.logits(engine, texts, pairs, batch_size):
            probs, chosen = self.predicted(logits)
            for row, picked in zip(probs.tolist(), chosen.tolist()):
                labels = sorted((k for k, yes in enumerate(picked) if yes), key=lambda k: -row[k])
                results.append({"labels": [self.labels.names[k] for k in labels],
                                "label_probabilities": [row[k] for k in labels], "probabilities": row})
        return results

    def format_prediction(self, text: str, prediction: dict) -> str:
        found = ", ".join(f"{name} {p:.4f}" for name, p in zip(prediction["labels"], prediction["label_probabilities"]))
        return f"{found or '-'}\t{text}"

    def prediction_columns(self, prediction: dict) -> dict[str, str]:
        return {"labels": (self.cfg.data.label_separator or "|").join(prediction["labels"]),
                **{f"p_{n}": f"{p:.6f}" for n, p in zip(self.labels.names, prediction["probabilities"])}}


class MultiLabelEvaluator:
    """Additive counts on device - loss sum, examples, exactly-right examples, then per label TP, FP, FN
    and TN - summed over ranks in one all-reduce before any metric is computed."""

    def __init__(self, task: MultiLabelTask, device):
        self.task, self.k = task, task.labels.num_labels
        self.state = torch.zeros(3 + 4 * self.k, dtype=torch.float64, device=device)

    def update(self, outputs, batch) -> None:
        _, pred = self.task.predicted(outputs.logits)
        true = batch["labels"] > 0.5
        per_label = torch.stack([pred & true, pred & ~true, ~pred & true, ~pred & ~true]).sum(1).flatten()
        self.state += torch.cat([torch.stack([self.task.loss_sum(outputs, batch).double(),
                                              pred.new_tensor(len(pred), dtype=torch.float64),
                                              (pred == true).all(1).sum().double()]),
                                 per_label.double()])

    def compute(self, all_reduce_sum) -> dict:
        """The report from the counts summed over ranks with ``all_reduce_sum`` (same on every rank)."""
        state = all_reduce_sum(self.state).cpu()
        loss_sum, n, exact = state[:3].tolist()
        tp, fp, fn, tn = state[3:].round().long().view(4, self.k).numpy()
        return multi_label_report(tp, fp, fn, tn, int(round(exact)), int(round(n)), loss_sum,
                                  self.task.labels.names, self.task.cfg.task.threshold)


def multi_label_report(tp, fp, fn, tn, exact: int, n: int, loss_sum: float, names: list[str],
                       threshold: float) -> dict:
    """F1 (micro, macro and per label), subset accuracy and Hamming loss from per-label counts.

    scikit-learn gets one weighted row per label and outcome (a true positive, false positive, false
    negative or true negative of that label alone): it sees each label's counts as in the full predictions,
    so its averages and its zero-division rules hold. A column that is never set keeps the rows a label
    matrix for one label too (a single column reads as binary).
    """
    from sklearn.metrics import precision_recall_fscore_support

    k = len(names)
    report = {"n": n, "loss": loss_sum / max(n * k, 1)}
    if n == 0:
        return report
    eye, none = np.eye(k, k + 1, dtype=int), np.zeros((k, k + 1), dtype=int)
    y_true, y_pred = np.concatenate([eye, none, eye, none]), np.concatenate([eye, eye, none, none])
    weights = np.concatenate([tp, fp, fn, tn]).astype(float)
    scores = {avg: precision_recall_fscore_support(y_true, y_pred, sample_weight=weights, average=avg,
                                                   labels=list(range(k)), zero_division=0)
              for avg in ("micro", "macro", None)}
    p, r, f, _ = scores[None]
    report.update({
        "f1_micro": float(scores["micro"][2]), "f1_macro": float(scores["macro"][2]),
        "precision_micro": float(scores["micro"][0]), "recall_micro": float(scores["micro"][1]),
        "subset_accuracy": exact / n, "hamming_loss": float((fp + fn).sum() / weights.sum()),
        "threshold": threshold,
        "per_label": {name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                             "support": int(tp[i] + fn[i]), "predicted": int(tp[i] + fp[i])}
                      for i, name in enumerate(names)},
    })
    return report
