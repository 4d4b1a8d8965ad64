"""AdamW parameter groups and the LR schedule (the one place every engine takes its LR from)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from conftest import TINY_BERT
from dist_train.config import TrainConfig
from dist_train.run.optim import build_optimizer, build_scheduler, lr_factor, param_groups


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
    # Warmup 8 and floor 0.3: the first warmup factor (1/8) and the floor differ, so neither can stand in
    # for the other (with warmup 10 and floor 0.1 both are 0.1).
    total, warmup, floor = 100, 8, 0.3
    f = [lr_factor(s, total, warmup, kind, floor) for s in range(total)]
    assert f[0] == pytest.approx(1 / warmup) and abs(f[0] - floor) > 0.1  # warmup starts at 1/warmup, not the floor
    assert f[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])  # linear warmup...
    assert f[warmup - 1] == pytest.approx(1.0)  # ...reaches the peak
    assert all(a <= b for a, b in zip(f[:warmup], f[1:warmup]))
    if kind == "constant":
        assert f[warmup:] == [1.0] * (total - warmup)
    else:
        assert all(a >= b for a, b in zip(f[warmup:], f[warmup + 1:]))
        progress = (total - 1 - warmup) / (total - warmup)
        assert f[-1] == pytest.approx(floor + (1 - floor) * (1 - progress) if kind == "linear"
                                      else floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
        assert min(f[warmup:]) > floor  # the decay never goes below the floor...
        assert lr_factor(total, total, warmup, kind, floor) == pytest.approx(floor)  # ...and decays onto it


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
