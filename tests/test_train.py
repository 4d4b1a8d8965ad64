"""The training loop end to end on tiny models: outputs, determinism, accumulation, learning, eval counts."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_BERT, assert_user_error, cue_rows, run_cli, tiny_config
from dist_train.config import load_config
from dist_train.errors import UserError
from dist_train.run.trainer import train

NO_DROPOUT = {**TINY_BERT, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def run(cfg_path, *overrides):
    cfg = load_config(cfg_path, list(overrides))
    return cfg, train(cfg).reports


def test_run_writes_every_output(trained):
    out, cfg, reports, _ = trained
    assert (out / "config.yaml").is_file() and load_config(out / "config.yaml") == cfg
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    splits = {r["split"] for r in records}
    assert splits == {"train", "validation", "test", "ranks"}
    train_records = [r for r in records if r["split"] == "train"]
    assert all(r["examples_per_s"] > 0 and r["tokens_per_s"] > 0 for r in train_records)
    assert [r["step"] for r in records if r["split"] == "validation"] == [5, 10, 15, 20]
    assert any((out / "tb").iterdir())
    report = json.loads((out / "eval_report.json").read_text())
    assert report == reports["test"]
    assert report["confusion_matrix"]["labels"] == ["negative", "positive"]


def best_and_validation(out):
    """The run's best step (from the last checkpoint's state) and the validation accuracy at each step."""
    state = json.loads((out / "checkpoints" / "step-20" / "trainer_state.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return state["best_step"], {r["step"]: r["accuracy"] for r in records if r["split"] == "validation"}


def test_checkpoints_rotate_and_keep_the_best(trained):
    out, _, _, _ = trained
    ckpts = out / "checkpoints"
    steps = sorted(int(p.name.split("-")[1]) for p in ckpts.glob("step-*"))
    best, accuracy = best_and_validation(out)
    # The fixture's validation gets worse as training learns, so the best is never the last step: were it
    # step 20, "keep the best" and "keep the newest" would be the same checkpoint and prove nothing.
    assert best != 20, accuracy
    assert best == min(accuracy, key=lambda s: (-accuracy[s], s))  # the highest accuracy (first of ties)
    assert accuracy[best] > accuracy[20], accuracy
    assert steps[-1] == 20 and set(steps) == {best, 20}  # keep_last_n=1 plus the best
    assert (ckpts / "latest").read_text() == "step-20"
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"):
        assert (ckpts / "step-20" / name).is_file()
        assert (ckpts / f"step-{best}" / name).is_file()
    optim = torch.load(ckpts / "step-20" / "optimizer.pt", weights_only=True)
    assert optim["state"]  # real Adam moments, loadable without pickle code
    assert not list(ckpts.glob(".tmp-*"))


def test_final_is_the_best_checkpoint_and_loads_in_a_pipeline(trained):
    out, _, _, _ = trained
    from transformers import AutoModelForSequenceClassification, pipeline

    best_step, _ = best_and_validation(out)
    assert best_step != 20
    final = weights(out / "final")
    best, last = weights(out / "checkpoints" / f"step-{best_step}"), weights(out / "checkpoints" / "step-20")
    assert final.keys() == best.keys() == last.keys()
    assert all(torch.equal(final[k], best[k]) for k in final)  # final/ is the best checkpoint...
    assert max((final[k] - last[k]).abs().max().item() for k in final) > 1e-3  # ...not the last one
    model = AutoModelForSequenceClassification.from_pretrained(out / "final")
    assert model.config.id2label == {0: "negative", 1: "positive"}
    clf = pipeline("text-classification", model=str(out / "final"))
    preds = clf(["I really enjoyed this film.", "Dreadful."])
    assert len(preds) == 2 and all(p["label"] in ("negative", "positive") for p in preds)


def test_eval_counts_every_example_exactly_once(trained):
    _, _, reports, _ = trained
    test = reports["test"]
    assert test["n"] == 37  # 37 rows, eval batches of 16: no padding duplicates, none dropped
    cm = test["confusion_matrix"]["rows_true_cols_pred"]
    assert sum(map(sum, cm)) == 37
    assert sum(c["support"] for c in test["per_class"].values()) == 37
    assert reports["validation"]["n"] == 48


def test_same_seed_gives_identical_weights(tmp_path, sentiment_slice):
    data = {"train": sentiment_slice["train"]}
    finals = []
    for name in ("a", "b"):
        cfg = tiny_config(tmp_path, data, output_dir=str(tmp_path / name), train={"max_steps": 6})
        run(cfg)
        finals.append(weights(tmp_path / name / "final"))
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])
    cfg = tiny_config(tmp_path, data, output_dir=str(tmp_path / "c"), train={"max_steps": 6, "seed": 7})
    run(cfg)
    other = weights(tmp_path / "c" / "final")
    assert not all(torch.equal(finals[0][k], other[k]) for k in other)


def test_accumulation_equals_one_big_batch(tmp_path, sentiment_slice):
    """GA 4 x micro 2 and GA 1 x micro 8 take the same 8 examples per step (uneven lengths, padding)
    and must produce the same parameters: the loss is the mean over the global batch, not of micro means."""
    data = {"train": sentiment_slice["train"]}
    results = {}
    for name, micro, ga in (("ga4", 2, 4), ("ga1", 8, 1)):
        cfg = tiny_config(tmp_path, data, output_dir=str(tmp_path / name),
                          model={"config": NO_DROPOUT, "tokenizer": "all-MiniLM-L6-v2"},
                          data={"group_by_length": False, "max_length": 48},
                          train={"max_steps": 5, "micro_batch_size": micro, "grad_accum": ga})
        run(cfg)
        results[name] = weights(tmp_path / name / "final")
    a, b = results["ga4"], results["ga1"]
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff < 1e-5, diff
    first = next(k for k in a if "classifier" in k)
    assert not torch.equal(a[first], weights_init(tmp_path)[first])


def weights_init(tmp_path):
    """The tiny model's initial weights under the default seed (to show training moved them)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from dist_train.run.trainer import seed_everything

    seed_everything(42)
    kwargs = dict(NO_DROPOUT)
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs, num_labels=2)
    return AutoModelForSequenceClassification.from_config(config).state_dict()


