"""Regression: one number per text (or text pair), e.g. the similarity of two sentences (STS-B, 0-5).

The head is one output (``num_labels=1``, ``problem_type="regression"``) trained with squared error. With
``task.target_range: [low, high]`` the model learns the targets scaled to [0, 1]; reports and predictions
are in the data's units again.

Pearson could be summed from moments, Spearman cannot: it ranks every prediction. So the evaluator keeps
each prediction with the example's position in its split (the ``index`` column), and ``compute`` sums
over ranks zero vectors of the split's size holding each rank's predictions at their positions: every rank
ends with all predictions, each counted once, and the metrics are those of one process.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from dist_train.data.sources import line_of_row
from dist_train.errors import UserError
from dist_train.tasks.sequence import SequenceTask, read_rows


class RegressionTask(SequenceTask):
    name = "regression"
    metrics = ("pearson", "spearman", "mse", "loss")
    lower_is_better = frozenset({"mse", "loss"})
    summary = ("loss", "pearson", "spearman")
    numbered = True

    @classmethod
    def check_config(cls, cfg) -> None:
        bounds = cfg.task.target_range
        if bounds is not None:
            if len(bounds) != 2 or not all(math.isfinite(b) for b in bounds) or bounds[0] >= bounds[1]:
                raise UserError(f"config: task.target_range must be [low, high], two finite numbers with low < high, "
                                f"got {bounds}")
        if cfg.task.label_names is not None:
            raise UserError("config: task.label_names names classes; regression predicts a number and has none "
                            "(remove it)")

    # -- data ------------------------------------------------------------------------------------------
    def read(self, path: str):
        ds = read_rows(path, self.cfg.data)
        return ds, read_targets(ds[self.cfg.data.label_column], path, self.cfg.data.label_column,
                                self.cfg.task.target_range)

    def collator(self, epoch: int):
        return TargetsAsFloat64(super().collator(epoch))

    # -- model, loss and metrics -----------------------------------------------------------------------
    def head_kwargs(self) -> dict:
        # The label's name is the target column's: a pipeline answers {"label": "score", "score": 4.1}.
        name = self.cfg.data.label_column
        return {"num_labels": 1, "problem_type": "regression", "id2label": {0: name}, "label2id": {name: 0}}

    def scaled(self, targets: torch.Tensor) -> torch.Tensor:
        """Targets in the units the model learns (the data's, or [0, 1] with ``task.target_range``)."""
        if self.cfg.task.target_range is None:
            return targets
        low, high = self.cfg.task.target_range
        return (targets - low) / (high - low)

    def unscaled(self, outputs):
        """Model outputs in the data's units."""
        if self.cfg.task.target_range is None:
            return outputs
        low, high = self.cfg.task.target_range
        return outputs * (high - low) + low

    def loss_sum(self, outputs, batch: dict) -> torch.Tensor:
        """Squared error summed over the batch's examples, in the units the model learns."""
        pred = outputs.logits.float().squeeze(-1)
        return torch.nn.functional.mse_loss(pred, self.scaled(batch["labels"]).float(), reduction="sum")

    def soft_loss_sum(self, outputs, teacher, batch: dict, temperature: float) -> torch.Tensor:
        """Squared distance to the teacher's prediction (a number has no temperature)."""
        return torch.nn.functional.mse_loss(outputs.logits.float().squeeze(-1), teacher.logits.float().squeeze(-1),
                                            reduction="sum")

    def evaluator(self, device, ds=None):
        return RegressionEvaluator(self, device)

    # -- export and use --------------------------------------------------------------------------------
    def same_predictions(self, want, got, batch) -> torch.Tensor:
        """A score is the same within a tenth of the batch's spread of scores."""
        spread = float(want.max() - want.min()) or 1.0
        return (got - want).abs().squeeze(-1) <= 0.1 * spread

    def export_meta(self) -> dict:
        return {**super().export_meta(), "target_range": self.cfg.task.target_range}

    @torch.no_grad()
    def predict(self, engine, texts: list[str], pairs: list[str] | None, batch_size: int) -> list[dict]:
        """The predicted number for each text (pair), in the data's units."""
        return [{"score": float(v)} for logits in self.logits(engine, texts, pairs, batch_size)
                for v in self.unscaled(logits.double().squeeze(-1))]

    def format_prediction(self, text: str, prediction: dict) -> str:
        return f"{prediction['score']:.4f}\t{text}"

    def prediction_columns(self, prediction: dict) -> dict[str, str]:
        return {"prediction": f"{prediction['score']:.6f}"}


def read_targets(raw: list, path: str, column: str, target_range: list[float] | None) -> list[float]:
    """The target column as numbers; a missing, non-numeric or non-finite one, or one outside
    ``target_range``, is an error naming the file and line."""
    targets = []
    for row, value in enumerate(raw):
        where = f"'{path}': {line_of_row(path, row)}"
        if value is None or (isinstance(value, str) and not value.strip()):
            raise UserError(f"{where}: missing target in column '{column}'")
        try:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
        except (TypeError, ValueError):
            raise UserError(f"{where}: target {value!r} in column '{column}' is not a number; regression "
                            "reads one number per row") from None
        if not math.isfinite(number):
            raise UserError(f"{where}: target {value!r} in column '{column}' is not a finite number")
        if target_range is not None and not target_range[0] <= number <= target_range[1]:
            raise UserError(f"{where}: target {number:g} is outside task.target_range "
                            f"[{target_range[0]:g}, {target_range[1]:g}]; widen the range or fix the row")
        targets.append(number)
    return targets


class TargetsAsFloat64:
    """Pads like ``collate`` and keeps the targets as float64: the reports see the data's own numbers."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, rows: list[dict]) -> dict:
        batch = self.collate([{k: v for k, v in row.items() if k != "labels"} for row in rows])
        batch["labels"] = torch.tensor([row["labels"] for row in rows], dtype=torch.float64)
        return batch


class RegressionEvaluator:
    """The loss sum and count on device, and this rank's predictions with their positions in the split."""

    def __init__(self, task: RegressionTask, device):
        self.task, self.device = task, device
        self.sums = torch.zeros(2, dtype=torch.float64, device=device)
        self.parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def update(self, outputs, batch) -> None:
        self.sums += torch.stack([self.task.loss_sum(outputs, batch).double(), self.task.count(batch)])
        pred = self.task.unscaled(outputs.logits.detach().double().squeeze(-1))
        self.parts.append((batch["index"], pred, batch["labels"].double()))

    def compute(self, all_reduce_sum) -> dict:
        """Sum over ranks with ``all_reduce_sum``: first the count (every example once: the split's size),
        then the zero vectors each rank filled at its examples' positions."""
        loss_sum, n = all_reduce_sum(self.sums).tolist()
        n = int(round(n))
        full = torch.zeros(2, n, dtype=torch.float64, device=self.device)
        for index, pred, target in self.parts:
            full[0, index], full[1, index] = pred, target
        preds, targets = all_reduce_sum(full).cpu().numpy()
        return regression_report(preds, targets, loss_sum / max(n, 1))


def regression_report(preds: np.ndarray, targets: np.ndarray, loss: float) -> dict:
    """Pearson and Spearman correlation (scipy), mean squared error in the data's units, and ``loss`` (the
    mean training loss: squared error in the units the model learns). A correlation is NaN where it is
    undefined (fewer than two examples, or constant predictions)."""
    from scipy import stats

    n = len(preds)
    report = {"n": n, "loss": loss}
    if n == 0:
        return report
    pearson = spearman = math.nan
    if n >= 2 and np.ptp(preds) > 0 and np.ptp(targets) > 0:
        with warnings.catch_warnings():  # near-constant inputs: the NaN or the number says it, not a log line
            warnings.simplefilter("ignore")
            pearson = float(stats.pearsonr(preds, targets).statistic)
            spearman = float(stats.spearmanr(preds, targets).statistic)
    return {"n": n, "pearson": pearson, "spearman": spearman, "mse": float(np.mean((preds - targets) ** 2)),
            "loss": loss}
