"""Benchmarks stay runnable: each runs end to end on a tiny setting (no timing asserts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT


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


def test_one_entry_point_lists_and_runs_the_benchmarks():
    listing = subprocess.run([sys.executable, "-m", "bench"], cwd=ROOT, capture_output=True, text=True)
    assert listing.returncode == 0
    for name in ("pretrain_overhead", "resume", "transfer", "zero_memory"):
        assert name in listing.stdout
    helped = subprocess.run([sys.executable, "-m", "bench", "transfer", "pretrain", "--help"], cwd=ROOT,
                            capture_output=True, text=True)
    assert helped.returncode == 0 and "--in-domain-copies" in helped.stdout
    unknown = subprocess.run([sys.executable, "-m", "bench", "nope"], cwd=ROOT, capture_output=True, text=True)
    assert unknown.returncode == 2 and "unknown benchmark 'nope'" in unknown.stderr
