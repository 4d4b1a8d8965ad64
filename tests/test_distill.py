"""Distillation and students kept from a teacher's layers: each task's teacher loss against its formula;
``model.keep_layers`` copies exactly the layers it names (encoders and decoders) and exports the stock
architecture; a distilled run equals itself on 1 process x GA 2 and 2 ZeRO-3 processes, resumes bit-exact,
keeps the teacher out of its checkpoints, and learns the teacher's answers; bad input as one line.
"""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import (NO_DROPOUT, cached_run, cue_rows, execute, in_process, max_diff, records, snapshot, tiny_config,
                      worker_cmd)


# -- the teacher's loss, per task ---------------------------------------------------------------------------
def task_of(name: str):
    from dist_train.config import Config
    from dist_train.tasks import task_class

    cfg = Config()
    cfg.task.name = name
    return task_class(name)(cfg)


def test_each_task_s_teacher_loss_is_its_formula_summed_over_its_targets():
    g = torch.Generator().manual_seed(0)
    s, t, T = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g), 2.0
    out, teacher = SimpleNamespace(logits=s), SimpleNamespace(logits=t)
    p = torch.softmax(t / T, -1)
    kl = (p * (p.log() - torch.log_softmax(s / T, -1))).sum() * T * T  # KL(teacher || student), x T^2
    got = task_of("classification").soft_loss_sum(out, teacher, {}, T)
    assert got.item() == pytest.approx(kl.item(), rel=1e-6)
    # token classification: only the labelled pieces
    s3, t3 = torch.randn(2, 4, 3, generator=g), torch.randn(2, 4, 3, generator=g)
    labels = torch.tensor([[-100, 1, 0, -100], [2, -100, -100, -100]])
    mask = labels != -100
    p3 = torch.softmax(t3[mask] / T, -1)
    expected = (p3 * (p3.log() - torch.log_softmax(s3[mask] / T, -1))).sum() * T * T
    got = task_of("token_classification").soft_loss_sum(SimpleNamespace(logits=s3), SimpleNamespace(logits=t3),
                                                         {"labels": labels}, T)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    # multi-label: binary cross-entropy against the teacher's softened probabilities, x T^2
    q = torch.sigmoid(t / T)
    bce = -(q * F.logsigmoid(s / T) + (1 - q) * F.logsigmoid(-s / T)).sum() * T * T
    assert task_of("multi_label").soft_loss_sum(out, teacher, {}, T).item() == pytest.approx(bce.item(), rel=1e-5)
    # regression: squared distance to the teacher's number
    r_s, r_t = torch.randn(5, 1, generator=g), torch.randn(5, 1, generator=g)
    got = task_of("regression").soft_loss_sum(SimpleNamespace(logits=r_s), SimpleNamespace(logits=r_t), {}, T)
    assert got.item() == pytest.approx(((r_s - r_t) ** 2).sum().item(), rel=1e-6)
    # question answering: the mean of the start and end terms
    qa = task_of("question_answering")
    both = qa.soft_loss_sum(SimpleNamespace(start_logits=s, end_logits=t), SimpleNamespace(start_logits=t, end_logits=s),
                            {}, T)
    assert both.item() == pytest.approx((qa.soft_kl_sum(s, t, T) + qa.soft_kl_sum(t, s, T)).item() / 2, rel=1e-6)
    # the same distribution costs nothing
    assert task_of("classification").soft_loss_sum(teacher, teacher, {}, T).abs().item() < 1e-6


