"""model.labelled_logits (dist_train/model/causal_loss.py): the loss and every gradient of the stock computation
(full logits, then cross-entropy summed over the targets), for logits of the labelled positions only:
gathered rows, and the chunked cross-entropy inside the output layer (several chunks forced), with LoRA,
with gradient accumulation, for a seq2seq model; un-armed forwards pass through; exports stay stock; a real
training run ends where the stock run ends."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import ROOT, max_diff

from dist_train.model import causal_loss
from dist_train.model.causal_loss import CausalLMLoss
from dist_train.config import load_config

VOCAB = 300
TINY = {
    "gpt2": {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 64, "resid_pdrop": 0.0,
             "embd_pdrop": 0.0, "attn_pdrop": 0.0},
    "llama": {"model_type": "llama", "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
              "hidden_size": 64, "intermediate_size": 128, "max_position_embeddings": 64, "tie_word_embeddings": False},
    "gemma3": {"model_type": "gemma3_text", "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
               "head_dim": 32, "hidden_size": 64, "intermediate_size": 128, "max_position_embeddings": 64,
               "sliding_window": 8},
}


def tiny_lm(kind: str, seed: int = 0, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    keys = {**TINY[kind], **extra}
    torch.manual_seed(seed)
    config = AutoConfig.for_model(keys.pop("model_type"), vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                  **keys)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager")


def sft_batch(seed: int, rows: int = 3, length: int = 20) -> dict:
    """Prompt positions and right padding without targets; one row with every position a target."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, length - 5:] = 0
    ids[1, length - 5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :7] = -100
    labels[1, :4] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def stock_loss(model, batch, shift: int = 1, **inputs) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **inputs).logits
    targets = F.pad(batch["labels"][:, shift:], (0, shift), value=-100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="sum")


def ours_loss(model, lm_loss, batch, **inputs) -> torch.Tensor:
    lm_loss.arm(batch["labels"])
    return lm_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **inputs),
                   batch["labels"])


def build(model, mode: str, monkeypatch, shift: int = 1) -> CausalLMLoss:
    """``CausalLMLoss`` in ``mode``: gather (chunked ruled out), chunked (5 rows a chunk), recompute (chunked,
    logits recomputed in backward: the fp16 path, here in fp32)."""
    if mode == "gather":
        monkeypatch.setattr(causal_loss, "CHUNKED", frozenset())
    loss = CausalLMLoss(model, True, shift=shift, chunk_rows=5)
    monkeypatch.undo()
    assert loss.mode == ("gather" if mode == "gather" else "chunked")
    loss.recompute = mode == "recompute"
    return loss


def assert_same_grads(ours, stock, tol: float = 1e-5) -> None:
    pairs = [(n, a, b) for (n, a), b in zip(stock.named_parameters(), ours.parameters()) if a.requires_grad]
    assert pairs
    for name, a, b in pairs:
        assert b.grad is not None, name
        torch.testing.assert_close(b.grad, a.grad, rtol=tol, atol=tol, msg=name)


def accumulate_two(stock, ours, lm_loss):
    """Two micro-batches accumulated into the same gradients, as the training loop does: the losses and then
    every gradient equal; returns the last batch."""
    for seed in (1, 2):
        batch = sft_batch(seed)
        a, b = stock_loss(stock, batch), ours_loss(ours, lm_loss, batch)
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-5)
        a.backward()
        b.backward()
    assert_same_grads(ours, stock)
    return batch


@pytest.mark.parametrize("mode", ["gather", "chunked", "recompute"])
@pytest.mark.parametrize("kind", ["gpt2", "llama", "gemma3"])
def test_loss_and_every_gradient_equal_the_stock_computation(kind, mode, monkeypatch):
    stock = tiny_lm(kind)
    ours = copy.deepcopy(stock)
    lm_loss = build(ours, mode, monkeypatch)
    batch = accumulate_two(stock, ours, lm_loss)
    # A batch with no target at all: zero loss, and a backward that runs.
    empty = {**batch, "labels": torch.full_like(batch["labels"], -100)}
    assert ours_loss(ours, lm_loss, empty).item() == 0.0


