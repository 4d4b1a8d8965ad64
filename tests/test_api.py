"""The Python API does what the CLI does: train from a dict of sections, evaluate and predict on the export;
mistakes raise UserError with the CLI's line."""

from __future__ import annotations

import json
import random

import pytest

from conftest import cue_rows, tiny_config


def test_train_evaluate_predict_from_python(tmp_path):
    import yaml

    import dist_train
    from dist_train import UserError, evaluate, load_config, predict, train

    rng = random.Random(0)
    files = {split: tmp_path / f"{split}.tsv" for split in ("train", "validation", "test")}
    for path, n in zip(files.values(), (160, 32, 32)):
        path.write_text(cue_rows(rng, n))
    sections = yaml.safe_load(tiny_config(tmp_path, files, task={"label_names": ["negative", "positive"]},
                                          train={"epochs": 3, "lr": 3e-3},
                                          logging={"progress_bar": False, "tensorboard": False}).read_text())
    reports = train(sections, ["train.seed=3"]).reports
    out = tmp_path / "out"
    assert json.loads((out / "eval_report.json").read_text()) == reports["test"]
    assert load_config(str(out / "config.yaml")).train.seed == 3
    report = evaluate(out / "final", files["test"])
    assert report["accuracy"] == reports["test"]["accuracy"] and report["n"] == 32
    got = predict(out / "final", ["the movie was wonderful", "an awful film"])
    assert [p["label"] for p in got] == ["positive", "negative"] and 0.5 < got[0]["probability"] <= 1
    with pytest.raises(UserError, match="no column 'text'"):
        evaluate(out / "final", files["test"], text_column="text")
    with pytest.raises(UserError, match="data.train: '.*nope.tsv': file not found"):
        train(sections, [f"data.train={tmp_path / 'nope.tsv'}"])
    with pytest.raises(UserError, match="train.lr must be > 0"):
        load_config(sections, ["train.lr=0"])
    assert dist_train.__version__ and "train" in dist_train.__all__
