"""Use a trained model folder: evaluate it on a labelled file, or predict labels for new text."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from dist_train.config import DataConfig
from dist_train.data.labels import LabelMap
from dist_train.data.sources import read_table, require_columns
from dist_train.data import make_loader
from dist_train.data.tokenize import model_view, tokenize_table
from dist_train.engine import SingleEngine
from dist_train.errors import UserError
from dist_train.evaluate import evaluate
from dist_train.export import read_meta
from dist_train.run_dir import can_write_in
from dist_train.models import _first_line, check_weights, load_tokenizer, resolve_model_path
from dist_train.tasks.classification import ClassificationEvaluator, ClassificationTask, read_labelled


LM_TASKS = ("causal_lm", "masked_lm")


class ModelFolder:
    """What a MODEL_DIR holds, read from its small files before anything heavy is loaded: the task it was
    trained for, the columns and length it was trained with, its positions; its weights are checked whole."""

    def __init__(self, name: str):
        self.name = name
        self.folder = resolve_model_path(name, "MODEL_DIR")
        path = Path(self.folder)
        if not (path / "config.json").is_file():
            raise UserError(_not_a_model(name, path))
        try:
            self.config = json.loads((path / "config.json").read_text())
            self.meta = read_meta(path)
        except (ValueError, OSError) as exc:
            raise UserError(f"MODEL_DIR '{name}': cannot read its config ({_first_line(exc)}); the folder is "
                            "damaged: copy or export the model again") from None
        architectures = self.config.get("architectures") or []
        self.task = self.meta.get("task") or _task_of(architectures)
        self.model_type = self.config.get("model_type", "transformer")
        check_weights(path, "MODEL_DIR")

    @property
    def positions(self) -> int | None:
        return self.config.get("max_position_embeddings") or self.config.get("n_positions")

    def require(self, command: str) -> None:
        """``command`` (predict or eval) can use this folder; else say what the folder is and what to do."""
        if self.task == "classification" or (command == "eval" and self.task in LM_TASKS):
            return
        if self.task in LM_TASKS:
            raise UserError(f"MODEL_DIR '{self.name}' is a {self.task} model: predict needs a classification "
                            "model; use dist-train eval for its perplexity")
        raise UserError(f"MODEL_DIR '{self.name}' is a pretrained {self.model_type} model without a trained "
                        f"classification head; fine-tune it first (dist-train train with model.pretrained="
                        f"{self.name}) and {command} with that run's final/ folder")

    def max_length(self, given: int | None) -> int:
        """Tokens per example: ``--max-length``, else as trained, else the model's positions."""
        from dist_train.config import check_number

        positions = self.positions
        if given is not None:
            check_number("--max-length", given, 2, None, "[", where="")
            if positions is not None and given > positions:
                raise UserError(f"--max-length {given} exceeds the model's {positions} positions; use "
                                f"--max-length {positions} or less")
            return given
        return min(self.meta.get("max_length") or positions or 512, positions or 512)


def _task_of(architectures: list[str]) -> str | None:
    """The task of a Hugging Face folder that dist-train did not write, from its model class."""
    for arch in architectures:
        if arch.endswith("ForSequenceClassification"):
            return "classification"
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal_lm"
        if arch.endswith("ForMaskedLM"):
            return "masked_lm"
    return None


def _not_a_model(name: str, path: Path) -> str:
    if (path / "hf").is_dir():
        return (f"MODEL_DIR '{name}' is a training checkpoint, not a model folder; export it first: "
                f"dist-train export {name} OUT_DIR")
    if (path / "final").is_dir():
        return f"MODEL_DIR '{name}' is a run folder; give its model: {path / 'final'}"
    if (path / "checkpoints").is_dir():
        return (f"MODEL_DIR '{name}' is a run folder without a final model (the run did not finish); export one of "
                f"its checkpoints: dist-train export {path / 'checkpoints'}/step-N OUT_DIR")
    return (f"MODEL_DIR '{name}' has no config.json, so it is no model folder; give a folder written by dist-train "
            "train (output_dir/final) or dist-train export")


def check_creatable(path: str | Path, flag: str) -> None:
    """``path`` can be created: its nearest existing ancestor is a folder this process may write into."""
    parent = Path(path).parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag} '{path}' cannot be created: '{parent}' is a file, not a folder")
    if not can_write_in(parent):
        raise UserError(f"{flag} '{path}' cannot be written: no write permission in '{parent}'")


def check_output_file(path: str, flag: str, inputs: tuple[str | None, ...] = ()) -> None:
    """``path`` can be written as a file and is none of ``inputs``: checked before any work, so a bad path
    never costs a whole inference pass."""
    out = Path(path)
    if out.is_dir():
        raise UserError(f"{flag} '{path}' is a folder; give a file path (e.g. {out / 'predictions.tsv'})")
    for given in inputs:
        if given and out.exists() and Path(given).exists() and out.resolve() == Path(given).resolve():
            raise UserError(f"{flag} '{path}' is the input file; give another path for the results")
    check_creatable(out, flag)
    if out.exists() and not os.access(out, os.W_OK):
        raise UserError(f"{flag} '{path}' cannot be written: the file is read-only")