@pytest.mark.parametrize("mode", ["gather", "chunked"])
def test_lora_gradients_equal_the_stock_computation(mode, monkeypatch):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                        init_lora_weights=False)  # random B: the adapters change the output from the start
    stock = get_peft_model(tiny_lm("gemma3"), config)
    ours = copy.deepcopy(stock)
    lm_loss = build(ours, mode, monkeypatch)
    assert not ours.get_output_embeddings().weight.requires_grad  # the tied embedding is frozen
    accumulate_two(stock, ours, lm_loss)


@pytest.mark.parametrize("kind,mode", [("t5", "chunked"), ("t5", "gather"), ("bart", "gather")])
def test_seq2seq_decoder_labels_shift_0(kind, mode, monkeypatch):
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    keys = ({"d_model": 64, "d_ff": 128, "d_kv": 32, "num_layers": 2, "num_heads": 2, "dropout_rate": 0.0}
            if kind == "t5" else
            {"d_model": 64, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 2,
             "decoder_attention_heads": 2, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128, "dropout": 0.0,
             "max_position_embeddings": 64})
    torch.manual_seed(0)
    stock = AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model(kind, vocab_size=VOCAB, pad_token_id=0,
                                                                   decoder_start_token_id=0, **keys))
    if kind == "bart":  # a non-zero final_logits_bias, added to the gathered logits
        stock.final_logits_bias.normal_()
    ours = copy.deepcopy(stock)
    lm_loss = build(ours, mode, monkeypatch, shift=0)
    batch = sft_batch(3)
    decoder = sft_batch(4, length=12)
    decoder_inputs = {"decoder_input_ids": decoder["input_ids"], "decoder_attention_mask": decoder["attention_mask"]}
    batch_dec = {**batch, "labels": decoder["labels"]}
    a = stock_loss(stock, batch_dec, shift=0, **decoder_inputs)
    b = ours_loss(ours, lm_loss, batch_dec, **decoder_inputs)
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-5)
    a.backward()
    b.backward()
    assert_same_grads(ours, stock)


def test_unarmed_forwards_pass_through_and_generate_as_stock():
    stock = tiny_lm("gpt2").eval()
    ours = copy.deepcopy(stock)
    lm_loss = CausalLMLoss(ours, "auto")
    assert lm_loss.mode == "chunked"
    batch = sft_batch(5)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=batch["input_ids"]).logits, stock(input_ids=batch["input_ids"]).logits)
        lm_loss.arm(batch["labels"])
        armed = lm_loss(ours(input_ids=batch["input_ids"]), batch["labels"])  # eval: no gradients computed
        torch.testing.assert_close(armed, stock_loss(stock, {**batch, "attention_mask": None}))
        # Disarmed by that forward: the next one (generate) sees the full logits.
        prompt = batch["input_ids"][:2, :6]
        options = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
        assert torch.equal(ours.generate(prompt, **options), stock.generate(prompt, **options))
    assert CausalLMLoss(ours, False).mode == "off"


def test_the_model_stays_stock_for_export_and_copies(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_lm("llama")
    keys = set(model.state_dict())
    lm_loss = CausalLMLoss(model, True, chunk_rows=4)
    assert set(model.state_dict()) == keys
    model.save_pretrained(tmp_path / "m")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert "forward" not in vars(plain.get_output_embeddings())
    prompt = torch.tensor([[5, 6, 7]])
    assert torch.equal(plain.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0),
                       model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0))
    # A deep copy's output layer computes with the copy's own weights (its forward is rebound to it).
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.get_output_embeddings().weight.mul_(2)
    batch = sft_batch(6)
    lm_loss.arm(batch["labels"])
    mine = lm_loss(model(input_ids=batch["input_ids"]), batch["labels"])
    twin_loss = twin.get_output_embeddings()._labelled_logits
    twin_loss.arm(batch["labels"])
    theirs = twin_loss(twin(input_ids=batch["input_ids"]), batch["labels"])
    assert abs(mine.item() - theirs.item()) > 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_is_close_to_stock(dtype, monkeypatch):
    """bf16: gradients made in the forward; fp16: recomputed in backward, scaled before the cast to fp16 (as
    the stock backward does: under a loss scale, a softmax of ~1/V would underflow in fp16 otherwise)."""
    stock = tiny_lm("gemma3")
    ours = copy.deepcopy(stock)
    lm_loss = build(ours, "chunked", monkeypatch)
    batch = sft_batch(7)
    with torch.autocast("cpu", dtype=dtype):
        a, b = stock_loss(stock, batch), ours_loss(ours, lm_loss, batch)
    (a * 1024).backward()  # a loss scale
    (b * 1024).backward()
    torch.testing.assert_close(b, a, rtol=1e-2, atol=1e-2)
    for p, q in zip(stock.parameters(), ours.parameters()):
        assert (p.grad - q.grad).norm() <= 2e-2 * p.grad.norm() + 1e-6


