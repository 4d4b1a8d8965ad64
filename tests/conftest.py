"""Shared fixtures: tiny models (2 layers, width 64), slices of the real data, and CLI runners."""

from __future__ import annotations

import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import yaml

from dist_train.config import load_config
from dist_train.run.trainer import train

ROOT = Path(__file__).resolve().parents[1]
SENTIMENT = ROOT / "data" / "sentiment"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_BERT = {
    "model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
    "intermediate_size": 128, "vocab_size": 30522, "max_position_embeddings": 128,
}

NO_DROPOUT = {**TINY_BERT, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def head(path: Path, n: int) -> str:
    """Header plus the first ``n`` rows of a TSV."""
    lines = path.read_text().splitlines(keepends=True)
    return "".join(lines[: n + 1])


@pytest.fixture
def sentiment_slice(tmp_path):
    """Small train / dev / test TSVs cut from the real sentiment data."""
    files = {}
    for split, n in (("train", 160), ("dev", 48), ("test", 37)):
        src = SENTIMENT / ("train.tsv" if split == "train" else f"{split}.tsv")
        files[split] = tmp_path / f"{split}.tsv"
        files[split].write_text(head(src, n))
    return files


def tiny_config(tmp_path: Path, files: dict, **sections) -> Path:
    """Write a config for a tiny random BERT with the MiniLM tokenizer; ``sections`` update the defaults."""
    cfg = {
        "output_dir": str(tmp_path / "out"),
        "model": {"config": dict(TINY_BERT), "tokenizer": "all-MiniLM-L6-v2"},
        "data": {"max_length": 32, "cache_dir": str(tmp_path / "cache"), **{k: str(v) for k, v in files.items()}},
        "train": {"epochs": 1, "micro_batch_size": 16, "eval_batch_size": 16, "lr": 1e-3},
        "logging": {"every_steps": 2, "progress_bar": False, "tensorboard": True},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300, stdin: str = "") -> subprocess.CompletedProcess:
    """Run the real console entry point in a fresh process (exit codes and stderr as a user sees them), with
    ``stdin`` piped in (empty by default: never the terminal of whoever runs the tests)."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, "-m", "launcher", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env, timeout=timeout, input=stdin)


def in_process(argv: list, capfd) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``dist-train ARGV`` run in this process (``capfd``: pytest's)."""
    from launcher.cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        code = exc.code
    captured = capfd.readouterr()
    return code, captured.out, captured.err


def bad_input_folder(tmp: Path, cfg: Path, files: dict[str, str]) -> Path:
    """``tmp/bad``: the bad-input ``files`` under ``data/`` and a copy of ``cfg`` whose output and cache go
    there too, so that a row can show it wrote nothing."""
    folder = tmp / "bad"
    (folder / "data").mkdir(parents=True)
    for name, text in files.items():
        (folder / "data" / name).write_text(text)
    (folder / "config.yaml").write_text(cfg.read_text().replace(str(tmp / "out"), str(folder / "out"))
                                        .replace(str(tmp / "cache"), str(folder / "cache")))
    return folder


def assert_one_line_in_process(argv: list, capfd, fragment: str, *untouched: Path) -> None:
    """``dist-train ARGV`` in this process exits 2 with one line holding ``fragment`` and no traceback, and
    every file under ``untouched`` is as it was."""
    before = snapshot(*untouched)
    code, _, stderr = in_process(argv, capfd)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("dist-train: error: ") and fragment in lines[0], lines[0]
    after = snapshot(*untouched)
    assert after == before, set(after) ^ set(before)


def worker_cmd(nproc: int, cfg, *overrides) -> list[str]:
    """`dist_train train` in one process (nproc 1, no launcher) or under real torchrun."""
    if nproc == 1:
        return [sys.executable, "-m", "dist_train", "train", str(cfg), *overrides]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--standalone",
            "-m", "dist_train", "train", str(cfg), *overrides]


def execute(cmd, env_extra=None, timeout=900) -> subprocess.CompletedProcess:
    """Run a multi-process job with 1 thread per rank (2 cores here) and DeepSpeed on CPU."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", **(env_extra or {})}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


_TRAINED: dict = {}
"""The session's training jobs, each run once: {(its module's folder, key): (output folder, completed process)}."""


def train_once(tmp: Path, key: str, nproc: int, cfg, *overrides, env=None, expect: bool | None = True,
               out: Path | None = None):
    """``dist_train train cfg`` on ``nproc`` processes once per session and (``tmp``, ``key``), into ``out``
    (default ``tmp/<key up to its first '/'>``: keys ``name/fail`` and ``name`` share a folder, a run and the
    run that continues it). ``expect``: True = it must succeed, False = it must fail, None = either.
    Returns (output folder, completed process)."""
    if (tmp, key) not in _TRAINED:
        out = out or tmp / key.split("/")[0]
        result = execute(worker_cmd(nproc, cfg, f"output_dir={out}", *overrides), env)
        if expect is not None:
            assert (result.returncode == 0) == expect, result.stderr[-4000:]
        _TRAINED[tmp, key] = out, result
    return _TRAINED[tmp, key]


def cached_run(tmp: Path, cfg: Path, runs: dict, name: str, *extra, env=None, key=None):
    """Run ``name`` of ``runs`` ({name: (processes, overrides)}) through ``train_once`` (key: ``key`` or
    ``name``); without ``env`` the run must succeed."""
    nproc, overrides = runs[name]
    return train_once(tmp, key or name, nproc, cfg, *overrides, *extra, env=env, expect=True if env is None else None)


def records(out: Path, split: str | None = None) -> list[dict]:
    """The records of a run's metrics.jsonl (those of one ``split``: train, validation, test, ranks)."""
    import json

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows if split is None else [r for r in rows if r["split"] == split]


