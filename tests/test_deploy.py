"""Deployment export: ONNX fp32 and int8 folders from a run, a model folder or a checkpoint; predict and eval
run them through onnxruntime with PyTorch's results; bad input is one line and writes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, assert_user_error, run_cli, snapshot

pytest.importorskip("onnxruntime", reason="the deploy extra is not installed: pip install -e '.[deploy]'")
pytest.importorskip("onnxscript", reason="the deploy extra is not installed: pip install -e '.[deploy]'")

TEXTS = ["I really enjoyed this film.", "A tedious, joyless mess.", "Funny.",
         "The plot is thin but the acting carries it, and the last act is as moving as anything this year."]


@pytest.fixture(scope="module")
def exports(trained, tmp_path_factory):
    """fp32 from the run folder (its final/), int8 from final/ itself, fp32 from a checkpoint."""
    out, _, _, files = trained
    tmp = tmp_path_factory.mktemp("deploy")
    step = sorted((out / "checkpoints").glob("step-*"))[-1]
    folders = {"fp32": (out, []), "int8": (out / "final", ["--quantize", "int8"]), "checkpoint": (step, [])}
    for name, (source, extra) in folders.items():
        result = run_cli("export", source, tmp / name, "--onnx", *extra)
        assert result.returncode == 0, result.stderr[-2000:]
        assert f"to {tmp / name} (ONNX" in result.stdout, result.stdout
    return {name: tmp / name for name in folders} | {"tmp": tmp, "step": step}


def predictions(folder, texts):
    from dist_train.use.inference import ModelFolder, ModelInUse

    model_folder = ModelFolder(str(folder))
    return ModelInUse(model_folder, {"max_length": model_folder.max_length(None)}).predict(texts, None, 3)


@pytest.mark.slow
def test_onnx_folders_predict_what_pytorch_predicts(trained, exports):
    out, _, _, files = trained
    texts = TEXTS + [line.split("\t")[0] for line in files["test"].read_text().splitlines()[1:]]
    want = predictions(out / "final", texts)
    fp32, int8 = predictions(exports["fp32"], texts), predictions(exports["int8"], texts)
    for w, g in zip(want, fp32):
        assert w["label"] == g["label"]
        assert max(abs(a - b) for a, b in zip(w["probabilities"], g["probabilities"])) < 1e-5
    assert sum(w["label"] == g["label"] for w, g in zip(want, int8)) >= 0.9 * len(texts)
    for name in ("fp32", "int8"):
        folder = exports[name]
        assert {"model.onnx", "config.json", "labels.json", "dist_train.json", "tokenizer.json"} <= {
            p.name for p in folder.iterdir()}
        assert not list(folder.glob("*.safetensors"))
        meta = json.loads((folder / "dist_train.json").read_text())
        assert meta["task"] == "classification" and meta["onnx"]["quantize"] == (None if name == "fp32" else "int8")
        assert meta["onnx"]["check"]["agreement"] >= 0.9
    assert meta["onnx"]["check"]["max_abs_diff"] > 0  # int8 weights: close, not equal
    # int8 weights are about a quarter of fp32's (the graph itself is the same size).
    assert (exports["int8"] / "model.onnx").stat().st_size < 0.5 * (exports["fp32"] / "model.onnx").stat().st_size
    # A checkpoint is exported through the PyTorch path first: the same model as that checkpoint's export.
    ck = predictions(exports["checkpoint"], texts[:4])
    assert run_cli("export", exports["step"], exports["tmp"] / "ck_pt").returncode == 0
    for w, g in zip(predictions(exports["tmp"] / "ck_pt", texts[:4]), ck):
        assert max(abs(a - b) for a, b in zip(w["probabilities"], g["probabilities"])) < 1e-5
    leftovers = [p.name for p in exports["tmp"].iterdir() if p.name.startswith(".")]
    assert leftovers == []


@pytest.mark.slow
def test_predict_and_eval_take_an_onnx_folder(trained, exports, tmp_path):
    out, _, _, files = trained
    result = run_cli("predict", exports["int8"], *TEXTS[:2])
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and lines[0].endswith(TEXTS[0]) and lines[0].split("\t")[0] in ("negative", "positive")
    pred = tmp_path / "pred.tsv"
    result = run_cli("predict", exports["fp32"], "--file", files["test"], "--output", pred)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = pred.read_text().splitlines()
    assert rows[0].split("\t")[:3] == ["sentence", "prediction", "probability"] and len(rows) == 38
    # Rows come back in the file's order, though predict batches the shortest texts first.
    assert [r.split("\t")[0] for r in rows[1:]] == [
        " ".join(line.split("\t")[0].split()) for line in files["test"].read_text().splitlines()[1:]]
    reports = {}
    for name, folder in (("pytorch", out / "final"), ("onnx", exports["fp32"])):
        result = run_cli("eval", folder, "--data", files["test"])
        assert result.returncode == 0, result.stderr[-2000:]
        reports[name] = json.loads(result.stdout)
    assert reports["onnx"]["n"] == reports["pytorch"]["n"] == 37
    assert reports["onnx"]["accuracy"] == reports["pytorch"]["accuracy"]
    assert abs(reports["onnx"]["loss"] - reports["pytorch"]["loss"]) < 1e-5
    assert_user_error(run_cli("predict", exports["fp32"], "--precision", "bf16", "x"), "ONNX folder", "--precision")


@pytest.mark.slow
def test_bad_export_input_is_one_line_and_writes_nothing(trained, exports, tmp_path):
    out, _, _, files = trained
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    before = snapshot(tmp_path, out)
    cases = [
        (("export", out, busy, "--onnx"), ("exists and is not empty",)),
        (("export", out, tmp_path / "new", "--quantize", "int8"), ("--quantize int8", "add --onnx")),
        (("export", files["test"], tmp_path / "new", "--onnx"), ("no run, model folder or checkpoint",)),
        (("export", tmp_path / "nowhere", tmp_path / "new", "--onnx"), ("does not exist",)),
        (("export", exports["fp32"], tmp_path / "new", "--onnx"), ("already an ONNX folder",)),
    ]
    for args, needles in cases:
        assert_user_error(run_cli(*args), *needles)
    assert snapshot(tmp_path, out) == before


@pytest.mark.slow
def test_a_failed_check_leaves_nothing_behind(trained, tmp_path, monkeypatch):
    """The ONNX graph is checked against PyTorch before the folder is renamed into place."""
    from dist_train.errors import UserError
    from dist_train.use import deploy
    from dist_train.use.onnx_model import OnnxModel

    out = trained[0]
    monkeypatch.setattr(deploy, "FP32_TOLERANCE", -1.0)  # any difference, even 0, now fails the check
    with pytest.raises(UserError, match="differ from PyTorch's by up to .*nothing was written"):
        deploy.export_onnx(str(out), str(tmp_path / "onnx"))
    assert list(tmp_path.iterdir()) == []


def test_a_missing_extra_names_the_install_command(monkeypatch):
    import importlib.util

    from dist_train.errors import UserError
    from dist_train.use import deploy
    from dist_train.use.onnx_model import OnnxModel

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(UserError, match=r"export --onnx needs onnxscript.*pip install onnx onnxscript onnxruntime"):
        deploy.export_onnx("anything", "anywhere")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(UserError, match=r"is an ONNX folder: running it needs onnxruntime.*\.\[deploy\]"):
        OnnxModel("some/folder")


@pytest.mark.slow
def test_predict_bench_runs_every_arm_on_a_tiny_setting(trained, exports, tmp_path):
    out, _, _, files = trained
    result = subprocess.run(
        [sys.executable, "-m", "bench", "predict", "--model", str(out / "final"), "--data", str(files["test"]),
         "--rows", "20", "--rounds", "1", "--threads", "2", "--onnx-fp32", str(exports["fp32"]),
         "--onnx-int8", str(exports["int8"]), "--work", str(tmp_path / "work"), "--out", str(tmp_path / "p.json")],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "2"}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "p.json").read_text())
    assert set(data["runs"]) == {"pipeline", "pipeline_b32", "dist_train", "onnx_fp32", "onnx_int8"}
    for arm, runs in data["runs"].items():
        assert runs[0]["n"] == 20 and runs[0]["examples_per_s"] > 0, arm
    # The same model on the same rows: every arm's accuracy is a share of 20, and PyTorch's arms agree.
    assert data["accuracy"]["pipeline"] == data["accuracy"]["dist_train"] == data["accuracy"]["onnx_fp32"]
    assert "dist_train/pipeline" in data["ratios"] and "onnx_int8/dist_train" in data["ratios"]
    assert "int8 accuracy drop" in result.stdout
