"""The launch command's shape (--dry-run) for torchrun and the DeepSpeed launcher."""

from __future__ import annotations

import sys

import pytest

from conftest import ROOT, assert_user_error, run_cli
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
    assert_user_error(run_cli("launch", CONFIG, "--nproc-per-node", "2", "engine.zero_stage=2"),
                      "need engine.kind=deepspeed")


def test_deepspeed_keys_merge_and_conflicts_are_errors():
    from dist_train.config import load_config
    from dist_train.engine.deepspeed import deepspeed_config

    cfg = load_config(CONFIG, ["engine.kind=deepspeed", "engine.zero_stage=2", "train.grad_accum=4",
                               "engine.deepspeed={zero_optimization: {overlap_comm: true}}"])
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 32 * 4 * 2 and ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert ds["gradient_clipping"] == cfg.train.max_grad_norm
    clash = load_config(CONFIG, ["engine.kind=deepspeed", "engine.zero_stage=2",
                                 "engine.deepspeed={zero_optimization: {stage: 3}}"])
    with pytest.raises(UserError, match=r"engine.deepspeed.zero_optimization.stage=3 conflicts with 2"):
        deepspeed_config(clash, world_size=2)
