"""The Task seam: everything the training loop, evaluation, export, ``eval`` and ``predict`` ask of a task.

A task supplies what the rest of dist-train must not know: its data, its model head, its loss, its metrics
(and which way they are better), what its export records, and how an exported folder is used. The loop,
``evaluate``, ``export`` and the CLI call only the hooks below, in this order:

Training (``dist_train/run/trainer.py``), on every rank:
  0. ``check_files(data)`` (a classmethod, from ``dist-train train`` / ``launch`` / ``submit``: every file
     named exists and is of a kind the task reads, before any work);
  1. ``check_config(cfg)`` (a classmethod, from ``config.validate``: before anything is read);
  2. ``load_tokenizer()`` then ``prepare(tokenizer)`` -> ``Splits`` (rank 0 first, into the cache; the
     other ranks then load the cache);
  3. ``lengths(split)`` and ``fingerprint(split)`` (batch plans, and the identity a resume checks);
  4. ``build_model()``;
  5. each step: ``loader(split, batches, epoch)``, then per micro-batch ``inputs(batch)``, ``count(batch)``,
     ``loss_sum(outputs, batch)`` and ``tokens(batch)``;
  6. each evaluation (``dist_train/evaluation/loop.py``): ``evaluator(device, split)`` -> ``update(outputs, batch)`` per
     batch -> ``compute(all_reduce_sum)``; ``maximize(metric)`` says which way the metric is better;
  7. every checkpoint and the final export: ``export_meta()`` and ``save_extras(folder)``.

Use of an exported folder (``dist-train eval`` / ``predict``, ``dist_train/use/inference.py``): the CLI reads
the folder's ``dist_train.json``, builds the task named there with ``for_folder(folder, meta, options)``,
then ``load_tokenizer()``, ``restore(folder)`` (what training learned: label maps), ``build_model()``, and
either ``split(path, "--data")`` + the evaluation hooks above, or ``predict(...)`` on the texts of
``read_texts`` (``--file``) or ``command_line_inputs`` (texts given on the command line) -> rows printed
with ``format_prediction`` / written with ``prediction_columns``.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from dist_train.data import make_loader
from dist_train.errors import UserError
from dist_train.model.assemble import build_model
from dist_train.model.files import load_tokenizer


@dataclass
class Splits:
    train: object
    validation: object | None
    test: object | None


class Task(abc.ABC):
    name: ClassVar[str] = ""
    metrics: ClassVar[tuple[str, ...]] = ()
    """Validation metrics that can pick the best checkpoint; the first is the default."""
    lower_is_better: ClassVar[frozenset[str]] = frozenset({"loss"})
    """The metrics where smaller is better (``maximize``)."""
    architectures: ClassVar[tuple[str, ...]] = ()
    """Suffixes of Hugging Face architecture names that mean this task (a folder dist-train did not write)."""
    summary: ClassVar[tuple[str, ...]] = ("loss",)
    """Report keys of the one-line evaluation summary."""
    peft_task_type: ClassVar[str | None] = None
    """peft's ``TaskType`` for this task's models (``SEQ_CLS``, ``TOKEN_CLS``, ``CAUSAL_LM``): what ``model.lora``
    wraps them as; None = LoRA is not offered for this task (the config check refuses it)."""
    reads_tables: ClassVar[bool] = True
    """One table file per split (``.tsv``, ``.jsonl``, ...) with named columns; False: text corpora (paths,
    globs, folders, lists)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.labels = None
        self.tokenizer = None
        self.is_main = True  # rank 0, the process that prints notes (build_task sets it)

    # -- config ------------------------------------------------------------------------------------------
    @classmethod
    def check_config(cls, cfg) -> None:
        """Refuse config values this task cannot use (a UserError naming the key), before any file is read."""

    # -- data --------------------------------------------------------------------------------------------
    @classmethod
    def check_files(cls, data) -> None:
        """Every file that ``data`` (a DataConfig) names exists and is of a kind this task reads, without
        loading any: what ``train``, ``launch`` and ``submit`` check before any work."""
        from dist_train.data import check_data_files

        check_data_files(data, cls.reads_tables)

    def load_tokenizer(self):
        m = self.cfg.model
        self.tokenizer = load_tokenizer(m.tokenizer or m.pretrained, m.trust_remote_code,
                                        what="model.tokenizer" if m.tokenizer else "model.pretrained")
        return self.tokenizer

    @abc.abstractmethod
    def prepare(self, tokenizer) -> Splits:
        """Read, check and tokenize ``data.train`` / ``validation`` / ``test`` (cached); learn from train what
        the model needs (a label map)."""

    def splits_around(self, train) -> Splits:
        """The splits of a run given its ``train`` (read and tokenized): ``data.validation`` and ``data.test``
        through ``split``, or, without a validation file, ``data.validation_split`` of train held out
        (``hold_out``). Every task assembles its splits here."""
        d = self.cfg.data
        validation = test = None
        if d.validation:
            validation = self.split(d.validation, "data.validation")
        elif d.validation_split > 0:
            train, validation = self.hold_out(train, d.validation_split, d.split_seed)
        if d.test:
            test = self.split(d.test, "data.test")
        return Splits(train, validation, test)

    def hold_out(self, train, fraction: float, seed: int) -> tuple:
        """(train, validation): ``fraction`` of the training rows held out, drawn with ``seed``."""
        parts = train.train_test_split(test_size=fraction, seed=seed)
        return parts["train"], parts["test"]

    @abc.abstractmethod
    def split(self, path, what: str):
        """One more file of the kind ``prepare`` reads, tokenized with what training learned (``what`` names
        it in errors: ``data.test``, ``--data``)."""

    def train_subset(self, ds):
        """``ds`` (the tokenized training set) cut to ``data.train_rows`` rows, stratified by ``strata``; an
        error when the set has fewer rows."""
        d = self.cfg.data
        if d.train_rows is None:
            return ds
        if d.train_rows > len(ds):
            after = " after data.validation_split" if d.validation_split and not d.validation else ""
            raise UserError(f"data.train_rows={d.train_rows}: data.train has {len(ds)} rows{after}; give at most "
                            f"{len(ds)}, or null for all of them")
        from dist_train.data.subset import take_rows

        return take_rows(ds, d.train_rows, self.strata(ds), d.train_rows_seed)

    def strata(self, ds) -> list | None:
        """One value per training row that ``data.train_rows`` keeps in proportion (the label); None = a
        random subset."""
        return None

    @abc.abstractmethod
    def lengths(self, ds) -> list[int]:
        """Tokens per example (batch plans group similar lengths)."""

    @abc.abstractmethod
    def fingerprint(self, ds) -> dict:
        """The training set's identity (``dist_train.data.fingerprint``): a resume refuses other data."""

    @abc.abstractmethod
    def view(self, ds):
        """What the DataLoader indexes (the model's columns of ``ds``)."""

    @abc.abstractmethod
    def collator(self, epoch: int):
        """Builds one batch from examples (padding, masking); ``epoch`` seeds anything random."""

    def loader(self, ds, batches: list[list[int]], epoch: int, num_workers: int = 0, pin_memory: bool = False):
        """A DataLoader over ``batches`` (index lists into ``ds``) of epoch ``epoch``."""
        return make_loader(self.view(ds), batches, self.collator(epoch), num_workers, pin_memory,
                           seed=self.cfg.train.seed)

    # -- model -------------------------------------------------------------------------------------------
    @staticmethod
    @abc.abstractmethod
    def auto_model():
        """The transformers auto class of this task's models (export rebuilds models through it)."""

    def head_kwargs(self) -> dict:
        """Config keys of the task head (number of labels, their names, problem type)."""
        return {}

    def pooling(self) -> str:
        """``task.pooling`` resolved to ``cls`` or ``mean`` for this model (tasks without one head over the
        text: ``cls``, the model as it is)."""
        return "cls"

    def build_model(self):
        return build_model(self.cfg.model, self.auto_model(), self.tokenizer, self.cfg.data.max_length,
                           peft_task_type=self.peft_task_type, pooling=self.pooling(), announce=self.is_main,
                           **self.head_kwargs())

    # -- the step ----------------------------------------------------------------------------------------
    def inputs(self, batch: dict) -> dict:
        """The model's keyword arguments (targets are not passed: the task computes its own loss)."""
        return {k: v for k, v in batch.items() if k != "labels"}

    @abc.abstractmethod
    def count(self, batch: dict) -> torch.Tensor:
        """How many loss targets the batch holds, as a float64 tensor on its device."""

    @abc.abstractmethod
    def loss_sum(self, outputs, batch: dict) -> torch.Tensor:
        """The loss SUMMED over the batch's targets: the loop divides by the global target count, so every
        target weighs the same however batches are split over micro-batches and ranks."""

    def soft_loss_sum(self, outputs, teacher, batch: dict, temperature: float) -> torch.Tensor:
        """The loss of ``outputs`` against a teacher's ``teacher`` outputs on the same batch, SUMMED over the
        same targets ``count`` counts (distillation); only tasks with ``can_distill``."""
        raise NotImplementedError

    @staticmethod
    def soft_kl_sum(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
        """T^2 x KL(softmax(teacher / T) || softmax(student / T)) over the last dimension, summed over rows
        (Hinton et al.: the T^2 keeps the gradient's scale as T changes)."""
        import torch.nn.functional as F

        t = temperature
        return F.kl_div(F.log_softmax(student.float() / t, -1), F.log_softmax(teacher.float() / t, -1),
                        log_target=True, reduction="sum") * t * t

    @staticmethod
    def tokens(batch: dict) -> torch.Tensor:
        """Real (non-pad) input tokens in the batch, for throughput and MFU."""
        mask = batch.get("attention_mask")
        return mask.sum() if mask is not None else torch.tensor(batch["input_ids"].numel(), device=batch["input_ids"].device)

    @staticmethod
    def count_of(targets: torch.Tensor) -> torch.Tensor:
        """How many loss targets ``targets`` holds (-100 = none), as float64 on its device."""
        return (targets != -100).sum().to(torch.float64)

    # -- evaluation --------------------------------------------------------------------------------------
    @abc.abstractmethod
    def evaluator(self, device, ds):
        """Additive evaluation state on ``device`` for the split ``ds``: ``update(outputs, batch)``, then
        ``compute(all_reduce_sum) -> report`` (the same report on every rank, every example counted once)."""

    @classmethod
    def best_metric(cls, metric: str | None = None, mode: str | None = None) -> tuple[str, bool]:
        """The validation metric that picks the best checkpoint and whether larger is better: ``checkpoint.metric``
        (default: the task's first) and ``checkpoint.mode`` (default: the metric's own direction). A metric the
        task does not report is a UserError naming the ones it does."""
        metric = metric or cls.metrics[0]
        if metric not in cls.metrics:
            raise UserError(f"config: checkpoint.metric '{metric}' is not a {cls.name} metric; choose one of: "
                            f"{', '.join(cls.metrics)}")
        return metric, mode == "max" if mode else metric not in cls.lower_is_better

    # -- export and use ----------------------------------------------------------------------------------
    def check_batch(self, texts: list[str]) -> dict:
        """``texts`` as one padded batch of this model's inputs (``export --onnx`` checks the ONNX graph against
        PyTorch on such batches). A model of text pairs gets each text with another as its pair."""
        pair = bool(self.cfg.data.text_pair_column)
        return dict(self.tokenizer(texts, texts[::-1] if pair else None, truncation=True, padding=True,
                                   max_length=self.cfg.data.max_length, return_tensors="pt"))

    def same_predictions(self, want: torch.Tensor, got: torch.Tensor, batch: dict) -> torch.Tensor:
        """For each prediction in ``batch``, whether logits ``got`` predict what ``want`` does (an int8 export
        against the fp32 model): the same label."""
        return got.argmax(-1) == want.argmax(-1)

    def export_meta(self) -> dict:
        """What ``dist_train.json`` in an export records, for ``for_folder`` to rebuild this task."""
        return {"task": self.name, "max_length": self.cfg.data.max_length}

    def save_extras(self, folder: Path) -> None:
        """Files besides weights, config and tokenizer that an export needs (e.g. ``labels.json``)."""

    @classmethod
    def for_folder(cls, folder: str, meta: dict, options: dict) -> "Task":
        """This task, rebuilt to evaluate or predict with an exported model ``folder`` (its ``meta`` from
        ``dist_train.json``; ``options``: the command's non-empty data options, e.g. ``text_column``)."""
        from dist_train.config import Config

        cfg = Config()
        cfg.model.pretrained, cfg.task.name = folder, cls.name
        known = {f for f in vars(cfg.data)}
        for key, value in {**meta, **options}.items():
            if key in known and value is not None:
                setattr(cfg.data, key, value)
        for key in vars(cfg.task):
            if key in meta and key != "name":
                setattr(cfg.task, key, meta[key])
        return cls(cfg)

    def restore(self, folder: str) -> None:
        """Take back what training learned and the export saved (label maps); nothing for most tasks."""

    poolable: ClassVar[bool] = False
    """Whether ``task.pooling`` applies (one head over the whole text)."""
    can_predict: ClassVar[bool] = False
    """Whether ``dist-train predict`` applies (else ``predict_hint`` says what to use instead)."""
    predict_hint: ClassVar[str] = ""
    can_generate: ClassVar[bool] = False
    """Whether ``dist-train generate`` applies (text generation: causal language models)."""
    generates_text: ClassVar[bool] = False
    """Whether evaluation scores generated text (text_to_text)."""
    lm_loss: ClassVar[bool] = False
    """Whether the loss is a language model's over the vocabulary (``model.labelled_logits`` applies)."""
    can_pack: ClassVar[bool] = False
    """Whether ``data.packing`` applies (several examples per row, each attending to itself)."""
    can_distill: ClassVar[bool] = False
    """Whether ``distill.teacher`` applies (``soft_loss_sum`` compares the model's outputs with a teacher's)."""
    task_fields: ClassVar[frozenset[str]] = frozenset()
    """Which of the task fields that only some tasks read (``config.TASK_ONLY_FIELDS``) this one reads."""

    def zero_shot(self, engine, split: str) -> dict:
        """The report of ``model.pretrained`` on ``data.<split>`` with no training (``dist-train zero-shot``),
        run by ``engine`` (one process)."""
        from dist_train.tasks import TASKS, task_class

        able = ", ".join(n for n in TASKS if task_class(n).zero_shot is not Task.zero_shot)
        raise UserError(f"zero-shot: a {self.name} model cannot answer without training; zero-shot evaluates {able}")

    def generation_report(self, engine, ds, what: str, batch_size: int) -> dict:
        """Metrics an evaluation adds beyond the evaluator's (scores of generated text), the same on every
        rank; ``what`` is the split (``validation``, ``test``, ``--data``). Nothing for most tasks."""
        return {}

    def save_eval_outputs(self, path: Path) -> None:
        """Write what the last evaluation produced besides its report (generated texts) to ``path``; nothing
        for most tasks."""

    def generate(self, engine, prompts: list[str], max_new_tokens: int, temperature: float, top_p: float,
                 seed: int, batch_size: int) -> list[str]:
        """Each prompt's continuation; only tasks with ``can_generate``."""
        raise UserError(f"generate: a {self.name} model does not generate text")

    @staticmethod
    def generated_line(prompt: str, text: str) -> str:
        """The line ``dist-train generate`` prints: the prompt and its continuation, on one line."""
        return " ".join(f"{prompt}{text}".split())

    def predict(self, engine, texts: list[str], pairs: list[str] | None, batch_size: int) -> list[dict]:
        """One prediction (a dict) per text; only tasks with ``can_predict``."""
        raise UserError(f"predict: a {self.name} model does not predict labels; {self.predict_hint}")

    def command_line_inputs(self, texts: list[str]) -> tuple[list[str], list[str] | None]:
        """(texts, pairs or None) of ``dist-train predict MODEL TEXT...``: a model trained on text pairs
        (``data.text_pair_column``) takes its texts two at a time, the first and second text of each pair."""
        d = self.cfg.data
        if not d.text_pair_column:
            return texts, None
        if len(texts) % 2:
            raise UserError(f"predict: this model reads text pairs ({d.text_column}, {d.text_pair_column}): give "
                            f"the texts two at a time, FIRST SECOND [FIRST SECOND ...], not {len(texts)}; or "
                            "--file FILE with both columns")
        return texts[0::2], texts[1::2]

    def format_prediction(self, text: str, prediction: dict) -> str:
        """The line ``dist-train predict`` prints for one text (a pair's two texts: joined by a tab)."""
        raise NotImplementedError

    def prediction_columns(self, prediction: dict) -> dict[str, str]:
        """The columns ``predict --file`` writes for one input row (after the text)."""
        raise NotImplementedError

    def read_texts(self, path: str) -> tuple[list[str], list[str] | None, list[str]]:
        """(texts, pairs or None, the names of their columns) of a file to predict on."""
        from dist_train.data.sources import read_table, require_columns

        d = self.cfg.data
        ds = read_table(path)
        columns = {"--text-column": d.text_column}
        if d.text_pair_column:
            columns["--text-pair-column"] = d.text_pair_column
        require_columns(ds, path, columns)
        texts = [t or "" for t in ds[d.text_column]]
        pairs = [t or "" for t in ds[d.text_pair_column]] if d.text_pair_column else None
        return texts, pairs, list(columns.values())


class SumEvaluator:
    """Loss sum and target count on device, reduced over ranks: exact means however the data is split."""

    def __init__(self, task, device):
        self.task = task
        self.state = torch.zeros(2, dtype=torch.float64, device=device)

    def update(self, outputs, batch) -> None:
        self.state += torch.stack([self.task.loss_sum(outputs, batch).double(), self.task.count(batch)])

    def compute(self, all_reduce_sum) -> dict:
        loss_sum, n = all_reduce_sum(self.state).tolist()
        loss = loss_sum / max(n, 1)
        return {"n": int(n), "loss": loss, "perplexity": math.exp(min(loss, 700.0))}