# -- students kept from the teacher's layers ----------------------------------------------------------------
def test_keep_layers_copies_exactly_the_named_layers(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from dist_train.model.assemble import keep_layers

    bert = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(
        "bert", vocab_size=100, hidden_size=32, num_hidden_layers=6, num_attention_heads=2, intermediate_size=64))
    teacher = {k: v.clone() for k, v in bert.state_dict().items()}
    assert keep_layers(bert, 2) == [0, 2, 4] and bert.config.num_hidden_layers == 3
    for new, old in enumerate([0, 2, 4]):
        for k, v in bert.bert.encoder.layer[new].state_dict().items():
            assert torch.equal(v, teacher[f"bert.encoder.layer.{old}.{k}"])
    assert torch.equal(bert.bert.embeddings.word_embeddings.weight, teacher["bert.embeddings.word_embeddings.weight"])
    bert.save_pretrained(tmp_path / "student")
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "student")
    assert len(again.bert.encoder.layer) == 3 and max_diff_models(again, bert) == 0.0
    # a decoder: the kept layers renumber their cache slots, and generation runs
    llama = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=64))
    assert keep_layers(llama, [0, 3]) == [0, 3] and llama.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in llama.model.layers] == [0, 1]
    out = llama.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def max_diff_models(a, b) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max((sa[k] - sb[k]).abs().max().item() for k in sa)


# -- a distilled run ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A 4-layer teacher trained on cue-word sentiment; the student config keeps its layers 0 and 2."""
    tmp = tmp_path_factory.mktemp("distill")
    rng = random.Random(0)
    files = {"train": tmp / "train.tsv", "validation": tmp / "validation.tsv", "test": tmp / "test.tsv"}
    for (split, path), n in zip(files.items(), (160, 40, 40)):
        path.write_text(cue_rows(rng, n))
    teacher_cfg = tiny_config(tmp, files, model={"config": {**NO_DROPOUT, "num_hidden_layers": 4},
                                                 "tokenizer": "all-MiniLM-L6-v2"},
                              task={"label_names": ["negative", "positive"]},
                              train={"epochs": 3, "micro_batch_size": 16, "lr": 3e-3},
                              logging={"every_steps": 5, "progress_bar": False, "tensorboard": False})
    teacher_out = tmp / "teacher"
    result = execute(worker_cmd(1, teacher_cfg, f"output_dir={teacher_out}"))
    assert result.returncode == 0, result.stderr[-3000:]
    (tmp / "s").mkdir()
    cfg = tiny_config(tmp / "s", files, model={"pretrained": str(teacher_out / "final"), "config": None,
                                              "tokenizer": None, "keep_layers": [0, 2]},
                      task={"label_names": ["negative", "positive"]},
                      distill={"teacher": str(teacher_out / "final"), "temperature": 2.0, "weight": 0.7},
                      train={"epochs": 2, "micro_batch_size": 16, "lr": 1e-3},
                      checkpoint={"every_steps": 4, "keep_last_n": 2, "load_best_at_end": False},
                      logging={"every_steps": 5, "progress_bar": False, "tensorboard": False})
    return tmp, cfg, teacher_out


RUNS = {"single": (1, ["engine.kind=single", "train.grad_accum=2", "train.micro_batch_size=8"]),
        "zero3": (2, ["engine.kind=deepspeed", "engine.deepspeed.zero_stage=3", "train.micro_batch_size=8"])}


def run(work, name: str, *extra, env=None, key=None):
    tmp, cfg, _ = work
    return cached_run(tmp, cfg, RUNS, name, *extra, env=env, key=key)



@pytest.mark.slow
def test_the_student_keeps_two_layers_learns_and_exports_the_stock_architecture(work):
    from transformers import AutoModelForSequenceClassification

    _, _, teacher = work
    out, result = run(work, "single")
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["architectures"] == ["BertForSequenceClassification"]
    model = AutoModelForSequenceClassification.from_pretrained(out / "final")
    assert len(model.bert.encoder.layer) == 2
    report = json.loads((out / "eval_report.json").read_text())
    assert report["accuracy"] > 0.9, report
    # the checkpoints hold the student alone: the same tensors as its export, nothing of the teacher
    from safetensors.torch import load_file

    exported = load_file(out / "final" / "model.safetensors")
    step = sorted((out / "checkpoints").glob("step-*"))[-1]
    saved = [p for p in step.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".pt", ".bin")]
    teacher_keys = set(load_file(teacher / "final" / "model.safetensors"))
    assert any("layer.3." in k for k in teacher_keys) and not any("layer.3." in k or "layer.2." in k for k in exported)
    total = sum(p.stat().st_size for p in saved)
    assert total < 4 * sum(v.numel() * 4 for v in exported.values()), (total, saved)  # weights + Adam moments


