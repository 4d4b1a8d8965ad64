"""Benchmarks stay runnable: each runs end to end on a tiny setting (no timing asserts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

pytestmark = pytest.mark.slow  # benchmarks, on tiny settings


def test_resume_bench_runs_on_a_tiny_setting(tmp_path):
    out = tmp_path / "resume.json"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, "bench/resume.py", "--model", "tiny", "--rows", "320", "--rounds", "1",
                             "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["steps_per_epoch"] == 10 and len(data["seconds"]["resume_90pct"]) == 1
    assert data["ratio_resume_10pct"] > 0 and data["load_mb_per_s"] > 0
    assert "ratio resume/fresh" in result.stdout


def test_pretrain_overhead_bench_runs_on_a_tiny_setting(tmp_path):
    out = tmp_path / "overhead.json"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, "bench/pretrain_overhead.py", "--tiny", "--steps", "4", "--warmup", "2",
                             "--rounds", "1", "--work", str(tmp_path / "work"), "--out", str(out)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert len(data["tokens_per_s"]["dist_train"]) == len(data["tokens_per_s"]["bare"]) == 1
    assert data["ratio_dist_train_over_bare"] > 0
    assert "ratio dist-train/bare" in result.stdout


def test_finetune_vs_hf_bench_runs_every_arm_on_a_tiny_setting(tmp_path):
    """dist-train ([CLS]-only last layer on / off; host-memory reuse off), Trainer (grouping off/on), the seed's
    loop and the bare loop all train the same 96 rows."""
    out = tmp_path / "finetune.json"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, "-m", "bench", "finetune_vs_hf", "--tiny", "--examples", "96",
                             "--warmup", "1", "--dev", "40", "--rounds", "1", "--work", str(tmp_path / "work"),
                             "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    arms = ("dist_train", "dist_train_stock", "dist_train_malloc", "trainer", "trainer_grouped", "seed", "bare")
    assert set(data["runs"]) == set(arms)
    # The allocator setting changes where memory comes from, not the arithmetic: the same model comes out.
    assert data["runs"]["dist_train_malloc"][0]["dev_accuracy"] == data["runs"]["dist_train"][0]["dev_accuracy"]
    for arm in arms:
        run = data["runs"][arm][0]
        assert run["steps"] == 3 and run["examples_per_s"] > 0, (arm, run)
        assert round(run["dev_accuracy"] * 40) == run["dev_accuracy"] * 40  # a share of exactly 40 dev rows
    fed = {arm: data["runs"][arm][0]["input_tokens"] for arm in arms if not arm.startswith("dist_train")}
    # The shortcut computes what the whole last layer computes: the same predictions, up to float rounding.
    accuracy = {arm: data["runs"][arm][0]["dev_accuracy"] for arm in ("dist_train", "dist_train_stock")}
    assert abs(accuracy["dist_train"] - accuracy["dist_train_stock"]) <= 1 / 40
    # Padding to the longest row of the whole set feeds the most positions; length grouping the fewest.
    assert data["real_tokens"] <= fed["bare"] <= fed["trainer"] <= fed["seed"]
    assert set(data["ratios"]) == {f"dist_train/{arm}" for arm in arms[1:]}
    assert "ratios: dist_train/dist_train_stock " in result.stdout and " dist_train/trainer " in result.stdout


def test_one_entry_point_lists_and_runs_the_benchmarks():
    listing = subprocess.run([sys.executable, "-m", "bench"], cwd=ROOT, capture_output=True, text=True)
    assert listing.returncode == 0
    for name in ("finetune_vs_hf", "pretrain_overhead", "resume", "transfer", "zero_memory"):
        assert name in listing.stdout
    helped = subprocess.run([sys.executable, "-m", "bench", "transfer", "pretrain", "--help"], cwd=ROOT,
                            capture_output=True, text=True)
    assert helped.returncode == 0 and "--in-domain-copies" in helped.stdout
    unknown = subprocess.run([sys.executable, "-m", "bench", "nope"], cwd=ROOT, capture_output=True, text=True)
    assert unknown.returncode == 2 and "unknown benchmark 'nope'" in unknown.stderr


def test_job_vs_trainer_bench_runs_the_whole_job_in_every_arm(tmp_path):
    """dist-train, Trainer and the seed's script each train, validate, test and export the same tiny job."""
    cfg = yaml.safe_load((ROOT / "configs" / "sentiment.yaml").read_text())
    for key, (name, rows) in {"train": ("train", 64), "validation": ("dev", 40), "test": ("test", 30)}.items():
        lines = (ROOT / "data" / "sentiment" / f"{name}.tsv").read_text().splitlines(keepends=True)
        (tmp_path / f"{name}.tsv").write_text("".join(lines[: rows + 1]))
        cfg["data"][key] = str(tmp_path / f"{name}.tsv")
    cfg["train"].update(epochs=2, micro_batch_size=16, eval_every=2)  # 8 steps, dev every 2
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "job.json"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, "-m", "bench", "job_vs_trainer", "--tiny", "--config",
                             str(tmp_path / "job.yaml"), "--rounds", "1", "--work", str(tmp_path / "work"),
                             "--out", str(out)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert set(data["runs"]) == {"dist_train", "trainer", "seed"}
    for arm, (run,) in data["runs"].items():
        assert run["wall_s"] > 0 and (Path(run["export"]) / "config.json").is_file(), (arm, run)
        assert round(run["test_accuracy"] * 30) == run["test_accuracy"] * 30  # a share of exactly 30 test rows
        assert round(run["best_dev_accuracy"] * 40) == run["best_dev_accuracy"] * 40
    assert set(data["ratios"]) == {"trainer/dist_train", "seed/dist_train"}
    assert f"trainer/dist_train {data['ratios']['trainer/dist_train']:.2f}" in result.stdout


