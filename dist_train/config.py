"""Typed run configuration: YAML file + dotted CLI overrides -> nested dataclasses.

Every field is documented where it is declared (the string under it). Unknown keys are errors that name
the closest valid key; values of the wrong type are errors that name the key, the expected type and the
value given.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from dist_train.engine import check_engine_config
from dist_train.engine.options import DeepSpeedOptions, FsdpOptions, upgrade_engine_keys, upgrade_engine_path
from dist_train.errors import UserError


# What a resumed run may change, declared on the fields themselves: a field's own mark, else the mark of
# the section that holds it. "fixed" values are part of what a checkpoint continues (model, task, data
# processing, seed, micro-batch, optimizer and schedule); changing one on resume is an error naming it.
# A new field inherits its section's mark, so it is never left without a rule.
MAY_CHANGE = {"on_resume": "may_change"}
FIXED = {"on_resume": "fixed"}


@dataclass
class TokenizerTrainConfig:
    kind: Optional[Literal["bpe", "wordpiece"]] = None
    """``bpe``: byte-level BPE with an end-of-text token (GPT-2 style, for causal LM); ``wordpiece``: BERT
    style with [CLS] [SEP] [MASK] (for masked LM); null: no training, use ``model.tokenizer``. The trained
    tokenizer is cached (same corpus and settings: trained once) and saved with every checkpoint and export."""
    vocab_size: int = 8000
    """Vocabulary size, special tokens included."""
    min_frequency: int = 2
    """A merge or word piece must occur this often in the corpus to enter the vocabulary."""
    lowercase: bool = False
    """Lowercase text before tokenizing (BERT 'uncased')."""


@dataclass
class LoraConfig:
    """LoRA through peft: the pretrained weights stay frozen; small low-rank matrices beside chosen linear
    layers, and the task head, are trained (docs/configuration.md#lora)."""

    r: int = 8
    """Rank of each adapter pair (A: r x in, B: out x r); trainable parameters grow linearly with it."""
    alpha: float = 16.0
    """Scale of the adapters' output: the update added to a layer is ``alpha / r x B A``."""
    dropout: float = 0.1
    """Dropout on the adapters' input while training, in [0, 1)."""
    target_modules: Optional[list[str]] = None
    """Names (or name suffixes) of the linear layers that get adapters, e.g. ``[query, value]``; null = peft's
    default for the model type (BERT family: query and value; GPT-2: c_attn). A model type without a default
    needs them listed."""


@dataclass
class ModelConfig:
    pretrained: Optional[str] = None
    """A local Hugging Face model folder, or a known name of a model shipped in a pip package
    (``all-MiniLM-L6-v2``). Its weights are loaded and a fresh task head is added where it has none."""
    config: Optional[dict[str, Any]] = None
    """Build the model from scratch (random init) from these Hugging Face config keys, e.g.
    ``{model_type: bert, hidden_size: 64, num_hidden_layers: 2, ...}``. Exclusive with ``pretrained``."""
    tokenizer: Optional[str] = None
    """Tokenizer folder or known name; defaults to ``pretrained``. Required with ``config``."""
    trust_remote_code: bool = False
    """Allow model folders to run their own Python code. Off unless you trust the folder."""
    train_tokenizer: TokenizerTrainConfig = field(default_factory=lambda: TokenizerTrainConfig())
    """Train a new tokenizer on ``data.train`` first (language modelling from scratch)."""
    keep_layers: Optional[Union[int, list[int]]] = field(default=None, metadata=FIXED)
    """A smaller copy of ``pretrained``: keep only these of its transformer layers (a list of indices, e.g.
    ``[0, 2, 4]``) or every k-th one (an int k: layers 0, k, 2k, ...), initialised from its weights; the
    export is the stock architecture with fewer layers. The student of a distillation (``distill``)."""
    lora: Optional[LoraConfig] = field(default=None, metadata=FIXED)
    """Fine-tune ``pretrained`` with LoRA adapters instead of all weights, e.g. ``{r: 8, alpha: 16}``; null =
    full fine-tuning. Checkpoints then hold only the trained tensors; ``final/`` is a plain model with the
    adapters merged in (docs/configuration.md#lora)."""
    cls_only_last_layer: Union[bool, Literal["auto"]] = field(default="auto", metadata=MAY_CHANGE)
    """Sequence classifiers whose head reads [CLS] alone (BERT, RoBERTa, MiniLM...): compute the last layer's
    query, attention output and feed-forward for position 0 only (keys and values still for every token).
    The same logits, loss and gradients for ~14% fewer FLOPs in MiniLM's 6 layers (1.12-1.24x faster measured, docs/performance.md); the model
    and its exports stay stock. ``auto``: wherever it applies (not with LoRA, token or LM tasks); ``true``: required; ``false``: off
    (docs/performance.md)."""
    labelled_logits: Union[bool, Literal["auto"]] = field(default="auto", metadata=MAY_CHANGE)
    """Language-model losses (causal_lm, masked_lm, text_to_text): project only the positions that have a
    target onto the vocabulary (``gather``), and where the model returns its output layer's result untouched
    (GPT-2, Llama, Gemma 3, Qwen, Mistral, T5...) compute the cross-entropy chunk by chunk inside the output
    layer so the full logits tensor never exists (``chunked``). The same loss and gradients, much less memory
    and time with a large vocabulary; the model and its exports stay stock. ``auto``: wherever it applies
    (chunked, else gather); ``true``: required; ``false``: off (full logits) (docs/configuration.md)."""


@dataclass
class DataConfig:
    train: Optional[Union[str, list[str]]] = field(default=None, metadata=MAY_CHANGE)
    """Training data. Classification: one labelled file (.tsv, .csv, .jsonl/.json or .parquet). Token
    classification: one CoNLL-style file (a word and its tag per line) or JSON lines with token and tag lists.
    Language modelling: text files (.txt: see ``text_unit``), JSONL or tables with ``text_column``; a path, a
    glob (``corpus/*.txt``), a folder, or a list of these."""
    validation: Optional[Union[str, list[str]]] = field(default=None, metadata=MAY_CHANGE)
    """Validation data, as ``train``. If absent, ``validation_split`` of train is carved off (when > 0)."""
    test: Optional[Union[str, list[str]]] = field(default=None, metadata=MAY_CHANGE)
    """Test data, as ``train``, evaluated once at the end into ``eval_report.json``."""
    text_column: str = "sentence"
    """Column holding the text."""
    text_pair_column: Optional[str] = None
    """Optional second text column for sentence-pair tasks."""
    tag_column: Optional[Union[int, str]] = None
    """token_classification, CoNLL-style files: the column holding the tag, an index (0 = the first, -1 =
    the last) or a name the file declares in a first line ``# global.columns = ...``; null = the last
    column. (JSON lines hold lists in ``text_column`` / ``label_column`` instead.)"""
    label_column: str = "label"
    """Column holding the label (ints or strings; regression: a number)."""
    target_column: str = "target"
    """text_to_text: column holding each row's target text (``text_column`` holds the source)."""
    label_separator: Optional[str] = None
    """multi_label in a .tsv/.csv: what separates a row's labels in its ``label_column`` cell (e.g. ``|`` for
    ``sports|politics``; an empty cell = no labels). JSON lines and Parquet hold a list per row instead."""
    train_rows: Optional[int] = None
    """Train on this many rows of ``train`` (after ``validation_split``), e.g. for a learning curve; null = all.
    Classification draws a stratified subset (each label keeps its share); other tasks a random one. Nested:
    for one ``train_rows_seed``, the rows of a smaller subset are part of every larger one."""
    train_rows_seed: int = 42
    """Seed of the order ``train_rows`` takes rows in (another seed, another draw)."""
    validation_split: float = 0.0
    """Fraction of train held out as validation when no validation file is given (0 = none)."""
    split_seed: int = 42
    """Seed of the train/validation split."""
    max_length: int = 128
    """Classification: truncate every example to this many tokens. Language modelling: the block length
    (documents are joined end to end and cut into blocks of exactly this many tokens)."""
    text_unit: Literal["line", "paragraph", "document"] = "line"
    """What one document is in a plain-text file: a line, a paragraph (blank-line separated: use this for
    hard-wrapped text such as books), or the whole file."""
    num_proc: Optional[int] = field(default=None, metadata=MAY_CHANGE)
    """Processes that tokenize a corpus (``datasets.map``); null = one. The result is cached either way."""
    packing: bool = False
    """text_to_text with a decoder-only model: pack several training examples into each row of up to
    ``max_length`` tokens, each attending only to itself (position ids restart per example; no padding inside
    a row). The same loss per example as unpacked, fewer padded positions; validation and test stay unpacked
    (docs/tasks.md)."""
    group_by_length: bool = True
    """Batch examples of similar length together (less padding, faster); order stays random across batches."""
    num_workers: int = field(default=0, metadata=MAY_CHANGE)
    """DataLoader worker processes (0 = load in the training process)."""
    cache_dir: Optional[str] = field(default=None, metadata=MAY_CHANGE)
    """Where tokenized data is cached (default: the Hugging Face datasets cache)."""


@dataclass
class TaskConfig:
    name: str = "classification"
    """What to train, one of the tasks in ``dist_train/tasks`` (their registry): ``classification`` (one label
    per text or text pair), ``causal_lm`` (next-token prediction, GPT-style) or ``masked_lm`` (BERT-style
    masked tokens); ``multi_label``: any number of labels per text; ``regression``: one number per text or
    text pair; ``token_classification``: one tag per word, e.g. named entities; ``text_to_text``: a target text
    per source text (translation, summaries, answers) with a decoder-only or encoder-decoder model;
    ``question_answering``: the answer to a question as a span of its context, SQuAD-style (docs/tasks.md)."""
    label_names: Optional[list[str]] = None
    """Display names for the labels, in sorted order of the label values (e.g. ``[negative, positive]`` for 0/1)."""
    label_all_tokens: bool = False
    """token_classification: every sub-word piece of a word carries the word's tag in the loss; false = only
    the first piece (the others are ignored). Either way a word is scored and predicted by its first piece."""
    mlm_probability: float = 0.15
    """masked_lm: fraction of tokens selected as targets; of those 80% become [MASK], 10% a random token, 10% stay."""
    whole_word_mask: bool = False
    """masked_lm: select whole words (all their word pieces) instead of single tokens."""
    threshold: float = 0.5
    """multi_label: a label is predicted when its probability (sigmoid) is above this; in (0, 1)."""
    pooling: Literal["cls", "mean", "auto"] = "cls"
    """classification, multi_label, regression: what the head reads. ``cls``: the model's own head (BERT: the
    [CLS] position through its pooler), a stock transformers export. ``mean``: the mean of the last layer over
    the real tokens, then the classifier (BERT-family heads; not with LoRA), as sentence-transformers models
    such as all-MiniLM-L6-v2 were trained; dist-train's evaluate / predict / deploy rebuild it from the
    export, a plain transformers ``pipeline`` cannot. ``auto``: the model's ``1_Pooling/config.json``
    (sentence-transformers) decides, else cls (docs/configuration.md#models)."""
    template: Optional[str] = None
    """text_to_text (and classification's ``dist-train zero-shot``): the prompt built from each row's source, with ``{source}`` where it goes, e.g.
    ``"Translate English to French: {source}\nFrench:"``; null = the source as it is (decoder-only models: the
    source and a newline). Decoder-only models learn only what follows the prompt: the target and an
    end-of-text token."""
    label_words: Optional[list[str]] = None
    """classification, ``dist-train zero-shot`` with a causal LM: one word per label (in the labels' sorted
    order, e.g. ``[negative, positive]``); the model's answer is the word most likely right after
    ``task.template`` (docs/tasks.md#zero-shot-classification-by-prompting)."""
    chat_template: bool = False
    """text_to_text: put the prompt into the tokenizer's chat template as the user's turn (instruction-tuned
    models); the target is the answer. An error for a tokenizer without one."""
    few_shot: int = field(default=0, metadata=MAY_CHANGE)
    """text_to_text: place this many training pairs (drawn once with ``data.split_seed``, the same for every
    prompt) before each prompt when generating: a k-shot baseline (``dist-train zero-shot``). Training
    examples never carry them."""
    generation_metrics: list[Literal["bleu", "chrf", "rouge", "squad"]] = field(default_factory=list,
                                                                                 metadata=MAY_CHANGE)
    """text_to_text: scores of generated text at validation and test: ``bleu`` and ``chrf`` (sacrebleu, corpus
    level: translation), ``rouge`` (ROUGE-1/2/L F1, rouge-score: summaries), ``squad`` (exact match and token
    F1 with SQuAD's normalisation: answers); all on a 0-100 scale, each usable as ``checkpoint.metric``.
    Empty = loss and perplexity only."""
    validation_generations: int = field(default=100, metadata=MAY_CHANGE)
    """text_to_text: generate for the first N validation examples at every validation (the test split and
    ``dist-train eval`` generate for all); 0 = loss only."""
    max_new_tokens: int = field(default=64, metadata=MAY_CHANGE)
    """text_to_text: the most tokens generated per example."""
    num_beams: int = field(default=1, metadata=MAY_CHANGE)
    """text_to_text: 1 = greedy decoding; more = beam search with this many beams."""
    stop_at_newline: bool = field(default=True, metadata=MAY_CHANGE)
    """text_to_text: keep a generated text up to its first line break (a base model goes on after its answer;
    one-line targets end there). False for targets of several lines."""
    stride: int = 128
    """question_answering: a context longer than fits ``data.max_length`` (with its question) is read in
    windows that overlap by this many tokens, so that an answer cut by one window's edge lies whole in the
    next; less than ``data.max_length``."""
    max_answer_length: int = field(default=30, metadata=MAY_CHANGE)
    """question_answering: the longest answer span predicted, in tokens."""
    null_threshold: float = field(default=0.0, metadata=MAY_CHANGE)
    """question_answering, with unanswerable questions in the training data (SQuAD 2.0): answer "no answer"
    when the no-answer score (start and end logits at the first token, the lowest over an example's
    windows) exceeds the best span's by more than this; raise it for fewer "no answer"s."""
    target_range: Optional[list[float]] = None
    """regression: ``[low, high]``, the range of the targets (e.g. ``[0, 5]`` for STS-B). The model learns
    them scaled to [0, 1]; reports and predictions are in the data's units again. A target outside the range
    is an error naming its file and line. null = the targets as they are."""


@dataclass
class DistillConfig:
    teacher: Optional[str] = None
    """A fine-tuned model folder of the same task and labels (a dist-train ``final/`` or export) whose
    outputs the model learns to imitate; null = no distillation. It runs beside the model in inference
    mode on every process, whole (not sharded by ZeRO-3 or FSDP2), and is never saved in checkpoints."""
    temperature: float = 2.0
    """Softens both models' distributions before they are compared (classification, token
    classification, question answering: KL(teacher || student) at this temperature, times its square)."""
    weight: float = 0.5
    """The share of the teacher's loss: loss = (1 - weight) x the task's loss on the labels + weight x the
    loss against the teacher; 1 = the teacher alone."""


@dataclass
class TrainConfig:
    seed: int = 42
    """Seed for model init, dropout and data order: the same config and seed give identical weights on CPU."""
    epochs: float = field(default=3.0, metadata=MAY_CHANGE)
    """Passes over the training data (ignored when ``max_steps`` > 0)."""
    max_steps: int = field(default=0, metadata=MAY_CHANGE)
    """Stop after this many optimizer steps (0 = use ``epochs``)."""
    micro_batch_size: int = 32
    """Examples per forward/backward pass on each process."""
    grad_accum: int = field(default=1, metadata=MAY_CHANGE)
    """Micro-batches accumulated per optimizer step; global batch = micro_batch_size x grad_accum x world size."""
    eval_batch_size: int = field(default=64, metadata=MAY_CHANGE)
    """Examples per forward pass during evaluation."""
    lr: float = 5e-5
    """Peak learning rate."""
    min_lr_ratio: float = 0.0
    """LR at the end of decay, as a fraction of ``lr``."""
    weight_decay: float = 0.01
    """AdamW weight decay (never applied to biases and normalisation weights)."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    fused_optimizer: bool = True
    """AdamW as torch's fused kernel (all parameters in one pass, on CPU and GPU); false = torch's default
    (a multi-tensor loop on GPU, a per-parameter loop on CPU: 15% of a MiniLM step there, docs/performance.md)."""
    reuse_host_memory: bool = field(default=True, metadata=MAY_CHANGE)
    """Keep the large host-memory blocks a step frees for the next step (Linux/glibc ``mallopt``: no mmap for
    large blocks, no heap trimming) instead of getting fresh zeroed pages from the kernel each step. Measured
    on CPU in docs/performance.md ("Host memory"); the process keeps its peak heap until it exits. No effect
    on GPU memory, macOS or non-glibc Linux."""
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    """LR decay after warmup."""
    warmup_ratio: float = 0.06
    """Warmup length as a fraction of all steps (used when ``warmup_steps`` is 0)."""
    warmup_steps: int = 0
    """Warmup length in steps (overrides ``warmup_ratio`` when > 0)."""
    max_grad_norm: float = field(default=1.0, metadata=MAY_CHANGE)
    """Clip the global gradient norm to this value (0 = no clipping)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Compute precision: bf16 autocast works on CPU and GPU; fp16 (with loss scaling) needs a GPU."""
    eval_every: int = field(default=0, metadata=MAY_CHANGE)
    """Evaluate on validation every N optimizer steps (0 = only at the end of each epoch)."""
    compile: bool = field(default=False, metadata=MAY_CHANGE)
    """Run the model through ``torch.compile`` (fuses elementwise ops; a second sequence length recompiles
    once with dynamic shapes, torch's default). Pays off on GPUs; on a 2-core CPU MiniLM took
    280 s to compile and then ran 13% slower than eager (docs/performance.md)."""
    compile_backend: str = field(default="inductor", metadata=MAY_CHANGE)
    """``torch.compile`` backend: ``inductor`` generates kernels; ``aot_eager`` only captures the graphs
    (a quick check that a model compiles)."""
    max_nonfinite_steps: int = field(default=0, metadata=MAY_CHANGE)
    """Non-finite (NaN/inf) loss or gradient-norm steps to skip on every rank alike before the run stops; 0 =
    stop at the first one (exit 3), never exporting non-finite weights."""
    tf32: bool = field(default=True, metadata=MAY_CHANGE)
    """On NVIDIA GPUs (Ampere and newer), fp32 matmuls use TF32 tensor cores (10-bit mantissa inputs, fp32
    accumulation; ``torch.set_float32_matmul_precision("high")``); no effect on CPU or on bf16 matmuls."""


@dataclass
class EngineConfig:
    kind: Literal["auto", "single", "ddp", "deepspeed", "fsdp"] = "auto"
    """How processes train together: ``single`` (one process), ``ddp`` (torch DistributedDataParallel),
    ``deepspeed`` (ZeRO), ``fsdp`` (PyTorch FSDP2: parameters, gradients and optimizer state sharded over
    the ranks, one unit per transformer block). ``auto``: ddp under a launcher (RANK/WORLD_SIZE set), else
    single."""
    deepspeed: DeepSpeedOptions = field(default_factory=DeepSpeedOptions)
    """Options of ``kind: deepspeed`` (keys of earlier versions: ``engine.zero_stage``, ``offload_optimizer``,
    ``offload_params`` and ``engine.deepspeed`` as DeepSpeed's own keys are read as these)."""
    fsdp: FsdpOptions = field(default_factory=FsdpOptions)
    """Options of ``kind: fsdp`` (earlier ``engine.reshard_after_forward`` and ``offload_params`` are read as
    these)."""
    timeout_s: float = 300.0
    """Collective timeout in seconds: a rank that does not arrive fails the job (naming it) instead of hanging.
    Where rank 0 works alone (tokenizing, completing a checkpoint, exporting) the others wait as long as
    it shows a heartbeat, and fail after this long without one."""


@dataclass
class CheckpointConfig:
    every_steps: int = 0
    """Save a checkpoint every N optimizer steps (0 = only at epoch ends, improved evaluations and the end)."""
    keep_last_n: int = 2
    """Keep this many newest checkpoints (the best one is always kept too)."""
    metric: Optional[str] = None
    """Validation metric that picks the best checkpoint (e.g. accuracy, f1_macro, loss, perplexity);
    null = the task's first (classification: accuracy; language modelling: loss)."""
    mode: Optional[Literal["max", "min"]] = None
    """Whether a larger or smaller ``metric`` is better; null = the task's own direction: min for loss and the other
    error measures (perplexity, mse, hamming_loss), max for the rest."""
    load_best_at_end: bool = True
    """Export the best checkpoint (by ``metric`` on validation) to ``final/`` rather than the last one."""
    every_epoch: bool = True
    """Also save a checkpoint at the end of every epoch."""
    stop_signals: list[str] = field(default_factory=lambda: ["SIGUSR1", "SIGTERM"])
    """Signals that make the run save a checkpoint and stop (exit 0) at the next log step (within
    ``logging.every_steps`` steps): SIGUSR1 ahead of a SLURM time limit (``kill -USR1 <pid>``), SIGTERM from
    SLURM or Kubernetes before they kill the job (``dist-train launch`` passes them on to its workers). One of
    SIGUSR1, SIGUSR2, SIGTERM, SIGHUP, SIGXCPU. Ctrl-C (SIGINT) is always handled and is not listed here.
    Continue later with ``checkpoint.resume=auto``."""
    resume: Optional[str] = None
    """``auto``: continue from the newest complete checkpoint in ``output_dir`` (damaged ones are skipped;
    no checkpoint = start fresh). A path (a ``step-N`` folder, or a run folder) resumes from there. The
    resumed run continues exactly where the checkpoint was taken, also at another world size."""


@dataclass
class LoggingConfig:
    every_steps: int = 10
    """Log training loss and throughput every N optimizer steps."""
    tensorboard: bool = True
    """Write TensorBoard events to ``output_dir/tb``."""
    progress_bar: bool = True
    """Show a tqdm progress bar."""
    peak_tflops: float = 0.0
    """Peak TFLOP/s of one device, for MFU; 0 = look the GPU up in a table (CPU: no MFU)."""


@dataclass
class Config:
    output_dir: str = field(default="output/run", metadata=MAY_CHANGE)
    """Where config.yaml, metrics.jsonl, tb/, checkpoints/ and final/ go."""
    overwrite: bool = field(default=False, metadata=MAY_CHANGE)
    """Replace the run in output_dir: its files are kept in ``.previous/`` until the new run has saved its
    first checkpoint, and put back if it ends before that."""
    model: ModelConfig = field(default_factory=ModelConfig, metadata=FIXED)
    data: DataConfig = field(default_factory=DataConfig, metadata=FIXED)
    task: TaskConfig = field(default_factory=TaskConfig, metadata=FIXED)
    train: TrainConfig = field(default_factory=TrainConfig, metadata=FIXED)
    distill: DistillConfig = field(default_factory=DistillConfig, metadata=FIXED)
    engine: EngineConfig = field(default_factory=EngineConfig, metadata=MAY_CHANGE)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig, metadata=MAY_CHANGE)
    logging: LoggingConfig = field(default_factory=LoggingConfig, metadata=MAY_CHANGE)


# ---------------------------------------------------------------------------------------------------------
# Parsing and validation


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{origin.__name__}[{args}]"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp: Any) -> Any:
    """Return ``value`` as type ``tp`` or raise _Mismatch. Only lossless coercions are made."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return _yaml11_numbers(value)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise _Mismatch
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        (item,) = typing.get_args(tp)
        return [_coerce(v, item) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        return {k: _yaml11_numbers(v) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads "3e-5" (no dot) as a string; accept it as the float it plainly is.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    raise TypeError(f"unsupported config type {tp!r}")


_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _yaml11_numbers(value: Any) -> Any:
    """YAML 1.1 reads ``1e-12`` (no dot) as a string; in free-form values (model.config, engine.deepspeed.config)
    such a string is the number it plainly is."""
    if isinstance(value, str) and _EXPONENT.fullmatch(value):
        return float(value)
    if isinstance(value, dict):
        return {k: _yaml11_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_yaml11_numbers(v) for v in value]
    return value


# What other tools call our keys (Hugging Face Trainer, Lightning, DeepSpeed, habit): key -> ours, in any
# section that has it.
SYNONYMS = {
    # sections
    "training": "train", "trainer": "train", "optim": "train", "optimizer": "train", "optimization": "train",
    "dataset": "data", "datasets": "data", "log": "logging", "logger": "logging", "checkpointing": "checkpoint",
    "checkpoints": "checkpoint", "save": "checkpoint", "distributed": "engine", "strategy": "engine",
    "output": "output_dir", "output_path": "output_dir", "out_dir": "output_dir", "outdir": "output_dir",
    "output_folder": "output_dir", "save_dir": "output_dir", "run_dir": "output_dir",
    "overwrite_output_dir": "overwrite",
    # train
    "learning_rate": "lr", "learningrate": "lr", "lr_rate": "lr", "peak_lr": "lr", "max_lr": "lr",
    "batch_size": "micro_batch_size", "per_device_train_batch_size": "micro_batch_size",
    "train_batch_size": "micro_batch_size", "micro_batch": "micro_batch_size", "bs": "micro_batch_size",
    "per_device_eval_batch_size": "eval_batch_size", "valid_batch_size": "eval_batch_size",
    "num_epochs": "epochs", "num_train_epochs": "epochs", "n_epochs": "epochs", "max_epochs": "epochs",
    "epoch": "epochs",
    "gradient_accumulation_steps": "grad_accum", "gradient_accumulation": "grad_accum",
    "grad_accumulation": "grad_accum", "accumulate_grad_batches": "grad_accum", "accum_steps": "grad_accum",
    "num_steps": "max_steps", "total_steps": "max_steps", "steps": "max_steps", "max_iters": "max_steps",
    "train_steps": "max_steps",
    "eval_steps": "eval_every", "evaluation_steps": "eval_every", "eval_interval": "eval_every",
    "val_check_interval": "eval_every",
    "warmup": "warmup_steps", "num_warmup_steps": "warmup_steps", "warmup_fraction": "warmup_ratio",
    "max_norm": "max_grad_norm", "clip_grad_norm": "max_grad_norm", "grad_clip": "max_grad_norm",
    "gradient_clipping": "max_grad_norm", "gradient_clip_val": "max_grad_norm",
    "wd": "weight_decay", "adam_epsilon": "adam_eps", "eps": "adam_eps", "betas": "adam_betas",
    "lr_scheduler": "scheduler", "lr_scheduler_type": "scheduler", "schedule": "scheduler",
    "dtype": "precision", "mixed_precision": "precision", "fp16": "precision", "bf16": "precision",
    "amp": "precision", "random_seed": "seed",
    # data
    "max_seq_length": "max_length", "max_seq_len": "max_length", "max_len": "max_length",
    "seq_len": "max_length", "seq_length": "max_length", "block_size": "max_length",
    "sequence_length": "max_length", "max_source_length": "max_length",
    "train_file": "train", "train_path": "train", "train_data": "train", "training_data": "train",
    "validation_file": "validation", "dev": "validation", "dev_file": "validation", "valid": "validation",
    "val": "validation", "eval_file": "validation", "test_file": "test",
    "text": "text_column", "text_field": "text_column", "text_col": "text_column", "input_column": "text_column",
    "label": "label_column", "labels": "label_column", "label_field": "label_column",
    "target_column": "label_column",
    "dataloader_num_workers": "num_workers", "workers": "num_workers", "preprocessing_num_workers": "num_proc",
    "val_split": "validation_split", "validation_split_percentage": "validation_split",
    "validation_size": "validation_split", "test_size": "validation_split",
    # model
    "model_name": "pretrained", "model_name_or_path": "pretrained", "name_or_path": "pretrained",
    "path": "pretrained", "tokenizer_name": "tokenizer", "tokenizer_name_or_path": "tokenizer",
    "model_config": "config",
    # task
    "task": "name", "task_name": "name", "type": "name", "label_list": "label_names",
    "mlm_prob": "mlm_probability", "doc_stride": "stride", "max_answer_len": "max_answer_length",
    "null_score_diff_threshold": "null_threshold",
    # engine
    "backend": "kind", "zero": "zero_stage", "stage": "zero_stage", "timeout": "timeout_s",
    # checkpoint
    "save_steps": "every_steps", "save_every": "every_steps", "checkpoint_every": "every_steps",
    "save_total_limit": "keep_last_n", "keep": "keep_last_n", "metric_for_best_model": "metric",
    "resume_from_checkpoint": "resume", "resume_from": "resume", "load_best_model_at_end": "load_best_at_end",
    # logging
    "logging_steps": "every_steps", "log_every": "every_steps", "log_steps": "every_steps",
    "log_every_n_steps": "every_steps", "use_tensorboard": "tensorboard", "tb": "tensorboard",
}


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance, where swapping two neighbouring characters counts as one edit."""
    previous2: list[int] = []
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            cost = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb))
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                cost = min(cost, previous2[j - 2] + 1)
            current.append(cost)
        previous2, previous = previous, current
    return previous[-1]


