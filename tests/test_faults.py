"""Nothing lost, ever: faults during a run, in real processes.

Diverging runs (NaN), a damaged best checkpoint, overwrite or resume that fails half way, two runs in one
folder, a full disk, signals at every phase, and a rank that stops answering. Each case checks the one
line, the exit status, and what is left on disk (byte for byte where nothing may change).
Faults come from the test hooks in dist_train/run/faults.py (deterministic), real signals and real limits.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from conftest import (NO_DROPOUT, ROOT, assert_user_error, cue_rows, execute, max_diff, snapshot, tiny_config,
                      worker_cmd)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    rng = random.Random(1)
    files = {"train": tmp / "train.tsv", "validation": tmp / "dev.tsv", "test": tmp / "test.tsv"}
    files["train"].write_text(cue_rows(rng, 96))
    files["validation"].write_text(cue_rows(rng, 32, flip=True))
    files["test"].write_text(cue_rows(rng, 32))
    cfg = tiny_config(tmp, files, model={"config": NO_DROPOUT, "tokenizer": "all-MiniLM-L6-v2"},
                      train={"epochs": 2, "micro_batch_size": 8, "lr": 3e-3, "eval_every": 3},
                      checkpoint={"every_steps": 2, "keep_last_n": 2},
                      logging={"every_steps": 1, "progress_bar": False, "tensorboard": False})
    return tmp, cfg  # 12 steps an epoch, 24 in all


def train(cfg, out, *overrides, env=None, timeout=300) -> subprocess.CompletedProcess:
    """``dist-train train`` in a new process, as a user runs it."""
    full = {**os.environ, "OMP_NUM_THREADS": "2", **(env or {})}
    return subprocess.run([sys.executable, "-m", "launcher", "train", str(cfg), f"output_dir={out}", *overrides],
                          capture_output=True, text=True, cwd=ROOT, env=full, timeout=timeout)


_finished: dict = {}


def finished_run(data, name="done"):
    """One complete run (memoised), copied to a fresh folder for each caller."""
    tmp, cfg = data
    if name not in _finished:
        out = tmp / f"_{name}"
        result = train(cfg, out)
        assert result.returncode == 0, result.stderr[-3000:]
        _finished[name] = out
    return _finished[name]


def copy_of(data, name: str):
    tmp, _ = data
    dst = tmp / name
    shutil.copytree(finished_run(data), dst)
    return dst


def error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("dist-train: error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


def leftovers(out) -> list[str]:
    return [str(p) for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp-")]


# -- non-finite steps -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_diverging_run_stops_with_exit_3_and_overwrite_keeps_the_old_run(data):
    tmp, cfg = data
    out = copy_of(data, "diverged")
    before = snapshot(out)
    result = train(cfg, out, "overwrite=true", "train.lr=1e6")
    assert result.returncode == 3, result.stderr[-3000:]
    line = error_line(result)
    assert "training diverged: step 2 had a non-finite loss" in line and "nothing was exported" in line
    assert snapshot(out) == before  # the earlier run is back, byte for byte; no .previous, no lock


@pytest.mark.slow
def test_a_nan_step_names_the_last_good_checkpoint_and_exports_nothing(data):
    tmp, cfg = data
    out = tmp / "nan5"
    result = train(cfg, out, env={"DIST_TRAIN_NAN_AT": "0:5"})
    assert result.returncode == 3, result.stderr[-3000:]
    line = error_line(result)
    assert "step 5 had a non-finite loss or gradient norm (loss nan" in line
    assert f"the last good checkpoint is {out / 'checkpoints' / 'step-4'}" in line
    assert not (out / "final").exists() and not (out / "eval_report.json").exists()
    steps = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert steps == ["step-3", "step-4"]  # the best (validation at 3) and the last good one; nothing after
    assert not leftovers(out)


@pytest.mark.slow
def test_max_nonfinite_steps_skips_a_nan_step_on_every_rank(data):
    """World 2: NaN logits on rank 1 at step 5 make the all-reduced gradients NaN everywhere; both ranks skip
    that update alike and the run finishes with finite weights."""
    tmp, cfg = data
    out = tmp / "skipped"
    result = execute(worker_cmd(2, cfg, f"output_dir={out}", "engine.kind=ddp", "train.max_nonfinite_steps=1",
                                "train.micro_batch_size=4"), {"DIST_TRAIN_NAN_AT": "1:5"})
    assert result.returncode == 0, result.stderr[-3000:]
    train_records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                     if '"train"' in line]
    assert [r.get("skipped_steps", 0) for r in train_records][3:6] == [0, 1, 1]  # steps 4, 5, 6
    assert train_records[4]["loss"] is None  # the skipped step's loss is not averaged in (NaN)
    assert all(r["loss"] < 10 for r in train_records if r["step"] != 5)
    weights = load_file(str(out / "final" / "model.safetensors"))
    assert all(t.isfinite().all() for t in weights.values())


# -- checkpoints that are damaged, resumes that fail ---------------------------------------------------
@pytest.mark.slow
def test_a_damaged_best_checkpoint_is_set_aside_and_never_exported(data):
    tmp, cfg = data
    out = tmp / "damaged_best"
    first = train(cfg, out, env={"DIST_TRAIN_FAIL_AT": "0:8"})
    assert first.returncode != 0 and "injected failure at step 8" in first.stderr
    best = json.loads((out / "checkpoints" / "step-6" / "trainer_state.json").read_text())["best_step"]
    assert best == 3
    weights = out / "checkpoints" / "step-3" / "model.safetensors"
    data_bytes = bytearray(weights.read_bytes())
    data_bytes[-100] ^= 0xFF  # one flipped byte: same size, wrong checksum
    weights.write_bytes(bytes(data_bytes))
    result = train(cfg, out, "checkpoint.resume=auto")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the best checkpoint (step 3) is damaged" in result.stderr
    assert (out / "checkpoints" / "step-3.damaged").is_dir() and not (out / "checkpoints" / "step-3").exists()
    assert max_diff(out / "final", out / "checkpoints" / "step-24") == 0.0  # the last weights, not damaged ones


@pytest.mark.slow
def test_a_resume_that_cannot_load_changes_nothing(data):
    tmp, cfg = data
    out = copy_of(data, "bad_resume")
    ckpt = out / "checkpoints" / "step-24"
    (ckpt / "optimizer.pt").write_bytes(b"not a torch file")
    from dist_train.run.checkpoint import write_manifest

    write_manifest(ckpt)  # the files match their manifest: only loading can tell
    before = snapshot(out)
    result = train(cfg, out, "checkpoint.resume=auto", "train.epochs=3")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "step-24' cannot be loaded" in error_line(result)
    assert snapshot(out) == before  # final/, metrics.jsonl and the report are untouched


@pytest.mark.slow
def test_resume_auto_where_every_checkpoint_is_damaged_says_so(data):
    tmp, cfg = data
    out = copy_of(data, "all_damaged")
    for ckpt in (out / "checkpoints").glob("step-*"):
        (ckpt / "model.safetensors").write_bytes(b"damaged")
    before = snapshot(out)
    result = train(cfg, out, "checkpoint.resume=auto")
    assert result.returncode == 2, result.stderr[-3000:]
    line = error_line(result)
    assert "every checkpoint in" in line and "is damaged" in line and "overwrite=true" in line, line
    assert "pass checkpoint.resume=auto" not in line
    assert snapshot(out) == before


@pytest.mark.slow
def test_overwrite_that_crashes_before_its_first_checkpoint_restores_the_old_run(data):
    tmp, cfg = data
    out = copy_of(data, "crash_overwrite")
    before = snapshot(out)
    result = train(cfg, out, "overwrite=true", env={"DIST_TRAIN_FAIL_AT": "0:1"})
    assert result.returncode != 0 and "injected failure at step 1" in result.stderr
    assert snapshot(out) == before
    result = train(cfg, out, "overwrite=true", "train.max_steps=2")  # succeeds: the old run is gone
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-2"]
    assert not (out / ".previous").exists()


# -- one writer ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_second_run_into_the_same_folder_stops_at_once(data):
    tmp, cfg = data
    out = tmp / "busy"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "launcher", "train", str(cfg), f"output_dir={out}"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 60
        while not (out / ".dist-train.lock").exists():
            assert time.monotonic() < deadline and first.poll() is None, "the first run never took the lock"
            time.sleep(0.1)
        second = train(cfg, out)
        assert_user_error(second, "is in use by another dist-train run", f"pid {first.pid}")
    finally:
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert not (out / ".dist-train.lock").exists()


@pytest.mark.slow
def test_a_stale_lock_is_replaced_with_a_message(data):
    tmp, cfg = data
    out = tmp / "stale"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / ".dist-train.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": int(dead.stdout)}))
    result = train(cfg, out, "train.max_steps=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "replacing a stale lock" in result.stderr


# -- a full disk -----------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("size, says", [
    ("12m", "No space left on device"),  # the first checkpoint (~24 MB: weights + Adam state) fails to write
    ("40m", "checkpoint needs about"),  # the second is refused before writing: the first one's size is not free
])
def test_a_full_disk_is_one_line_and_leaves_no_temp_folder(data, tmp_path, size, says):
    tmp, cfg = data
    disk = tmp_path / "small"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], capture_output=True,
                             text=True) if os.geteuid() == 0 and shutil.which("mount") else None
    if mounted is None or mounted.returncode != 0:
        pytest.skip(f"needs root and a mountable tmpfs ({mounted.stderr.strip() if mounted else 'not root'})")
    try:
        out = disk / "run"
        result = train(cfg, out, "train.max_steps=4", "checkpoint.keep_last_n=3", "data.cache_dir=" + str(tmp / "cache"))
        assert result.returncode == 3, result.stderr[-3000:]
        line = error_line(result)
        assert "disk full" in line and says in line and "checkpoint.resume=auto" in line
        assert not leftovers(out)
        complete = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
        assert complete == ([] if size == "12m" else ["step-2"])
    finally:
        subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.slow
def test_a_full_disk_during_an_export_is_one_line_and_leaves_nothing(data, tmp_path):
    """dist-train export onto a disk too small for the weights: one line, exit 3, no half folder beside it."""
    run = finished_run(data)
    disk = tmp_path / "tiny"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True,
                             text=True) if os.geteuid() == 0 and shutil.which("mount") else None
    if mounted is None or mounted.returncode != 0:
        pytest.skip(f"needs root and a mountable tmpfs ({mounted.stderr.strip() if mounted else 'not root'})")
    try:
        step = sorted((run / "checkpoints").glob("step-*"))[-1]
        result = subprocess.run([sys.executable, "-m", "launcher", "export", str(step), str(disk / "model")],
                                capture_output=True, text=True, cwd=ROOT, timeout=300,
                                env={**os.environ, "OMP_NUM_THREADS": "2"})
        assert result.returncode == 3, result.stderr[-3000:]
        line = error_line(result)
        assert "disk full" in line and str(disk / "model") in line, line
        assert list(disk.iterdir()) == []  # neither the model nor .model.tmp
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# -- signals at every phase ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("phase, sig, code", [
    ("setup", "SIGTERM", 0), ("setup", "SIGINT", 130), ("step-3", "SIGTERM", 0), ("step-3", "SIGINT", 130),
    ("step-3", "SIGUSR1", 0), ("finish", "SIGTERM", 0),
])
def test_a_signal_at_any_phase_ends_cleanly(data, phase, sig, code):
    tmp, cfg = data
    out = tmp / f"signal-{phase}-{sig}"
    result = train(cfg, out, env={"DIST_TRAIN_SIGNAL_AT": f"0:{phase}:{sig}"})
    assert result.returncode == code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not leftovers(out) if out.exists() else True
    if phase == "setup":  # nothing trained, nothing to save: the folder is as it was (absent)
        assert f"stopped by {sig} before training started; nothing to save" in result.stderr
        assert not out.exists()
    elif phase == "step-3":  # saved after the step that read the request (log every step), then stopped
        assert "stopped after step 4 on request" in result.stdout
        assert (out / "checkpoints" / "latest").read_text() == "step-4"
        assert not (out / "final").exists()
    else:  # the end of the run finishes: final/ and the report exist
        assert (out / "final" / "model.safetensors").is_file() and (out / "eval_report.json").is_file()


def test_sigterm_while_the_process_is_still_importing(data):
    tmp, cfg = data
    out = tmp / "early"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "launcher", "train", str(cfg), f"output_dir={out}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    # As soon as the process catches SIGTERM (its first line does), while it is still importing torch.
    deadline = time.monotonic() + 30
    while not catches(proc.pid, signal.SIGTERM):
        assert time.monotonic() < deadline and proc.poll() is None, "the process never installed its SIGTERM handler"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped by SIGTERM before training started" in err and "Traceback" not in err
    assert not out.exists()


def catches(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler for ``sig`` (SigCgt in /proc/PID/status)."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


@pytest.mark.slow
def test_overwrite_stopped_before_training_restores_the_old_run(data):
    tmp, cfg = data
    out = copy_of(data, "stop_overwrite")
    before = snapshot(out)
    result = train(cfg, out, "overwrite=true", env={"DIST_TRAIN_SIGNAL_AT": "0:setup:SIGTERM"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert snapshot(out) == before


# -- hangs ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_rank_that_stops_answering_ends_the_job_naming_it(data):
    tmp, cfg = data
    out = tmp / "frozen"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIST_TRAIN_FREEZE_AT": "1:3"}
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "launcher", "launch", str(cfg), "--nproc-per-node", "2",
                             f"output_dir={out}", "engine.kind=ddp", "engine.timeout_s=15"],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=240)
    elapsed = time.monotonic() - start
    assert result.returncode == 3, result.stderr[-3000:]
    line = error_line(result)
    assert "rank 1 did not answer within engine.timeout_s=15 s" in line
    assert "checkpoint.resume=auto" in line  # step 2 was saved before the freeze
    print(f"frozen rank: job ended {elapsed:.0f} s after start")
