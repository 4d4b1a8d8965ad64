"""Checkpoints and resuming, with real processes: bit-exact resume, another world size, crashes, export.

Each scenario compares against an uninterrupted run of the same config. A run is interrupted by the
fault-injection hook (DIST_TRAIN_FAIL_AT=RANK:STEP[:kill], first attempt only) after step 10, with
checkpoints every 4 steps, so it resumes mid-epoch from step 8 and crosses an epoch boundary after that.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import (ROOT, SENTIMENT, assert_user_error, execute, head, max_diff, records, run_cli,
                      worker_cmd)
from resume_runs import ENGINES, EPOCHS, ROWS, assert_same_history, train_run, uninterrupted


@pytest.fixture
def work(resume_work):
    return resume_work


# -- 4. bit-exact ------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("engine", list(ENGINES))
def test_resumed_run_equals_uninterrupted_run(work, engine):
    nproc, ga, extra = ENGINES[engine]
    full = uninterrupted(work, engine)
    out, failed = train_run(work, f"{engine}-resumed/fail", nproc, "dropout", f"train.grad_accum={ga}", *extra,
                            env={"DIST_TRAIN_FAIL_AT": "0:10"}, expect_ok=False)
    assert failed.returncode != 0 and "injected failure at step 10" in failed.stderr
    out, resumed = train_run(work, f"{engine}-resumed", nproc, "dropout", f"train.grad_accum={ga}", *extra,
                             "checkpoint.resume=auto")
    assert "resuming from" in resumed.stdout and "step-8 at step 8 (epoch 0, batch 16 of 38)" in resumed.stdout
    assert max_diff(full / "final", out / "final") == 0.0  # dropout included: RNG states restored
    assert_same_history(full, out)
    assert [r for r in records(out) if r["split"] == "train"][-1]["examples_seen"] == ROWS * EPOCHS


# -- 5. another world size ---------------------------------------------------------------------------------
WORLD_CHANGES = {  # name: (engine overrides, (processes, accumulation) before, after)
    "ddp_2_to_1": (["engine.kind=ddp"], (2, 1), (1, 2)),
    "ddp_1_to_2": (["engine.kind=ddp"], (1, 2), (2, 1)),
    "zero2_2_to_1": (["engine.kind=deepspeed", "engine.deepspeed.zero_stage=2"], (2, 1), (1, 2)),
    "zero3_1_to_2": (["engine.kind=deepspeed", "engine.deepspeed.zero_stage=3"], (1, 2), (2, 1)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(WORLD_CHANGES))
def test_resume_at_another_world_size(work, name):
    """Same global batch (2 micro-batches a step) on another number of ranks: the run continues as if
    nothing happened. ZeRO optimizer shards are re-cut through DeepSpeed's universal checkpoint."""
    extra, (n1, ga1), (n2, ga2) = WORLD_CHANGES[name]
    reference = uninterrupted(work, "single", "nodrop")
    train_run(work, f"{name}/fail", n1, "nodrop", f"train.grad_accum={ga1}", *extra,
              env={"DIST_TRAIN_FAIL_AT": "0:10"}, expect_ok=False)
    out, resumed = train_run(work, name, n2, "nodrop", f"train.grad_accum={ga2}", *extra, "checkpoint.resume=auto")
    assert f"world {n1} x accumulation {ga1} -> world {n2} x accumulation {ga2}" in resumed.stdout
    assert max_diff(reference / "final", out / "final") < 1e-6
    train = [r for r in records(out) if r["split"] == "train"]
    assert train[-1]["step"] == 38 and train[-1]["examples_seen"] == ROWS * EPOCHS


@pytest.mark.slow
def test_resume_with_another_global_batch_sees_each_example_once(work):
    """World 2 -> 1 without raising accumulation: the rest of the epoch is re-cut into smaller steps."""
    extra = ["engine.kind=deepspeed", "engine.deepspeed.zero_stage=2"]
    train_run(work, "zero2_halved/fail", 2, "nodrop", *extra, env={"DIST_TRAIN_FAIL_AT": "0:10"}, expect_ok=False)
    out, _ = train_run(work, "zero2_halved", 1, "nodrop", *extra, "checkpoint.resume=auto")
    train = [r for r in records(out) if r["split"] == "train"]
    # 8 steps of 2 batches, then the remaining 22 batches of epoch 0 and all 38 of epoch 1 one at a time.
    assert train[-1]["step"] == 8 + 22 + 38
    assert train[-1]["examples_seen"] == ROWS * EPOCHS


