"""Run reports as pictures: every run's report.png, `dist-train report` for one run or several overlaid."""

from __future__ import annotations

import shutil

import pytest
from PIL import Image

from conftest import assert_user_error, run_cli, tiny_config
from dist_train.config import load_config


def png_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()  # a complete, readable file
    with Image.open(path) as image:
        return image.size


def test_every_run_draws_its_report(trained):
    out, _, _, _ = trained
    assert png_size(out / "report.png") == (1600, 1000)


def test_the_report_shows_every_series_the_best_step_and_the_confusion_matrix(trained):
    """What the picture holds, read from its figure: the panels, the best validation step circled at the
    step and value the run recorded as best, and the test confusion matrix with the test counts."""
    import json

    import matplotlib.pyplot as plt

    from dist_train.use.report import read_run, report_figure

    out, _, reports, _ = trained
    run = read_run(out)
    fig = report_figure([run])
    try:
        panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
        assert {"training loss", "learning rate", "gradient norm", "throughput (examples/s)",
                "validation accuracy", "test confusion matrix"} <= set(panels)
        best = [r for r in run.validation if r["accuracy"] == max(v["accuracy"] for v in run.validation)][0]
        (label,) = [t.get_text() for t in panels["validation accuracy"].texts if t.get_text().startswith("best")]
        assert label == f"best {best['accuracy']:.4g} @ {best['step']}"
        (circle,) = panels["validation accuracy"].collections
        assert circle.get_offsets().tolist() == [[best["step"], best["accuracy"]]]
        counts = json.loads((out / "eval_report.json").read_text())["confusion_matrix"]["rows_true_cols_pred"]
        assert panels["test confusion matrix"].images[0].get_array().tolist() == counts
        assert sum(map(sum, counts)) == reports["test"]["n"]
        steps = [r["step"] for r in run.train]
        (raw, smoothed) = panels["training loss"].lines
        assert list(raw.get_xdata()) == steps and len(smoothed.get_xdata()) == len(steps)
    finally:
        plt.close(fig)


def test_report_command_draws_one_run_or_overlays_several(trained, tmp_path):
    out, _, _, _ = trained
    for name in ("lr-a", "lr-b"):
        shutil.copytree(out, tmp_path / name, ignore=shutil.ignore_patterns("checkpoints", "final", "tb"))
    (tmp_path / "lr-a" / "report.png").unlink()
    result = run_cli("report", tmp_path / "lr-a")
    assert result.returncode == 0, result.stderr[-2000:]
    assert png_size(tmp_path / "lr-a" / "report.png") == (1600, 1000)
    result = run_cli("report", tmp_path / "lr-a", tmp_path / "lr-b", "--out", tmp_path / "both.png")
    assert result.returncode == 0, result.stderr[-2000:]
    assert png_size(tmp_path / "both.png") == (1600, 1000)


def test_report_errors_are_one_line(trained, tmp_path):
    out, _, _, _ = trained
    assert_user_error(run_cli("report", tmp_path), "is not a run folder (no metrics.jsonl)")
    assert_user_error(run_cli("report", out, out), "several runs need --out")
    assert_user_error(run_cli("report", out, "--out", tmp_path), "is a folder")
    assert not list(tmp_path.iterdir())


def test_a_report_that_cannot_be_drawn_never_fails_the_run(tmp_path, sentiment_slice, monkeypatch, capfd):
    import dist_train.use.report
    from dist_train.run.trainer import train

    def broken(*args, **kwargs):
        raise RuntimeError("no fonts on this machine")

    monkeypatch.setattr(dist_train.use.report, "draw_runs", broken)
    cfg = tiny_config(tmp_path, {"train": sentiment_slice["train"], "test": sentiment_slice["test"]},
                      train={"max_steps": 2})
    reports = train(load_config(cfg)).reports
    assert reports["test"]["n"] == 37 and (tmp_path / "out" / "final" / "model.safetensors").is_file()
    assert "warning: report.png not drawn: no fonts on this machine" in capfd.readouterr().err
    assert not (tmp_path / "out" / "report.png").exists()


def test_smoothing_is_tensorboard_s_bias_corrected_average():
    from dist_train.use.report import _smooth

    assert _smooth([1.0]) == [1.0]
    assert _smooth([1.0, 3.0], weight=0.5) == pytest.approx([1.0, (0.5 * 0.5 + 0.5 * 3.0) / 0.75])
