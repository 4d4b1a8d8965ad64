"""Typed run configuration: YAML file + dotted CLI overrides -> nested dataclasses.

Every field is documented where it is declared (the string under it). Unknown keys are errors that name
the closest valid key; values of the wrong type are errors that name the key, the expected type and the
value given.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import signal
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from dist_train.errors import UserError


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


@dataclass
class DataConfig:
    train: Optional[Union[str, list[str]]] = None
    """Training data. Classification: one labelled file (.tsv, .csv, .jsonl/.json or .parquet). Language
    modelling: text files (.txt: see ``text_unit``), JSONL or tables with ``text_column``; a path, a glob
    (``corpus/*.txt``), a folder, or a list of these."""
    validation: Optional[Union[str, list[str]]] = None
    """Validation data, as ``train``. If absent, ``validation_split`` of train is carved off (when > 0)."""
    test: Optional[Union[str, list[str]]] = None
    """Test data, as ``train``, evaluated once at the end into ``eval_report.json``."""
    text_column: str = "sentence"
    """Column holding the text."""
    text_pair_column: Optional[str] = None
    """Optional second text column for sentence-pair tasks."""
    label_column: str = "label"
    """Column holding the label (ints or strings)."""
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
    num_proc: Optional[int] = None
    """Processes that tokenize a corpus (``datasets.map``); null = one. The result is cached either way."""
    group_by_length: bool = True
    """Batch examples of similar length together (less padding, faster); order stays random across batches."""
    num_workers: int = 0
    """DataLoader worker processes (0 = load in the training process)."""
    cache_dir: Optional[str] = None
    """Where tokenized data is cached (default: the Hugging Face datasets cache)."""


@dataclass
class TaskConfig:
    name: Literal["classification", "causal_lm", "masked_lm"] = "classification"
    """What to train: ``classification`` (one label per text or text pair), ``causal_lm`` (next-token
    prediction, GPT-style) or ``masked_lm`` (BERT-style masked tokens)."""
    label_names: Optional[list[str]] = None
    """Display names for the labels, in sorted order of the label values (e.g. ``[negative, positive]`` for 0/1)."""
    mlm_probability: float = 0.15
    """masked_lm: fraction of tokens selected as targets; of those 80% become [MASK], 10% a random token, 10% stay."""
    whole_word_mask: bool = False
    """masked_lm: select whole words (all their word pieces) instead of single tokens."""


@dataclass
class TrainConfig:
    seed: int = 42
    """Seed for model init, dropout and data order: the same config and seed give identical weights on CPU."""
    epochs: float = 3.0
    """Passes over the training data (ignored when ``max_steps`` > 0)."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = use ``epochs``)."""
    micro_batch_size: int = 32
    """Examples per forward/backward pass on each process."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step; global batch = micro_batch_size x grad_accum x world size."""
    eval_batch_size: int = 64
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
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    """LR decay after warmup."""
    warmup_ratio: float = 0.06
    """Warmup length as a fraction of all steps (used when ``warmup_steps`` is 0)."""
    warmup_steps: int = 0
    """Warmup length in steps (overrides ``warmup_ratio`` when > 0)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (0 = no clipping)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Compute precision: bf16 autocast works on CPU and GPU; fp16 (with loss scaling) needs a GPU."""
    eval_every: int = 0
    """Evaluate on validation every N optimizer steps (0 = only at the end of each epoch)."""
    compile: bool = False
    """Run the model through ``torch.compile`` (fuses elementwise ops; a second sequence length recompiles
    once with dynamic shapes, torch's default). Pays off on GPUs; on a 2-core CPU MiniLM took
    280 s to compile and then ran 13% slower than eager (docs/performance.md)."""
    compile_backend: str = "inductor"
    """``torch.compile`` backend: ``inductor`` generates kernels; ``aot_eager`` only captures the graphs
    (a quick check that a model compiles)."""
    tf32: bool = True
    """On NVIDIA GPUs (Ampere and newer), fp32 matmuls use TF32 tensor cores (10-bit mantissa inputs, fp32
    accumulation; ``torch.set_float32_matmul_precision("high")``); no effect on CPU or on bf16 matmuls."""


@dataclass
class EngineConfig:
    kind: Literal["auto", "single", "ddp", "deepspeed"] = "auto"
    """How processes train together: ``single`` (one process), ``ddp`` (torch DistributedDataParallel),
    ``deepspeed`` (ZeRO). ``auto``: ddp under a launcher (RANK/WORLD_SIZE set), else single."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage: 0 (plain data parallel), 1 (shard optimizer state), 2 (+ gradients), 3 (+ parameters)."""
    offload_optimizer: bool = False
    """DeepSpeed ZeRO-Offload: keep optimizer state (and the step) on CPU. Needs zero_stage >= 1."""
    offload_params: bool = False
    """DeepSpeed ZeRO-3 parameter offload to CPU. Needs zero_stage 3."""
    deepspeed: Optional[dict[str, Any]] = None
    """Extra DeepSpeed config keys merged into the generated config; a key that conflicts with a value
    dist-train sets from this config is an error naming both values."""
    timeout_s: float = 300.0
    """Collective and barrier timeout in seconds: a rank that never arrives fails the job instead of hanging."""


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
    """Whether a larger or smaller ``metric`` is better; null = min for loss and perplexity, else max."""
    load_best_at_end: bool = True
    """Export the best checkpoint (by ``metric`` on validation) to ``final/`` rather than the last one."""
    every_epoch: bool = True
    """Also save a checkpoint at the end of every epoch."""
    stop_signals: list[str] = field(default_factory=lambda: ["SIGUSR1"])
    """Signals that make the run save a checkpoint and stop (exit 0) at the next log step (within
    ``logging.every_steps`` steps), e.g. ahead of a preemption: ``kill -USR1 <pid>``. Continue later with
    ``checkpoint.resume=auto``."""
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
    output_dir: str = "output/run"
    """Where config.yaml, metrics.jsonl, tb/, checkpoints/ and final/ go."""
    overwrite: bool = False
    """Allow writing into an output_dir that already holds a run (its old files are replaced)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


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
    """YAML 1.1 reads ``1e-12`` (no dot) as a string; in free-form values (model.config, engine.deepspeed)
    such a string is the number it plainly is."""
    if isinstance(value, str) and _EXPONENT.fullmatch(value):
        return float(value)
    if isinstance(value, dict):
        return {k: _yaml11_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_yaml11_numbers(v) for v in value]
    return value


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if close:
        return f"did you mean '{close[0]}'?"
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
            raise UserError(f"config: unknown key '{prefix}{key}'; {_suggest(str(key), names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{prefix}{key}.")
            continue
        try:
            kwargs[key] = _coerce(value, tp)
        except _Mismatch:
            raise UserError(
                f"config: '{prefix}{key}' expects {_type_name(tp)}, got {value!r} ({type(value).__name__})"
            ) from None
    return cls(**kwargs)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise UserError(f"override '{text}' is not KEY=VALUE (e.g. train.lr=3e-5)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"override '{text}' has an empty key; write e.g. train.lr=3e-5")
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


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config, apply ``a.b=value`` overrides, and return the validated Config."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file '{path}' not found")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark else ""
            raise UserError(f"config file '{path}'{line} is not valid YAML: {getattr(exc, 'problem', exc)}") from None
        if not isinstance(tree, dict):
            raise UserError(f"config file '{path}' must hold a mapping of sections (model:, data:, train:, ...)")
    for text in overrides:
        keys, value = _parse_override(text)
        _set_dotted(tree, keys, value)
    cfg = _build(Config, tree, "")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Checks that span several fields; each error names the fields and the fix."""
    m = cfg.model
    if (m.pretrained is None) == (m.config is None):
        raise UserError("config: set exactly one of model.pretrained (a model folder) or model.config (from scratch)")
    if m.config is not None and m.tokenizer is None and m.train_tokenizer.kind is None:
        raise UserError("config: model.config builds a model from scratch and needs model.tokenizer (a tokenizer "
                        "folder) or model.train_tokenizer.kind (bpe or wordpiece)")
    if m.config is not None and "model_type" not in m.config:
        raise UserError("config: model.config needs 'model_type' (e.g. bert, gpt2, distilbert)")
    if cfg.data.train is None:
        raise UserError("config: data.train is required (a .tsv, .csv, .jsonl or .parquet file; text files "
                        "for language modelling)")
    tt = m.train_tokenizer
    if tt.kind is not None:
        if m.config is None or m.tokenizer is not None:
            raise UserError("config: model.train_tokenizer trains a tokenizer for a model built from scratch; "
                            "use it with model.config and without model.tokenizer / model.pretrained")
        if cfg.task.name == "classification":
            raise UserError("config: model.train_tokenizer is for language modelling (task.name causal_lm or "
                            "masked_lm); pretrain first, then fine-tune with the pretrained model's tokenizer")
        if tt.vocab_size < 300:
            raise UserError(f"config: model.train_tokenizer.vocab_size must be >= 300, got {tt.vocab_size}")
    if not 0.0 < cfg.task.mlm_probability < 1.0:
        raise UserError(f"config: task.mlm_probability must be in (0, 1), got {cfg.task.mlm_probability}")
    if cfg.data.num_proc is not None and cfg.data.num_proc < 1:
        raise UserError(f"config: data.num_proc must be >= 1 (or null), got {cfg.data.num_proc}")
    if not 0.0 <= cfg.data.validation_split < 1.0:
        raise UserError(f"config: data.validation_split must be in [0, 1), got {cfg.data.validation_split}")
    t = cfg.train
    for key in ("micro_batch_size", "grad_accum", "eval_batch_size"):
        if getattr(t, key) < 1:
            raise UserError(f"config: train.{key} must be >= 1, got {getattr(t, key)}")
    if cfg.data.max_length < 2:
        raise UserError(f"config: data.max_length must be >= 2, got {cfg.data.max_length}")
    if t.max_steps <= 0 and t.epochs <= 0:
        raise UserError("config: set train.epochs > 0 or train.max_steps > 0")
    if t.lr <= 0:
        raise UserError(f"config: train.lr must be > 0, got {t.lr}")
    if len(t.adam_betas) != 2:
        raise UserError(f"config: train.adam_betas needs two numbers, got {t.adam_betas}")
    if not 0.0 <= t.warmup_ratio < 1.0:
        raise UserError(f"config: train.warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
    e = cfg.engine
    if e.zero_stage not in (0, 1, 2, 3):
        raise UserError(f"config: engine.zero_stage must be 0, 1, 2 or 3, got {e.zero_stage}")
    if (e.zero_stage or e.offload_optimizer or e.offload_params or e.deepspeed) and e.kind != "deepspeed":
        raise UserError("config: engine.zero_stage / offload_* / deepspeed need engine.kind=deepspeed")
    if e.offload_optimizer and e.zero_stage < 1:
        raise UserError("config: engine.offload_optimizer needs engine.zero_stage >= 1")
    if e.offload_params and e.zero_stage != 3:
        raise UserError("config: engine.offload_params needs engine.zero_stage=3")
    if e.timeout_s <= 0:
        raise UserError(f"config: engine.timeout_s must be > 0, got {e.timeout_s}")
    if cfg.logging.every_steps < 1:
        raise UserError(f"config: logging.every_steps must be >= 1, got {cfg.logging.every_steps}")
    if cfg.checkpoint.every_steps < 0:
        raise UserError(f"config: checkpoint.every_steps must be >= 0, got {cfg.checkpoint.every_steps}")
    for name in cfg.checkpoint.stop_signals:
        if name not in signal.Signals.__members__ or name in ("SIGKILL", "SIGSTOP"):
            raise UserError(f"config: checkpoint.stop_signals: '{name}' is not a signal that can be caught; "
                            "use names like SIGUSR1, SIGUSR2, SIGTERM")
    if cfg.checkpoint.keep_last_n < 1:
        raise UserError(f"config: checkpoint.keep_last_n must be >= 1, got {cfg.checkpoint.keep_last_n}")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
