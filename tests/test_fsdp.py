"""FSDP2 (engine.kind=fsdp) in real processes: torchrun on gloo, tiny BERTs, one thread a rank.

The runs share test_resume's data, configs and once-per-session memo (150 examples, micro-batch 4, 2 epochs,
checkpoints every 4 steps; a run interrupted after step 10 resumes mid-epoch from step 8), so the DDP and
single-process runs both files compare against are trained once per session. Ten training jobs when this
file runs alone, eight when test_resume runs too.
"""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from conftest import NO_DROPOUT, TINY_BERT, assert_user_error, max_diff, records, run_cli
from resume_runs import EPOCHS, ROWS, assert_same_history, train_run, uninterrupted


@pytest.fixture
def work(resume_work):
    return resume_work


FSDP = ("engine.kind=fsdp",)
FAIL_AT_10 = {"DIST_TRAIN_FAIL_AT": "0:10"}

# One global batch of 8 examples split three ways (as test_distributed): name -> (processes, micro, accumulation,
# overrides). The world-2 run also keeps its shards on CPU (CPUOffloadPolicy): the same numbers.
SPLITS = {
    "single_m8": (1, 8, 1, ("engine.kind=single",)),
    "fsdp_w1_ga4_m2": (1, 2, 4, FSDP),
    "fsdp_w2_ga2_m2": (2, 2, 2, (*FSDP, "engine.fsdp.offload_params=true")),
}


def split_run(work, name):
    nproc, micro, accum, extra = SPLITS[name]
    # One epoch, plain shuffling (micro-batches of 2 then hold the same examples as one of 8), last weights
    # exported (not the best), a record every step.
    return train_run(work, f"split-{name}", nproc, "nodrop", "train.epochs=1", "data.group_by_length=false",
                     f"train.micro_batch_size={micro}", f"train.grad_accum={accum}", "logging.every_steps=1",
                     "checkpoint.load_best_at_end=false", *extra)[0]


def split(out, kind):
    return [r for r in records(out) if r["split"] == kind]


def last_weights(out) -> dict:
    """The weights of a run's last checkpoint (step 38), whatever engine wrote it. Not final/: that holds the
    best checkpoint's weights, here step 5's in every run, from before any interruption."""
    from dist_train.run.checkpoint import read_state
    from dist_train.engine import consolidated_state_dict

    folder = out / "checkpoints" / "step-38"
    return consolidated_state_dict(folder, read_state(folder)["engine"])


def weights_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# -- loss normalisation and evaluation -------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["fsdp_w1_ga4_m2", "fsdp_w2_ga2_m2"])
def test_same_parameters_however_the_global_batch_is_split(work, name):
    reference, out = split_run(work, "single_m8"), split_run(work, name)
    assert max_diff(reference / "final", out / "final") < 1e-5
    ref_loss, loss = [r["loss"] for r in split(reference, "train")], [r["loss"] for r in split(out, "train")]
    assert len(loss) == len(ref_loss) == 19  # 150 examples: 18 steps of 8 and a short one of 6
    assert loss == pytest.approx(ref_loss, abs=1e-5)


@pytest.mark.slow
def test_exact_eval_counts_and_sharded_state_at_world_2(work):
    reference, out = split_run(work, "single_m8"), split_run(work, "fsdp_w2_ga2_m2")
    assert split(out, "train")[-1]["examples_seen"] == ROWS
    # 40 validation examples in batches of 16: rank 1 pads its last batch with a weight-0 filler.
    for ref, got in zip(split(reference, "validation"), split(out, "validation"), strict=True):
        assert got["n"] == 40 and sum(map(sum, got["confusion_matrix"]["rows_true_cols_pred"])) == 40
        assert got["accuracy"] == ref["accuracy"] and got["loss"] == pytest.approx(ref["loss"], abs=1e-5)
    ranks = split(out, "ranks")[0]
    total = split(reference, "ranks")[0]["param_elements"][0]
    assert sum(ranks["param_elements"]) == total and max(ranks["param_elements"]) < 0.51 * total
    assert ranks["optimizer_state_elements"] == [2 * n for n in ranks["param_elements"]]  # Adam's two moments


