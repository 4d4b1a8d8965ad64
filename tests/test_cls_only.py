"""[CLS]-only last layer: the stock model's logits, loss and gradients, for less work; stock exports."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForMaskedLM, AutoModelForSequenceClassification
from transformers import AutoModelForTokenClassification

from dist_train.model import cls_only
from dist_train.errors import UserError


def tiny(auto, impl="sdpa", dropout=0.1, **extra):
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("bert", hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=128, vocab_size=100, hidden_dropout_prob=dropout,
                               attention_probs_dropout_prob=dropout, attn_implementation=impl, **extra)
    return auto.from_config(cfg)


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 100, (4, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # padding: position 0 must not attend to it
    mask[3, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2, 1])}


@pytest.mark.parametrize("impl, dropout", [("sdpa", 0.0), ("sdpa", 0.1), ("eager", 0.1)])
def test_logits_loss_and_gradients_equal_the_stock_model(impl, dropout):
    stock = tiny(AutoModelForSequenceClassification, impl, dropout, num_labels=3)
    fast = copy.deepcopy(stock)
    assert cls_only.apply(fast, "auto")
    results = []
    for model in (stock, fast):
        model.train()
        torch.manual_seed(123)  # the same dropout stream for both
        out = model(**batch())
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.logits.detach(), out.loss.detach(), grads))
    (logits, loss, grads), (logits2, loss2, grads2) = results
    assert (logits - logits2).abs().max() < 1e-5 and (loss - loss2).abs() < 1e-5
    assert grads.keys() == grads2.keys() and len(grads) == len(list(stock.parameters()))
    assert max((grads[n] - grads2[n]).abs().max().item() for n in grads) < 1e-5
    # ... and it really is the shortcut: the last layer's output is position 0 only.
    hidden = fast.bert(input_ids=batch()["input_ids"]).last_hidden_state
    assert hidden.shape[1] == 1


def test_the_model_stays_stock_and_its_export_loads_plain(tmp_path):
    stock = tiny(AutoModelForSequenceClassification, num_labels=3)
    fast = copy.deepcopy(stock)
    cls_only.apply(fast, True)
    assert fast.state_dict().keys() == stock.state_dict().keys()
    fast.save_pretrained(tmp_path)
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    fast.eval()
    inputs = {k: v for k, v in batch().items() if k != "labels"}
    assert torch.allclose(plain(**inputs).logits, fast(**inputs).logits, atol=1e-6)


def test_auto_is_off_where_the_head_reads_other_positions():
    for model in (tiny(AutoModelForTokenClassification, num_labels=3), tiny(AutoModelForMaskedLM)):
        assert not cls_only.apply(model, "auto")
        with pytest.raises(UserError, match="set it to auto"):
            cls_only.apply(model, True)
    assert not cls_only.apply(tiny(AutoModelForSequenceClassification, num_labels=2), False)


def test_training_with_it_ends_where_the_stock_model_ends(sentiment_slice, tmp_path):
    """The whole loop (dropout on, 10 steps of AdamW): auto (on for this BERT classifier) and off end at the
    same weights and test metrics, up to float rounding of the smaller matmuls."""
    import json

    from conftest import max_diff, tiny_config
    from dist_train.config import load_config
    from dist_train.run.trainer import train

    files = {"train": sentiment_slice["train"], "validation": sentiment_slice["dev"], "test": sentiment_slice["test"]}
    cfg = tiny_config(tmp_path, files, train={"epochs": 1, "micro_batch_size": 16, "lr": 1e-3},
                      checkpoint={"load_best_at_end": False}, logging={"progress_bar": False, "tensorboard": False})
    from dist_train.model.assemble import build_model
    from dist_train.model.files import load_tokenizer

    def shortcut(setting):  # whether the model, as training builds it, has the [CLS]-only last layer
        model_cfg = load_config(cfg, [f"model.cls_only_last_layer={setting}"]).model
        model = build_model(model_cfg, AutoModelForSequenceClassification, load_tokenizer("all-MiniLM-L6-v2"), 32,
                            num_labels=2)
        return "forward" in vars(cls_only.last_layer(model))

    assert shortcut("auto") and not shortcut("false")
    outs = {}
    for setting in ("auto", "false"):
        outs[setting] = out = tmp_path / setting
        train(load_config(cfg, [f"output_dir={out}", f"model.cls_only_last_layer={setting}"]))
    assert max_diff(outs["auto"] / "final", outs["false"] / "final") < 1e-5
    reports = [json.loads((outs[s] / "eval_report.json").read_text()) for s in outs]
    assert reports[0]["n"] == reports[1]["n"] == 37
    assert reports[0]["loss"] == pytest.approx(reports[1]["loss"], abs=1e-5)
    assert reports[0]["accuracy"] == reports[1]["accuracy"]