def test_plan_recut_at_another_world_size_covers_the_epoch_once():
    from dist_train.data.sampler import step_windows, train_plan

    plan = train_plan(list(range(5, 155)), 4, seed=3, epoch=1, group_by_length=True)
    for (w1, ga1), (w2, ga2) in [((2, 1), (1, 1)), ((1, 3), (2, 2)), ((4, 1), (3, 1))]:
        done = 5 * w1 * ga1  # five steps at the first world
        seen = [i for r in range(w1) for s in step_windows(plan[:done], ga1, r, w1) for b, w in s if w for i in b]
        seen += [i for r in range(w2) for s in step_windows(plan[done:], ga2, r, w2) for b, w in s if w for i in b]
        assert sorted(seen) == sorted(i for b in plan for i in b)


# -- 6. crashes --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_kill_9_of_a_worker_restarts_and_resumes_to_the_same_weights(work):
    tmp, configs = work
    full = uninterrupted(work, "ddp")
    out = tmp / "killed"
    cmd = [sys.executable, "-m", "launcher", "launch", str(configs["dropout"]), "--nproc-per-node", "2",
           "--max-restarts", "1", f"output_dir={out}", "engine.kind=ddp", "train.grad_accum=1",
           "checkpoint.resume=auto"]
    result = execute(cmd, {"DIST_TRAIN_FAIL_AT": "1:10:kill"})
    assert result.returncode == 0, result.stderr[-4000:]
    assert "exitcode: -9" in result.stderr  # torchrun saw the worker die of SIGKILL, then restarted the group
    assert "resuming from" in result.stdout and "step-8" in result.stdout
    assert max_diff(full / "final", out / "final") == 0.0
    assert_same_history(full, out)


@pytest.mark.slow
def test_killed_while_saving_keeps_latest_on_the_previous_checkpoint(work):
    tmp, configs = work
    full = uninterrupted(work, "single")
    out = tmp / "killed_in_save"
    args = (f"output_dir={out}", "engine.kind=single", "train.grad_accum=2")
    result = execute(worker_cmd(1, configs["dropout"], *args), {"DIST_TRAIN_KILL_IN_SAVE": "12"})
    assert result.returncode == -9
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text() == "step-8"
    assert (ckpts / ".tmp-step-12").is_dir() and not (ckpts / "step-12").exists()
    resumed = execute(worker_cmd(1, configs["dropout"], *args, "checkpoint.resume=auto"))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resuming from" in resumed.stdout and "step-8" in resumed.stdout
    assert not (ckpts / ".tmp-step-12").exists()  # the half-written folder is cleaned up
    assert max_diff(full / "final", out / "final") == 0.0


