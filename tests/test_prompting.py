"""Classification by prompting a causal LM (``dist-train zero-shot`` on a classification config): the label
word most likely after the template, raw and with contextual calibration, checked against the same numbers
computed by hand from the model's logits."""

from __future__ import annotations

import json
import random

import pytest
import torch
import yaml
from conftest import cue_rows, run_cli

from dist_train.data.new_tokenizer import train_tokenizer

TEMPLATE = "Review: {source}\nSentiment:"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from transformers import AutoModelForCausalLM, LlamaConfig

    tmp = tmp_path_factory.mktemp("prompting")
    rng = random.Random(0)
    for split, n in (("train", 40), ("test", 30)):
        (tmp / f"{split}.tsv").write_text(cue_rows(rng, n))
    texts = [line.split("\t")[0] for line in (tmp / "train.tsv").read_text().splitlines()[1:]]
    tok = train_tokenizer(texts + ["Review: Sentiment: negative positive"] * 20, "bpe", 350, tmp / "llama")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp / "llama")
    cfg = {"output_dir": str(tmp / "out"), "model": {"pretrained": str(tmp / "llama")},
           "data": {"train": str(tmp / "train.tsv"), "test": str(tmp / "test.tsv"), "cache_dir": str(tmp / "cache")},
           "task": {"name": "classification", "template": TEMPLATE, "label_words": ["negative", "positive"]},
           "train": {"eval_batch_size": 7}}
    (tmp / "config.yaml").write_text(yaml.safe_dump(cfg))
    return tmp


@pytest.mark.slow
def test_zero_shot_classification_equals_the_label_word_logits_by_hand(work):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = run_cli("zero-shot", work / "config.yaml", "--output", work / "report.json")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((work / "report.json").read_text())

    model = AutoModelForCausalLM.from_pretrained(work / "llama").eval()
    tok = AutoTokenizer.from_pretrained(work / "llama")
    rows = [line.split("\t") for line in (work / "test.tsv").read_text().splitlines()[1:]]
    prompt = TEMPLATE.replace("{source}", "x")
    word_ids = [tok(f"{prompt} {w}")["input_ids"][len(tok(prompt)["input_ids"])] for w in ("negative", "positive")]

    def scores(text):  # one prompt at a time: no padding
        with torch.no_grad():
            logits = model(**tok(TEMPLATE.replace("{source}", text), return_tensors="pt")).logits[0, -1]
        return torch.log_softmax(logits.float(), -1)[word_ids]

    raw = torch.stack([scores(text) for text, _ in rows])
    free = torch.stack([scores(t) for t in ("N/A", "", "[MASK]")]).exp()
    prior = (free / free.sum(1, keepdim=True)).mean(0)
    gold = torch.tensor([int(label) for _, label in rows])
    assert report["n"] == 30
    assert report["accuracy"] == pytest.approx((raw.argmax(1) == gold).double().mean().item())
    assert report["calibrated"]["accuracy"] == pytest.approx(((raw - prior.log()).argmax(1) == gold).double().mean().item())
    assert list(report["content_free_probabilities"].values()) == pytest.approx(prior.tolist(), abs=1e-5)
    assert sum(report["predicted_share"].values()) == pytest.approx(1.0)


def test_zero_shot_classification_needs_one_word_per_label(work):
    result = run_cli("zero-shot", work / "config.yaml", "task.label_words=[bad,good,meh]")
    assert result.returncode == 2 and "3 words for 2 labels" in result.stderr, result.stderr
