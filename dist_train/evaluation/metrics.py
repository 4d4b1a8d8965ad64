"""Metric formulas (through scikit-learn) and the sinks they are written to (metrics.jsonl, TensorBoard).

Evaluators keep additive state (a confusion matrix, loss sums) so that ranks can all-reduce it exactly;
the report is then computed once from the reduced state.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch


def classification_report(cm: torch.Tensor, loss_sum: float, names: list[str]) -> dict:
    """Accuracy, macro and per-class precision/recall/F1 and the confusion matrix from a (true x pred) matrix.

    scikit-learn gets one weighted sample per confusion-matrix cell, which is exactly the same as the full
    list of predictions but can be summed over ranks first.
    """
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    k = len(names)
    counts = cm.numpy().reshape(-1)
    y_true = np.repeat(np.arange(k), k)
    y_pred = np.tile(np.arange(k), k)
    n = int(counts.sum())
    report = {"n": n, "loss": loss_sum / max(n, 1)}
    if n == 0:
        return report
    labels = list(range(k))
    p, r, f, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, sample_weight=counts,
                                                       zero_division=0)
    pm, rm, fm, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, sample_weight=counts,
                                                    average="macro", zero_division=0)
    report.update({
        "accuracy": float(accuracy_score(y_true, y_pred, sample_weight=counts)),
        "f1_macro": float(fm), "precision_macro": float(pm), "recall_macro": float(rm),
        "per_class": {name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                             "support": int(round(support[i]))} for i, name in enumerate(names)},
        "confusion_matrix": {"labels": list(names), "rows_true_cols_pred": cm.tolist()},
    })
    return report


# Dense bf16/fp16 tensor-core peak TFLOP/s per device (no sparsity), by a substring of the device name.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A10G": 125.0, "A10": 125.0, "L40S": 362.0,
               "L4": 121.0, "V100": 125.0, "T4": 65.0, "RTX 4090": 165.0, "RTX 3090": 71.0, "MI300X": 1307.0,
               "MI250": 362.0}


def peak_tflops(device: torch.device, override: float = 0.0) -> float:
    """The device's peak TFLOP/s: ``logging.peak_tflops`` if set, else the table (0 = unknown, no MFU)."""
    if override > 0:
        return override
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), 0.0)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def scalars(record: dict) -> dict[str, float]:
    """The flat numeric entries of a record (what TensorBoard and one-line summaries show)."""
    return {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


def summary_line(prefix: str, report: dict, keys: tuple[str, ...]) -> str:
    """``prefix: loss 0.1234 accuracy 0.9000 (n=37)``: the task's summary keys that the report has."""
    keys = [k for k in keys if isinstance(report.get(k), (int, float))]
    return f"{prefix}: " + " ".join(f"{k} {report[k]:.4f}" for k in keys) + f" (n={report.get('n', '?')})"


class MetricsSink:
    """Writes records to metrics.jsonl and TensorBoard. Built only on the main process."""

    def __init__(self, output_dir: str | Path, tensorboard: bool, purge_step: int | None = None):
        """``purge_step``: a resumed run hides TensorBoard events from this step on (the ones it replays)."""
        self.path = Path(output_dir, "metrics.jsonl")
        self.file = open(self.path, "a", buffering=1)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(output_dir, "tb")), purge_step=purge_step)

    def write(self, split: str, step: int, record: dict) -> None:
        self.file.write(json.dumps({"split": split, "step": step, **record}) + "\n")
        if self.tb is not None:
            for key, value in scalars(record).items():
                self.tb.add_scalar(f"{split}/{key}", value, step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
