"""AdamW parameter groups and the LR schedule (the one place every engine takes its LR from)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from conftest import TINY_BERT
from dist_train.config import TrainConfig
from dist_train.optim import build_optimizer, build_scheduler, lr_factor, param_groups


def test_no_weight_decay_on_biases_and_norms():
    kwargs = dict(TINY_BERT)
    model = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(kwargs.pop("model_type"), **kwargs))
    decay, plain = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    undecayed = {names[id(p)] for p in plain["params"]}
    assert decay["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(not n.endswith("bias") and "LayerNorm" not in n for n in decayed)
    assert "bert.embeddings.LayerNorm.weight" in undecayed and "classifier.bias" in undecayed
    assert "classifier.weight" in decayed and "bert.embeddings.word_embeddings.weight" in decayed
    assert len(decayed) + len(undecayed) == len(list(model.parameters()))


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_schedule_warms_up_then_decays(kind):
    total, warmup = 100, 10
    f = [lr_factor(s, total, warmup, kind, 0.1) for s in range(total)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # linear warmup reaches the peak
    assert all(a <= b for a, b in zip(f[:10], f[1:10]))
    if kind == "constant":
        assert f[10:] == [1.0] * 90
    else:
        assert all(a >= b for a, b in zip(f[10:], f[11:]))
        assert f[-1] == pytest.approx(0.1 + 0.9 * (1 - 89 / 90) if kind == "linear"
                                      else 0.1 + 0.45 * (1 + math.cos(math.pi * 89 / 90)))


def test_scheduler_drives_the_optimizer_lr():
    model = torch.nn.Linear(4, 2)
    cfg = TrainConfig(lr=1e-3, warmup_steps=2, scheduler="linear")
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total_steps=4)
    seen = []
    for _ in range(4):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4])
