"""LoRA (``model.lora``, through peft): what trains, what a checkpoint holds, bit-exact resume (one process,
DDP and DeepSpeed ZeRO-2 at world 2), the merged ``final/`` and ``dist-train export`` (merged, ``--adapter-only``), causal LM, and
config errors. The pretrained bases are tiny random models saved into a temp folder (LoRA needs a base to
freeze); one cue word decides the label, so the adapters have something to learn.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
import yaml
from conftest import (ROOT, SENTIMENT, TINY_BERT, assert_user_error, cue_rows, head, max_diff, run_cli, tiny_config,
                      train_once)
from safetensors.torch import load_file

from dist_train.config import load_config

ROWS = 160  # micro-batch 8, 2 micro-batches a step: 10 steps an epoch, 20 in all
LORA = {"r": 4, "alpha": 8, "dropout": 0.1}  # dropout on: a resume must restore the RNG too
TINY_DISTILBERT = {"model_type": "distilbert", "dim": 64, "n_layers": 2, "n_heads": 2, "hidden_dim": 128,
                   "vocab_size": 30522, "max_position_embeddings": 128}
ENGINES = {"single": (1, ["engine.kind=single", "train.grad_accum=2"]), "ddp": (2, ["engine.kind=ddp"]),
           "zero2": (2, ["engine.kind=deepspeed", "engine.deepspeed.zero_stage=2"])}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Data files, and tiny random BERT and DistilBERT bases (with the MiniLM tokenizer) saved as pretrained
    folders."""
    from transformers import AutoConfig, AutoModel

    from dist_train.model.files import load_tokenizer

    tmp = tmp_path_factory.mktemp("lora")
    rng = random.Random(0)
    files = {split: tmp / f"{split}.tsv" for split in ("train", "validation", "test")}
    files["train"].write_text(cue_rows(rng, ROWS))
    files["validation"].write_text(cue_rows(rng, 48))
    files["test"].write_text(head(SENTIMENT / "test.tsv", 37))
    tokenizer = load_tokenizer("all-MiniLM-L6-v2")
    for name, spec in (("bert", TINY_BERT), ("distilbert", TINY_DISTILBERT)):
        torch.manual_seed(0)
        AutoModel.from_config(AutoConfig.for_model(**spec)).save_pretrained(tmp / name)
        tokenizer.save_pretrained(tmp / name)
    return tmp, files


def lora_config(work, name: str = "lora", base: str = "bert", lora: dict = LORA):
    tmp, files = work
    path = tiny_config(tmp, files, task={"label_names": ["negative", "positive"]},
                       train={"epochs": 2, "micro_batch_size": 8, "eval_every": 5, "lr": 3e-3},
                       # final/ = the last weights, so a resumed run's final/ compares with an uninterrupted one's
                       checkpoint={"every_steps": 4, "keep_last_n": 2, "load_best_at_end": False},
                       logging={"every_steps": 2, "progress_bar": False, "tensorboard": False})
    cfg = yaml.safe_load(path.read_text())
    cfg["model"] = {"pretrained": str(tmp / base), "lora": lora}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(work, key: str, engine: str, *overrides, out: str | None = None, env=None, expect_ok=True):
    """One training job per ``key`` (``train_once``): (output dir, completed process)."""
    tmp, _ = work
    nproc, extra = ENGINES[engine]
    return train_once(tmp, key, nproc, lora_config(work), *extra, *overrides, env=env,
                      expect=True if expect_ok else None, out=tmp / (out or key))


def uninterrupted(work, engine: str):
    return run(work, f"{engine}-full", engine)[0]


@pytest.fixture(scope="module")
def built(work):
    """The LoRA classifier as training builds it."""
    from transformers import AutoModelForSequenceClassification

    from dist_train.model.assemble import build_model

    from dist_train.model.files import load_tokenizer

    tmp, _ = work
    cfg = load_config(lora_config(work))
    return build_model(cfg.model, AutoModelForSequenceClassification, load_tokenizer(str(tmp / "bert")), 32,
                       peft_task_type="SEQ_CLS", num_labels=2)


