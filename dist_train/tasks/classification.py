"""Sequence classification: one label per text (or text pair)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dist_train.data.fingerprint import data_fingerprint
from dist_train.data.labels import LabelMap
from dist_train.data.sources import check_texts, read_table, require_columns
from dist_train.data.tokenize import model_view, tokenize_table
from dist_train.errors import UserError
from dist_train.metrics import classification_report
from dist_train.tasks.base import Splits, Task


def read_labelled(path: str, data_cfg, labels: LabelMap | None = None, names: list[str] | None = None):
    """Read and check one labelled file; learn the label map from it if none is given (train)."""
    ds = read_table(path, data_cfg.cache_dir)
    columns = {"data.text_column": data_cfg.text_column, "data.label_column": data_cfg.label_column}
    if data_cfg.text_pair_column:
        columns["data.text_pair_column"] = data_cfg.text_pair_column
    require_columns(ds, path, columns)
    for col in (data_cfg.text_column, data_cfg.text_pair_column):
        if col:
            check_texts(ds, path, col)
    raw = ds[data_cfg.label_column]
    if labels is None:
        labels = LabelMap.from_train(raw, path, names)
    return ds, labels, labels.encode(raw, path)


class ClassificationTask(Task):
    name = "classification"
    metrics = ("accuracy", "f1_macro", "precision_macro", "recall_macro", "loss")
    architectures = ("ForSequenceClassification",)
    summary = ("loss", "accuracy", "f1_macro")
    can_predict = True

    # -- data ------------------------------------------------------------------------------------------
    def prepare(self, tokenizer) -> Splits:
        self.tokenizer = tokenizer
        d = self.cfg.data
        if not isinstance(d.train, str):
            raise UserError("data.train: classification reads one training file; give one path, not a list")
        train_raw, self.labels, train_ids = read_labelled(d.train, d, names=self.cfg.task.label_names)
        train = self._tokenize(train_raw, train_ids)
        validation = test = None
        if d.validation:
            validation = self.split(d.validation, "data.validation")
        elif d.validation_split > 0:
            parts = train.train_test_split(test_size=d.validation_split, seed=d.split_seed)
            train, validation = parts["train"], parts["test"]
        if d.test:
            test = self.split(d.test, "data.test")
        return Splits(train, validation, test)

    def split(self, path, what: str):
        ds, _, ids = read_labelled(path, self.cfg.data, self.labels)
        return self._tokenize(ds, ids)

    def _tokenize(self, ds, ids):
        d = self.cfg.data
        return tokenize_table(ds, self.tokenizer, d.text_column, d.text_pair_column, d.max_length, ids)

    def lengths(self, ds) -> list[int]:
        return ds["length"]

    def fingerprint(self, ds) -> dict:
        return data_fingerprint(len(ds), ds["length"], ds["labels"])

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

    def head_kwargs(self) -> dict:
        lm = self.labels
        return {"num_labels": lm.num_labels, "id2label": lm.id2label, "label2id": lm.label2id}

    # -- loss and metrics ------------------------------------------------------------------------------
    def count(self, batch: dict) -> torch.Tensor:
        """How many loss targets the batch holds (examples here), as a float64 tensor on its device."""
        return torch.tensor(float(batch["labels"].numel()), dtype=torch.float64, device=batch["labels"].device)

    def loss_sum(self, outputs, batch: dict) -> torch.Tensor:
        """Summed (not averaged) cross-entropy over the batch's examples."""
        return F.cross_entropy(outputs.logits.float(), batch["labels"], reduction="sum")

    def evaluator(self, device):
        return ClassificationEvaluator(self, device)

    # -- export and use --------------------------------------------------------------------------------
    def export_meta(self) -> dict:
        d = self.cfg.data
        return {**super().export_meta(), "text_column": d.text_column, "text_pair_column": d.text_pair_column,
                "label_column": d.label_column}

    def save_extras(self, folder) -> None:
        self.labels.save(folder)

    def restore(self, folder: str) -> None:
        from transformers import AutoConfig

        self.labels = LabelMap.load(folder, AutoConfig.from_pretrained(folder))

    @torch.no_grad()
    def predict(self, engine, texts: list[str], pairs: list[str] | None, batch_size: int) -> list[dict]:
        """The most probable label, its probability and every label's, for each text."""
        results = []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer(texts[i:i + batch_size], pairs[i:i + batch_size] if pairs else None,
                                 truncation=True, max_length=self.cfg.data.max_length, padding=True,
                                 return_tensors="pt")
            enc = {k: v.to(engine.device) for k, v in enc.items()}
            probs = torch.softmax(engine.forward(**enc).logits.float(), dim=-1).cpu()
            for row in probs:
                k = int(row.argmax())
                results.append({"label": self.labels.names[k], "probability": float(row[k]),
                                "probabilities": row.tolist()})
        return results

    def format_prediction(self, text: str, prediction: dict) -> str:
        return f"{prediction['label']}\t{prediction['probability']:.4f}\t{text}"

    def prediction_columns(self, prediction: dict) -> dict[str, str]:
        return {"prediction": prediction["label"], "probability": f"{prediction['probability']:.6f}",
                **{f"p_{n}": f"{p:.6f}" for n, p in zip(self.labels.names, prediction["probabilities"])}}


class ClassificationEvaluator:
    """Accumulates a confusion matrix and loss sum on device; reduced over ranks before reporting."""

    def __init__(self, task: ClassificationTask, device):
        self.task, self.labels = task, task.labels
        k = self.labels.num_labels
        self.cm = torch.zeros(k * k, dtype=torch.float64, device=device)
        self.loss = torch.zeros((), dtype=torch.float64, device=device)

    def update(self, outputs, batch) -> None:
        k = self.labels.num_labels
        self.loss += self.task.loss_sum(outputs, batch).double()
        preds = outputs.logits.argmax(-1)
        self.cm += torch.bincount(batch["labels"] * k + preds, minlength=k * k).double()

    def compute(self, all_reduce_sum) -> dict:
        """Sum the state over ranks with ``all_reduce_sum`` and return the report (same on every rank)."""
        k = self.labels.num_labels
        cm = all_reduce_sum(self.cm).cpu().round().long().view(k, k)
        loss = all_reduce_sum(self.loss).item()
        return classification_report(cm, loss, self.labels.names)
