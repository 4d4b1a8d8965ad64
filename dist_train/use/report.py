"""Run reports as pictures: what a run did, or several runs side by side (matplotlib, Agg: no display).

``draw_runs`` reads what a run wrote (``metrics.jsonl``, ``eval_report.json``) and draws training loss (raw
and smoothed), learning rate, gradient norm, throughput, every validation metric against the step with the
best step marked, and for a single classification run the test confusion matrix. ``band_panel`` draws
mean +- std curves (learning curves: accuracy against labelled examples) and is the one plotting path for
other figures too.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from dist_train.errors import UserError

SIZE_IN, DPI = (16.0, 10.0), 100
"""Every report is 1600 x 1000 pixels (fixed: no tight bounding box), however many panels it holds."""
SKIP = {"epoch", "n", "step", "split", "examples_seen"}


@dataclass
class RunRecords:
    name: str
    train: list[dict] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)
    test: dict | None = None
    best_metric: str | None = None
    maximize: bool = True


def read_run(folder: str | Path) -> RunRecords:
    """A run folder's records; a folder without ``metrics.jsonl`` is not a run (one-line error)."""
    folder = Path(folder)
    metrics = folder / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"report: '{folder}' is not a run folder (no metrics.jsonl); give a training run's "
                        "output_dir")
    run = RunRecords(name=folder.name or str(folder))
    for number, line in enumerate(metrics.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise UserError(f"report: '{metrics}' line {number} is not JSON; the file is damaged") from None
        if record.get("split") == "train":
            run.train.append(record)
        elif record.get("split") == "validation":
            run.validation.append(record)
        elif record.get("split") == "test":
            run.test = record
    config = folder / "config.yaml"
    if config.is_file():
        run.best_metric, run.maximize = _selection(config)
    return run


def _selection(config: Path) -> tuple[str | None, bool]:
    """The metric that picked the best checkpoint and whether larger is better, as the run chose them."""
    import yaml

    from dist_train.tasks import TASKS, task_class

    tree = yaml.safe_load(config.read_text()) or {}
    name, checkpoint = (tree.get("task") or {}).get("name"), tree.get("checkpoint") or {}
    if name not in TASKS:
        return checkpoint.get("metric"), checkpoint.get("mode") != "min"
    return task_class(name).best_metric(checkpoint.get("metric"), checkpoint.get("mode"))


def _metric_keys(records: list[dict]) -> list[str]:
    keys: dict[str, None] = {}
    for record in records:
        for key, value in record.items():
            if key not in SKIP and isinstance(value, (int, float)) and not isinstance(value, bool):
                keys[key] = None
    return list(keys)


def _smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """TensorBoard's exponential moving average (bias-corrected)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return out


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))
             and math.isfinite(r[key])]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def draw_runs(folders: list[str | Path], out: str | Path) -> Path:
    """One picture of one run, or of several overlaid (labelled by their folder names)."""
    return save(report_figure([read_run(f) for f in folders]), out)


def report_figure(runs: list[RunRecords]):
    """The matplotlib figure of ``runs``: a panel per training series, per validation metric (the best step
    circled and labelled), and a single classification run's test confusion matrix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    val_keys = list(dict.fromkeys(k for run in runs for k in _metric_keys(run.validation)))
    confusion = runs[0].test.get("confusion_matrix") if len(runs) == 1 and runs[0].test else None
    panels = ["loss", "lr", "grad_norm", "examples_per_s"] + [f"validation {k}" for k in val_keys]
    panels += ["confusion"] if confusion else []
    cols = 4 if len(panels) > 6 else 3
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=SIZE_IN, dpi=DPI, squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax, panel in zip(flat, panels):
        if panel == "confusion":
            _confusion(ax, confusion)
        elif panel.startswith("validation "):
            _validation(ax, runs, panel.split(" ", 1)[1])
        else:
            _training(ax, runs, panel)
    for ax in flat[len(panels):]:
        ax.axis("off")
    fig.suptitle(" vs ".join(run.name for run in runs))
    fig.subplots_adjust(left=0.05, right=0.98, top=0.93, bottom=0.06, hspace=0.45, wspace=0.3)
    return fig


def save(fig, out: str | Path) -> Path:
    """Write the figure as PNG beside ``out`` and move it into place (never half a picture)."""
    import matplotlib.pyplot as plt

    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, dpi=DPI, format="png")
    plt.close(fig)
    tmp.replace(out)
    return out


def _training(ax, runs: list[RunRecords], key: str) -> None:
    for i, run in enumerate(runs):
        steps, values = _series(run.train, key)
        color = f"C{i}"
        label = run.name if len(runs) > 1 else None
        if key == "loss" and values:
            ax.plot(steps, values, color=color, alpha=0.3, linewidth=1)
            ax.plot(steps, _smooth(values), color=color, label=label or "smoothed")
        else:
            ax.plot(steps, values, color=color, label=label)
    ax.set_title({"loss": "training loss", "lr": "learning rate", "grad_norm": "gradient norm",
                  "examples_per_s": "throughput (examples/s)"}[key])
    ax.set_xlabel("step")
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=8)


def _validation(ax, runs: list[RunRecords], key: str) -> None:
    for i, run in enumerate(runs):
        steps, values = _series(run.validation, key)
        if not values:
            continue
        ax.plot(steps, values, marker="o", markersize=3, color=f"C{i}", label=run.name if len(runs) > 1 else None)
        if key == run.best_metric:
            best = (max if run.maximize else min)(range(len(values)), key=values.__getitem__)
            ax.scatter([steps[best]], [values[best]], s=120, facecolors="none", edgecolors=f"C{i}", linewidths=2,
                       zorder=3)
            ax.annotate(f"best {values[best]:.4g} @ {steps[best]}", (steps[best], values[best]), fontsize=8,
                        xytext=(4, 4), textcoords="offset points")
    ax.set_title(f"validation {key}")
    ax.set_xlabel("step")
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=8)


def _confusion(ax, confusion: dict) -> None:
    counts, labels = confusion["rows_true_cols_pred"], confusion["labels"]
    ax.imshow(counts, cmap="Blues")
    peak = max(max(row) for row in counts) or 1
    for r, row in enumerate(counts):
        for c, value in enumerate(row):
            ax.text(c, r, str(value), ha="center", va="center", color="white" if value > peak / 2 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("test confusion matrix")


def band_panel(ax, x: list[float], curves: dict[str, tuple[list[float], list[float]]], xlabel: str, ylabel: str,
               log_x: bool = False) -> None:
    """One line per curve (mean) with a band of +- one standard deviation, e.g. accuracy against labelled
    examples for several arms."""
    for i, (name, (mean, std)) in enumerate(curves.items()):
        ax.plot(x, mean, marker="o", color=f"C{i}", label=name)
        ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color=f"C{i}",
                        alpha=0.2)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
