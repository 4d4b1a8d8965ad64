"""The ``dist-train`` command: train, launch, submit, eval, zero-shot, predict, generate, export, convert, tokenizer,
report, config.

Mistakes in the input end as one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _quiet_libraries() -> None:
    # Offline by design: never try a model hub; keep library chatter out of the user's terminal.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # transformers imports DeepSpeed for its integration checks: tell it about the accelerator up front.
    from dist_train.engine.options import use_deepspeed_cpu_accelerator

    use_deepspeed_cpu_accelerator()


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def cmd_train(args) -> int:
    from dist_train.config import dump_yaml, load_config

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    from dist_train.api import train

    return train(cfg).exit_code  # (a missing file is named by its key, before any work)


def cmd_config(args) -> int:
    from dist_train.errors import UserError

    if args.reference:
        if args.config:
            raise UserError("config: --reference prints every key of every config; give no CONFIG with it")
        from dist_train.config_reference import reference

        print(reference(), end="")
        return 0
    if not args.config:
        raise UserError("config: give a CONFIG file to print with every default filled in, or --reference")
    from dist_train.config import dump_yaml, load_config

    print(dump_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def cmd_launch(args) -> int:
    from dist_train.config import load_config
    from launcher.launch import (LaunchArgs, build_command, check_slurm_grant, launch_env, preflight, render,
                                 run_workers)

    cfg = load_config(args.config, args.overrides)  # config errors surface here, before any worker starts
    largs = LaunchArgs(args.nproc_per_node, args.nnodes, args.node_rank, args.rdzv_endpoint, args.rdzv_id,
                       args.max_restarts, args.launcher)
    cmd, env = build_command(largs, args.config, args.overrides, cfg.checkpoint.stop_signals), launch_env(largs)
    if args.dry_run:
        print(render(cmd, env))
        return 0
    preflight(cfg, largs.nnodes)
    check_slurm_grant(largs.nproc_per_node)
    print(f"dist-train: launching {render(cmd, env)}", flush=True)
    return run_workers(cmd, env, cfg.checkpoint.stop_signals)


def cmd_submit(args) -> int:
    from dist_train.config import load_config
    from launcher.submit import SubmitArgs, render, submit

    cfg = load_config(args.config, args.overrides)
    overrides = [o for o in args.overrides if not o.startswith("output_dir=")]
    sargs = SubmitArgs(args.config, overrides, cfg.output_dir, args.nodes, args.gpus_per_node, args.nproc_per_node,
                       args.time, args.partition, args.account, args.qos, args.cpus_per_task, args.mem,
                       args.requeue, args.signal_lead, args.job_name)
    if args.dry_run:
        print(render(sargs), end="")
        return 0
    # The job would find these only once it starts, maybe hours later.
    from dist_train.tasks import task_class
    from dist_train.run.run_dir import check_writable

    check_writable(Path(cfg.output_dir))
    task_class(cfg.task.name).check_files(cfg.data)
    job_id, log = submit(sargs)
    print(f"submitted job {job_id}; log: {log}; output: {sargs.output_dir}/job-{job_id}")
    return 0


def _model_folder(args, command: str):
    """Check MODEL_DIR and the options against it before loading anything heavy (nothing is written)."""
    from dist_train.config import check_number
    from dist_train.use.inference import ModelFolder
    from dist_train.paths import check_output_file

    check_number("--batch-size", args.batch_size, 1, None, "[", where="")
    folder = ModelFolder(args.model_dir)
    folder.require(command)
    max_length = folder.max_length(args.max_length)
    if args.output and args.output != "-":
        check_output_file(args.output, "--output", (getattr(args, "file", None), getattr(args, "data", None)))
    return folder, max_length


def _options(args, max_length: int) -> dict:
    """The data options of eval/predict that override what the folder was trained with."""
    return {"text_column": args.text_column, "text_pair_column": args.text_pair_column,
            "label_column": getattr(args, "label_column", None), "target_column": getattr(args, "target_column", None),
            "max_length": max_length}


def _write_report(report: dict, task, output: str | None) -> None:
    """Print the report; with --output also write it there, and what the evaluation generated beside it
    (``REPORT.outputs.jsonl``: sources, references, hypotheses)."""
    text = json.dumps(report, indent=2)
    if output:
        with open(output, "w") as fh:
            fh.write(text + "\n")
        task.save_eval_outputs(Path(output).with_suffix(".outputs.jsonl"))
    print(text)


def cmd_eval(args) -> int:
    from dist_train.use.inference import ModelInUse

    folder, max_length = _model_folder(args, "eval")
    model = ModelInUse(folder, _options(args, max_length), args.precision)
    _write_report(model.evaluate(args.data, args.batch_size), model.task, args.output)
    return 0


def cmd_zero_shot(args) -> int:
    from dist_train.config import load_config
    from dist_train.paths import check_output_file
    from dist_train.tasks import task_class
    from dist_train.use.zero_shot import zero_shot

    cfg = load_config(args.config, args.overrides)
    task_class(cfg.task.name).check_files(cfg.data)
    if args.output:
        check_output_file(args.output, "--output")
    report, task = zero_shot(cfg, args.split)
    _write_report(report, task, args.output)
    return 0


def cmd_predict(args) -> int:
    from dist_train.errors import UserError
    from dist_train.use.inference import ModelInUse

    if (args.question is None) != (args.context is None):
        raise UserError("predict: --question and --context go together (a question_answering model answers a "
                        "question from its context)")
    if args.question is not None:
        if args.texts or args.file:
            raise UserError("predict: give --question/--context, texts, or --file FILE; not several")
        args.texts = [args.question, args.context]
    if bool(args.texts) == bool(args.file):
        raise UserError("predict: give either texts to classify or --file FILE (with --output FILE)")
    if args.file == "-" and not args.output:
        args.output = "-"  # a pipe in, a pipe out
    if args.file and not args.output:
        raise UserError("predict: --file needs --output FILE for the predictions (or --output - for standard output)")
    if args.output and not args.file:
        raise UserError("predict: --output goes with --file FILE; texts given on the command line are printed")
    folder, max_length = _model_folder(args, "predict")
    if args.question is not None and folder.task != "question_answering":
        raise UserError(f"predict: --question/--context are for question_answering models; MODEL_DIR "
                        f"'{args.model_dir}' is a {folder.task} model: give its texts")
    if args.file == "-":
        args.file = _stdin_table()
    model = ModelInUse(folder, _options(args, max_length), args.precision)
    if args.file:
        n = model.predict_file(args.file, args.output, args.batch_size)
        if args.output != "-":
            print(f"wrote {n} predictions to {args.output}")
        return 0
    texts, pairs = model.task.command_line_inputs(args.texts)
    shown = texts if pairs is None else [f"{a}\t{b}" for a, b in zip(texts, pairs)]
    for text, prediction in zip(shown, model.predict(texts, pairs, args.batch_size)):
        print(model.task.format_prediction(text, prediction))
    return 0


def _stdin_table() -> str:
    """``--file -``: standard input, read whole as a TSV with a header line, into a temporary file (removed at
    exit) that is read like any ``.tsv``."""
    import atexit
    import shutil
    import tempfile

    from dist_train.errors import UserError

    if sys.stdin is None or sys.stdin.isatty():
        raise UserError("predict: --file - reads standard input, but nothing is piped in; e.g. "
                        "cat new.tsv | dist-train predict MODEL_DIR --file -")
    text = sys.stdin.read()
    if not text.strip():
        raise UserError("predict: --file -: standard input is empty; pipe in a TSV with a header line and a text column")
    folder = tempfile.mkdtemp(prefix="dist-train-stdin-")
    atexit.register(shutil.rmtree, folder, True)
    path = Path(folder, "stdin.tsv")
    path.write_text(text, encoding="utf-8")
    return str(path)


def cmd_generate(args) -> int:
    from dist_train.config import check_number
    from dist_train.errors import UserError
    from dist_train.use.inference import ModelFolder, ModelInUse
    from dist_train.paths import check_output_file
    from dist_train.tasks import task_class

    if bool(args.prompts) == bool(args.file):
        raise UserError("generate: give either prompts or --file FILE (one prompt per line)")
    check_number("--max-new-tokens", args.max_new_tokens, 1, None, "[", where="")
    check_number("--temperature", args.temperature, 0, None, "[", hint=" (0 = greedy)", where="")
    check_number("--top-p", args.top_p, 0, 1, "(]", where="")
    check_number("--batch-size", args.batch_size, 1, None, "[", where="")
    folder = ModelFolder(args.model_dir)
    if folder.task is None or not task_class(folder.task).can_generate:
        what = f"a {folder.task} model" if folder.task else "not a model dist-train trained"
        raise UserError(f"generate: MODEL_DIR '{args.model_dir}' is {what}; generate needs a causal_lm model "
                        "(e.g. the final/ of configs/clm_pretrain.yaml)")
    positions = folder.positions or 1024
    if args.max_new_tokens >= positions:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} leaves no room for the prompt in the model's "
                        f"{positions} positions; use at most {positions - 1}")
    if args.output:
        check_output_file(args.output, "--output", (args.file,))
    prompts = args.prompts
    if args.file:
        from dist_train.data.sources import _check_readable

        _check_readable(args.file, "--file")
        prompts = [line.rstrip("\n") for line in open(args.file, encoding="utf-8") if line.strip()]
    model = ModelInUse(folder, {"max_length": positions - args.max_new_tokens}, args.precision)
    texts = model.task.generate(model.engine, prompts, args.max_new_tokens, args.temperature, args.top_p,
                                args.seed, args.batch_size)
    if args.output:
        with open(args.output, "w") as fh:
            for prompt, text in zip(prompts, texts):
                fh.write(json.dumps({"prompt": prompt, "generated": text}) + "\n")
        print(f"wrote {len(texts)} generations to {args.output}")
        return 0
    for prompt, text in zip(prompts, texts):
        print(model.task.generated_line(prompt, text))  # one line per prompt (--output keeps the text exactly)
    return 0


def cmd_export(args) -> int:
    from dist_train.run.checkpoint import checkpoints
    from dist_train.errors import UserError
    from dist_train.use.export import export_checkpoint
    from dist_train.paths import check_new_folder

    if args.quantize and not args.onnx:
        raise UserError(f"export: --quantize {args.quantize} quantizes the ONNX graph; add --onnx")
    if args.onnx:
        from dist_train.use.deploy import export_onnx

        if args.adapter_only:
            raise UserError("export: --onnx writes the whole model; drop --adapter-only")
        result, check = export_onnx(args.source, args.out_dir, args.quantize)
        print(f"exported {args.source} to {result} (ONNX {args.quantize or 'fp32'}; checked on {check['inputs']} "
              f"texts: logits within {check['max_abs_diff']:.1e} of PyTorch's, {check['agreement']:.0%} same predictions)")
        return 0
    # Paths are checked before export_checkpoint consolidates the weights (the slow part).
    ckpt, out = Path(args.source), Path(args.out_dir)
    if not ckpt.exists():
        raise UserError(f"export: '{ckpt}' does not exist; give a checkpoint folder like "
                        "output_dir/checkpoints/step-N")
    steps = checkpoints(ckpt / "checkpoints")
    if steps:
        raise UserError(f"export: '{ckpt}' is a run folder; give one of its checkpoints, e.g. {steps[0]}")
    if (ckpt / "config.json").is_file() and not (ckpt / "hf").exists():
        raise UserError(f"export: '{ckpt}' is already a model folder (config.json, weights); use it as it is")
    check_new_folder(out)
    result = export_checkpoint(args.source, args.out_dir, adapter_only=args.adapter_only)
    print(f"exported {args.source} to {result}")
    return 0


def cmd_convert(args) -> int:
    from dist_train.model.gguf import convert_gguf

    convert_gguf(args.gguf_file, args.out_dir, overwrite=args.overwrite)
    return 0


def cmd_tokenizer(args) -> int:
    import time
    from pathlib import Path

    from dist_train.data.corpus import read_corpus
    from dist_train.data.new_tokenizer import train_tokenizer
    from dist_train.errors import UserError

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"tokenizer: --out '{out}' exists and is not empty; choose a new folder")
    if args.vocab_size < 300:
        raise UserError(f"tokenizer: --vocab-size must be >= 300, got {args.vocab_size}")
    start = time.perf_counter()
    corpus = read_corpus(args.files, args.text_column, args.text_unit, what="FILES")
    texts = (text for batch in corpus.iter(batch_size=1000) for text in batch["text"])
    tok = train_tokenizer(texts, args.kind, args.vocab_size, out, args.min_frequency, args.lowercase)
    print(f"trained a {args.kind} tokenizer of {len(tok)} tokens on {len(corpus)} documents in "
          f"{time.perf_counter() - start:.1f} s; saved to {out}")
    return 0


class _DefaultsShown(argparse.HelpFormatter):
    """``--help`` names each option's default where it has a value (not for flags and unset options)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if "%(default)" in text or default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as the one line every dist-train error is (argparse prints the usage first),
    and every option's default in its help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _DefaultsShown)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        command = self.prog.removeprefix("dist-train").strip()
        if command:
            self.exit(2, f"dist-train: error: {command}: {message} (see dist-train {command} --help)\n")
        self.exit(2, f"dist-train: error: {message} (see dist-train --help)\n")