def test_loss_falls_on_a_learnable_task(tmp_path):
    """String labels, a signal a tiny model can learn: loss must fall and test accuracy must be high."""
    rng = random.Random(0)

    def rows(n):
        return cue_rows(rng, n, labels=("no", "yes"), header="text\tverdict")

    (tmp_path / "train.tsv").write_text(rows(256))
    (tmp_path / "test.tsv").write_text(rows(64))
    cfg = tiny_config(tmp_path, {"train": tmp_path / "train.tsv", "test": tmp_path / "test.tsv"},
                      data={"text_column": "text", "label_column": "verdict"},
                      train={"epochs": 4, "lr": 3e-3})
    _, reports = run(cfg)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
              if '"train"' in line]
    assert losses[-1] < 0.5 * losses[0], losses
    assert reports["test"]["accuracy"] >= 0.9
    assert json.loads((tmp_path / "out" / "final" / "labels.json").read_text())["values"] == ["no", "yes"]


def test_bf16_autocast_trains_on_cpu(tmp_path, sentiment_slice):
    """bf16 autocast against an fp32 twin (same config, 3 steps, no dropout): the losses differ from the
    first forward on (bf16 really ran; fp32 runs are bitwise repeatable, see the same-seed test), yet the
    update is the same one and the master weights stay fp32."""
    finals, losses = {}, {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        cfg = tiny_config(tmp_path, {"train": sentiment_slice["train"]}, output_dir=str(out),
                          model={"config": NO_DROPOUT, "tokenizer": "all-MiniLM-L6-v2"},
                          train={"max_steps": 3, "precision": precision}, logging={"every_steps": 1})
        run(cfg)
        finals[precision] = weights(out / "final")
        losses[precision] = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                             if r["split"] == "train"]
    fp32, bf16 = finals["fp32"], finals["bf16"]
    assert all(t.dtype == torch.float32 for t in bf16.values())  # master weights stay fp32
    assert len(losses["bf16"]) == len(losses["fp32"]) == 3
    assert losses["bf16"][0] != losses["fp32"][0], losses  # step 1 is the untrained model: only precision differs
    assert losses["bf16"] == pytest.approx(losses["fp32"], abs=1e-3), losses  # measured: |diff| <= 2.4e-5
    # Close weights, judged against how far training moved them (3 steps at lr 1e-3 move each weight by at
    # most ~2.5e-3, so an absolute tolerance would say little). Measured: |bf16 - fp32| = 0.052 x |fp32 - init|
    # (L2 over all weights); fp16 autocast in bf16's place gives 0.37.
    init = weights_init(tmp_path)
    flat = lambda w: torch.cat([w[k].flatten() for k in sorted(init)])  # noqa: E731
    moved, apart = flat(fp32) - flat(init), flat(bf16) - flat(fp32)
    assert 0 < moved.abs().max().item() < 1e-2  # the init really is this run's init, and training moved it
    assert apart.norm().item() < 0.15 * moved.norm().item(), (apart.norm().item(), moved.norm().item())
    assert apart.abs().max().item() < 1e-2  # measured 2.7e-3: no single weight strays either


@pytest.mark.skipif(torch.cuda.is_available(), reason="about CPU-only machines: with CUDA, fp16 is valid")
def test_fp16_on_cpu_is_a_clear_error(tmp_path, sentiment_slice):
    cfg = tiny_config(tmp_path, {"train": sentiment_slice["train"]}, train={"precision": "fp16"})
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        run(cfg)


def test_existing_run_is_never_overwritten_by_accident(tmp_path, sentiment_slice):
    cfg = tiny_config(tmp_path, {"train": sentiment_slice["train"]}, train={"max_steps": 2})
    run(cfg)
    before = (tmp_path / "out" / "final" / "model.safetensors").read_bytes()
    result = run_cli("train", cfg)
    assert_user_error(result, "already holds a run", "overwrite=true")
    assert (tmp_path / "out" / "final" / "model.safetensors").read_bytes() == before


def test_bad_data_stops_before_writing_anything(tmp_path, sentiment_slice):
    bad = tmp_path / "bad.tsv"
    bad.write_text("review\tlabel\ngood\t1\n")
    cfg = tiny_config(tmp_path, {"train": bad})
    assert_user_error(run_cli("train", cfg), "no column 'sentence'", "columns found: review, label")
    assert not (tmp_path / "out").exists()


def test_unknown_checkpoint_metric_fails_before_training(tmp_path, sentiment_slice):
    cfg = tiny_config(tmp_path, {"train": sentiment_slice["train"]}, checkpoint={"metric": "acc"})
    with pytest.raises(UserError, match="checkpoint.metric 'acc' is not a classification metric; choose one of: accuracy, f1_macro"):
        run(cfg)
    assert not (tmp_path / "out").exists()