def test_only_the_adapters_and_the_head_train(built):
    trainable = {n: p.numel() for n, p in built.named_parameters() if p.requires_grad}
    # 2 layers x (query, value) x (A: r x 64 + B: 64 x r), and the fresh classifier (64 x 2 + 2)
    assert sum(trainable.values()) == 2 * 2 * (4 * 64 + 64 * 4) + 130 == 2178
    assert all(".lora_A." in n or ".lora_B." in n or ".classifier.modules_to_save." in n for n in trainable), trainable
    assert sum(trainable.values()) / sum(p.numel() for p in built.parameters()) < 0.002


def test_a_merged_copy_computes_the_live_model_and_leaves_it_as_it_was(built, tmp_path):
    """Writing final/ must not touch the live model, which then runs the test evaluation: peft >= 0.22 merges
    into the base weights' own tensors, which the copy shares with the live model."""
    import copy

    from transformers import AutoModelForSequenceClassification

    from dist_train.model.lora import merged_copy

    live = copy.deepcopy(built).eval()
    with torch.no_grad():
        for name, p in live.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 1.0)  # adapters that change the output (B starts at zero)
        ids = torch.randint(1000, 2000, (2, 12))
        before = live(input_ids=ids).logits
        merged = merged_copy(live, live.state_dict())
        after = live(input_ids=ids).logits
        with live.disable_adapter():
            base = live(input_ids=ids).logits
    assert torch.equal(before, after)
    assert (before - base).abs().max() > 1e-3  # the adapters matter: a merge into the live weights would show
    merged.save_pretrained(tmp_path)  # as export writes it (buffers the meta skeleton lacks come back on load)
    with torch.no_grad():
        exported = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()(input_ids=ids).logits
    assert (before - exported).abs().max() < 1e-5