@pytest.mark.slow
def test_distillation_pulls_the_student_to_the_teacher(work):
    """weight 1 = the teacher alone: the student matches the teacher's probabilities more closely than a
    student of the same start trained on the labels alone (weight 0 - distill off)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tmp, _, teacher = work
    soft, _ = run(work, "single", "distill.weight=1.0", key="soft")
    hard, _ = run(work, "single", "distill.teacher=null", "distill.weight=0.5", "distill.temperature=2.0", key="hard")
    texts = [line.split("\t")[0] for line in (tmp / "test.tsv").read_text().splitlines()[1:]]
    tok = AutoTokenizer.from_pretrained(teacher / "final")
    enc = tok(texts, padding=True, return_tensors="pt")

    def probs(folder):
        with torch.no_grad():
            return torch.softmax(AutoModelForSequenceClassification.from_pretrained(folder).eval()(**enc).logits, -1)

    target = probs(teacher / "final")
    gap = {name: (probs(out / "final") - target).abs().mean().item() for name, out in (("soft", soft), ("hard", hard))}
    assert gap["soft"] < gap["hard"], gap


@pytest.mark.slow
def test_zero3_reports_what_one_process_reports(work):
    reference, _ = run(work, "single")
    out, _ = run(work, "zero3")
    assert max_diff(reference / "final", out / "final") < 1e-4
    for split in ("validation", "test"):
        ref, got = records(reference, split), records(out, split)
        assert ref and [r["accuracy"] for r in got] == [r["accuracy"] for r in ref]


@pytest.mark.slow
def test_resume_with_a_teacher_is_bit_exact(work):
    reference, _ = run(work, "single")
    out, failed = run(work, "single", env={"DIST_TRAIN_FAIL_AT": "0:10"}, key="resumed/failed")
    assert failed.returncode != 0 and "injected failure at step 10" in failed.stderr
    _, resumed = run(work, "single", "checkpoint.resume=auto", key="resumed/again")
    assert "at step 8" in resumed.stdout, resumed.stdout
    assert max_diff(reference / "final", out / "final") == 0.0
    assert records(out, "test")[-1] == records(reference, "test")[-1]


# -- bad input ------------------------------------------------------------------------------------------------
BAD = [
    ("teacher-missing", ["distill.teacher={t}/nope"], "distill.teacher: '"),
    ("teacher-other-labels", ["task.label_names=[bad,good]"],
     "predicts the labels ['negative', 'positive'], the student's data has ['bad', 'good']"),
    ("teacher-a-run-folder", ["distill.teacher={t}/teacher"], "is a run folder; give its model"),
    ("keep-too-many", ["model.keep_layers=[0,9]"], "model.keep_layers [0, 9]: model.pretrained has 4 layers"),
    ("keep-repeated", ["model.keep_layers=[1,1]"], "give distinct layer indices"),
    ("weight-above-1", ["distill.weight=1.5"], "distill.weight must be"),
    ("temperature-0", ["distill.temperature=0"], "distill.temperature must be"),
    ("temperature-without-teacher", ["distill.teacher=null", "distill.temperature=3"],
     "distill.temperature is set but distill.teacher is not"),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(work, case, capfd):
    tmp, cfg, _ = work
    _, overrides, fragment = case
    out = tmp / "bad-out"
    before = snapshot(tmp / "teacher")
    code, _, stderr = in_process(["train", cfg, f"output_dir={out}", *[o.format(t=tmp) for o in overrides]], capfd)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr
    assert fragment in lines[0], lines[0]
    assert not out.exists() and snapshot(tmp / "teacher") == before
