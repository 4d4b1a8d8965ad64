"""Real multi-process training: torchrun on gloo, DDP and DeepSpeed ZeRO 0-3 (tiny models, 1 thread each).

Every run is its own set of processes. The central check is the loss normalisation: one optimizer step
follows the gradient of the mean loss over the whole global batch, however it is split into micro-batches
and ranks, so (world 1, GA 4, micro 2), (world 2, GA 2, micro 2) and (world 1, GA 1, micro 8) end with
the same parameters - with uneven lengths, padding and a short last step.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from conftest import NO_DROPOUT, ROOT, SENTIMENT, execute, head, records, tiny_config, worker_cmd

pytestmark = pytest.mark.slow  # every test here starts real multi-process jobs

TRAIN_ROWS = 150  # 18 full steps of 8 examples and a short last one (6): fillers at world 2


def launch(nproc: int, cfg, *overrides, env_extra=None, timeout=900) -> subprocess.CompletedProcess:
    return execute(worker_cmd(nproc, cfg, *overrides), env_extra, timeout)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    (tmp / "train.tsv").write_text(head(SENTIMENT / "train.tsv", TRAIN_ROWS))
    (tmp / "test.tsv").write_text(head(SENTIMENT / "test.tsv", 37))
    return tmp


RUNS = {  # name: (processes, micro batch, grad accum, extra overrides)
    "single_ga1_m8": (1, 8, 1, ["engine.kind=single"]),
    "single_ga4_m2": (1, 2, 4, ["engine.kind=single"]),
    "ddp_w2_ga2_m2": (2, 2, 2, ["engine.kind=ddp"]),
    "zero0_w2": (2, 2, 2, ["engine.kind=deepspeed", "engine.deepspeed.zero_stage=0"]),
    "zero1_w2": (2, 2, 2, ["engine.kind=deepspeed", "engine.deepspeed.zero_stage=1"]),
    "zero2_w2": (2, 2, 2, ["engine.kind=deepspeed", "engine.deepspeed.zero_stage=2"]),
    "zero3_w2": (2, 2, 2, ["engine.kind=deepspeed", "engine.deepspeed.zero_stage=3"]),
    # ZeRO-Offload: optimizer state and step on CPU with DeepSpeed's CPU Adam (compiled on first use).
    "zero2_offload_w2": (2, 2, 2, ["engine.kind=deepspeed", "engine.deepspeed.zero_stage=2", "engine.deepspeed.offload_optimizer=true"]),
}
_done: dict = {}


def run(workdir, name):
    """Train run ``name`` once per module; returns its output folder."""
    if name not in _done:
        nproc, micro, ga, extra = RUNS[name]
        out = workdir / name
        cfg = tiny_config(workdir, {"train": workdir / "train.tsv", "test": workdir / "test.tsv"},
                          output_dir=str(out), model={"config": NO_DROPOUT, "tokenizer": "all-MiniLM-L6-v2"},
                          data={"group_by_length": False, "max_length": 48},
                          train={"epochs": 1, "micro_batch_size": micro, "grad_accum": ga, "eval_batch_size": 8},
                          logging={"every_steps": 1, "progress_bar": False, "tensorboard": False})
        cfg_copy = workdir / f"{name}.yaml"
        cfg_copy.write_text(cfg.read_text())
        result = launch(nproc, cfg_copy, *extra)
        assert result.returncode == 0, result.stderr[-4000:]
        _done[name] = out
    return _done[name]



def max_diff(a, b) -> float:
    wa, wb = load_file(str(a / "final" / "model.safetensors")), load_file(str(b / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


@pytest.mark.parametrize("name", [n for n in RUNS if n != "single_ga1_m8"])
def test_same_parameters_however_the_global_batch_is_split(workdir, name):
    reference = run(workdir, "single_ga1_m8")
    out = run(workdir, name)
    assert max_diff(reference, out) < 1e-5
    ref_loss = [r["loss"] for r in records(reference, "train")]
    loss = [r["loss"] for r in records(out, "train")]
    assert len(loss) == len(ref_loss) == 19  # one record per step, written once (rank 0 only)
    assert loss == pytest.approx(ref_loss, abs=1e-5)  # the logged loss is the global mean too


@pytest.mark.parametrize("name", ["ddp_w2_ga2_m2", "zero3_w2"])
def test_every_example_once_and_exact_eval_counts_at_world_2(workdir, name):
    reference, out = run(workdir, "single_ga1_m8"), run(workdir, name)
    assert records(out, "train")[-1]["examples_seen"] == TRAIN_ROWS
    test, ref = records(out, "test")[0], records(reference, "test")[0]
    assert test["n"] == 37 and sum(map(sum, test["confusion_matrix"]["rows_true_cols_pred"])) == 37
    assert test["accuracy"] == ref["accuracy"]
    assert test["loss"] == pytest.approx(ref["loss"], abs=1e-5)


def test_zero_shards_optimizer_state(workdir):
    ddp = records(run(workdir, "ddp_w2_ga2_m2"), "ranks")[0]["optimizer_state_elements"]
    params = sum(v.numel() for v in load_file(str(run(workdir, "ddp_w2_ga2_m2") / "final" / "model.safetensors")).values())
    assert ddp == [2 * params, 2 * params]  # Adam's two moments, replicated on both ranks
    for stage in (1, 2, 3):
        zero = records(run(workdir, f"zero{stage}_w2"), "ranks")[0]["optimizer_state_elements"]
        for rank in range(2):
            assert 0.45 < zero[rank] / ddp[rank] < 0.55, (stage, zero, ddp)
    z3 = records(run(workdir, "zero3_w2"), "ranks")[0]["param_elements"]
    assert 0.45 < z3[0] / params < 0.55  # only stage 3 shards the parameters themselves


def test_only_rank_0_writes(workdir):
    out = run(workdir, "ddp_w2_ga2_m2")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.yaml", "eval_report.json", "final",
                                                    "metrics.jsonl", "report.png"]
    steps = [r["step"] for r in records(out, "train")]
    assert steps == sorted(set(steps))


def test_a_failing_rank_ends_the_whole_job(workdir):
    cfg = tiny_config(workdir, {"train": workdir / "train.tsv"}, output_dir=str(workdir / "fail"),
                      train={"epochs": 1000})
    result = launch(2, cfg, "engine.kind=ddp", env_extra={"DIST_TRAIN_FAIL_AT": "1:2"}, timeout=180)
    assert result.returncode != 0
    assert "injected failure at step 2" in result.stderr
    # Rank 1's own traceback (torch prefixes an uncaught exception's lines with the global rank) ends in the
    # injected failure, and rank 0 never raised it; torchrun's failure summary lists rank 1.
    assert re.search(r"^\[rank1\]: RuntimeError: injected failure at step 2 \(DIST_TRAIN_FAIL_AT\)$",
                     result.stderr, re.M), result.stderr[-4000:]
    assert not re.search(r"^\[rank0\]:.*injected failure", result.stderr, re.M)
    assert re.search(r"^ +rank +: 1 \(local_rank: 1\)$", result.stderr, re.M), result.stderr[-4000:]


def test_deepspeed_launcher_runs_the_same_job(workdir):
    """`dist-train launch --launcher deepspeed` starts 2 real ranks whose result equals torchrun's."""
    out = workdir / "ds_launcher"
    cfg = workdir / "ds_launcher.yaml"
    cfg.write_text((run(workdir, "zero1_w2") / "config.yaml").read_text())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "launcher", "launch", str(cfg), "--nproc-per-node", "2",
                             "--launcher", "deepspeed", f"output_dir={out}"], capture_output=True, text=True,
                            cwd=ROOT, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert len(records(out, "ranks")[0]["optimizer_state_elements"]) == 2
    assert max_diff(run(workdir, "zero1_w2"), out) == 0.0