def test_transfer_curve_recipe_and_picture(tmp_path):
    """The learning-curve recipe gives small sets enough steps, and the picture is a PNG of the set size."""
    import importlib.util

    import matplotlib.image

    spec = importlib.util.spec_from_file_location("transfer", ROOT / "bench" / "transfer.py")
    transfer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(transfer)
    assert [transfer.curve_epochs(n, 16, 150) for n in (100, 300, 1000, 3000, 8568)] == [22, 8, 3, 1, 1]
    sizes = {"100": {"mean": 0.6, "std": 0.05}, "1000": {"mean": 0.7, "std": 0.02}}
    result = {"table": {"scratch": {"label": "from scratch", "sizes": sizes},
                        "mlm": {"label": "pretrained", "sizes": {k: {"mean": v["mean"] + 0.05, "std": 0.01}
                                                                 for k, v in sizes.items()}}}}
    png = transfer.draw_curve(result, tmp_path / "curve.png")
    assert matplotlib.image.imread(png).shape[:2] == (600, 900)


def test_labelled_logits_bench_runs_on_a_tiny_setting(tmp_path):
    out = tmp_path / "labelled_logits.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "bench/labelled_logits.py", "--width", "32", "--vocab", "2048", "--batch",
                             "2", "--length", "32", "--rounds", "1", "--out", str(out)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    table = json.loads(out.read_text())["widths"]["32"]
    assert [table[m]["actual_mode"] for m in ("full", "gather", "chunked")] == ["off", "gather", "chunked"]
    assert table["gather"]["loss"] == table["chunked"]["loss"] == table["full"]["loss"] or (
        abs(table["chunked"]["loss"] - table["full"]["loss"]) < 1e-3 * abs(table["full"]["loss"]))


