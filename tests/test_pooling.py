"""task.pooling: mean pooling is the masked mean of the last layer through the model's own classifier, it
survives the export (dist-train evaluate rebuilds it), and ``auto`` follows a sentence-transformers config."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from conftest import tiny_config
from dist_train.model import pooling
from dist_train.config import load_config
from dist_train.use.inference import ModelFolder, ModelInUse
from dist_train.run.trainer import train


def tiny_classifier():
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("bert", hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=128, vocab_size=100, num_labels=3)
    return AutoModelForSequenceClassification.from_config(cfg).eval()


def test_mean_pooling_is_the_masked_mean_through_the_classifier_and_ignores_padding():
    stock = tiny_classifier()
    model = copy.deepcopy(stock)
    pooling.apply(model, "mean")
    assert model.state_dict().keys() == stock.state_dict().keys()  # the stock architecture: exports unchanged
    ids = torch.randint(5, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        hidden = stock.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        expected = stock.classifier(torch.stack([hidden[0].mean(0), hidden[1, :4].mean(0)]))
        alone = model(input_ids=ids[1:, :4], attention_mask=mask[1:, :4]).logits
        cls = stock(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(logits, expected, atol=1e-6)
    assert torch.allclose(logits[1:], alone, atol=1e-5)  # padded in a batch or alone: the same row
    assert not torch.allclose(logits, cls, atol=1e-3)  # and not what the [CLS] pooler gives


def test_auto_reads_the_sentence_transformers_pooling_config(tmp_path):
    assert pooling.resolve("auto", "all-MiniLM-L6-v2") == "mean"  # its 1_Pooling/config.json: mean tokens
    tiny_classifier().save_pretrained(tmp_path)
    assert pooling.resolve("auto", str(tmp_path)) == "cls"  # no pooling config: the model's own head
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert pooling.resolve("auto", str(tmp_path)) == "cls"
    assert pooling.resolve("cls", "all-MiniLM-L6-v2") == "cls" and pooling.resolve("mean", None) == "mean"


@pytest.mark.slow
def test_a_mean_pooled_export_evaluates_as_it_trained(tmp_path, sentiment_slice):
    files = {"train": sentiment_slice["train"], "validation": sentiment_slice["dev"], "test": sentiment_slice["test"]}
    cfg = load_config(tiny_config(tmp_path, files, task={"pooling": "mean"}, train={"epochs": 2}))
    reports = train(cfg).reports
    final = tmp_path / "out" / "final"
    assert json.loads((final / "dist_train.json").read_text())["pooling"] == "mean"
    again = ModelInUse(ModelFolder(str(final)), {}).evaluate(str(sentiment_slice["test"]), 16)
    assert again["accuracy"] == reports["test"]["accuracy"]
    assert abs(again["loss"] - reports["test"]["loss"]) < 1e-5
    # The limit the docs state: transformers alone reads [CLS] through the pooler, so other logits.
    used = ModelInUse(ModelFolder(str(final)), {})
    batch = used.task.tokenizer(["a fine film", "dull"], padding=True, return_tensors="pt")
    plain = AutoModelForSequenceClassification.from_pretrained(final).eval()
    with torch.no_grad():
        assert not torch.allclose(plain(**batch).logits, used.engine.model(**batch).logits, atol=1e-4)