def assert_same_evaluations(reference: Path, out: Path, scores) -> None:
    """Two runs validated at the same steps with the same ``scores(record)`` and losses within 1e-5 (a float
    sum whose order differs between ranks and batches), on validation and test."""
    import pytest

    for split in ("validation", "test"):
        ref, got = records(reference, split), records(out, split)
        assert [r["step"] for r in got] == [r["step"] for r in ref] and ref, split
        for a, b in zip(ref, got):
            assert scores(b) == scores(a), split
            assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)


def assert_resume_is_bit_exact(run, work, fail_at: int, resumed_at: int) -> None:
    """A run killed after step ``fail_at`` and resumed (from step ``resumed_at``) ends with the weights and the
    test report of the uninterrupted run ``run(work, "single")``."""
    reference, _ = run(work, "single")
    out, failed = run(work, "single", env={"DIST_TRAIN_FAIL_AT": f"0:{fail_at}"}, key="resumed/failed")
    assert failed.returncode != 0 and f"injected failure at step {fail_at}" in failed.stderr
    _, resumed = run(work, "single", "checkpoint.resume=auto", key="resumed/again")
    assert "resuming from" in resumed.stdout and f"at step {resumed_at}" in resumed.stdout, resumed.stdout
    assert max_diff(reference / "final", out / "final") == 0.0
    assert records(out, "test")[-1] == records(reference, "test")[-1]


def max_diff(a: Path, b: Path) -> float:
    """Largest absolute difference between the weights of two model folders (same tensor names)."""
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


_CRC: dict[tuple, int] = {}


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every path under ``roots`` (the datasets cache aside) with its size and checksum. A file is read
    again only when its inode, size, mtime or ctime changed (any write changes its ctime)."""
    found = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if "cache" in path.relative_to(root).parts[:1]:
                continue
            st = path.lstat() if path.is_symlink() else path.stat()  # (a link to itself has no target to stat)
            if path.is_symlink():
                found[str(path)] = ("link", os.readlink(path))
            elif path.is_file():
                key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                if key not in _CRC:
                    _CRC[key] = zlib.crc32(path.read_bytes())
                found[str(path)] = (st.st_size, _CRC[key])
            else:
                found[str(path)] = ("dir",)
    return found


def assert_user_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit 2, one line on stderr naming the problem, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def cue_rows(rng, n: int, flip: bool = False, labels=(0, 1), header: str = "sentence\tlabel") -> str:
    """A TSV where one cue word decides the label (``labels``: negative, positive): a tiny model learns it in a
    few steps. ``flip`` reverses the rule (validation then gets worse as training improves: the best step is
    an early one)."""
    good, bad = ["wonderful", "superb", "delightful"], ["awful", "boring", "terrible"]
    filler = "the movie plot acting story film scene cast director music".split()
    out = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = rng.sample(filler, 5) + [rng.choice(good if label else bad)]
        rng.shuffle(words)
        out.append(f"{' '.join(words)}\t{labels[1 - label if flip else label]}\n")
    return f"{header}\n" + "".join(out)


@pytest.fixture(scope="session")
def resume_work(tmp_path_factory):
    """The folder and configs of tests/resume_runs.py, one per session: test_resume and test_fsdp read the
    same uninterrupted runs."""
    from resume_runs import make_work

    return make_work(tmp_path_factory)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """One tiny sentiment run, shared by the output tests.

    Train is learnable (one cue word decides the label; 0/1 = negative/positive) and validation follows the
    opposite rule, so every bit learned makes validation worse: the best checkpoint is the first evaluation
    (step 5), never the last (step 20), and ``final/`` must be the best, not the last, weights. Measured
    validation accuracy at steps 5/10/15/20: 0.56 / 0.44 / 0.0 / 0.0. Test is a slice of the real test set.
    """
    import random

    rng = random.Random(0)
    tmp = tmp_path_factory.mktemp("run")
    files = {split: tmp / f"{split}.tsv" for split in ("train", "validation", "test")}
    files["train"].write_text(cue_rows(rng, 160))
    files["validation"].write_text(cue_rows(rng, 48, flip=True))
    files["test"].write_text(head(SENTIMENT / "test.tsv", 37))
    cfg_path = tiny_config(tmp, files, task={"label_names": ["negative", "positive"]},
                           train={"epochs": 2, "eval_every": 5, "lr": 3e-3},
                           checkpoint={"every_steps": 4, "keep_last_n": 1})
    cfg = load_config(cfg_path)
    reports = train(cfg).reports
    return tmp / "out", cfg, reports, files