@pytest.mark.slow
def test_corrupted_checkpoint_is_named_and_auto_falls_back(work):
    tmp, configs = work
    full = uninterrupted(work, "single")
    out = tmp / "corrupted"
    args = (f"output_dir={out}", "engine.kind=single", "train.grad_accum=2")
    assert execute(worker_cmd(1, configs["dropout"], *args), {"DIST_TRAIN_FAIL_AT": "0:10"}).returncode != 0
    newest = out / "checkpoints" / "step-8" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, as by a full disk

    result = run_cli("train", configs["dropout"], *args, f"checkpoint.resume={newest.parent}")
    assert_user_error(result, "step-8", "model.safetensors", "truncated", "resume=auto")

    result = execute(worker_cmd(1, configs["dropout"], *args, "checkpoint.resume=auto"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "skipping checkpoint" in result.stderr and "step-8" in result.stderr
    assert "resuming from" in result.stdout and "step-5 at step 5" in result.stdout  # the best, at step 5
    assert max_diff(full / "final", out / "final") == 0.0


@pytest.mark.slow
def test_stop_signal_saves_stops_and_the_run_continues_exactly(work):
    """SIGUSR1 (checkpoint.stop_signals) = save after the current step and exit 0; resume=auto finishes."""
    tmp, configs = work
    full = uninterrupted(work, "single")
    out = tmp / "signalled"
    cmd = worker_cmd(1, configs["dropout"], f"output_dir={out}", "engine.kind=single", "train.grad_accum=2")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not ((out / "metrics.jsonl").is_file() and '"train"' in (out / "metrics.jsonl").read_text()):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    stopped = int(re.search(r"stopped after step (\d+) on request \(SIGUSR1", stdout).group(1))
    assert 3 <= stopped < 38 and (out / "checkpoints" / f"step-{stopped}").is_dir()
    assert not (out / "final").exists()
    resumed = execute(worker_cmd(1, configs["dropout"], f"output_dir={out}", "engine.kind=single",
                                 "train.grad_accum=2", "checkpoint.resume=auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {stopped} " in resumed.stdout
    assert max_diff(full / "final", out / "final") == 0.0


# -- what a resume may change ------------------------------------------------------------------------------
@pytest.mark.slow
def test_resume_refuses_a_changed_model_engine_or_data(work):
    tmp, configs = work
    out, _ = train_run(work, "single-resumed", 1, "dropout", "engine.kind=single", "train.grad_accum=2")
    base = ("train", configs["dropout"], f"output_dir={out}", "checkpoint.resume=auto", "train.grad_accum=2")
    assert_user_error(run_cli(*base, "model.config.hidden_size=128"),
                      "model.config.hidden_size: 64 -> 128", "another output_dir")
    assert_user_error(run_cli(*base, "train.lr=0.01"), "train.lr: 0.001 -> 0.01")
    other = tmp / "other_train.tsv"
    other.write_text(head(SENTIMENT / "train.tsv", ROWS + 5))
    assert_user_error(run_cli(*base, f"data.train={other}"), "training data differs", "150 examples then, 155 now")
    result = execute(worker_cmd(2, configs["dropout"], *base[2:], "engine.kind=deepspeed"))
    assert result.returncode != 0 and "written by the torch engine" in result.stderr
    zero2, _ = train_run(work, "zero2-resumed", 2, "dropout", "train.grad_accum=1", *ENGINES["zero2"][2],
                         "checkpoint.resume=auto")  # a finished ZeRO-2 run
    result = execute(worker_cmd(1, configs["dropout"], f"output_dir={zero2}", "checkpoint.resume=auto",
                                "engine.kind=deepspeed", "engine.deepspeed.zero_stage=3"))
    assert result.returncode == 2 and "engine.deepspeed.zero_stage: 2 -> 3" in result.stderr, result.stderr[-2000:]


@pytest.mark.slow
def test_resume_may_extend_the_run(work):
    """max_steps, logging and eval cadence may change: continue a finished run for more steps."""
    tmp, configs = work
    out = tmp / "extended"
    args = (f"output_dir={out}", "engine.kind=single", "train.grad_accum=2")
    assert execute(worker_cmd(1, configs["nodrop"], *args, "train.max_steps=20")).returncode == 0
    result = execute(worker_cmd(1, configs["nodrop"], *args, "train.max_steps=24", "logging.every_steps=1",
                                "checkpoint.resume=auto"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "at step 20" in result.stdout
    steps = [r["step"] for r in records(out) if r["split"] == "train"]
    assert steps[-6:] == [18, 20, 21, 22, 23, 24]  # every 3 steps and the last before, every step after
    assert (out / "final" / "model.safetensors").is_file()


# -- 7. export ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_export_from_zero3_shards_equals_export_from_ddp(work):
    tmp, _ = work
    exports = {}
    for engine in ("ddp", "zero3"):
        run_dir = uninterrupted(work, engine)
        exports[engine] = tmp / f"export-{engine}"
        result = run_cli("export", run_dir / "checkpoints" / "step-38", exports[engine])
        assert result.returncode == 0, result.stderr[-3000:]
    assert max_diff(exports["ddp"], exports["zero3"]) < 1e-5
    # final/ holds the last weights here (load_best_at_end off), gathered from the live ZeRO-3 shards: the
    # export of the last checkpoint, consolidated from its files, is the same model.
    assert max_diff(exports["zero3"], uninterrupted(work, "zero3") / "final") == 0.0

    from transformers import pipeline

    classify = pipeline("text-classification", model=str(exports["zero3"]), device="cpu")
    labels = json.loads((exports["zero3"] / "config.json").read_text())["id2label"].values()
    assert {o["label"] for o in classify(["a moving, beautifully acted film", "dull and lifeless"])} <= set(labels)
    # dist-train's own predict reads the export too (labels and columns travel with it).
    result = run_cli("predict", exports["zero3"], "a moving film")
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.slow
def test_export_errors_are_one_line(work, tmp_path):
    assert_user_error(run_cli("export", tmp_path, tmp_path / "x"), "not a dist-train checkpoint")
    run_dir = uninterrupted(work, "single")
    target = tmp_path / "full"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    assert_user_error(run_cli("export", run_dir / "checkpoints" / "step-38", target), "not empty")
    assert (target / "keep.txt").read_text() == "mine"
