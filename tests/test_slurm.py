"""SLURM: `dist-train submit` against a real local cluster (slurm/local-cluster.sh; `.ci/run` starts it).

Jobs are tiny CPU runs. Where no SLURM cluster answers, the cluster tests skip and say why (`make test` on a
machine without SLURM) - except under CI (``CI=true``, which `.ci/run` sets): there they fail, so a cluster
that did not start can never turn CI green with these tests unrun.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from conftest import SENTIMENT, TINY_BERT, assert_user_error, execute, head, max_diff, run_cli, tiny_config

pytestmark = pytest.mark.slow  # a real SLURM cluster


def cluster_up() -> str | None:
    """None if a SLURM cluster has an idle node; else why not."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "SLURM client commands not installed (start one with slurm/local-cluster.sh start)"
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10).stdout
    except subprocess.TimeoutExpired:
        return "sinfo did not answer"
    if not re.search(r"idle|mixed|allocated", states):
        return f"no SLURM node is up (sinfo: {states.strip() or 'nothing'}); run slurm/local-cluster.sh start"
    return None


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


def skip_or_fail(why: str) -> None:
    """Skip with the reason; under CI, fail instead (CI must really run the cluster tests)."""
    if in_ci():
        pytest.fail(f"CI={os.environ['CI']}: {why}; in CI the SLURM tests must run, not skip", pytrace=False)
    pytest.skip(why)


CLUSTER_MISSING = cluster_up()


@pytest.fixture
def slurm_cluster():
    if CLUSTER_MISSING is not None:
        skip_or_fail(CLUSTER_MISSING)


needs_cluster = pytest.mark.usefixtures("slurm_cluster")


def job_state(job_id: str) -> dict:
    text = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", text))


def wait_for_job(job_id: str, timeout: float = 600) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = job_state(job_id)
        if state.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(1)
    subprocess.run(["scancel", job_id])
    raise AssertionError(f"job {job_id} did not end within {timeout} s: {job_state(job_id)}")


def submit(*args) -> tuple[str, str]:
    result = run_cli("submit", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    found = re.search(r"submitted job (\d+); log: ([^;\s]+)", result.stdout)
    return found.group(1), found.group(2)


@pytest.fixture
def job_config(tmp_path):
    (tmp_path / "train.tsv").write_text(head(SENTIMENT / "train.tsv", 150))
    (tmp_path / "test.tsv").write_text(head(SENTIMENT / "test.tsv", 40))
    return tiny_config(tmp_path, {"train": tmp_path / "train.tsv", "test": tmp_path / "test.tsv"},
                       model={"config": TINY_BERT, "tokenizer": "all-MiniLM-L6-v2"}, data={"max_length": 48},
                       train={"epochs": 2, "micro_batch_size": 4, "lr": 1e-3},
                       checkpoint={"every_steps": 4},
                       logging={"every_steps": 3, "progress_bar": False, "tensorboard": False})


def test_submit_dry_run_prints_the_sbatch_script(job_config):
    result = run_cli("submit", job_config, "--nodes", "2", "--gpus-per-node", "4", "--time", "02:00:00",
                     "--partition", "gpu", "--account", "proj", "--requeue", "--signal-lead", "300", "--dry-run",
                     "engine.kind=deepspeed", "engine.deepspeed.zero_stage=2")
    assert result.returncode == 0, result.stderr
    script = result.stdout
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=4", "#SBATCH --time=02:00:00",
                 "#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --requeue",
                 "#SBATCH --signal=B:USR1@300", "--nproc-per-node 4", "engine.kind=deepspeed engine.deepspeed.zero_stage=2",
                 "checkpoint.resume=auto", '--rdzv-id "$SLURM_JOB_ID"'):
        assert line in script, line
    assert "{{" not in script
    assert_user_error(run_cli("submit", job_config, "--time", "2 hours", "--dry-run"), "--time", "HH:MM:SS")
    assert_user_error(run_cli("submit", job_config, "train.lr=fast", "--dry-run"), "train.lr")


@needs_cluster
def test_a_submitted_job_trains_and_writes_its_outputs(job_config, tmp_path):
    job, log = submit(job_config, "--nproc-per-node", "2", "--time", "00:10:00", "engine.kind=ddp")
    state = wait_for_job(job)
    assert state["JobState"] == "COMPLETED", open(log).read()[-3000:]
    out = tmp_path / "out" / f"job-{job}"
    report = json.loads((out / "eval_report.json").read_text())
    assert report["n"] == 40
    ranks = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in ranks if r["split"] == "ranks"][0]["peak_memory_mb"]) == 2  # two real ranks


@needs_cluster
def test_preempted_job_requeues_resumes_and_ends_like_an_uninterrupted_run(job_config, tmp_path):
    """USR1 to the batch shell (as SLURM sends before the time limit): checkpoint, stop, requeue, resume."""
    job, log = submit(job_config, "--nproc-per-node", "2", "--time", "00:10:00", "--requeue", "engine.kind=ddp",
                      "train.epochs=4")
    metrics = tmp_path / "out" / f"job-{job}" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.is_file() and '"train"' in metrics.read_text()):
        assert time.time() < deadline and job_state(job).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING")
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    state = wait_for_job(job, timeout=900)
    text = open(log).read()
    assert state["JobState"] == "COMPLETED", text[-3000:]
    assert state.get("Restarts") == "1", state
    stopped = int(re.search(r"stopped after step (\d+) on request", text).group(1))
    assert f"resuming from {tmp_path}/out/job-{job}/checkpoints/step-{stopped} at step {stopped}" in text

    reference = tmp_path / "reference"  # the same job without SLURM, at the job's thread count
    threads = re.search(r"launching OMP_NUM_THREADS=(\d+)", text).group(1)
    result = execute([sys.executable, "-m", "launcher", "launch", str(job_config), "--nproc-per-node", "2",
                      f"output_dir={reference}", "engine.kind=ddp", "train.epochs=4"], {"OMP_NUM_THREADS": threads})
    assert result.returncode == 0, result.stderr[-3000:]
    assert max_diff(reference / "final", tmp_path / "out" / f"job-{job}" / "final") == 0.0


@needs_cluster
def test_more_processes_than_granted_fail_fast_with_a_clear_message(job_config):
    job, log = submit(job_config, "--nproc-per-node", "4", "--cpus-per-task", "1", "--time", "00:05:00")
    state = wait_for_job(job, timeout=300)
    assert state["JobState"] == "FAILED"
    assert "--nproc-per-node 4 asks for more processes than the 1 CPUs SLURM granted" in open(log).read()


@needs_cluster
def test_two_nodes_train_as_one_world(job_config, tmp_path):
    nodes = subprocess.run(["sinfo", "-h", "-o", "%D"], capture_output=True, text=True).stdout.split()
    if sum(map(int, nodes)) < 2:
        skip_or_fail("the cluster has one node (start it with LOCAL_SLURM_NODES=2 slurm/local-cluster.sh start)")
    job, log = submit(job_config, "--nodes", "2", "--nproc-per-node", "1", "--time", "00:10:00", "engine.kind=ddp")
    state = wait_for_job(job)
    text = open(log).read()
    assert state["JobState"] == "COMPLETED", text[-3000:]
    assert state["NumNodes"] == "2" and text.count("dist-train: launching") == 2  # one launcher per node
    records = [json.loads(line) for line in (tmp_path / "out" / f"job-{job}" / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in records if r["split"] == "ranks"][0]["peak_memory_mb"]) == 2
    assert [r for r in records if r["split"] == "train"][-1]["examples_seen"] == 300