# -- checkpoints -----------------------------------------------------------------------------------------
def full_run(work):
    return train_run(work, "fsdp-dropout-full", 2, "dropout", "train.grad_accum=1", *FSDP)[0]


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_run(work):
    full = full_run(work)
    _, failed = train_run(work, "fsdp-resumed/fail", 2, "dropout", "train.grad_accum=1", *FSDP, env=FAIL_AT_10,
                          expect_ok=False)
    assert failed.returncode != 0 and "injected failure at step 10" in failed.stderr
    out, resumed = train_run(work, "fsdp-resumed", 2, "dropout", "train.grad_accum=1", *FSDP,
                             "checkpoint.resume=auto")
    assert "step-8 at step 8 (epoch 0, batch 16 of 38)" in resumed.stdout
    assert sorted(p.name for p in (out / "checkpoints" / "step-38" / "dcp").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp"]  # each rank wrote its own shards
    assert weights_diff(last_weights(full), last_weights(out)) == 0.0  # dropout included: RNG states restored
    assert max_diff(full / "final", out / "final") == 0.0
    assert_same_history(full, out)


@pytest.mark.slow
def test_resume_at_world_1_then_back_at_world_2(work):
    """Same global batch (2 micro-batches a step) on 2, then 1, then 2 ranks: DCP re-cuts model and Adam
    shards at each load, and the run ends where the uninterrupted one does."""
    reference = uninterrupted(work, "single", "nodrop")
    train_run(work, "fsdp-worlds/fail", 2, "nodrop", "train.grad_accum=1", *FSDP, env=FAIL_AT_10, expect_ok=False)
    _, at_1 = train_run(work, "fsdp-worlds/w1", 1, "nodrop", "train.grad_accum=2", *FSDP, "checkpoint.resume=auto",
                        env={"DIST_TRAIN_FAIL_AT": "0:22"}, expect_ok=False)
    assert "world 2 x accumulation 1 -> world 1 x accumulation 2" in at_1.stdout
    assert "injected failure at step 22" in at_1.stderr
    # Back at world 2, gathered parameters kept from forward to backward this time (the same numbers).
    out, at_2 = train_run(work, "fsdp-worlds", 2, "nodrop", "train.grad_accum=1", *FSDP,
                          "engine.fsdp.reshard_after_forward=false", "checkpoint.resume=auto")
    assert "step-20 at step 20" in at_2.stdout and "world 1 x accumulation 2 -> world 2 x accumulation 1" in at_2.stdout
    assert weights_diff(last_weights(reference), last_weights(out)) < 1e-6
    train = split(out, "train")
    assert train[-1]["step"] == 38 and train[-1]["examples_seen"] == ROWS * EPOCHS


@pytest.mark.slow
def test_export_of_fsdp_shards_equals_export_from_ddp(work):
    tmp, _ = work
    exports = {}
    for name, run_dir in (("ddp", uninterrupted(work, "ddp")), ("fsdp", full_run(work))):
        exports[name] = tmp / f"export-fsdp-vs-{name}"
        result = run_cli("export", run_dir / "checkpoints" / "step-38", exports[name])
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stderr == ""
    assert max_diff(exports["ddp"], exports["fsdp"]) < 1e-5
    assert (exports["fsdp"] / "config.json").read_text() == (exports["ddp"] / "config.json").read_text()

    from transformers import pipeline

    classify = pipeline("text-classification", model=str(exports["fsdp"]), device="cpu")
    labels = json.loads((exports["fsdp"] / "config.json").read_text())["id2label"].values()
    assert {o["label"] for o in classify(["a moving, beautifully acted film", "dull and lifeless"])} <= set(labels)


# -- refusals --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, needles", [
    (("engine.kind=fsdp", "engine.deepspeed.zero_stage=3"), ("is an option of engine.kind=deepspeed", "fsdp always shards")),
    (("engine.kind=fsdp", "train.precision=fp16"), ("fp16 is not supported with engine.kind=fsdp", "bf16")),
    (("engine.kind=ddp", "engine.fsdp.reshard_after_forward=false"), ("is an option of engine.kind=fsdp, but engine.kind is ddp",)),
    (("engine.kind=ddp", "engine.offload_params=true"), ("offload_params needs engine.kind=fsdp",)),
])
def test_bad_fsdp_config_is_one_line(work, tmp_path, overrides, needles):
    _, configs = work
    result = run_cli("train", configs["dropout"], f"output_dir={tmp_path / 'out'}", *overrides)
    assert_user_error(result, *needles)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_only_on_fsdp(work):
    _, configs = work
    result = run_cli("train", configs["dropout"], f"output_dir={full_run(work)}", "checkpoint.resume=auto",
                     "train.grad_accum=1", "engine.kind=ddp")
    assert_user_error(result, "written by the dcp engine", "engine.kind it was trained with")