class LoadedModel:
    """A classification model folder with its tokenizer, labels and the columns it was trained on."""

    def __init__(self, folder: ModelFolder, precision: str = "fp32"):
        from transformers import AutoModelForSequenceClassification

        self.folder = folder.folder
        try:
            model = AutoModelForSequenceClassification.from_pretrained(self.folder)
        except Exception as exc:  # noqa: BLE001 - OSError, ValueError, SafetensorError, ...: one line each
            raise UserError(f"MODEL_DIR '{folder.name}': cannot load a classification model: "
                            f"{_first_line(exc)}") from None
        self.tokenizer = load_tokenizer(self.folder, what="MODEL_DIR")
        self.meta = folder.meta
        self.labels = LabelMap.load(self.folder, model.config)
        self.engine = SingleEngine(precision=precision)
        self.engine.prepare(model, None, None)
        self.engine.train(False)

    def data_config(self, text_column, pair_column, label_column, max_length: int) -> DataConfig:
        m = self.meta
        return DataConfig(text_column=text_column or m.get("text_column", "sentence"),
                          text_pair_column=pair_column or m.get("text_pair_column"),
                          label_column=label_column or m.get("label_column", "label"),
                          max_length=max_length)

    # -- eval ------------------------------------------------------------------------------------------
    def evaluate(self, path: str, data_cfg: DataConfig, batch_size: int) -> dict:
        ds, _, ids = read_labelled(path, data_cfg, self.labels)
        ds = tokenize_table(ds, self.tokenizer, data_cfg.text_column, data_cfg.text_pair_column,
                            data_cfg.max_length, ids)
        return evaluate(self.engine, self, ds, batch_size)

    # The task-side hooks evaluate() needs.
    inputs = staticmethod(ClassificationTask.inputs)
    lengths = staticmethod(ClassificationTask.lengths)

    def loader(self, ds, batches, epoch):
        from transformers import DataCollatorWithPadding

        return make_loader(model_view(ds), batches, DataCollatorWithPadding(self.tokenizer))

    def evaluator(self, device):
        return ClassificationEvaluator(self.labels, device)

    # -- predict ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, texts: list[str], pairs: list[str] | None, max_length: int, batch_size: int = 64):
        """(label name, probability of that label, all probabilities) for each text."""
        results = []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer(texts[i:i + batch_size], pairs[i:i + batch_size] if pairs else None,
                                 truncation=True, max_length=max_length, padding=True, return_tensors="pt")
            enc = {k: v.to(self.engine.device) for k, v in enc.items()}
            probs = torch.softmax(self.engine.forward(**enc).logits.float(), dim=-1).cpu()
            for row in probs:
                k = int(row.argmax())
                results.append((self.labels.names[k], float(row[k]), row.tolist()))
        return results

    def predict_file(self, path: str, out_path: str, data_cfg: DataConfig, batch_size: int) -> int:
        ds = read_table(path)
        columns = {"--text-column": data_cfg.text_column}
        if data_cfg.text_pair_column:
            columns["--text-pair-column"] = data_cfg.text_pair_column
        require_columns(ds, path, columns)
        texts = [t or "" for t in ds[data_cfg.text_column]]
        pairs = [t or "" for t in ds[data_cfg.text_pair_column]] if data_cfg.text_pair_column else None
        results = self.predict(texts, pairs, data_cfg.max_length, batch_size)
        out = Path(out_path)
        out.parent.mkdir(parents=True, exist_ok=True)  # (checked writable before inference: check_output_file)
        with open(out, "w") as fh:  # plain TSV like the input: no quoting, tabs/newlines in text become spaces
            header = [data_cfg.text_column, "prediction", "probability"] + [f"p_{n}" for n in self.labels.names]
            fh.write("\t".join(header) + "\n")
            for text, (label, prob, probs) in zip(texts, results):
                row = [" ".join(text.split()), label, f"{prob:.6f}"] + [f"{p:.6f}" for p in probs]
                fh.write("\t".join(row) + "\n")
        return len(results)


def evaluate_language_model(folder: ModelFolder, data: str, text_column: str | None, max_length: int,
                            batch_size: int, precision: str = "fp32") -> dict:
    """Loss and perplexity of a causal or masked LM folder on text ``data``, in blocks as in training
    (masked LM: the fixed evaluation masks)."""
    from dist_train.config import Config, validate
    from dist_train.data.corpus import corpus_files
    from dist_train.tasks import build_task

    corpus_files(data, "--data")  # a missing file is named as the option the user gave
    meta, cfg = folder.meta, Config()
    cfg.model.pretrained, cfg.data.train, cfg.task.name = folder.folder, data, folder.task
    cfg.data.text_column = text_column or meta.get("text_column", "text")
    cfg.data.text_unit = meta.get("text_unit", "line")
    cfg.data.max_length = max_length
    cfg.task.mlm_probability = meta.get("mlm_probability", 0.15)
    cfg.task.whole_word_mask = bool(meta.get("whole_word_mask", False))
    validate(cfg)
    task = build_task(cfg)
    blocks = task.prepare(task.load_tokenizer()).train
    engine = SingleEngine(precision=precision)
    engine.prepare(task.build_model(), None, None)
    return evaluate(engine, task, blocks, batch_size)
