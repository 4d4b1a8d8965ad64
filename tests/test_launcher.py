"""The launch command's shape (--dry-run) for torchrun and the DeepSpeed launcher; signals passed on to workers."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, assert_user_error, run_cli, tiny_config
from dist_train.errors import UserError
from launcher.launch import LaunchArgs, build_command

CONFIG = str(ROOT / "configs" / "sentiment.yaml")


def test_single_node_torchrun_is_standalone():
    cmd = build_command(LaunchArgs(nproc_per_node=4), CONFIG, ["train.lr=3e-5"])
    assert cmd[:3] == [sys.executable, "-m", "launcher.launch"]  # torchrun, workers keep their signals
    assert "--nproc-per-node=4" in cmd and "--standalone" in cmd and "--max-restarts=0" in cmd
    assert cmd[-5:] == ["-m", "dist_train", "train", CONFIG, "train.lr=3e-5"]


def test_multi_node_torchrun_uses_c10d_rendezvous():
    cmd = build_command(LaunchArgs(nproc_per_node=8, nnodes=2, rdzv_endpoint="head:29500", rdzv_id="job7",
                                   max_restarts=3), CONFIG, [])
    assert {"--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=head:29500", "--rdzv-id=job7",
            "--max-restarts=3"} <= set(cmd)
    assert "--standalone" not in cmd
    with pytest.raises(UserError, match="needs --rdzv-endpoint"):
        build_command(LaunchArgs(nnodes=2), CONFIG, [])


def test_deepspeed_launcher_command():
    cmd = build_command(LaunchArgs(nproc_per_node=2, launcher="deepspeed"), CONFIG, ["engine.kind=deepspeed"])
    assert cmd[:5] == [sys.executable, "-m", "deepspeed.launcher.runner", "--no_local_rank", "--num_gpus=2"]
    assert not any(a.startswith("--num_nodes") for a in cmd)  # --num_nodes=1 would start a single rank
    assert cmd[-5:] == ["--module", "dist_train", "train", CONFIG, "engine.kind=deepspeed"]


def test_dry_run_prints_threads_and_command():
    result = run_cli("launch", CONFIG, "--nproc-per-node", "2", "engine.kind=ddp", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("OMP_NUM_THREADS=")
    assert "--nproc-per-node=2" in result.stdout and result.stdout.strip().endswith("engine.kind=ddp")


def test_launch_checks_the_config_before_starting_workers():
    assert_user_error(run_cli("launch", CONFIG, "--nproc-per-node", "2", "engine.deepspeed.zero_stage=2"),
                      "is an option of engine.kind=deepspeed, but engine.kind is auto")


def test_deepspeed_keys_merge_and_conflicts_are_errors():
    from dist_train.config import load_config
    from dist_train.engine.deepspeed import deepspeed_config

    cfg = load_config(CONFIG, ["engine.kind=deepspeed", "engine.deepspeed.zero_stage=2", "train.grad_accum=4",
                               "engine.deepspeed.config={zero_optimization: {overlap_comm: true}}"])
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 32 * 4 * 2 and ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert ds["gradient_clipping"] == cfg.train.max_grad_norm
    clash = load_config(CONFIG, ["engine.kind=deepspeed", "engine.deepspeed.zero_stage=2",
                                 "engine.deepspeed.config={zero_optimization: {stage: 3}}"])
    with pytest.raises(UserError, match=r"engine.deepspeed.config.zero_optimization.stage=3 conflicts with 2"):
        deepspeed_config(clash, world_size=2)


def test_torchrun_leaves_the_stop_signals_and_ctrl_c_to_the_workers():
    cmd = build_command(LaunchArgs(nproc_per_node=2), CONFIG, [], ["SIGUSR1", "SIGTERM"])
    assert "--leave-to-workers=SIGUSR1,SIGTERM,SIGINT" in cmd
    assert "--signals-to-handle=SIGHUP,SIGQUIT" in cmd  # torchrun still ends the job on these


@pytest.mark.slow
def test_sigterm_to_the_launcher_saves_a_checkpoint_and_exits_0(tmp_path, sentiment_slice):
    """Kubernetes and SLURM send SIGTERM before they kill: the workers (not torchrun) must get it, save at
    their next log step and exit 0 (torchrun on its own would SIGTERM them and SIGKILL them 30 s later)."""
    cfg = tiny_config(tmp_path, {"train": sentiment_slice["train"]}, train={"max_steps": 100000},
                      checkpoint={"every_epoch": False}, logging={"every_steps": 1, "tensorboard": False})
    metrics = tmp_path / "out" / "metrics.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "launcher", "launch", str(cfg), "--nproc-per-node", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 240
    while not (metrics.is_file() and metrics.read_text().strip()):  # training has started
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-3000:]
    step = int(re.search(r"stopped after step (\d+) on request \(SIGTERM", stdout).group(1))
    assert (tmp_path / "out" / "checkpoints" / f"step-{step}" / "manifest.json").is_file()
    assert "Traceback" not in stderr


@pytest.mark.slow
def test_a_worker_killed_under_launch_is_one_line_naming_the_rank_and_the_resume(tmp_path, sentiment_slice):
    """A worker that a signal ends (SIGKILL: the out-of-memory killer) leaves no traceback of its own: one
    dist-train line instead of torchrun's ChildFailedError report, exit 3."""
    cfg = tiny_config(tmp_path, {"train": sentiment_slice["train"]}, logging={"tensorboard": False})
    result = subprocess.run([sys.executable, "-m", "launcher", "launch", str(cfg), "--nproc-per-node", "2"],
                            capture_output=True, text=True, cwd=ROOT, timeout=240,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "DIST_TRAIN_FAIL_AT": "1:1:kill"})
    assert result.returncode == 3, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr, result.stderr[-3000:]
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("dist-train: error:")]
    assert "rank 1 was killed by SIGKILL" in line and "checkpoint.resume=auto" in line, line


@pytest.mark.slow
def test_a_crash_under_launch_keeps_its_traceback_and_torchrun_s_report(tmp_path, sentiment_slice):
    """Only user errors are shortened to one line: a real crash stays diagnosable."""
    cfg = tiny_config(tmp_path, {"train": sentiment_slice["train"]}, logging={"tensorboard": False})
    result = subprocess.run([sys.executable, "-m", "launcher", "launch", str(cfg), "--nproc-per-node", "2"],
                            capture_output=True, text=True, cwd=ROOT, timeout=240,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "DIST_TRAIN_FAIL_AT": "1:1"})
    assert result.returncode == 1
    assert "RuntimeError: injected failure at step 1" in result.stderr and "Traceback" in result.stderr
    assert "ChildFailedError" in result.stderr and "rank      : 1" in result.stderr