# -- weights-only loading, in this process -----------------------------------------------------------------
class Payload:
    """Unpickling this makes a folder: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP saving in one process, on purpose
def test_checkpoint_loading_runs_no_pickled_code(tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    from dist_train.engine.fsdp import DCP_DIR, FSDPEngine, _read, _write
    from dist_train.errors import UserError

    folder = tmp_path / "ckpt"
    _write(folder / DCP_DIR, {"model": {"w": torch.ones(3)}, "scheduler": {"last_epoch": 4}}, no_dist=True)
    assert FSDPEngine.consolidated_state_dict(folder)["w"].tolist() == [1.0, 1.0, 1.0]
    state = {"scheduler": {"last_epoch": 0}}
    _read(folder / DCP_DIR, state, no_dist=True)
    assert state["scheduler"]["last_epoch"] == 4  # non-tensor entries load (weights-only)

    # Read and write errors reach the CheckpointManager as themselves (DCP wraps them in a BaseException).
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the checkpoint folder should be")
    with pytest.raises(OSError):
        _write(blocked / DCP_DIR, {"model": {"w": torch.ones(3)}}, no_dist=True)
    torn = tmp_path / "torn"
    _write(torn, {"model": {"w": torch.ones(3)}}, no_dist=True)
    next(torn.glob("*.distcp")).unlink()
    with pytest.raises(FileNotFoundError):
        _read(torn, {"model": {"w": torch.zeros(3)}}, no_dist=True)

    # A non-tensor entry that runs code when unpickled (DCP itself would load it with weights_only=False).
    entry = tmp_path / "entry"
    _write(entry, {"scheduler": {"x": Payload(tmp_path / "from-entry")}}, no_dist=True)
    with pytest.raises(UserError, match="refused to load it"):
        _read(entry, {"scheduler": {"x": None}}, no_dist=True)
    assert not (tmp_path / "from-entry").exists()

    # A .metadata that runs code: DCP's own reader would run it (plain pickle); ours refuses.
    (folder / DCP_DIR / ".metadata").write_bytes(pickle.dumps(Payload(tmp_path / "from-metadata")))
    with pytest.raises(UserError, match="posix.mkdir is not part of DCP checkpoint metadata"):
        FSDPEngine.consolidated_state_dict(folder)
    assert not (tmp_path / "from-metadata").exists()
    with pytest.raises(AttributeError):  # the payload ran, then DCP found no Metadata
        FileSystemReader(folder / DCP_DIR).read_metadata()
    assert (tmp_path / "from-metadata").is_dir()


def test_units_are_the_blocks_and_tied_embeddings_stay_with_the_root():
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoModelForSequenceClassification, GPT2Config, \
        GPT2LMHeadModel

    from dist_train.engine.fsdp import shard_units

    def names(model):
        return [type(m).__name__ for m in shard_units(model)]

    bert = AutoConfig.for_model(**TINY_BERT)
    assert names(AutoModelForSequenceClassification.from_config(bert)) == ["BertLayer", "BertLayer", "BertEmbeddings"]
    # Masked LM: the word embeddings are the output projection too, so BertEmbeddings is no unit of its own.
    assert names(AutoModelForMaskedLM.from_config(AutoConfig.for_model(**NO_DROPOUT))) == ["BertLayer", "BertLayer"]
    assert names(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=100))) == ["GPT2Block"] * 2
