"""Use a trained model folder: evaluate it on a labelled file, or predict labels for new text."""

from __future__ import annotations

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
from dist_train.models import load_tokenizer, resolve_model_path
from dist_train.tasks.classification import ClassificationEvaluator, ClassificationTask, read_labelled


class LoadedModel:
    """A classification model folder with its tokenizer, labels and the columns it was trained on."""

    def __init__(self, folder: str, precision: str = "fp32"):
        from transformers import AutoModelForSequenceClassification

        self.folder = resolve_model_path(folder, "MODEL_DIR")
        try:
            model = AutoModelForSequenceClassification.from_pretrained(self.folder)
        except (OSError, ValueError) as exc:
            raise UserError(f"MODEL_DIR '{folder}': cannot load a classification model: "
                            f"{str(exc).splitlines()[0]}") from None
        self.tokenizer = load_tokenizer(self.folder, what="MODEL_DIR")
        self.meta = read_meta(self.folder)
        self.labels = LabelMap.load(self.folder, model.config)
        self.engine = SingleEngine(precision=precision)
        self.engine.prepare(model, None, None)
        self.engine.train(False)

    def data_config(self, text_column, pair_column, label_column, max_length) -> DataConfig:
        m = self.meta
        return DataConfig(text_column=text_column or m.get("text_column", "sentence"),
                          text_pair_column=pair_column or m.get("text_pair_column"),
                          label_column=label_column or m.get("label_column", "label"),
                          max_length=max_length or m.get("max_length", 512))

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
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w") as fh:  # plain TSV like the input: no quoting, tabs/newlines in text become spaces
            header = [data_cfg.text_column, "prediction", "probability"] + [f"p_{n}" for n in self.labels.names]
            fh.write("\t".join(header) + "\n")
            for text, (label, prob, probs) in zip(texts, results):
                row = [" ".join(text.split()), label, f"{prob:.6f}"] + [f"{p:.6f}" for p in probs]
                fh.write("\t".join(row) + "\n")
        return len(results)


def evaluate_language_model(folder: str, data: str, meta: dict, text_column: str | None, max_length: int | None,
                            batch_size: int, precision: str = "fp32") -> dict:
    """Loss and perplexity of a causal or masked LM folder on text ``data``, in blocks as in training
    (masked LM: the fixed evaluation masks)."""
    from dist_train.config import load_config
    from dist_train.tasks import build_task

    cfg = load_config(None, [f"model.pretrained={folder}", f"data.train={data}", f"task.name={meta['task']}",
                             f"data.text_column={text_column or meta.get('text_column', 'text')}",
                             f"data.text_unit={meta.get('text_unit', 'line')}",
                             f"data.max_length={max_length or meta.get('max_length', 128)}",
                             f"task.mlm_probability={meta.get('mlm_probability', 0.15)}",
                             f"task.whole_word_mask={str(meta.get('whole_word_mask', False)).lower()}"])
    task = build_task(cfg)
    blocks = task.prepare(task.load_tokenizer()).train
    engine = SingleEngine(precision=precision)
    engine.prepare(task.build_model(), None, None)
    return evaluate(engine, task, blocks, batch_size)
