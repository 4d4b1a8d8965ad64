"""``dist-train eval`` and ``dist-train predict`` on a trained model folder, as a user runs them."""

from __future__ import annotations

import json
import random

import pandas as pd
import pytest

from conftest import assert_user_error, cue_rows, run_cli, tiny_config
from dist_train.config import load_config
from dist_train.run.trainer import train


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """A tiny model trained on a task it can learn (one cue word decides the label), so that its
    predictions on clear examples are known; the shared ``trained`` model is too weak for that."""
    tmp = tmp_path_factory.mktemp("learned")
    (tmp / "train.tsv").write_text(cue_rows(random.Random(0), 160))
    cfg = tiny_config(tmp, {"train": tmp / "train.tsv"}, task={"label_names": ["negative", "positive"]},
                      train={"epochs": 4, "lr": 3e-3}, checkpoint={"every_epoch": False},
                      logging={"every_steps": 12, "progress_bar": False, "tensorboard": False})
    train(load_config(cfg))
    return tmp / "out" / "final"


@pytest.mark.slow
def test_predict_texts_prints_label_and_probability(learned):
    """Clear examples get the right label, with the softmax probability of that label (checked against the
    Hugging Face pipeline's scores for both labels, which sum to 1)."""
    from transformers import pipeline

    cases = {"the movie was wonderful": "positive", "superb acting and a delightful story": "positive",
             "the film was awful": "negative", "a boring plot and terrible music": "negative"}
    result = run_cli("predict", learned, *cases)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(cases)
    scores = pipeline("text-classification", model=str(learned), top_k=None)(list(cases))
    for line, (text, expected), both in zip(lines, cases.items(), scores):
        label, prob, echoed = line.split("\t")
        assert (label, echoed) == (expected, text), line
        both = {s["label"]: s["score"] for s in both}
        assert both.keys() == {"negative", "positive"} and sum(both.values()) == pytest.approx(1.0, abs=1e-6)
        assert float(prob) == pytest.approx(both[label], abs=1e-4), (line, both)
        assert float(prob) > 0.9, line  # clear cases, confidently (measured 0.97)


@pytest.mark.slow
def test_predict_file_writes_one_row_per_input(trained, tmp_path):
    out, _, _, _ = trained
    reviews = ['He said "wow".', "Flat and dull.", "An utter delight from start to finish."]
    pd.DataFrame({"review": reviews}).to_json(tmp_path / "in.jsonl", orient="records", lines=True)
    result = run_cli("predict", out / "final", "--file", tmp_path / "in.jsonl", "--text-column", "review",
                     "--output", tmp_path / "preds.tsv")
    assert result.returncode == 0, result.stderr
    rows = (tmp_path / "preds.tsv").read_text().splitlines()
    assert rows[0].split("\t") == ["review", "prediction", "probability", "p_negative", "p_positive"]
    assert [r.split("\t")[0] for r in rows[1:]] == reviews
    for row in rows[1:]:
        _, label, prob, p_neg, p_pos = row.split("\t")
        assert abs(float(p_neg) + float(p_pos) - 1.0) < 1e-5
        assert float(prob) == max(float(p_neg), float(p_pos))


@pytest.mark.slow
def test_eval_reproduces_the_training_test_report(trained, tmp_path):
    out, _, reports, files = trained
    result = run_cli("eval", out / "final", "--data", files["test"], "--output", tmp_path / "report.json")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["n"] == 37
    assert report["accuracy"] == reports["test"]["accuracy"]
    assert report["confusion_matrix"] == reports["test"]["confusion_matrix"]
    assert abs(report["loss"] - reports["test"]["loss"]) < 1e-5


@pytest.mark.slow
def test_eval_and_predict_errors_are_one_line(trained, tmp_path):
    out, _, _, _ = trained
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\nfine\t1\nodd\t7\n")
    assert_user_error(run_cli("eval", out / "final", "--data", bad), "line 3", "label 7 never appears")
    assert_user_error(run_cli("predict", tmp_path / "nothing", "hi"), "not a local folder")
    assert_user_error(run_cli("predict", out / "final"), "give either texts")
    assert_user_error(run_cli("eval", out / "final", "--data", tmp_path / "missing.tsv"), "file not found")


def test_version_and_every_command_in_help():
    from dist_train import __version__

    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"dist-train {__version__}"
    shown = run_cli("--help").stdout
    for command in ("train", "launch", "submit", "eval", "zero-shot", "predict", "generate", "export", "convert",
                    "tokenizer", "report", "config"):
        assert command in shown, command


def test_every_option_with_a_default_shows_it_in_help():
    import argparse

    from launcher.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    for name, parser in commands.items():
        text = parser.format_help()
        for action in parser._actions:
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                assert action.help, (name, action.option_strings)
                assert f"(default: {action.default})" in " ".join(text.split()), (name, action.option_strings)
