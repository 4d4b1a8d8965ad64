"""``dist-train eval`` and ``dist-train predict`` on a trained model folder, as a user runs them."""

from __future__ import annotations

import json

import pandas as pd

from conftest import assert_user_error, run_cli


def test_predict_texts_prints_label_and_probability(trained):
    out, _, _, _ = trained
    result = run_cli("predict", out / "final", "I really enjoyed this film.", "A tedious, joyless mess.")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2
    for line, text in zip(lines, ["I really enjoyed this film.", "A tedious, joyless mess."]):
        label, prob, echoed = line.split("\t")
        assert label in ("negative", "positive") and 0.5 <= float(prob) <= 1.0 and echoed == text


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


def test_eval_reproduces_the_training_test_report(trained, tmp_path):
    out, _, reports, files = trained
    result = run_cli("eval", out / "final", "--data", files["test"], "--output", tmp_path / "report.json")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["n"] == 37
    assert report["accuracy"] == reports["test"]["accuracy"]
    assert report["confusion_matrix"] == reports["test"]["confusion_matrix"]
    assert abs(report["loss"] - reports["test"]["loss"]) < 1e-5


def test_eval_and_predict_errors_are_one_line(trained, tmp_path):
    out, _, _, _ = trained
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\nfine\t1\nodd\t7\n")
    assert_user_error(run_cli("eval", out / "final", "--data", bad), "line 3", "label 7 never appears")
    assert_user_error(run_cli("predict", tmp_path / "nothing", "hi"), "not a local folder")
    assert_user_error(run_cli("predict", out / "final"), "give either texts")
    assert_user_error(run_cli("eval", out / "final", "--data", tmp_path / "missing.tsv"), "file not found")
