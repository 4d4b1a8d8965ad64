"""Sequence-level tasks on tables: one text (or text pair) per row and one target per row.

Classification (a class per row) and regression (a number per row) read, check and tokenize their tables
through this one path - the same columns, the same checks, the same cache - and differ only in ``read``:
what a row's target is.
"""

from __future__ import annotations

import abc

import numpy as np
import torch

from dist_train.data.fingerprint import data_fingerprint
from dist_train.data.sources import check_texts, read_table, require_columns
from dist_train.data.tokenize import model_view, numbered, tokenize_table
from dist_train.errors import UserError
from dist_train.model.pooling import resolve as resolve_pooling
from dist_train.tasks.base import Splits, Task


def read_rows(path: str, data_cfg):
    """One table with its text (and pair) column filled on every row and a label column."""
    ds = read_table(path, data_cfg.cache_dir)
    columns = {"data.text_column": data_cfg.text_column, "data.label_column": data_cfg.label_column}
    if data_cfg.text_pair_column:
        columns["data.text_pair_column"] = data_cfg.text_pair_column
    require_columns(ds, path, columns)
    for col in (data_cfg.text_column, data_cfg.text_pair_column):
        if col:
            check_texts(ds, path, col)
    return ds


class SequenceTask(Task):
    can_predict = True
    can_distill = True
    poolable = True
    peft_task_type = "SEQ_CLS"  # one head over the sequence (classification, multi-label, regression)
    numbered: bool = False
    """Give every example its position in its split (an ``index`` column, carried in batches): for
    evaluators that need each prediction in its place."""

    @abc.abstractmethod
    def read(self, path: str) -> tuple[object, list]:
        """(table, one target per row) of a labelled file; the first call (train) learns what the targets
        need (a label map)."""

    # -- data ------------------------------------------------------------------------------------------
    def prepare(self, tokenizer) -> Splits:
        self.tokenizer = tokenizer
        d = self.cfg.data
        if not isinstance(d.train, str):
            raise UserError(f"data.train: {self.name} reads one training file; give one path, not a list")
        return self.splits_around(self._tokenize(*self.read(d.train)))

    def hold_out(self, train, fraction: float, seed: int) -> tuple:
        train, validation = super().hold_out(train, fraction, seed)
        return train, self._numbered(validation)  # positions in the held-out split, for Spearman's ranks

    def split(self, path, what: str):
        return self._tokenize(*self.read(path))

    def _tokenize(self, ds, targets):
        d = self.cfg.data
        return self._numbered(tokenize_table(ds, self.tokenizer, d.text_column, d.text_pair_column, d.max_length,
                                             targets))

    def _numbered(self, ds):
        return numbered(ds) if self.numbered else ds

    def lengths(self, ds) -> list[int]:
        return ds["length"]

    def fingerprint(self, ds) -> dict:
        targets = np.asarray(ds["labels"])
        if targets.dtype.kind == "f":  # every bit of a number counts: compare its bytes, not int(value)
            targets = targets.astype(np.float64).view(np.int64)
        return data_fingerprint(len(ds), ds["length"], targets)

    def view(self, ds):
        return model_view(ds)

    def collator(self, epoch: int):
        # Pads each batch to its own longest row (batches are length-grouped, so little is padding).
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(self.tokenizer)

    # -- model -----------------------------------------------------------------------------------------
    @staticmethod
    def auto_model():
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def inputs(self, batch: dict) -> dict:
        return {k: v for k, v in batch.items() if k not in ("labels", "index")}

    def count(self, batch: dict) -> torch.Tensor:
        """How many loss targets the batch holds (examples here), as a float64 tensor on its device."""
        return torch.tensor(float(batch["labels"].numel()), dtype=torch.float64, device=batch["labels"].device)

    # -- export and use --------------------------------------------------------------------------------
    def export_meta(self) -> dict:
        d = self.cfg.data
        return {**super().export_meta(), "text_column": d.text_column, "text_pair_column": d.text_pair_column,
                "label_column": d.label_column, "pooling": self.pooling()}

    def pooling(self) -> str:
        return resolve_pooling(self.cfg.task.pooling, self.cfg.model.pretrained)

    def logits(self, engine, texts: list[str], pairs: list[str] | None, batch_size: int):
        """The model's outputs (float32, on CPU) for ``texts`` (and ``pairs``), one batch at a time."""
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer(texts[i:i + batch_size], pairs[i:i + batch_size] if pairs else None,
                                 truncation=True, max_length=self.cfg.data.max_length, padding=True,
                                 return_tensors="pt")
            enc = {k: v.to(engine.device) for k, v in enc.items()}
            yield engine.forward(**enc).logits.float().cpu()