@pytest.mark.slow
def test_checkpoint_holds_only_the_trained_tensors(work, built):
    tmp, _ = work
    step = uninterrupted(work, "single") / "checkpoints" / "step-20"
    saved = load_file(str(step / "model.safetensors"))
    assert set(saved) == {n for n, p in built.named_parameters() if p.requires_grad}
    lora_bytes = (step / "model.safetensors").stat().st_size
    full_bytes = (tmp / "bert" / "model.safetensors").stat().st_size  # what a full fine-tune saves (+ the head)
    assert lora_bytes < full_bytes / 200, (lora_bytes, full_bytes)
    assert (step / "hf" / "adapter_config.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("engine", list(ENGINES))
def test_resumed_run_equals_uninterrupted_run(work, engine):
    full = uninterrupted(work, engine)
    _, failed = run(work, f"{engine}-fail", engine, out=f"{engine}-resumed", env={"DIST_TRAIN_FAIL_AT": "0:10"},
                    expect_ok=False)
    assert failed.returncode != 0 and "injected failure at step 10" in failed.stderr
    out, resumed = run(work, f"{engine}-resumed", engine, "checkpoint.resume=auto")
    assert "resuming from" in resumed.stdout and "step-8 at step 8" in resumed.stdout
    # The frozen base came back from model.pretrained, adapters, head, Adam and RNG from the checkpoint.
    assert max_diff(full / "final", out / "final") == 0.0


@pytest.mark.slow
def test_final_is_the_merged_model_and_the_adapter_folder_loads_with_peft(work, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    tmp, _ = work
    out = uninterrupted(work, "single")
    final, last = out / "final", out / "checkpoints" / "step-20"
    merged, adapter = tmp_path / "merged", tmp_path / "adapter"
    for args in ((last, merged), (last, adapter, "--adapter-only")):
        result = run_cli("export", *args)
        assert result.returncode == 0, result.stderr[-2000:]
    # A plain model: no adapter config, no LoRA tensors; the export from the checkpoint is the same bits.
    assert not (final / "adapter_config.json").exists()
    assert not [k for k in load_file(str(final / "model.safetensors")) if "lora" in k or "base_layer" in k]
    assert max_diff(final, merged) == 0.0
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}

    # The live model again: base + the adapter folder through peft. Unmerged it computes what final/ computes,
    # merged (peft's own merge) it is final/.
    base = AutoModelForSequenceClassification.from_pretrained(tmp / "bert", num_labels=2)
    live = PeftModel.from_pretrained(base, adapter).eval()
    plain = AutoModelForSequenceClassification.from_pretrained(final).eval()
    tok = AutoTokenizer.from_pretrained(final)
    enc = tok(["the film was wonderful", "a boring and awful plot"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(live(**enc).logits, plain(**enc).logits, rtol=1e-5, atol=1e-5)
    mine = load_file(str(final / "model.safetensors"))
    peft_merged = live.merge_and_unload().state_dict()
    assert max((mine[k] - peft_merged[k]).abs().max().item() for k in mine) == 0.0

    clf = pipeline("text-classification", model=str(final))
    assert clf("the film was wonderful")[0]["label"] in ("negative", "positive")


@pytest.mark.slow
def test_causal_lm_lora_learns_and_its_merged_export_generates(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from dist_train.data.new_tokenizer import train_tokenizer
    from dist_train.run.trainer import train

    text = (ROOT / "data" / "corpus" / "austen.txt").read_text()[200_000:]
    paragraphs = [" ".join(p.split()) for p in text.split("\n\n") if p.strip()][:150]
    (tmp_path / "corpus.txt").write_text("\n".join(paragraphs) + "\n")
    base = tmp_path / "gpt2"
    tok = train_tokenizer(paragraphs, "bpe", 600, base)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "gpt2", n_layer=2, n_head=2, n_embd=64, n_positions=64, vocab_size=len(tok),
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, initializer_range=0.2)).save_pretrained(base)
    cfg = {"output_dir": str(tmp_path / "out"),
           "model": {"pretrained": str(base), "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},  # c_attn: GPT-2's default
           "data": {"train": str(tmp_path / "corpus.txt"), "max_length": 32, "cache_dir": str(tmp_path / "cache")},
           "task": {"name": "causal_lm"},
           "train": {"epochs": 2, "micro_batch_size": 16, "lr": 1e-2, "warmup_ratio": 0.1},
           "logging": {"every_steps": 5, "progress_bar": False, "tensorboard": False}}
    (tmp_path / "clm.yaml").write_text(yaml.safe_dump(cfg))
    train(load_config(tmp_path / "clm.yaml"))
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "out" / "metrics.jsonl").read_text().splitlines())
              if r["split"] == "train"]
    assert losses[-1] < losses[0] - 0.3, losses
    final = tmp_path / "out" / "final"
    generated = run_cli("generate", final, "It is a truth", "--max-new-tokens", "6", "--temperature", "0")
    assert generated.returncode == 0, generated.stderr[-2000:]
    assert generated.stdout.startswith("It is a truth") and len(generated.stdout) > len("It is a truth\n")


@pytest.mark.slow
def test_bad_lora_config_is_one_line(work):
    tmp, _ = work
    cfg = lora_config(work, "bad")
    assert_user_error(run_cli("train", cfg, "model.lora.r=0"), "model.lora.r must be >= 1, got 0")
    assert_user_error(run_cli("train", cfg, "model.lora.dropout=1"), "model.lora.dropout must be in [0, 1)")
    # DistilBERT is a model type peft knows no default layers for: the key to set, and this model's layers.
    unknown = run_cli("train", lora_config(work, "distil", base="distilbert"), f"output_dir={tmp / 'distil'}")
    assert_user_error(unknown, "model.lora.target_modules", "'distilbert'", "q_lin")
