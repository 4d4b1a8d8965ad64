"""text_to_text: decoder-only and encoder-decoder models learn target texts; generation-based evaluation.

The data is written here: English number words to French ones ("two nine" -> "deux neuf"), which a tiny
model learns in a few hundred steps. The bases are tiny random models (2 layers, width 64) saved as
pretrained folders with a byte-level BPE tokenizer trained on the data: a Llama (decoder-only) and a T5
(encoder-decoder). What is proven: only target tokens carry a loss; the same weights and the same reports
(loss and the scores of generated text) on one process with accumulation 2 and on two processes under DDP,
DeepSpeed ZeRO-3 and FSDP2; a run stopped at its generation-based validation resumes bit-exactly; batched
generation with left padding equals one prompt at a time; the export predicts, generates and loads in
transformers' pipeline; ``dist-train zero-shot`` scores the untrained model through the same evaluation.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
import yaml
from conftest import execute, max_diff, records, run_cli, train_once, worker_cmd

from dist_train.config import load_config

EN = "zero one two three four five six seven eight nine".split()
FR = "zéro un deux trois quatre cinq six sept huit neuf".split()
TEMPLATE = "English: {source}\nFrench:"
LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 128}
T5 = {"model_type": "t5", "d_model": 64, "d_ff": 128, "num_layers": 2, "num_heads": 2, "d_kv": 32}


def pairs(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        digits = [rng.randrange(10) for _ in range(rng.randint(1, 4))]
        out.append((" ".join(EN[d] for d in digits), " ".join(FR[d] for d in digits)))
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Data files, a BPE tokenizer, and tiny random Llama and T5 folders to fine-tune."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from dist_train.data.new_tokenizer import train_tokenizer

    tmp = tmp_path_factory.mktemp("t2t")
    for split, n, seed in (("train", 320, 0), ("validation", 24, 1), ("test", 20, 2)):
        (tmp / f"{split}.tsv").write_text("en\tfr\n" + "".join(f"{s}\t{t}\n" for s, t in pairs(n, seed)))
    tok = train_tokenizer([f"{TEMPLATE.format(source=s)} {t}" for s, t in pairs(400, 0)], "bpe", 400, tmp / "tok")
    ids = {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
    for name, spec, auto in (("llama", LLAMA, AutoModelForCausalLM), ("t5", T5, AutoModelForSeq2SeqLM)):
        extra = {"decoder_start_token_id": tok.pad_token_id} if name == "t5" else {"bos_token_id": tok.eos_token_id}
        torch.manual_seed(0)
        auto.from_config(AutoConfig.for_model(**spec, **ids, **extra)).save_pretrained(tmp / name)
        tok.save_pretrained(tmp / name)
    return tmp


def t2t_config(work, base: str = "llama", lora: bool = True, **sections):
    cfg = {"output_dir": str(work / "out"),
           "model": {"pretrained": str(work / base), "lora": {"r": 4, "alpha": 8, "dropout": 0.0} if lora else None},
           "data": {"train": str(work / "train.tsv"), "validation": str(work / "validation.tsv"),
                    "test": str(work / "test.tsv"), "text_column": "en", "target_column": "fr", "max_length": 48,
                    "cache_dir": str(work / "cache")},
           "task": {"name": "text_to_text", "template": TEMPLATE, "generation_metrics": ["chrf", "bleu", "squad"],
                    "validation_generations": 12, "max_new_tokens": 12, "stop_at_newline": False},
           # Low rates: 12 steps leave the models near their random start, so they generate varied tokens (a higher
           # rate first learns to end every answer at once: empty texts would compare equal whatever the engine)
           "train": {"max_steps": 12, "micro_batch_size": 8, "eval_batch_size": 8, "lr": 1e-3 if lora else 1e-4,
                     "eval_every": 6},
           "checkpoint": {"every_steps": 4, "keep_last_n": 2, "load_best_at_end": False, "metric": "chrf"},
           "logging": {"every_steps": 2, "progress_bar": False, "tensorboard": False}}
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = work / f"{base}-{'lora' if lora else 'full'}.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return path


ENGINES = {"single": (1, ["engine.kind=single", "train.grad_accum=2"]), "ddp": (2, ["engine.kind=ddp"]),
           "zero3": (2, ["engine.kind=deepspeed", "engine.deepspeed.zero_stage=3"]), "fsdp": (2, ["engine.kind=fsdp"])}


def run(work, key: str, engine: str, *overrides, lora: bool = True, out: str | None = None, env=None,
        expect_ok: bool = True):
    """One training job per ``key`` (``train_once``): (output dir, completed process)."""
    nproc, extra = ENGINES[engine]
    return train_once(work, key, nproc, t2t_config(work, lora=lora), *extra, *overrides, env=env,
                      expect=True if expect_ok else None, out=work / (out or key))



def same_reports(a, b) -> None:
    """The same validation and test reports: every example counted once, the same texts generated."""
    generated = (a / "test_outputs.jsonl").read_text()
    assert generated == (b / "test_outputs.jsonl").read_text()
    texts = [json.loads(line)["hypothesis"] for line in generated.splitlines()]
    assert len({t for t in texts if t}) >= 3, texts  # varied texts: the comparison can tell engines apart
    for split in ("validation", "test"):
        ra, rb = records(a, split), records(b, split)
        assert [r["step"] for r in ra] == [r["step"] for r in rb]
        for x, y in zip(ra, rb):
            assert x["n"] == y["n"] and x["generated"] == y["generated"], (x, y)
            assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
            for key in ("chrf", "bleu", "exact_match", "f1"):
                assert x[key] == pytest.approx(y[key], abs=1e-9), (split, key, x, y)


# -- the data and the loss -----------------------------------------------------------------------------------

def test_only_target_tokens_and_eos_carry_a_loss(work):
    from dist_train.tasks import build_task

    cfg = load_config(t2t_config(work, lora=False))
    task = build_task(cfg)
    tok = task.load_tokenizer()
    splits = task.prepare(tok)
    row = splits.train[0]
    labelled = [t for t in row["labels"] if t != -100]
    assert tok.decode(labelled[:-1]).strip() == row["reference"] and labelled[-1] == tok.eos_token_id
    prompt = row["input_ids"][:len(row["input_ids"]) - len(labelled)]
    assert tok.decode(prompt) == TEMPLATE.format(source=row["source"])
    assert row["labels"][:len(prompt)] == [-100] * len(prompt)
    batch = task.collator(0)([splits.train[i] for i in range(4)])
    assert task.count(batch).item() == sum(len([t for t in splits.train[i]["labels"] if t != -100]) for i in range(4))


def test_prompts_few_shot_and_truncation(work):
    from dist_train.tasks import build_task
    from dist_train.tasks.text_to_text import fit

    cfg = load_config(t2t_config(work, lora=False), ["task.few_shot=2"])
    task = build_task(cfg)
    task.prepare(task.load_tokenizer())
    shots = task.shots
    assert len(shots) == 2 and all(s in pairs(320, 0) for s in shots)
    text = task.prompt_text("one two")
    assert text == "".join(f"{TEMPLATE.format(source=s)} {t}\n\n" for s, t in shots) + TEMPLATE.format(source="one two")
    assert task.prompt_text("one two", shots=False) == TEMPLATE.format(source="one two")
    # Too long: the target keeps a quarter of the length, the prompt its first token and its end.
    assert fit([0, 1, 2, 3, 4, 5, 6, 7], [10, 11, 12, 13], 8) == ([0, 3, 4, 5, 6, 7], [10, 11])
    assert fit([0, 1, 2], [10, 11, 12, 13, 14, 15, 16, 17], 8) == ([0, 1, 2], [10, 11, 12, 13, 14])


def test_generation_scores():
    from dist_train.evaluation.text_metrics import generation_scores, normalize_answer

    assert normalize_answer("The  Cat, sat!") == "cat sat"
    same = generation_scores(["deux neuf", "un"], ["deux neuf", "un"], ["bleu", "chrf", "rouge", "squad"])
    assert same["chrf"] == pytest.approx(100) and same["exact_match"] == 100 and same["rouge1"] == pytest.approx(100)
    half = generation_scores(["a cat", "dog"], ["the cat", "a bird"], ["squad"])
    assert half == {"exact_match": 50.0, "f1": 50.0}  # "a cat" = "the cat" after normalisation; "dog" shares nothing


# -- training on every engine --------------------------------------------------------------------------------

@pytest.mark.slow
def test_ddp_equals_one_process_with_accumulation_and_reports_match(work):
    single, _ = run(work, "single", "single")
    ddp, _ = run(work, "ddp", "ddp")
    assert max_diff(single / "final", ddp / "final") < 1e-5
    same_reports(single, ddp)
    test = json.loads((single / "eval_report.json").read_text())
    assert test["generated"] == 20 and {"chrf", "bleu", "exact_match", "f1", "loss"} <= set(test)
    rows = [json.loads(line) for line in (single / "test_outputs.jsonl").read_text().splitlines()]
    assert [(r["source"], r["reference"]) for r in rows] == pairs(20, 2)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["zero3", "fsdp"])
def test_sharded_engines_equal_one_process(work, engine):
    single, _ = run(work, "single-full", "single", lora=False)
    sharded, _ = run(work, f"{engine}-full", engine, lora=False)
    assert max_diff(single / "final", sharded / "final") < 1e-5
    same_reports(single, sharded)


@pytest.mark.slow
def test_run_stopped_at_generation_validation_resumes_exactly(work):
    full, _ = run(work, "single", "single")
    # The stop request (after step 5) is read at step 6, whose validation generates text: the run finishes that
    # validation, saves step 6 and stops.
    _, stopped = run(work, "stopped", "single", out="resumed", env={"DIST_TRAIN_SIGNAL_AT": "0:step-5:SIGUSR1"})
    assert "stopped after step 6" in stopped.stdout, stopped.stdout[-2000:]
    out, resumed = run(work, "resumed", "single", "checkpoint.resume=auto")
    assert "at step 6" in resumed.stdout
    assert max_diff(full / "final", out / "final") == 0.0
    assert records(full, "test") == records(out, "test")


# -- the model in use ----------------------------------------------------------------------------------------

def test_batched_generation_with_left_padding_equals_one_at_a_time(work):
    from dist_train.engine import SingleEngine
    from dist_train.tasks import build_task

    task = build_task(load_config(t2t_config(work, lora=False), ["task.stop_at_newline=false"]))
    task.load_tokenizer()
    engine = SingleEngine()
    engine.prepare(task.build_model())
    sources = ["one", "two nine four three", "seven seven", "eight zero one"]
    prompts = task.prompt_ids(sources)
    assert len({len(p) for p in prompts}) > 1  # unequal: the batch is padded
    batched = task.generate_ids(engine, prompts, batch_size=4)
    alone = [task.generate_ids(engine, [p], batch_size=1)[0] for p in prompts]
    assert batched == alone and any(batched)


@pytest.mark.slow
def test_export_predicts_generates_and_loads_in_pipeline(work, tmp_path):
    from transformers import pipeline

    final = run(work, "single", "single")[0] / "final"
    sources = [s for s, _ in pairs(3, 5)]
    predicted = run_cli("predict", final, *sources)
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    outputs = [line.split("\t")[1] for line in predicted.stdout.splitlines()]
    generator = pipeline("text-generation", model=str(final))
    for source, out in zip(sources, outputs):
        text = generator(TEMPLATE.format(source=source), max_new_tokens=12, do_sample=False,
                         return_full_text=False)[0]["generated_text"]
        assert text.strip().split("\n")[0].strip() == out
    inputs = tmp_path / "in.tsv"
    inputs.write_text("en\n" + "".join(f"{s}\n" for s in sources))
    written = run_cli("predict", final, "--file", inputs, "--output", tmp_path / "out.tsv")
    assert written.returncode == 0, written.stderr[-2000:]
    assert [line.split("\t")[1] for line in (tmp_path / "out.tsv").read_text().splitlines()[1:]] == outputs
    evaluated = run_cli("eval", final, "--data", work / "test.tsv", "--output", tmp_path / "report.json")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    trained = json.loads((final.parent / "eval_report.json").read_text())
    assert report["chrf"] == pytest.approx(trained["chrf"]) and report["loss"] == pytest.approx(trained["loss"])
    assert len((tmp_path / "report.outputs.jsonl").read_text().splitlines()) == 20


@pytest.mark.slow
def test_encoder_decoder_learns_and_beats_its_zero_shot_baseline(work, tmp_path):
    cfg = t2t_config(work, base="t5", lora=False, train={"max_steps": 160, "eval_every": 80, "lr": 3e-3},
                     task={"template": None, "validation_generations": 0}, checkpoint={"metric": "loss"})
    baseline = run_cli("zero-shot", cfg, "--output", tmp_path / "zero.json")
    assert baseline.returncode == 0, baseline.stderr[-2000:]
    zero = json.loads((tmp_path / "zero.json").read_text())
    assert zero["generated"] == 20 and (tmp_path / "zero.outputs.jsonl").is_file()
    result = execute(worker_cmd(1, cfg, f"output_dir={tmp_path / 'run'}"))
    assert result.returncode == 0, result.stderr[-3000:]
    tuned = json.loads((tmp_path / "run" / "eval_report.json").read_text())
    assert tuned["chrf"] > zero["chrf"] + 20, (zero, tuned)
    assert (tmp_path / "run" / "final" / "config.json").is_file()
    from transformers import AutoModelForSeq2SeqLM

    assert AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "run" / "final").config.is_encoder_decoder


@pytest.mark.parametrize("spec", [T5, {"model_type": "bart", "d_model": 64, "encoder_layers": 2, "decoder_layers": 2,
                                       "encoder_attention_heads": 2, "decoder_attention_heads": 2,
                                       "encoder_ffn_dim": 128, "decoder_ffn_dim": 128,
                                       "max_position_embeddings": 64}], ids=["t5", "bart"])
def test_encoder_decoder_batches_give_the_models_own_loss(work, spec):
    """The collator's decoder inputs (labels shifted right behind the start token) and the summed loss over
    the target count are what transformers computes from ``labels`` itself."""
    from dist_train.tasks import build_task

    path = t2t_config(work, lora=False)
    tree = yaml.safe_load(path.read_text())
    tree["model"] = {"config": {**spec, "decoder_start_token_id": 0}, "tokenizer": str(work / "tok")}
    path.write_text(yaml.safe_dump(tree, allow_unicode=True))
    task = build_task(load_config(path))
    task.prepare(task.load_tokenizer())
    model = task.build_model().eval()
    splits = task.prepare(task.tokenizer)
    batch = task.collator(0)([splits.train[i] for i in range(6)])
    assert (batch["labels"] == -100).any()  # rows of unequal length: padding in the labels
    with torch.no_grad():
        ours = task.loss_sum(model(**task.inputs(batch)), batch) / task.count(batch)
        theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)


def test_chat_template_wraps_the_prompt_and_the_target_follows_it(work, tmp_path):
    from transformers import AutoTokenizer

    from dist_train.tasks import build_task

    tok = AutoTokenizer.from_pretrained(work / "llama")
    tok.chat_template = ("{% for m in messages %}<|user|>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tok.save_pretrained(tmp_path / "chat")
    cfg = load_config(t2t_config(work, lora=False), [f"model.tokenizer={tmp_path / 'chat'}", "task.chat_template=true"])
    task = build_task(cfg)
    task.prepare(task.load_tokenizer())
    assert task.prompt_text("one two") == f"<|user|>{TEMPLATE.format(source='one two')}\n<|assistant|>"
    row = task._tokenize(task.read(str(work / "validation.tsv"), "--data")).select([0])[0]
    target = [t for t in row["labels"] if t != -100]
    assert task.tokenizer.decode(target[:-1]).strip() == row["reference"]
    with pytest.raises(Exception, match="has no chat template"):
        build_task(load_config(t2t_config(work, lora=False), ["task.chat_template=true"])).load_tokenizer()


def test_packed_examples_each_have_their_unpacked_loss(work):
    """Three examples in one packed row: each one's summed loss (and every logit at its targets) is what it
    has alone; nothing attends or predicts across the boundaries. Gemma 3's sliding-window layers included."""
    import torch.nn.functional as F
    from transformers import AutoConfig, AutoModelForCausalLM

    from dist_train.data.packing import pack, pack_rows
    from dist_train.tasks import build_task

    task = build_task(load_config(t2t_config(work, lora=False), ["data.packing=true", "model.labelled_logits=false"]))
    splits = task.prepare(task.load_tokenizer())
    rows = splits.train.select(range(3))
    packed, fill = pack(rows, 48)
    assert len(packed) == 1 and fill == sum(rows["length"]) / 48
    batch = task.collator(0)([packed[0]])
    assert "attention_mask" not in batch and batch["position_ids"][0].tolist().count(0) == 3
    tok = task.tokenizer
    gemma = {"model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "sliding_window": 4,
             "layer_types": ["sliding_attention", "full_attention"], "vocab_size": len(tok),
             "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id, "bos_token_id": tok.eos_token_id}
    for spec in (LLAMA, gemma):
        torch.manual_seed(0)
        config = dict(spec, vocab_size=len(tok), pad_token_id=tok.pad_token_id)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config)).eval()

        def losses(logits, labels):
            return F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="none")

        with torch.no_grad():
            def run(b):  # what the task passes to the model in training: no labels, no cache
                return model(**{k: v for k, v in b.items() if k != "labels"}, use_cache=False).logits

            together = losses(run(batch), batch["labels"])
            start, alone = 0, []
            for row in rows:
                one = task.collator(0)([row])
                alone.append(losses(run(one), one["labels"]))
                n = len(row["input_ids"])
                torch.testing.assert_close(together[start:start + n - 1], alone[-1], rtol=1e-5, atol=1e-5)
                start += n
    assert pack_rows([5, 3, 4, 2, 1], 6) == [[0, 4], [2, 3], [1]]  # best fit, longest first
