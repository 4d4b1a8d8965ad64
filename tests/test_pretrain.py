"""Pretraining: tokenizers, packing into blocks, masking, the token stream on disk, and LM training runs."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from conftest import ROOT, SENTIMENT, assert_user_error, execute, max_diff, run_cli, worker_cmd

from dist_train.config import load_config
from dist_train.data.collate import MaskedLMCollator, continuation_table
from dist_train.data.corpus import TokenBlocks, read_corpus, tokenize_corpus
from dist_train.data.new_tokenizer import train_tokenizer
from dist_train.data.sampler import step_windows, train_plan
from dist_train.run.trainer import train

AUSTEN = ROOT / "data" / "corpus" / "austen.txt"
TINY_GPT2 = {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 64}
TINY_MLM = {"model_type": "bert", "num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 64,
            "intermediate_size": 128, "max_position_embeddings": 64}


def austen_paragraphs(n: int) -> list[str]:
    text = AUSTEN.read_text()[200_000:]
    paras = [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]
    return paras[:n]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("corpus")
    (tmp / "a.txt").write_text("\n".join(austen_paragraphs(300)) + "\n")
    (tmp / "b.txt").write_text("\n".join(austen_paragraphs(400)[300:]) + "\n")
    return tmp


@pytest.fixture(scope="module")
def tokenizers(corpus_dir):
    texts = austen_paragraphs(400)
    return {"bpe": train_tokenizer(texts, "bpe", 600, corpus_dir / "bpe"),
            "wordpiece": train_tokenizer(texts, "wordpiece", 600, corpus_dir / "wp", lowercase=True)}


# -- tokenizers --------------------------------------------------------------------------------------------

def test_trained_tokenizers_round_trip_and_reload(tokenizers, corpus_dir):
    from transformers import AutoTokenizer

    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune."
    bpe = tokenizers["bpe"]
    assert bpe.decode(bpe(text)["input_ids"]) == text  # byte-level: exact, no unknown tokens
    assert bpe.eos_token == "<|endoftext|>" and len(bpe) == 600
    wp = tokenizers["wordpiece"]
    ids = wp(text)["input_ids"]
    assert ids[0] == wp.cls_token_id and ids[-1] == wp.sep_token_id and wp.mask_token_id is not None
    decoded = wp.decode(ids, skip_special_tokens=True)
    assert wp(decoded)["input_ids"] == ids  # decode loses only case and spacing, which encoding ignores
    for name, folder in (("bpe", "bpe"), ("wordpiece", "wp")):
        again = AutoTokenizer.from_pretrained(corpus_dir / folder)
        assert again(text)["input_ids"] == tokenizers[name](text)["input_ids"]


@pytest.mark.slow
def test_tokenizer_command_trains_and_saves_a_folder(corpus_dir, tmp_path):
    result = run_cli("tokenizer", corpus_dir / "*.txt", "--kind", "wordpiece", "--vocab-size", "500",
                     "--out", tmp_path / "tok")
    assert result.returncode == 0, result.stderr
    vocab = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(vocab) == 500 and "[MASK]" in vocab
    again = run_cli("tokenizer", corpus_dir / "*.txt", "--kind", "wordpiece", "--out", tmp_path / "tok")
    assert_user_error(again, "not empty")
    missing = run_cli("tokenizer", tmp_path / "nothing-*.txt", "--out", tmp_path / "t2")
    assert_user_error(missing, "no file matches")


# -- packing -----------------------------------------------------------------------------------------------

def test_packing_keeps_every_token_with_eos_between_documents(corpus_dir, tokenizers, tmp_path):
    bpe = tokenizers["bpe"]
    corpus = read_corpus(str(corpus_dir / "*.txt"), "text", "line", str(tmp_path / "cache"))
    docs = austen_paragraphs(400)
    assert corpus["text"] == docs  # both files, in order, a document per line
    stream = tokenize_corpus(corpus, bpe, "eos", None, tmp_path / "cache")
    expected = [t for d in docs for t in bpe(d)["input_ids"] + [bpe.eos_token_id]]
    assert stream.array.tolist() == expected
    assert stream.num_documents == 400 and int((stream.array == bpe.eos_token_id).sum()) == 400
    blocks = TokenBlocks(stream, 64)
    joined = [t for i in range(len(blocks)) for t in blocks[i]["input_ids"].tolist()]
    assert joined == expected[:len(joined)] and len(expected) - len(joined) < 64  # only a partial tail is left
    assert all(blocks[i]["input_ids"].shape == (64,) for i in range(len(blocks)))
    # Cached: a second call finds the same stream on disk without writing it again.
    again = tokenize_corpus(corpus, bpe, "eos", None, tmp_path / "cache")
    assert again.path == stream.path


def test_masked_lm_streams_keep_each_documents_special_tokens(corpus_dir, tokenizers, tmp_path):
    wp = tokenizers["wordpiece"]
    corpus = read_corpus(str(corpus_dir / "a.txt"), "text", "line", str(tmp_path / "cache"))
    stream = tokenize_corpus(corpus, wp, "special", 2, tmp_path / "cache")  # two tokenizing processes
    ids = stream.array
    assert int((ids == wp.cls_token_id).sum()) == int((ids == wp.sep_token_id).sum()) == 300
    assert ids[0] == wp.cls_token_id and ids[-1] == wp.sep_token_id


def test_paragraph_units_and_jsonl_text_fields(tmp_path):
    (tmp_path / "book.txt").write_text("First line\nof a paragraph.\n\nSecond\nparagraph.\n\n\nThird.\n")
    corpus = read_corpus(str(tmp_path / "book.txt"), "text", "paragraph", str(tmp_path / "cache"))
    assert [" ".join(t.split()) for t in corpus["text"] if t.strip()] == [
        "First line of a paragraph.", "Second paragraph.", "Third."]
    (tmp_path / "docs.jsonl").write_text('{"body": "one doc", "id": 1}\n{"body": "two", "id": 2}\n')
    assert read_corpus(str(tmp_path / "docs.jsonl"), "body", "line", str(tmp_path / "cache"))["text"] == [
        "one doc", "two"]


def test_blocks_are_read_exactly_once_across_two_ranks(corpus_dir, tokenizers, tmp_path):
    corpus = read_corpus(str(corpus_dir / "*.txt"), "text", "line", str(tmp_path / "cache"))
    blocks = TokenBlocks(tokenize_corpus(corpus, tokenizers["bpe"], "eos", None, tmp_path / "cache"), 32)
    plan = train_plan(blocks.lengths, 3, seed=5, epoch=0, group_by_length=False)
    read = {0: [], 1: []}
    for rank in (0, 1):
        for window in step_windows(plan, 2, rank, 2):
            for indices, weight in window:
                if weight:
                    read[rank] += [blocks[i]["index"] for i in indices]
    assert not set(read[0]) & set(read[1])
    assert sorted(read[0] + read[1]) == list(range(len(blocks)))
    assert len(read[0]) > 0 and len(read[1]) > 0


# -- masking -----------------------------------------------------------------------------------------------

def masked(tokenizer, n_blocks=400, length=64, **kw):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(len(tokenizer), (n_blocks, length), generator=gen)
    ids[:, 0], ids[:, 10] = tokenizer.cls_token_id, tokenizer.sep_token_id
    items = [{"input_ids": row, "index": i} for i, row in enumerate(ids)]
    return ids, items, MaskedLMCollator(tokenizer, **kw)


def test_masking_selects_15_percent_80_10_10_and_never_special_tokens(tokenizers):
    wp = tokenizers["wordpiece"]
    ids, items, collate = masked(wp, seed=3)
    batch = collate(items)
    selected = batch["labels"] != -100
    special = (ids == wp.cls_token_id) | (ids == wp.sep_token_id) | (ids == wp.pad_token_id) | (
        ids == wp.mask_token_id) | (ids == wp.unk_token_id)
    assert not (selected & special).any()
    assert torch.equal(batch["labels"][selected], ids[selected])
    assert torch.equal(batch["input_ids"][~selected], ids[~selected])  # unselected tokens untouched
    rate = selected.sum().item() / (~special).sum().item()
    assert abs(rate - 0.15) < 0.01, rate
    n = selected.sum().item()
    as_mask = (batch["input_ids"][selected] == wp.mask_token_id).sum().item() / n
    kept = (batch["input_ids"][selected] == ids[selected]).sum().item() / n
    assert abs(as_mask - 0.8) < 0.02 and abs(kept - 0.1 - 0.1 / len(wp)) < 0.02, (as_mask, kept)


def test_masks_depend_on_the_block_and_epoch_only(tokenizers):
    wp = tokenizers["wordpiece"]
    _, items, collate = masked(wp, n_blocks=8, seed=3)
    first = collate(items)
    assert torch.equal(first["labels"], collate(items)["labels"])  # no hidden process-wide RNG
    torch.manual_seed(123)
    assert torch.equal(first["labels"], collate(items)["labels"])
    # Another batching of the same blocks: the same masks block by block.
    regrouped = torch.cat([collate(items[5:])["labels"], collate(items[:5])["labels"]])
    assert torch.equal(regrouped, torch.cat([first["labels"][5:], first["labels"][:5]]))
    other_epoch = MaskedLMCollator(wp, seed=3, epoch=1)(items)
    assert not torch.equal(first["labels"], other_epoch["labels"])


def test_whole_word_masking_selects_all_pieces_of_a_word(tokenizers):
    wp = tokenizers["wordpiece"]
    text = " ".join(austen_paragraphs(60))
    ids = torch.tensor(wp(text, add_special_tokens=False)["input_ids"][:64 * 50]).view(50, 64)
    items = [{"input_ids": row, "index": i} for i, row in enumerate(ids)]
    batch = MaskedLMCollator(wp, whole_word=True, seed=1)(items)
    selected = batch["labels"] != -100
    continues = continuation_table(wp)[ids]
    assert continues.any() and selected.any()
    # A continuation piece is selected exactly when the piece before it is (same word), except at a block start.
    inner = continues[:, 1:]
    assert torch.equal(selected[:, 1:][inner], selected[:, :-1][inner])


# -- training runs ------------------------------------------------------------------------------------------

def lm_config(tmp_path, corpus_dir, task: str, **sections) -> "object":
    model = TINY_GPT2 if task == "causal_lm" else TINY_MLM
    kind = "bpe" if task == "causal_lm" else "wordpiece"
    cfg = {"output_dir": str(tmp_path / "out"),
           "model": {"config": model, "train_tokenizer": {"kind": kind, "vocab_size": 600}},
           "data": {"train": str(corpus_dir / "*.txt"), "validation_split": 0.1, "max_length": 32,
                    "cache_dir": str(tmp_path / "cache")},
           "task": {"name": task},
           "train": {"epochs": 3, "micro_batch_size": 16, "eval_batch_size": 16, "lr": 3e-3, "warmup_ratio": 0.1},
           "logging": {"every_steps": 5, "progress_bar": False, "tensorboard": False}}
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = tmp_path / f"{task}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_losses(out) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "train"]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["causal_lm", "masked_lm"])
def test_language_model_loss_falls_and_exports_a_loadable_model(task, corpus_dir, tmp_path):
    cfg = load_config(lm_config(tmp_path, corpus_dir, task, train={"epochs": 2},
                                data={"test": str(corpus_dir / "b.txt")}))
    reports = train(cfg).reports
    losses = train_losses(tmp_path / "out")
    assert losses[-1] < losses[0] - 0.5, losses  # from ln(600) = 6.4, uniform over the vocabulary
    report = reports["validation"]
    assert report["perplexity"] == pytest.approx(math.exp(report["loss"]))
    assert report["perplexity"] < 600  # the vocabulary size: better than uniform guessing
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    auto = AutoModelForCausalLM if task == "causal_lm" else AutoModelForMaskedLM
    model = auto.from_pretrained(tmp_path / "out" / "final")
    tok = AutoTokenizer.from_pretrained(tmp_path / "out" / "final")
    assert model.config.vocab_size == len(tok) == 600
    # `dist-train eval` on the exported folder reproduces the run's test report (same blocks, same masks).
    result = run_cli("eval", tmp_path / "out" / "final", "--data", corpus_dir / "b.txt")
    assert result.returncode == 0, result.stderr[-3000:]
    again = json.loads(result.stdout)
    assert again["n"] == reports["test"]["n"] and again["perplexity"] == pytest.approx(reports["test"]["perplexity"],
                                                                                        rel=1e-5)
    # `dist-train export` of the best checkpoint gives final/'s weights (tied embeddings stored once).
    from dist_train.use.export import export_checkpoint

    ckpts = tmp_path / "out" / "checkpoints"
    best = json.loads((ckpts / (ckpts / "latest").read_text() / "trainer_state.json").read_text())["best_step"]
    exported = export_checkpoint(ckpts / f"step-{best}", tmp_path / "exported")
    assert max_diff(exported, tmp_path / "out" / "final") == 0.0


def test_sparse_mlm_logits_give_the_same_loss_and_gradients(tokenizers):
    from transformers import AutoConfig, AutoModelForMaskedLM

    from dist_train.tasks.language_modeling import MaskedLMTask

    wp = tokenizers["wordpiece"]
    cfg = load_config(None, ["model.config.model_type=bert", "model.tokenizer=x", "data.train=x", "task.name=masked_lm"])
    task = MaskedLMTask(cfg)
    task.tokenizer = wp
    config = AutoConfig.for_model(**{**TINY_MLM, "vocab_size": len(wp), "hidden_dropout_prob": 0.0,
                                     "attention_probs_dropout_prob": 0.0})
    torch.manual_seed(0)
    dense = AutoModelForMaskedLM.from_config(config)
    sparse = AutoModelForMaskedLM.from_config(config)
    sparse.load_state_dict(dense.state_dict())
    sparse.get_output_embeddings().register_forward_pre_hook(task._only_targets)
    _, items, collate = masked(wp, n_blocks=6, length=32, seed=0)
    batch = collate(items)
    loss_dense = task.loss_sum(dense(input_ids=batch["input_ids"]), batch)
    loss_sparse = task.loss_sum(sparse(**task.inputs(batch)), batch)
    assert sparse(**task.inputs(batch)).logits.shape[0] == task.count(batch).item()
    loss_dense.backward()
    loss_sparse.backward()
    assert loss_sparse.item() == pytest.approx(loss_dense.item(), rel=1e-6)
    for (name, a), b in zip(dense.named_parameters(), sparse.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


@pytest.mark.slow
@pytest.mark.parametrize("task", ["causal_lm", "masked_lm"])
def test_perplexity_over_exact_token_counts_agrees_at_world_1_and_2(task, corpus_dir, tmp_path):
    """Same global batch either way (world 1 x accumulation 2 = world 2 x 1): same model, same validation
    perplexity, from exact token counts summed over ranks."""
    cfg = lm_config(tmp_path, corpus_dir, task, train={"epochs": 1, "max_steps": 6},
                    model={"config": {**(TINY_GPT2 if task == "causal_lm" else TINY_MLM),
                                      **({"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
                                         if task == "causal_lm" else
                                         {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})}})
    # World 2 runs DDP for causal LM and DeepSpeed ZeRO-3 for masked LM (its vocabulary projection, which
    # sees only the masked rows, is then a partitioned parameter).
    engine = ["engine.kind=ddp"] if task == "causal_lm" else ["engine.kind=deepspeed", "engine.deepspeed.zero_stage=3"]
    reports = {}
    for nproc, accum in ((1, 2), (2, 1)):
        out = tmp_path / f"w{nproc}"
        result = execute(worker_cmd(nproc, cfg, f"output_dir={out}", f"train.grad_accum={accum}",
                                    "checkpoint.every_epoch=false", *(engine if nproc == 2 else [])))
        assert result.returncode == 0, result.stderr[-3000:]
        reports[nproc] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                          if json.loads(line)["split"] == "validation"][-1]
    assert reports[1]["n"] == reports[2]["n"] > 0
    assert reports[2]["perplexity"] == pytest.approx(reports[1]["perplexity"], rel=1e-4)


@pytest.mark.slow
def test_masked_lm_resume_is_exact(corpus_dir, tmp_path):
    """Masks come from (seed, epoch, block): a resumed run draws the same ones as an uninterrupted run."""
    cfg = lm_config(tmp_path, corpus_dir, "masked_lm", train={"epochs": 1, "max_steps": 8},
                    checkpoint={"every_steps": 4, "keep_last_n": 3})
    full = execute(worker_cmd(1, cfg, f"output_dir={tmp_path / 'full'}"))
    assert full.returncode == 0, full.stderr[-3000:]
    cut = execute(worker_cmd(1, cfg, f"output_dir={tmp_path / 'cut'}"), {"DIST_TRAIN_FAIL_AT": "0:6"})
    assert cut.returncode != 0
    resumed = execute(worker_cmd(1, cfg, f"output_dir={tmp_path / 'cut'}", "checkpoint.resume=auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 4" in resumed.stdout
    assert max_diff(tmp_path / "full" / "final", tmp_path / "cut" / "final") == 0.0


@pytest.mark.slow
def test_language_model_config_errors_are_one_line(corpus_dir, tokenizers, tmp_path):
    cfg = lm_config(tmp_path, corpus_dir, "masked_lm")
    assert_user_error(run_cli("train", cfg, "data.max_length=100"), "exceeds the model's 64 positions")
    assert_user_error(run_cli("train", cfg, f"data.train={tmp_path / 'none' / '*.txt'}"), "no file matches")
    assert_user_error(run_cli("train", cfg, "model.train_tokenizer.kind=bpe"), "no mask token")
    assert_user_error(run_cli("train", cfg, "checkpoint.metric=accuracy"), "not a masked_lm metric")
    (tmp_path / "tiny.txt").write_text("too short\n")
    assert_user_error(run_cli("train", cfg, f"data.train={tmp_path / 'tiny.txt'}", "model.train_tokenizer.kind=null",
                              f"model.tokenizer={corpus_dir / 'wp'}", "data.validation_split=0"),
                      "fewer than one block")


@pytest.mark.slow
def test_continued_pretraining_of_minilm_gets_a_fresh_mlm_head(tmp_path):
    """configs/mlm_continue_minilm.yaml: the pretrained encoder is loaded, an MLM head is added, it trains."""
    result = run_cli("train", ROOT / "configs" / "mlm_continue_minilm.yaml", f"output_dir={tmp_path / 'out'}",
                     f"data.train={SENTIMENT / 'dev.tsv'}", "data.max_length=32", "train.max_steps=2",
                     "train.micro_batch_size=4", "train.eval_every=0", "data.validation_split=0",
                     f"data.cache_dir={tmp_path / 'cache'}", "logging.progress_bar=false", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    from safetensors.torch import load_file

    from dist_train.model.files import resolve_model_path

    base = load_file(str(resolve_model_path("all-MiniLM-L6-v2") + "/model.safetensors"))
    tuned = load_file(str(tmp_path / "out" / "final" / "model.safetensors"))
    assert any(k.startswith("cls.predictions") for k in tuned)  # the new head
    name = "embeddings.word_embeddings.weight"
    moved = (tuned[f"bert.{name}"] - base[name]).abs().max().item()
    assert 0 < moved < 0.05  # started from the pretrained weights and took two small steps


@pytest.mark.slow
def test_generate_continues_prompts_deterministically(corpus_dir, tmp_path):
    """Greedy output equals a hand-run model.generate on the same input (end-of-text + prompt, as every
    training document started); sampling repeats under a seed; predict on a causal LM points to generate."""
    cfg = load_config(lm_config(tmp_path, corpus_dir, "causal_lm", train={"epochs": 1},
                                data={"validation_split": 0.0}))
    train(cfg)
    final = tmp_path / "out" / "final"
    prompt = "It is a truth universally acknowledged"
    greedy = run_cli("generate", final, prompt, "--max-new-tokens", "8", "--temperature", "0")
    assert greedy.returncode == 0, greedy.stderr[-2000:]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(final), AutoModelForCausalLM.from_pretrained(final).eval()
    ids = tok(tok.eos_token + prompt, return_tensors="pt")
    expected = model.generate(**ids, do_sample=False, max_new_tokens=8, pad_token_id=tok.eos_token_id)
    continuation = tok.decode(expected[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert greedy.stdout == " ".join(f"{prompt}{continuation}".split()) + "\n"
    sampled = [run_cli("generate", final, prompt, "Her sister", "--max-new-tokens", "12", "--seed", str(seed)).stdout
               for seed in (1, 1, 2)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2] and len(sampled[0].splitlines()) == 2
    assert_user_error(run_cli("predict", final, "hello"), "use dist-train generate")
    assert_user_error(run_cli("generate", final, prompt, "--top-p", "0"), "--top-p")


def test_own_causal_lm_fine_tunes_as_a_classifier_reading_each_rows_last_token(corpus_dir, tmp_path):
    """A GPT-2 dist-train pretrained (its BPE tokenizer: no pad token of its own) fine-tunes as a sentiment
    classifier through transformers' GPT2ForSequenceClassification: the backbone is the pretrained one, pad =
    eos, and a row's prediction is the same alone or padded in a batch (the head reads its last real token)."""
    (tmp_path / "lm").mkdir()
    cfg = load_config(lm_config(tmp_path / "lm", corpus_dir, "causal_lm", train={"max_steps": 4}))
    train(cfg)
    lm = tmp_path / "lm" / "out" / "final"
    # A folder as GPT-2 ships: neither the tokenizer nor the model config names a pad token.
    tok_cfg = json.loads((lm / "tokenizer_config.json").read_text())
    tok_cfg.pop("pad_token", None)
    (lm / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    model_cfg = json.loads((lm / "config.json").read_text())
    model_cfg["pad_token_id"] = None
    (lm / "config.json").write_text(json.dumps(model_cfg))
    data = {split: tmp_path / f"{split}.tsv" for split in ("train", "dev")}
    for split, n in (("train", 64), ("dev", 16)):
        data[split].write_text("".join((SENTIMENT / f"{split}.tsv").read_text().splitlines(keepends=True)[:n + 1]))
    clf = {"output_dir": str(tmp_path / "clf"), "model": {"pretrained": str(lm)},
           "data": {"train": str(data["train"]), "validation": str(data["dev"]), "max_length": 32,
                    "cache_dir": str(tmp_path / "cache")},
           "train": {"max_steps": 4, "micro_batch_size": 8, "lr": 1e-3},
           "logging": {"every_steps": 2, "progress_bar": False, "tensorboard": False}}
    (tmp_path / "clf.yaml").write_text(yaml.safe_dump(clf))
    reports = train(load_config(tmp_path / "clf.yaml")).reports
    assert 0 <= reports["validation"]["accuracy"] <= 1
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    final = tmp_path / "clf" / "final"
    model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    tok = AutoTokenizer.from_pretrained(final)
    assert type(model).__name__ == "GPT2ForSequenceClassification"
    assert tok.pad_token == tok.eos_token and model.config.pad_token_id == tok.eos_token_id
    pretrained, tuned = load_file(str(lm / "model.safetensors")), load_file(str(final / "model.safetensors"))
    wpe = "transformer.wpe.weight"  # started from the LM's weights: 4 small steps moved them a little
    assert 0 < (tuned[wpe] - pretrained[wpe]).abs().max().item() < 0.05
    rows = ["a fine film", "dull, far too long and badly acted from start to end"]
    with torch.no_grad():
        batch = model(**tok(rows, padding=True, return_tensors="pt")).logits
        alone = torch.cat([model(**tok([r], return_tensors="pt")).logits for r in rows])
    assert torch.allclose(batch, alone, atol=1e-5), (batch, alone)
