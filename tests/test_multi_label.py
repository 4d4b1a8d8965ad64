"""task.name=multi_label through everything: data (JSON lists, TSV cells), metrics against scikit-learn,
learning, world 2 with DDP and ZeRO-2, bit-exact resume, eval on the export, the transformers pipeline,
predict, and bad input.

No openly licensed multi-label corpus is at hand offline, so the data is built here: four labels, each
decided by its own cue word; a document has each label with probability 0.4 (none at all in about 1 of 8),
among 2-4 filler words. The tiny BERT reaches test f1_micro ~0.95 on it in 240 steps ("learn").

Every training run is a real process, run once per module (``_runs``): "learn" for learning and the
export, 40-step runs for the engines (world 1, DDP and ZeRO-2 at world 2) and for resuming.
"""

from __future__ import annotations

import json
import random
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import NO_DROPOUT, in_process, max_diff, snapshot, tiny_config, train_once
from dist_train.config import load_config
from dist_train.tasks import build_task

CUES = {"food": "pizza", "politics": "election", "sports": "football", "tech": "software"}
FILLER = "the a today people city week story report new local after many".split()
SPLITS = {"train": (240, 0), "validation": (40, 1), "test": (45, 2)}  # rows, seed


def documents(n: int, seed: int) -> list[tuple[str, list[str]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        labels = [label for label in CUES if rng.random() < 0.4]
        words = rng.sample(FILLER, rng.randint(2, 4)) + [CUES[label] for label in labels]
        rng.shuffle(words)
        out.append((" ".join(words), labels))
    return out


def write_jsonl(path: Path, docs) -> Path:
    path.write_text("".join(json.dumps({"text": text, "labels": labels}) + "\n" for text, labels in docs))
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The data (JSON lines, and train again as a TSV with '|'), bad files, and the run config."""
    tmp = tmp_path_factory.mktemp("multi_label")
    data = tmp / "data"
    data.mkdir()
    docs = {split: documents(n, seed) for split, (n, seed) in SPLITS.items()}
    files = {split: write_jsonl(data / f"{split}.jsonl", rows) for split, rows in docs.items()}
    (data / "train.tsv").write_text("text\tlabels\n" + "".join(f"{t}\t{'|'.join(ls)}\n" for t, ls in docs["train"]))
    write_jsonl(data / "unseen.jsonl", [("pizza today", ["food"]), ("rain today", ["weather"])])
    (data / "scalar.jsonl").write_text('{"text": "pizza", "labels": ["food"]}\n{"text": "vote", "labels": "politics"}\n')
    (data / "empty.jsonl").write_text('{"text": "pizza", "labels": ["food", " "]}\n')
    (data / "nolabels.jsonl").write_text('{"text": "pizza", "labels": []}\n{"text": "city", "labels": []}\n')
    cfg = tiny_config(tmp, files, model={"config": NO_DROPOUT, "tokenizer": "all-MiniLM-L6-v2"},
                      task={"name": "multi_label"},
                      data={"text_column": "text", "label_column": "labels", "max_length": 16},
                      # a constant 1e-3 learns this data steadily (4 train seeds: test f1_micro 0.90-0.98)
                      train={"epochs": 8, "micro_batch_size": 8, "lr": 1e-3, "scheduler": "constant"},
                      # final/ = the last weights, for the resume comparison
                      checkpoint={"every_steps": 10, "keep_last_n": 1, "every_epoch": False,
                                  "load_best_at_end": False},
                      logging={"every_steps": 10, "progress_bar": False, "tensorboard": False})
    return tmp, cfg


# The engines and resume are compared on 40 steps of two micro-batches of 4 (the same global batches at
# world 1 and 2); "learn" is the whole training, 240 steps.
SHORT = ["train.max_steps=40", "train.micro_batch_size=4"]
RUNS = {  # name: (processes, overrides)
    "learn": (1, ["engine.kind=single"]),
    "world1": (1, [*SHORT, "engine.kind=single", "train.grad_accum=2"]),
    "ddp": (2, [*SHORT, "engine.kind=ddp"]),
    "zero2": (2, [*SHORT, "engine.kind=deepspeed", "engine.deepspeed.zero_stage=2"]),
    "failed": (1, [*SHORT, "engine.kind=single", "train.grad_accum=2"]),
    "resumed": (1, [*SHORT, "engine.kind=single", "train.grad_accum=2", "checkpoint.resume=auto"]),
}


def run(work, name: str):
    """(output folder, completed process) of run ``name``, trained once (``train_once``)."""
    tmp, cfg = work
    nproc, overrides = RUNS[name]
    env = {"DIST_TRAIN_FAIL_AT": "0:25"} if name == "failed" else None
    return train_once(tmp, name, nproc, cfg, *overrides, env=env, expect=name != "failed",
                      out=tmp / ("resumed" if name == "failed" else name))  # the resumed run continues the failed one


def report_of(out: Path) -> dict:
    return json.loads((out / "eval_report.json").read_text())


# -- data and metrics, no training -----------------------------------------------------------------------
def test_tsv_with_a_separator_and_jsonl_lists_give_the_same_dataset(work):
    tmp, cfg_path = work
    prepared = []
    for train, sep in (("train.jsonl", None), ("train.tsv", "|")):
        cfg = load_config(cfg_path, [f"data.train={tmp / 'data' / train}", f"data.label_separator='{sep}'"
                                     if sep else "data.label_separator=null"])
        task = build_task(cfg)
        splits = task.prepare(task.load_tokenizer())
        prepared.append((task.labels, splits.train.select_columns(["input_ids", "labels"]).to_dict()))
    (labels_a, a), (labels_b, b) = prepared
    assert labels_a == labels_b and labels_a.names == sorted(CUES)
    assert a == b
    assert sum(map(sum, a["labels"])) > 0 and any(sum(row) == 0 for row in a["labels"])  # some have none


def test_an_int8_export_agrees_where_the_same_labels_pass_the_threshold(work):
    """deploy's int8 check asks the task whether two models predict alike: for multi-label, the same set of
    labels above task.threshold (not the same top label, which says nothing of the others)."""
    tmp, cfg_path = work
    task = build_task(load_config(cfg_path, ["task.threshold=0.5"]))
    want = torch.tensor([[2.0, -2.0, 0.5], [-1.0, -3.0, -0.2]])  # sets {0, 2} and {}
    got = torch.tensor([[1.5, -0.1, 0.1], [-0.4, -0.1, -2.0]])  # the same sets, other scores
    assert task.same_predictions(want, got, {}).tolist() == [True, True]
    got = torch.tensor([[3.0, -2.0, -0.1], [-1.0, 0.2, -0.2]])  # label 2 drops out; label 1 comes in
    assert task.same_predictions(want, got, {}).tolist() == [False, False]


def test_metrics_equal_scikit_learn_and_add_over_ranks(work):
    """Counts kept by two 'ranks' and summed give scikit-learn's numbers on the whole set of predictions;
    one label is never true nor predicted (scikit-learn's zero-division rule applies to it)."""
    from sklearn.metrics import accuracy_score, f1_score, hamming_loss, precision_recall_fscore_support
    from types import SimpleNamespace

    tmp, cfg_path = work
    task = build_task(load_config(cfg_path, ["task.threshold=0.3"]))
    task.labels = SimpleNamespace(num_labels=5, names=["a", "b", "c", "d", "never"])
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(101, 5, generator=gen) * 2
    truth = (torch.rand(101, 5, generator=gen) < 0.35).float()
    logits[:, 4], truth[:, 4] = -10.0, 0.0
    halves = [task.evaluator("cpu") for _ in range(2)]
    for evaluator, rows in zip(halves, (slice(0, 37), slice(37, None))):
        evaluator.update(SimpleNamespace(logits=logits[rows]), {"labels": truth[rows]})
    report = halves[0].compute(lambda t: halves[0].state + halves[1].state)

    y, pred = truth.numpy().astype(int), (torch.sigmoid(logits) > 0.3).numpy().astype(int)
    assert report["n"] == 101
    assert report["f1_micro"] == pytest.approx(f1_score(y, pred, average="micro"), abs=1e-12)
    assert report["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0), abs=1e-12)
    assert report["subset_accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)
    assert report["hamming_loss"] == pytest.approx(hamming_loss(y, pred), abs=1e-12)
    p, r, f, support = precision_recall_fscore_support(y, pred, zero_division=0)
    for i, name in enumerate(task.labels.names):
        assert report["per_label"][name] == pytest.approx(
            {"precision": p[i], "recall": r[i], "f1": f[i], "support": support[i], "predicted": pred[:, i].sum()})
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, truth)  # mean over examples x labels
    assert report["loss"] == pytest.approx(bce.item(), rel=1e-6)


def test_one_label_is_a_label_matrix_too(work):
    from sklearn.metrics import f1_score
    from types import SimpleNamespace

    task = build_task(load_config(work[1]))
    task.labels = SimpleNamespace(num_labels=1, names=["only"])
    evaluator = task.evaluator("cpu")
    evaluator.update(SimpleNamespace(logits=torch.tensor([[2.0], [-2.0], [2.0], [-2.0]])),
                     {"labels": torch.tensor([[1.0], [1.0], [0.0], [0.0]])})
    report = evaluator.compute(lambda t: t)
    assert report["f1_micro"] == report["f1_macro"] == f1_score([[1], [1], [0], [0]], [[1], [0], [1], [0]],
                                                                average="micro") == 0.5


# -- training --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_training_learns_the_cue_words(work):
    out, _ = run(work, "learn")
    report = report_of(out)
    assert report["n"] == SPLITS["test"][0]
    assert report["f1_micro"] > 0.85 and report["f1_macro"] > 0.85, report  # all labels always: 0.57
    assert report["hamming_loss"] < 0.1 and report["subset_accuracy"] > 0.5, report
    assert set(report["per_label"]) == set(CUES)
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"
    assert config["id2label"] == {str(i): name for i, name in enumerate(sorted(CUES))}
    assert json.loads((out / "final" / "labels.json").read_text())["values"] == sorted(CUES)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddp", "zero2"])
def test_world_2_reports_what_world_1_does(work, name):
    reference, out = report_of(run(work, "world1")[0]), report_of(run(work, name)[0])
    assert out["n"] == reference["n"] == SPLITS["test"][0]
    for key in ("f1_micro", "f1_macro", "subset_accuracy", "hamming_loss", "per_label"):
        assert out[key] == reference[key], key
    assert out["loss"] == pytest.approx(reference["loss"], abs=1e-5)
    assert max_diff(run(work, "world1")[0] / "final", run(work, name)[0] / "final") < 1e-4


@pytest.mark.slow
def test_resumed_run_equals_the_uninterrupted_one(work):
    full = run(work, "world1")[0]
    _, failed = run(work, "failed")
    assert "injected failure at step 25" in failed.stderr
    out, resumed = run(work, "resumed")
    assert "resuming from" in resumed.stdout and "step-20 at step 20" in resumed.stdout
    assert max_diff(full / "final", out / "final") == 0.0
    assert report_of(out) == report_of(full)


# -- the export ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_eval_on_the_export_reproduces_the_test_report(work, capfd):
    tmp, _ = work
    out = run(work, "learn")[0]
    code, stdout, stderr = in_process(["eval", str(out / "final"), "--data", str(tmp / "data" / "test.jsonl"),
                                       "--batch-size", "16"], capfd)
    assert code == 0, stderr
    report, reference = json.loads(stdout), report_of(out)
    assert report.pop("loss") == pytest.approx(reference.pop("loss"), abs=1e-6)
    assert report == reference


def test_the_transformers_pipeline_gives_every_label_its_sigmoid(work, capfd):
    from transformers import pipeline

    from dist_train.use.inference import ModelFolder, ModelInUse

    final = run(work, "learn")[0] / "final"
    texts = ["pizza election today", "the city week", "football software report"]
    scores = pipeline("text-classification", model=str(final), top_k=None)(texts)
    ours = ModelInUse(ModelFolder(str(final)), {}).predict(texts, None, 8)
    for result, prediction in zip(scores, ours):
        probability = {s["label"]: s["score"] for s in result}
        assert [probability[k] for k in sorted(CUES)] == pytest.approx(prediction["probabilities"], abs=1e-6)
        assert prediction["labels"] == sorted((k for k, p in probability.items() if p > 0.5),
                                              key=lambda k: -probability[k])
    # sigmoid, not softmax: two labels above one half, none for filler alone
    assert sorted(ours[0]["labels"]) == ["food", "politics"] and ours[1]["labels"] == []
    code, stdout, stderr = in_process(["predict", str(final), *texts], capfd)
    assert code == 0, stderr
    lines = stdout.splitlines()
    assert len(lines) == 3 and lines[1] == "-\tthe city week"
    first = dict(part.split(" ") for part in lines[0].split("\t")[0].split(", "))
    assert {k: float(p) for k, p in first.items()} == pytest.approx(
        dict(zip(ours[0]["labels"], ours[0]["label_probabilities"])), abs=1e-4)


def test_predict_file_writes_every_probability(work, capfd):
    tmp, _ = work
    final = run(work, "learn")[0] / "final"
    preds = tmp / "preds.tsv"
    code, stdout, stderr = in_process(["predict", str(final), "--file", str(tmp / "data" / "test.jsonl"),
                                       "--output", str(preds)], capfd)
    assert code == 0, stderr
    header, *rows = [line.split("\t") for line in preds.read_text().splitlines()]
    assert header == ["text", "labels", *(f"p_{label}" for label in sorted(CUES))]
    assert len(rows) == SPLITS["test"][0]
    for row in rows:
        probs = dict(zip(sorted(CUES), map(float, row[2:])))
        assert set(filter(None, row[1].split("|"))) == {k for k, p in probs.items() if p > 0.5}


# -- bad input -------------------------------------------------------------------------------------------
BAD = {  # id: (argv after the command, with {d}: the data folder, {cfg}, {final}; what the one line says)
    "unseen-validation-label": ("train {cfg} data.validation={d}/unseen.jsonl",
                                "'{d}/unseen.jsonl': line 2: label 'weather' never appears in the training data"),
    "unseen-label-in-eval": ("eval {final} --data {d}/unseen.jsonl", "line 2: label 'weather' never appears"),
    "jsonl-label-not-a-list": ("train {cfg} data.train={d}/scalar.jsonl",
                               "'{d}/scalar.jsonl': line 2: label 'politics' is not a list"),
    "empty-label": ("train {cfg} data.train={d}/empty.jsonl", "'{d}/empty.jsonl': line 1: an empty label"),
    "no-label-at-all": ("train {cfg} data.train={d}/nolabels.jsonl", "no row has a label"),
    "lists-for-one-label-task": ("train {cfg} task.name=classification",
                                 "is a list; this task reads one label per row; for any number of labels per "
                                 "row use task.name=multi_label"),
    "tsv-without-separator": ("train {cfg} data.train={d}/train.tsv", "set data.label_separator"),
    "empty-separator": ("train {cfg} data.label_separator=|", "data.label_separator is empty"),
    "threshold-0": ("train {cfg} task.threshold=0", "task.threshold must be in (0, 1), got 0"),
    "threshold-1": ("train {cfg} task.threshold=1", "task.threshold must be in (0, 1), got 1"),
    "threshold-negative": ("train {cfg} task.threshold=-0.5", "task.threshold must be in (0, 1)"),
    "metric-of-another-task": ("train {cfg} checkpoint.metric=accuracy", "'accuracy' is not a multi_label metric"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(work, case, capfd):
    tmp, cfg = work
    final = run(work, "learn")[0] / "final"
    names = {"d": tmp / "data", "cfg": cfg, "final": final}
    argv, fragment = BAD[case]
    before = snapshot(tmp)
    code, _, stderr = in_process([a.format(**names) for a in shlex.split(argv)], capfd)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr
    assert fragment.format(**names) in lines[0], lines[0]
    assert snapshot(tmp) == before


def test_report_values_are_exact_counts():
    """Per-label counts stay integers through the float64 all-reduce (``round`` before use)."""
    from dist_train.tasks.multi_label import multi_label_report

    counts = [np.array(c) for c in ([3, 0], [1, 0], [0, 2], [6, 8])]
    report = multi_label_report(*counts, exact=7, n=10, loss_sum=2.0, names=["x", "y"], threshold=0.5)
    assert report["per_label"]["x"] == {"precision": 0.75, "recall": 1.0, "f1": 6 / 7, "support": 3, "predicted": 4}
    assert report["per_label"]["y"]["f1"] == 0.0 and report["hamming_loss"] == 3 / 20 and report["loss"] == 0.1
    nothing = np.zeros(2, dtype=int)  # no label true or predicted anywhere: scikit-learn's zero division
    report = multi_label_report(nothing, nothing, nothing, np.array([4, 4]), exact=4, n=4, loss_sum=0.4,
                                names=["x", "y"], threshold=0.5)
    assert report["f1_micro"] == report["f1_macro"] == 0.0 and report["subset_accuracy"] == 1.0
