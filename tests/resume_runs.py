"""The runs that tests/test_resume.py and tests/test_fsdp.py share: a sentiment slice, two tiny configs (with
and without dropout) and the uninterrupted runs both compare against (trained once per session through
``conftest.train_once``; the ``resume_work`` fixture in conftest holds the folder)."""

from __future__ import annotations

import pytest
from conftest import NO_DROPOUT, SENTIMENT, TINY_BERT, head, records, tiny_config, train_once

ROWS, EPOCHS = 150, 2  # micro-batch 4: 38 batches an epoch (the last one short)
ENGINES = {  # name: (processes, grad accum, overrides); all take 2 micro-batches per optimizer step
    "single": (1, 2, ["engine.kind=single"]),
    "ddp": (2, 1, ["engine.kind=ddp"]),
    "zero2": (2, 1, ["engine.kind=deepspeed", "engine.deepspeed.zero_stage=2"]),
    "zero3": (2, 1, ["engine.kind=deepspeed", "engine.deepspeed.zero_stage=3"]),
}


def make_work(tmp_path_factory):
    """(folder, {"dropout": config, "nodrop": config})."""
    tmp = tmp_path_factory.mktemp("resume")
    (tmp / "train.tsv").write_text(head(SENTIMENT / "train.tsv", ROWS))
    (tmp / "dev.tsv").write_text(head(SENTIMENT / "dev.tsv", 40))
    configs = {}
    for name, model in (("dropout", TINY_BERT), ("nodrop", NO_DROPOUT)):
        path = tiny_config(tmp, {"train": tmp / "train.tsv", "validation": tmp / "dev.tsv"},
                           model={"config": model, "tokenizer": "all-MiniLM-L6-v2"},
                           data={"max_length": 48},
                           train={"epochs": EPOCHS, "micro_batch_size": 4, "eval_every": 5, "lr": 1e-3},
                           # final/ = the last weights: best-at-end would export step 5, before any interruption
                           checkpoint={"every_steps": 4, "keep_last_n": 2, "load_best_at_end": False},
                           logging={"every_steps": 3, "progress_bar": False, "tensorboard": False})
        configs[name] = tmp / f"{name}.yaml"
        configs[name].write_text(path.read_text())
    return tmp, configs


def train_run(work, key, nproc, cfg_name, *overrides, env=None, expect_ok=True):
    """Run once (``train_once``, by ``key``); returns (output dir, completed process)."""
    tmp, configs = work
    return train_once(tmp, key, nproc, configs[cfg_name], *overrides, env=env, expect=True if expect_ok else None)


def uninterrupted(work, engine, cfg_name="dropout"):
    nproc, ga, extra = ENGINES[engine]
    return train_run(work, f"{engine}-{cfg_name}-full", nproc, cfg_name, f"train.grad_accum={ga}", *extra)[0]


def assert_same_history(full, resumed):
    """Same records at the same steps; losses equal up to float64 summation order of the log sums."""
    a, b = records(full), records(resumed)
    assert [(r["split"], r["step"]) for r in a] == [(r["split"], r["step"]) for r in b]
    for ra, rb in zip(a, b):
        if "loss" in ra:
            assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-12, abs=1e-12), (ra, rb)
        if "examples_seen" in ra:
            assert rb["examples_seen"] == ra["examples_seen"]