def cmd_report(args) -> int:
    from dist_train.errors import UserError
    from dist_train.paths import check_output_file
    from dist_train.use.report import draw_runs, read_run

    if args.out is None and len(args.runs) > 1:
        raise UserError("report: several runs need --out FILE.png for the overlay")
    out = args.out or str(Path(args.runs[0]) / "report.png")
    for run in args.runs:
        read_run(run)  # a folder that is not a run is named before anything is drawn
    check_output_file(out, "--out")
    print(f"wrote {draw_runs(args.runs, out)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from dist_train import __version__

    parser = _Parser(prog="dist-train", description=__doc__.split("\n\n")[0].replace("\n", " ").replace("``", ""))
    parser.add_argument("--version", action="version", version=f"dist-train {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train from a YAML config (one process; under torchrun, one worker)")
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-5 data.max_length=128")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("launch", help="train on N processes through torchrun (or the DeepSpeed launcher)")
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. engine.kind=deepspeed engine.deepspeed.zero_stage=2")
    p.add_argument("--nproc-per-node", type=int, default=1, help="worker processes per node")
    p.add_argument("--nnodes", type=int, default=1, help="number of nodes")
    p.add_argument("--node-rank", type=int, default=0, help="this node's rank (DeepSpeed launcher)")
    p.add_argument("--rdzv-endpoint", help="HOST:PORT of the rendezvous (multi-node)")
    p.add_argument("--rdzv-id", default="dist-train", help="rendezvous id shared by all nodes of a job")
    p.add_argument("--max-restarts", type=int, default=0, help="restart the worker group this many times")
    p.add_argument("--launcher", choices=["torchrun", "deepspeed"], default="torchrun",
                   help="what starts the worker processes")
    p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("submit", help="submit a training job to SLURM (sbatch), multi-node, with requeue")
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted overrides")
    p.add_argument("--nodes", type=int, default=1, help="machines the job runs on")
    p.add_argument("--gpus-per-node", type=int, default=0, help="one training process per GPU (0 = CPU job)")
    p.add_argument("--nproc-per-node", type=int, default=1, help="training processes per node of a CPU job")
    p.add_argument("--time", default="01:00:00", help="time limit, HH:MM:SS")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--cpus-per-task", type=int, help="CPUs per node (default: one per training process)")
    p.add_argument("--mem", help="memory per node, e.g. 64G")
    p.add_argument("--requeue", action="store_true", help="requeue when stopped by the time-limit signal")
    p.add_argument("--signal-lead", type=int, default=120, help="seconds before the limit to checkpoint and stop")
    p.add_argument("--job-name", default="dist-train", help="the SLURM job's name")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script instead of submitting it")
    p.set_defaults(func=cmd_submit)

    def model_args(p):
        p.add_argument("model_dir", help="a trained model folder (e.g. output/sentiment/final)")
        p.add_argument("--text-column", help="text column (default: the one the model was trained on)")
        p.add_argument("--text-pair-column", help="second text column for pair tasks")
        p.add_argument("--max-length", type=int, help="truncate to this many tokens (default: as trained)")
        p.add_argument("--batch-size", type=int, default=64, help="examples per forward pass")
        p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                       help="compute precision (bf16: GPUs and CPUs with native bf16; fp16: CUDA GPUs)")

    p = sub.add_parser("eval", help="evaluate a model folder on a labelled file (language models: perplexity on text)")
    model_args(p)
    p.add_argument("--data", required=True, help="labelled .tsv/.csv/.jsonl/.parquet file; for a language model, "
                                                 "text as in data.train (files, globs, folders)")
    p.add_argument("--label-column", help="label column (default: the one the model was trained on)")
    p.add_argument("--target-column", help="text_to_text: target text column (default: as trained)")
    p.add_argument("--output", help="also write the report (JSON) here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("zero-shot", help="evaluate a config's model.pretrained with no training (text_to_text: "
                       "the template alone; task.few_shot=K for K-shot): the baseline of a fine-tuning run")
    p.add_argument("config", help="YAML config file (the one you train with)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. task.few_shot=3")
    p.add_argument("--split", choices=["test", "validation"], default="test", help="which data file to evaluate on")
    p.add_argument("--output", help="also write the report (JSON) here, and the generated texts beside it")
    p.set_defaults(func=cmd_zero_shot)

    p = sub.add_parser("predict", help="predict labels for texts or a file")
    model_args(p)
    p.add_argument("texts", nargs="*", help="texts to classify (a model of text pairs: FIRST SECOND per pair; "
                   "question answering: QUESTION CONTEXT per question)")
    p.add_argument("--question", help="question answering: the question (with --context)")
    p.add_argument("--context", help="question answering: the text that holds the answer")
    p.add_argument("--file", help="a .tsv/.csv/.jsonl/.parquet file with a text column, or - for standard input "
                   "read as a TSV with a header line (question answering: "
                   "SQuAD JSON, or JSON lines / a table with question and context)")
    p.add_argument("--output", help="where --file's predictions go (TSV; - for standard output, the default with --file -)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="write a training checkpoint (any engine) as a Hugging Face model folder")
    p.add_argument("source", help="a checkpoint folder, e.g. output/sentiment/checkpoints/step-540 (with --onnx also "
                   "a run folder or a model folder such as its final/)")
    p.add_argument("out_dir", help="new folder for the model (safetensors, config with labels, tokenizer)")
    p.add_argument("--adapter-only", action="store_true",
                   help="a LoRA checkpoint: write peft's adapter folder (adapter_config.json, adapter weights) "
                        "instead of the merged model")
    p.add_argument("--onnx", action="store_true", help="write an ONNX folder for onnxruntime instead (from a run, "
                                                       "its final/ or a checkpoint); predict and eval take it")
    p.add_argument("--quantize", choices=["int8"], help="with --onnx: int8 weights (dynamic quantization)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("convert", help="write a GGUF model file (llama.cpp, e.g. 4-bit) as a Hugging Face model folder")
    p.add_argument("gguf_file", help="a .gguf file of a causal language model (llama, gemma3, qwen2, ...)")
    p.add_argument("out_dir", help="new folder for the model (float32 safetensors, config, tokenizer)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT_DIR if it holds something (only once the new model is complete)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("tokenizer", help="train a tokenizer (byte-level BPE or WordPiece) on text files")
    p.add_argument("files", nargs="+", help="text files, globs or folders; .jsonl/.tsv/.csv/.parquet read --text-column")
    p.add_argument("--out", required=True, help="new folder for the tokenizer (Hugging Face format)")
    p.add_argument("--kind", choices=["bpe", "wordpiece"], default="bpe",
                   help="bpe: byte-level, GPT-2 style (causal LM); wordpiece: BERT style with [MASK] (masked LM)")
    p.add_argument("--vocab-size", type=int, default=8000, help="tokens in the vocabulary, special ones included")
    p.add_argument("--min-frequency", type=int, default=2, help="how often a piece must occur to enter it")
    p.add_argument("--lowercase", action="store_true")
    p.add_argument("--text-column", default="text", help="text column of .jsonl/.tsv/.csv/.parquet files")
    p.add_argument("--text-unit", choices=["line", "paragraph", "document"], default="line",
                   help="what one document is in a plain-text file")
    p.set_defaults(func=cmd_tokenizer)

    p = sub.add_parser("generate", help="continue prompts with a causal language model (e.g. clm_pretrain's final/)")
    p.add_argument("model_dir", help="a causal_lm model folder (output_dir/final)")
    p.add_argument("prompts", nargs="*", help="prompts to continue")
    p.add_argument("--file", help="a text file, one prompt per line")
    p.add_argument("--output", help="write one JSON line per prompt here instead of printing")
    p.add_argument("--max-new-tokens", type=int, default=50, help="the most tokens generated per prompt")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (deterministic)")
    p.add_argument("--top-p", type=float, default=0.95, help="sample from the smallest set of tokens with this mass")
    p.add_argument("--seed", type=int, default=1, help="the same seed and prompts give the same text")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="compute precision")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("config", help="print a config with every default filled in (checked as train checks it), "
                       "or --reference: every config key with its type, default, range and meaning")
    p.add_argument("config", nargs="?", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-5")
    p.add_argument("--reference", action="store_true", help="print the config reference (docs/config-reference.md)")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("report", help="draw a run's curves (or several runs overlaid) as a PNG")
    p.add_argument("runs", nargs="+", help="run folders (output_dir of dist-train train)")
    p.add_argument("--out", help="PNG to write (default: RUN/report.png for one run; required for several)")
    p.set_defaults(func=cmd_report)
    parser.commands = sub.choices
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    """Options may come before, between or after the positionals of every command (overrides, texts)."""
    parser = build_parser()
    commands = parser.commands
    if not argv or argv[0] not in commands:
        return parser.parse_args(argv)  # help, or the error for a missing or unknown command
    args = commands[argv[0]].parse_intermixed_args(argv[1:])
    args.command = argv[0]
    return args


def _report(exc: BaseException) -> int:
    """The one line for an error the user can fix, on stderr; a worker of `dist-train launch` leaves it to
    the launcher instead, which prints each different line once rather than once per rank."""
    from launcher.launch import write_error

    code, message, rank = getattr(exc, "exit_code", 2), " ".join(str(exc).split()), os.environ.get("RANK", "0")
    if not write_error(rank, code, message):
        who = f"rank {rank}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"dist-train: {who}error: {message}", file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    from dist_train import errors
    from dist_train.run import stopping

    training = argv[:1] == ["train"]
    try:
        if training:
            # A training process handles stop signals and Ctrl-C from its start (imports alone take
            # seconds); the config's checkpoint.stop_signals take over once it is read.
            stopping.install(["SIGUSR1", "SIGTERM"])
        _quiet_libraries()
        args = parse(argv)
        if args.command in ("eval", "predict", "export", "generate", "zero-shot", "convert") or (args.command == "train"
                                                                         and not args.print_config):
            _quiet_transformers()
        if args.command == "train":
            from launcher.launch import register_worker

            register_worker()
        return args.func(args)
    except errors.UserError as exc:
        return _report(exc)
    except errors.StopRequested as exc:
        if os.environ.get("RANK", "0") == "0":
            print(f"dist-train: stopped by {exc.signal_name} before training started; nothing to save",
                  file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        print("dist-train: interrupted", file=sys.stderr, flush=True)
        return 130
    except BrokenPipeError:  # `dist-train eval ... | head`: the reader left; nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (Python flushes stdout again at exit)
        return 0
    except Exception:
        from launcher.launch import peer_error

        if training and peer_error():
            return 1  # this rank failed because another stopped on bad input; the launcher prints that line
        raise
    finally:
        if training:
            stopping.uninstall()  # called in-process (tests, notebooks): leave the caller's handlers as they were


if __name__ == "__main__":
    sys.exit(main())