@pytest.fixture(scope="module")
def stock_run(tmp_path_factory):
    """A short causal_lm run with model.labelled_logits=false: (its folder, the config, its reports)."""
    from dist_train.data.new_tokenizer import train_tokenizer
    from dist_train.run.trainer import train

    tmp = tmp_path_factory.mktemp("runs")
    text = (ROOT / "data" / "corpus" / "austen.txt").read_text()[200_000:]
    paragraphs = [" ".join(p.split()) for p in text.split("\n\n") if p.strip()][:60]
    (tmp / "corpus.txt").write_text("\n".join(paragraphs) + "\n")
    train_tokenizer(paragraphs, "bpe", VOCAB, tmp / "tok")
    cfg = {"output_dir": str(tmp / "stock"),
           "model": {"config": {**TINY["gpt2"]}, "tokenizer": str(tmp / "tok"), "labelled_logits": False},
           "data": {"train": str(tmp / "corpus.txt"), "validation_split": 0.2, "max_length": 32,
                    "cache_dir": str(tmp / "cache")},
           "task": {"name": "causal_lm"},
           # adam_eps 1e-6, not 1e-8: Adam's normalised step turns a rounding-level difference in a gradient
           # element near 0 (summation order) into a step of up to lr; eps bounds that (5e-5 -> 2e-6 here).
           "train": {"epochs": 1, "max_steps": 4, "micro_batch_size": 4, "grad_accum": 2, "eval_batch_size": 8,
                     "lr": 3e-3, "adam_eps": 1e-6},
           "checkpoint": {"every_epoch": False},
           "logging": {"every_steps": 1, "progress_bar": False, "tensorboard": False}}
    (tmp / "c.yaml").write_text(yaml.safe_dump(cfg))
    return tmp, tmp / "c.yaml", train(load_config(tmp / "c.yaml"))


def run_log(out) -> tuple[list[float], float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"], [r["loss"] for r in rows if r["split"] == "validation"][-1]


def common_max_diff(a, b) -> float:
    """max_diff over the tensors both exports hold (ZeRO-3's export also writes GPT-2's tied lm_head)."""
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return max((wa[k] - wb[k]).abs().max().item() for k in wa.keys() & wb.keys())


def test_training_run_ends_at_the_stock_runs_weights(stock_run):
    from dist_train.run.trainer import train

    tmp, cfg, _ = stock_run
    train(load_config(cfg, [f"output_dir={tmp / 'ours'}", "model.labelled_logits=true"]))
    (train_ours, valid_ours), (train_stock, valid_stock) = run_log(tmp / "ours"), run_log(tmp / "stock")
    assert train_ours == pytest.approx(train_stock, rel=1e-5)
    assert valid_ours == pytest.approx(valid_stock, rel=1e-5)
    assert max_diff(tmp / "ours" / "final", tmp / "stock" / "final") < 1e-5


@pytest.mark.slow
def test_zero3_world_2_with_the_chunked_loss_ends_at_the_stock_runs_weights(stock_run):
    """DeepSpeed ZeRO-3 gathers the (tied) output layer only around its forward and backward: the chunked loss
    runs inside that forward. World 2 x 1 micro-batch = world 1 x accumulation 2 (the same global batch)."""
    from conftest import execute, worker_cmd

    tmp, cfg, _ = stock_run
    result = execute(worker_cmd(2, cfg, f"output_dir={tmp / 'zero3'}", "model.labelled_logits=true",
                                "engine.kind=deepspeed", "engine.deepspeed.zero_stage=3", "train.grad_accum=1"))
    assert result.returncode == 0, result.stderr[-3000:]
    (train_ours, valid_ours), (train_stock, valid_stock) = run_log(tmp / "zero3"), run_log(tmp / "stock")
    assert train_ours == pytest.approx(train_stock, rel=1e-5)
    assert valid_ours == pytest.approx(valid_stock, rel=1e-5)
    assert common_max_diff(tmp / "zero3" / "final", tmp / "stock" / "final") < 1e-5