@pytest.fixture(scope="module")
def sft_vs_trl_tiny(tmp_path_factory):
    """One tiny run of `python -m bench sft_vs_trl` (6 steps + 2 profiled ones per arm; dist-train's packing and
    TRL with gradient checkpointing are left out to save time)."""
    tmp = tmp_path_factory.mktemp("sft")
    out = tmp / "sft.json"
    # Committed text as "parallel" pairs (16 words -> the next 16), about as long as Bible verses.
    words = (ROOT / "data" / "corpus" / "austen.txt").read_text()[100_000:160_000].replace('"', "").split()
    chunks = [" ".join(words[i:i + 16]) for i in range(0, len(words) - 16, 16)]
    (tmp / "pairs.tsv").write_text("source\ttarget\n" + "".join(f"{s}\t{t}\n" for s, t in zip(chunks[::2], chunks[1::2])))
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, "-m", "bench", "sft_vs_trl", "--tiny", "--steps", "6", "--rounds", "1",
                             "--profile", "--arms", "dist_train,trl,trl_packed,trainer", "--work", str(tmp / "work"),
                             "--data", str(tmp / "pairs.tsv"), "--out", str(out)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return json.loads(out.read_text()), out.read_text(), result.stdout, tmp


def test_sft_vs_trl_bench_runs_dist_train_and_trainer_on_a_tiny_setting(sft_vs_trl_tiny):
    """dist-train and Trainer fine-tune a tiny Gemma 3 with LoRA on the same batches: the same targets per step,
    the same losses; throughput, memory and a profile by phase come back; the results hold no absolute path."""
    data, text, stdout, tmp = sft_vs_trl_tiny
    for arm in ("dist_train", "trainer"):
        (run,) = data["runs"][arm]
        assert run["steps"] == 8 and run["timed_steps"] == 5 and run["target_tokens_per_s"] > 0, (arm, run)
        assert run["peak_rss_mb"] > 0 and run["peak_rss_process_mb"] >= run["peak_rss_mb"] * 0.99
        assert run["trainable_params"] == data["runs"]["dist_train"][0]["trainable_params"] > 0
        assert set(run["profile"]["ms_per_step"]) >= {"output layer + loss", "attention (SDPA)", "optimizer + clipping"}
    check = data["checks"]["trainer"]
    assert check["same_target_tokens_per_step"] and check["max_step_loss_diff"] < 1e-4, check
    assert data["ratios"]["dist_train/trainer"]["target_tokens_per_s"] > 0
    assert str(ROOT) not in text and str(tmp) not in text
    assert "median target tokens/s: dist_train " in stdout
    if data["skipped"]:  # only the arms that cannot run here, each with its reason
        assert set(data["skipped"]) <= {"trl", "trl_packed", "trl_gc"} and all(data["skipped"].values())


def test_sft_vs_trl_bench_runs_the_trl_arms_on_a_tiny_setting(sft_vs_trl_tiny):
    """TRL's SFTTrainer without packing trains on dist-train's batches with the same losses; with packing its
    packed rows keep their examples apart (block-diagonal attention from the position ids, on CPU with SDPA)."""
    pytest.importorskip("trl", reason="trl is not installed (pip install '.[bench]'): the TRL arms were skipped")
    data, _, stdout, _ = sft_vs_trl_tiny
    for arm in ("trl", "trl_packed"):
        (run,) = data["runs"][arm]
        assert run["target_tokens_per_s"] > 0 and run["peak_rss_mb"] > 0, (arm, run)
    check = data["checks"]["trl"]
    assert check["same_target_tokens_per_step"] and check["max_step_loss_diff"] < 1e-4, check
    # Packing changes the batches, not the examples: every target token is trained on once.
    assert sum(data["runs"]["trl_packed"][0]["target_tokens"]) == sum(data["runs"]["trl"][0]["target_tokens"])
    packing = data["packing_check"]
    assert packing["keeps_examples_apart"] and packing["max_abs_diff"] < 1e-4 < packing["max_abs_diff_plain_causal"]
    assert data["trl_best"]["speed"] in ("trl", "trl_packed")
    assert "ratio dist_train/trl_best" in stdout and "target tokens/s" in stdout