def _suggest(key: str, valid: list[str], elsewhere: dict[str, str] | None = None) -> str:
    """The fix for unknown ``key``: a known synonym of a valid key; the same key in another section
    (``elsewhere``: name -> section); else the valid key or synonym fewest edits away, if close enough."""
    low = key.lower()
    if SYNONYMS.get(low) in valid:
        return f"did you mean '{SYNONYMS[low]}'?"
    if elsewhere and low in elsewhere and low not in valid:
        return f"did you mean '{elsewhere[low]}.{low}'?"
    candidates = [(name, name) for name in valid]
    candidates += [(synonym, target) for synonym, target in SYNONYMS.items() if target in valid]
    distance, target = min((edit_distance(low, text), target) for text, target in candidates)
    if distance <= max(1, min(3, len(low) // 3)):
        return f"did you mean '{target}'?"
    return "valid keys: " + ", ".join(valid)


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"config: '{where}' must be a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise UserError(f"config: unknown key '{prefix}{key}'; {_suggest(str(key), names, _sections())}")
        tp = hints[key]
        section = _optional_section(tp)
        if section is not None and value is None:
            kwargs[key] = None
            continue
        if section is not None:
            kwargs[key] = _build(section, value, f"{prefix}{key}.")
            continue
        try:
            kwargs[key] = _coerce(value, tp)
        except _Mismatch:
            raise UserError(
                f"config: '{prefix}{key}' expects {_type_name(tp)}, got {_short(value)} ({type(value).__name__})"
            ) from None
    return cls(**kwargs)


def _optional_section(tp: Any) -> type | None:
    """The dataclass of a section field (``X`` or ``Optional[X]``, null = the section is off), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if len(args) == 1 and dataclasses.is_dataclass(args[0]) else None


def _sections() -> dict[str, str]:
    """Field name -> the section that declares it (to point at a key given in the wrong section)."""
    found: dict[str, str] = {}
    for name, tp in typing.get_type_hints(Config).items():
        if dataclasses.is_dataclass(tp):
            for inner in dataclasses.fields(tp):
                found.setdefault(inner.name, name)
    return found


def _has_alias(raw: str) -> bool:
    try:
        return any(isinstance(token, yaml.AliasToken) for token in yaml.scan(raw))
    except yaml.YAMLError:
        return False


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise UserError(f"override '{text}' is not KEY=VALUE (e.g. train.lr=3e-5)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"override '{text}' has an empty key; write e.g. train.lr=3e-5")
    if "*" in raw and _has_alias(raw):  # an alias repeats an anchor's value: a short text can expand without bound
        raise UserError(f"override '{_short(text)[1:-1]}' uses YAML anchors and aliases (& and *); write the value "
                        "out, or put it in the config file")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set_dotted(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing what a config never needs and a reader would miss: a key given twice in one
    mapping (YAML keeps the last one silently: a second ``train:`` section replaces the first)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise UserError(f"line {key_node.start_mark.line + 1}: key '{key}' is given twice in one mapping (also "
                                f"line {seen[key] + 1}); YAML would keep only the last: merge them into one")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _config_file_problem(path: Path) -> str | None:
    try:
        path.stat()
    except OSError as exc:
        if exc.errno == 40:  # ELOOP
            return "is a symbolic link that points back to itself (a loop)"
        return "not found" if not path.is_symlink() else "is a symbolic link to nothing"
    if path.is_dir():
        return "is a folder; give the YAML file (e.g. configs/sentiment.yaml)"
    if not path.is_file():
        return "is not a regular file"
    return None


MAX_ECHO = 200  # characters of a value an error message repeats


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= MAX_ECHO else f"{text[:MAX_ECHO]}... ({len(text)} characters)"


def load_config(path: str | Path | dict | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (or take a dict of its sections), apply ``a.b=value`` overrides, and return the
    validated Config."""
    tree: dict = {}
    if isinstance(path, dict):
        import copy

        tree = copy.deepcopy(path)
    elif path is not None:
        path = Path(path)
        problem = _config_file_problem(path)
        if problem:
            raise UserError(f"config file '{path}' {problem}")
        try:
            tree = yaml.load(path.read_text(), Loader=_StrictLoader) or {}
        except UserError as exc:
            raise UserError(f"config file '{path}' {exc}") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark else ""
            raise UserError(f"config file '{path}'{line} is not valid YAML: {getattr(exc, 'problem', exc)}") from None
        if not isinstance(tree, dict):
            raise UserError(f"config file '{path}' must hold a mapping of sections (model:, data:, train:, ...)")
    upgrade_engine_keys(tree)
    parsed = [_parse_override(text) for text in overrides]
    engine = tree.get("engine") if isinstance(tree.get("engine"), dict) else {}
    kind = next((v for k, v in reversed(parsed) if k == ["engine", "kind"]), engine.get("kind", "auto"))
    for keys, value in parsed:
        keys = upgrade_engine_path(keys, value, kind)
        if keys is not None:
            _set_dotted(tree, keys, value)
    cfg = _build(Config, tree, "")
    validate(cfg)
    return cfg


SEED_MAX = 2**32 - 1  # numpy's seed range (data order and the train/validation split are seeded through it)

# key -> (lowest, highest, bounds): "[" / "(" = the low end included / excluded, "]" / ")" likewise for
# the high end. Floats must also be finite (nan and inf pass no range). Checked before anything runs: each
# of these would otherwise fail deep inside torch, numpy, tokenizers or DeepSpeed, or train on NaN.
RANGES: dict[str, tuple[float | None, float | None, str]] = {
    "model.train_tokenizer.min_frequency": (0, None, "["),
    "model.lora.r": (1, None, "["),
    "model.lora.alpha": (0, None, "("),
    "model.lora.dropout": (0, 1, "[)"),
    "data.validation_split": (0, 1, "[)"),
    "data.split_seed": (0, SEED_MAX, "[]"),
    "data.train_rows": (1, None, "["),
    "data.train_rows_seed": (0, SEED_MAX, "[]"),
    "data.max_length": (2, None, "["),
    "data.num_proc": (1, None, "["),
    "data.num_workers": (0, None, "["),
    "task.mlm_probability": (0, 1, "()"),
    "task.threshold": (0, 1, "()"),
    "task.few_shot": (0, None, "["),
    "task.validation_generations": (0, None, "["),
    "task.max_new_tokens": (1, None, "["),
    "task.num_beams": (1, None, "["),
    "task.stride": (1, None, "["),
    "distill.temperature": (0, None, "("),
    "distill.weight": (0, 1, "[]"),
    "task.max_answer_length": (1, None, "["),
    "task.null_threshold": (None, None, "[]"),
    "train.seed": (0, SEED_MAX, "[]"),
    "train.epochs": (0, None, "["),
    "train.max_steps": (0, None, "["),
    "train.micro_batch_size": (1, None, "["),
    "train.grad_accum": (1, None, "["),
    "train.eval_batch_size": (1, None, "["),
    "train.lr": (0, None, "("),
    "train.min_lr_ratio": (0, 1, "[]"),
    "train.weight_decay": (0, None, "["),
    "train.adam_eps": (0, None, "("),
    "train.warmup_ratio": (0, 1, "[)"),
    "train.warmup_steps": (0, None, "["),
    "train.max_grad_norm": (0, None, "["),
    "train.eval_every": (0, None, "["),
    "train.max_nonfinite_steps": (0, None, "["),
    "engine.timeout_s": (0, 365 * 24 * 3600, "(]"),
    "checkpoint.every_steps": (0, None, "["),
    "checkpoint.keep_last_n": (1, None, "["),
    "logging.every_steps": (1, None, "["),
    "logging.peak_tflops": (0, None, "["),
}
INT_MAX = 2**63 - 1  # what a torch int64 holds

# Signals that make sense as "save and stop": those a scheduler or a user sends on purpose. Others are sent
# by the system for unrelated reasons (SIGCHLD at every child exit, SIGWINCH at a terminal resize) or are
# how to end a run at once (SIGQUIT, Ctrl-\).
STOP_SIGNALS = ("SIGUSR1", "SIGUSR2", "SIGTERM", "SIGHUP", "SIGXCPU")


def _value(cfg: Config, key: str) -> Any:
    value = cfg
    for part in key.split("."):
        value = getattr(value, part) if value is not None else None  # inside a section that is off (null)
    return value


def _range_text(low, high, bounds: str) -> str:
    if high is None:
        return f"{'>=' if bounds[0] == '[' else '>'} {low}"
    return f"in {bounds[0]}{low}, {high}{bounds[1]}"


def check_number(key: str, value, low, high, bounds: str, hint: str = "", where: str = "config: ") -> None:
    """``value`` is a finite number in the range; else an error naming ``key`` (a config key, or a command
    line option with ``where=""``)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{where}{key} must be a finite number, got {value}{hint}")
    ok = (value >= low if bounds[0] == "[" else value > low) if low is not None else True
    if high is not None:
        ok = ok and (value <= high if bounds[-1] == "]" else value < high)
    if not ok:
        raise UserError(f"{where}{key} must be {_range_text(low, high, bounds)}, got {value}{hint}")


def _check_ints(obj, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_ints(value, f"{prefix}{f.name}.")
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT_MAX:
            raise UserError(f"config: {prefix}{f.name} is too large ({value}); it must fit in 64 bits")


def _check_paths(key: str, spec, single: bool, task: str) -> None:
    if spec is None:
        return
    items = [spec] if isinstance(spec, str) else spec
    if single and not isinstance(spec, str):
        raise UserError(f"config: {key}: {task} reads one file; give one path, not a list")
    if not items or any(not item.strip() for item in items):
        raise UserError(f"config: {key} is empty; give a file path{'' if single else ' (or a glob, folder or list)'}")


def _check_stop_signals(names: list[str]) -> None:
    for name in names:
        upper = str(name).upper()
        fixed = upper if upper.startswith("SIG") else f"SIG{upper}"
        if fixed in ("SIGINT", "INT"):
            raise UserError("config: checkpoint.stop_signals: SIGINT (Ctrl-C) is always handled (save and stop); "
                            "remove it from the list")
        if name in STOP_SIGNALS:
            continue
        hint = f"did you mean '{fixed}'? " if fixed in STOP_SIGNALS else ""
        raise UserError(f"config: checkpoint.stop_signals: '{name}' cannot be a stop signal; {hint}use any of "
                        f"{', '.join(STOP_SIGNALS)}")


def _check_distill(cfg: Config, task) -> None:
    from dist_train.tasks import TASKS, task_class

    d, keep = cfg.distill, cfg.model.keep_layers
    if keep is not None:
        if cfg.model.pretrained is None:
            raise UserError("config: model.keep_layers copies layers of model.pretrained, which is not set; give "
                            "model.pretrained (the teacher's folder), or fewer layers in model.config")
        if isinstance(keep, list) and (not keep or any(isinstance(i, bool) or not isinstance(i, int) or i < 0
                                                       for i in keep) or len(set(keep)) != len(keep)):
            raise UserError(f"config: model.keep_layers {keep}: give distinct layer indices (0 = the first), "
                            "e.g. [0, 2, 4], or an int k for every k-th layer")
        if not isinstance(keep, list) and keep < 1:
            raise UserError(f"config: model.keep_layers must be an int >= 1 (every k-th layer) or a list, got {keep}")
    if d.teacher is None:
        defaults = DistillConfig()
        for name in ("temperature", "weight"):
            if getattr(d, name) != getattr(defaults, name):
                raise UserError(f"config: distill.{name} is set but distill.teacher is not; give the teacher's "
                                "folder, or remove it")
        return
    if not task.can_distill:
        able = ", ".join(n for n in TASKS if task_class(n).can_distill)
        raise UserError(f"config: distill.teacher: distillation is for {able}; {cfg.task.name} does not offer it")


def _check_lora(m: ModelConfig, task) -> None:
    from dist_train.tasks import TASKS, task_class

    if m.pretrained is None:
        raise UserError("config: model.lora adapts a pretrained model; set model.pretrained (LoRA on a model "
                        "built from scratch would train adapters beside random frozen weights)")
    if task.peft_task_type is None:
        able = [name for name in TASKS if task_class(name).peft_task_type is not None]
        raise UserError(f"config: model.lora is not available for task.name {task.name}; it works with "
                        f"{', '.join(able)} (or set model.lora=null)")
    if m.cls_only_last_layer is True:
        raise UserError("config: model.cls_only_last_layer=true does not work with model.lora (peft wraps the last "
                        "layer); set it to auto")
    targets = m.lora.target_modules
    if targets is not None and (not targets or any(not str(t).strip() for t in targets)):
        raise UserError(f"config: model.lora.target_modules must name modules (e.g. [query, value]), got {targets}; "
                        "or null for the model type's default")


def _check_pooling(cfg: Config, task) -> None:
    pooling = cfg.task.pooling
    if pooling == "cls":
        return
    if not task.poolable:
        from dist_train.tasks import TASKS, task_class

        able = [name for name in TASKS if task_class(name).poolable]
        raise UserError(f"config: task.pooling={pooling} is for tasks with one head over the text "
                        f"({', '.join(able)}); {cfg.task.name} has none: remove task.pooling")
    if pooling == "mean" and cfg.model.lora is not None:
        raise UserError("config: task.pooling=mean does not work with model.lora (peft wraps the classifier's "
                        "forward); use task.pooling=cls or full fine-tuning (model.lora=null)")
    if pooling == "mean" and cfg.model.cls_only_last_layer is True:
        raise UserError("config: model.cls_only_last_layer=true needs the [CLS] head, but task.pooling=mean reads "
                        "every position; set model.cls_only_last_layer=auto")


# Task fields that only some tasks read (their ``task_fields``): set under another task, they are an error.
TASK_ONLY_FIELDS = ("template", "label_words", "chat_template", "few_shot", "generation_metrics",
                    "validation_generations", "max_new_tokens", "num_beams", "stop_at_newline", "stride",
                    "max_answer_length", "null_threshold")


def _check_unused(section: TaskConfig, task) -> None:
    from dist_train.tasks import TASKS, task_class

    defaults = TaskConfig()
    for name in TASK_ONLY_FIELDS:
        if name not in task.task_fields and getattr(section, name) != getattr(defaults, name):
            readers = ", ".join(n for n in TASKS if name in task_class(n).task_fields)
            raise UserError(f"config: task.{name} is for task.name {readers}; {task.name} does not use it: remove it")


def validate(cfg: Config) -> None:
    """Every check that needs no file and no model: ranges, and fields that must agree. Each error names
    the key, the value given and the fix."""
    _check_ints(cfg, "")
    for key, (low, high, bounds) in RANGES.items():
        value = _value(cfg, key)
        if value is not None:
            hint = " (numpy's seed range)" if high == SEED_MAX else ""
            check_number(key, value, low, high, bounds, hint)
    t = cfg.train
    if len(t.adam_betas) != 2:
        raise UserError(f"config: train.adam_betas needs two numbers, got {t.adam_betas}")
    for i, beta in enumerate(t.adam_betas):
        check_number(f"train.adam_betas[{i}]", beta, 0, 1, "[)")
    if not str(cfg.output_dir).strip():
        raise UserError("config: output_dir is empty; give a folder for the run")
    m = cfg.model
    if (m.pretrained is None) == (m.config is None):
        raise UserError("config: set exactly one of model.pretrained (a model folder) or model.config (from scratch)")
    if m.pretrained is not None and not m.pretrained.strip():
        raise UserError("config: model.pretrained is empty; give a model folder or a known name (all-MiniLM-L6-v2)")
    if m.config is not None and m.tokenizer is None and m.train_tokenizer.kind is None:
        raise UserError("config: model.config builds a model from scratch and needs model.tokenizer (a tokenizer "
                        "folder) or model.train_tokenizer.kind (bpe or wordpiece)")
    if m.config is not None and not isinstance(m.config.get("model_type"), str):
        raise UserError("config: model.config needs 'model_type' (e.g. bert, gpt2, distilbert)")
    d = cfg.data
    if d.train is None:
        raise UserError("config: data.train is required (a .tsv, .csv, .jsonl or .parquet file; text files "
                        "for language modelling)")
    from dist_train.tasks import TASKS, task_class

    if cfg.task.name not in TASKS:
        raise UserError(f"config: task.name '{cfg.task.name}' is not a task; {_suggest(cfg.task.name, list(TASKS))}")
    task = task_class(cfg.task.name)
    _check_unused(cfg.task, task)
    if cfg.data.packing and not task.can_pack:
        able = ", ".join(n for n in TASKS if task_class(n).can_pack)
        raise UserError(f"config: data.packing is for {able}; {cfg.task.name} does not pack: remove it")
    if m.labelled_logits is True and not task.lm_loss:
        able = ", ".join(n for n in TASKS if task_class(n).lm_loss)
        raise UserError(f"config: model.labelled_logits=true is for language-model losses ({able}); "
                        f"{cfg.task.name} has none: set it to auto")
    task.check_config(cfg)
    if m.lora is not None:
        _check_lora(m, task)
    _check_pooling(cfg, task)
    _check_distill(cfg, task)
    tables = task.reads_tables
    if d.train_rows is not None and not tables:
        raise UserError(f"config: data.train_rows subsets labelled rows; {cfg.task.name} trains on a text corpus "
                        "(give it less text, or train.max_steps to stop earlier)")
    for split in ("train", "validation", "test"):
        _check_paths(f"data.{split}", getattr(d, split), tables, cfg.task.name)
    if tables:
        columns = {"data.text_column": d.text_column, "data.text_pair_column": d.text_pair_column,
                   "data.label_column": d.label_column}
        named = [(key, col) for key, col in columns.items() if col is not None]
        for i, (key, col) in enumerate(named):
            for other, col2 in named[i + 1:]:
                if col == col2:
                    raise UserError(f"config: {key} and {other} are both '{col}'; each names a different column")
    names = cfg.task.label_names
    if names is not None:
        if len(names) < 2:
            raise UserError(f"config: task.label_names needs one name per label (at least two), got {names}")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise UserError(f"config: task.label_names repeats {', '.join(map(repr, repeated))}; names must differ")
    tt = m.train_tokenizer
    if tt.kind is not None:
        if m.config is None or m.tokenizer is not None:
            raise UserError("config: model.train_tokenizer trains a tokenizer for a model built from scratch; "
                            "use it with model.config and without model.tokenizer / model.pretrained")
        if tables:
            raise UserError("config: model.train_tokenizer is for language modelling (task.name causal_lm or "
                            "masked_lm); pretrain first, then fine-tune with the pretrained model's tokenizer")
        if tt.vocab_size < 300:
            raise UserError(f"config: model.train_tokenizer.vocab_size must be >= 300, got {tt.vocab_size}")
    if t.max_steps <= 0 and t.epochs <= 0:
        raise UserError("config: set train.epochs > 0 or train.max_steps > 0")
    if not t.compile_backend.strip():
        raise UserError("config: train.compile_backend is empty; use inductor (or aot_eager, eager)")
    check_engine_config(cfg)
    c = cfg.checkpoint
    _check_stop_signals(c.stop_signals)
    task.best_metric(c.metric, c.mode)
    if c.resume is not None and c.resume != "auto":
        if not c.resume.strip():
            raise UserError("config: checkpoint.resume is empty; give 'auto', a checkpoints/step-N folder or a "
                            "run's output_dir")
        if not Path(c.resume).expanduser().exists():
            raise UserError(f"checkpoint.resume: '{c.resume}' does not exist; give a checkpoints/step-N folder, "
                            "a run's output_dir, or 'auto'")


def resume_policies(cls: type = None, inherited: str | None = None, prefix: str = "") -> dict[str, str]:
    """Every config key (dotted) and whether a resumed run may change it: ``may_change`` or ``fixed``."""
    cls = cls or Config
    out = {}
    for f in dataclasses.fields(cls):
        policy = f.metadata.get("on_resume", inherited)
        if policy is None:
            raise TypeError(f"config field {prefix}{f.name} has no resume policy (metadata=MAY_CHANGE or FIXED)")
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(resume_policies(tp, policy, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = policy
    return out


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
