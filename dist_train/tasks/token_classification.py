"""Token classification: one tag per word (named entities, part of speech, chunks).

Words are tokenized into sub-word pieces; the first piece of each word carries the word's tag and is what
evaluation scores and prediction reads (``dist_train/data/tagged.py`` aligns them). Metrics are entity-level
precision / recall / F1 with seqeval's semantics (BIO / IOB2 spans from ``get_entities``), micro and per
entity type, plus token accuracy. Tags without a B-/I- scheme (POS tags) make every word a one-word span of
its tag, so the entity metrics become per-tag token metrics.
"""

from __future__ import annotations

import itertools
import json
import sys

import numpy as np
import torch
import torch.nn.functional as F

from dist_train.data.fingerprint import data_fingerprint
from dist_train.data.labels import LabelMap
from dist_train.data.tagged import check_known_tags, encode_words, is_conll, read_tagged, tokenize_tagged
from dist_train.errors import UserError
from dist_train.tasks.base import Splits
from dist_train.tasks.labelled import LabelledTask

ENTITY_PREFIXES = ("B-", "I-", "E-", "S-")


# -- entities (seqeval's semantics) ----------------------------------------------------------------------
def scheme_is_bio(names: list[str]) -> bool:
    """Whether the tags follow a B-/I- scheme that seqeval reads spans from (else: one span per tagged word)."""
    return any(n != "O" for n in names) and all(n == "O" or n.startswith(ENTITY_PREFIXES) for n in names)


def entities(tags: list[str], bio: bool) -> set[tuple[str, int, int]]:
    """(type, first word, last word) spans of one sentence."""
    if bio:
        from seqeval.metrics.sequence_labeling import get_entities

        return set(get_entities(tags))
    return {(t, i, i) for i, t in enumerate(tags) if t != "O"}


def entity_types(names: list[str], bio: bool) -> list[str]:
    return sorted({t for name in names for t, _, _ in entities([name], bio)})


def prf(tp: np.ndarray, predicted: np.ndarray, gold: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall, F1 from counts, as seqeval computes them (0 where a denominator is 0)."""
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, gold, out=np.zeros_like(tp), where=gold > 0)
    denom = precision + recall
    denom[denom == 0.0] = 1.0
    return precision, recall, 2 * precision * recall / denom


class TokenClassificationTask(LabelledTask):
    name = "token_classification"
    metrics = ("entity_f1", "entity_precision", "entity_recall", "token_accuracy", "loss")
    architectures = ("ForTokenClassification",)
    peft_task_type = "TOKEN_CLS"
    summary = ("loss", "entity_f1", "entity_precision", "entity_recall", "token_accuracy")
    can_predict = True
    can_distill = True

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.data.text_pair_column:
            raise UserError("config: data.text_pair_column: token_classification tags the words of one text; "
                            "remove it")
        if isinstance(cfg.data.tag_column, str) and not cfg.data.tag_column.strip():
            raise UserError("config: data.tag_column is empty; give a column index (-1 = the last) or name")

    @classmethod
    def check_files(cls, data) -> None:
        # Any file that is not a table is read as CoNLL, whatever its suffix (.conll, .txt, .iob, .tsv).
        from dist_train.data.sources import _check_readable

        for split in ("train", "validation", "test"):
            if getattr(data, split) is not None:
                _check_readable(getattr(data, split), f"data.{split}")

    # -- data ------------------------------------------------------------------------------------------
    def prepare(self, tokenizer) -> Splits:
        self.tokenizer = tokenizer
        d = self.cfg.data
        raw = read_tagged(d.train, d, "data.train")
        self.labels = LabelMap.of_classes(itertools.chain.from_iterable(raw["tags"]), d.train,
                                          self.cfg.task.label_names, what="tag", plural="tags")
        train = self._tokenize(raw, d.train, "data.train")
        return self.splits_around(train)

    def split(self, path, what: str):
        raw = read_tagged(path, self.cfg.data, what)
        check_known_tags(raw, path, self.labels.values)
        return self._tokenize(raw, path, what)

    def _tokenize(self, raw, path: str, what: str):
        d = self.cfg.data
        ds = tokenize_tagged(raw, self.tokenizer, d.max_length, self.labels.value_to_id(),
                             self.cfg.task.label_all_tokens)
        cut = sum(ds["cut"])
        if cut and self.is_main:
            sentences = sum(1 for c in ds["cut"] if c)
            print(f"dist-train: warning: {what} '{path}': {cut} words of {sentences} sentences lie beyond "
                  f"max_length {d.max_length} tokens and are cut (not trained on, not scored); raise "
                  "data.max_length to keep them", file=sys.stderr, flush=True)
        return ds

    def lengths(self, ds) -> list[int]:
        return ds["length"]

    def fingerprint(self, ds) -> dict:
        return data_fingerprint(len(ds), ds["length"], list(itertools.chain.from_iterable(ds["labels"])))

    def view(self, ds):
        return ds.select_columns([c for c in ("input_ids", "attention_mask", "token_type_ids", "labels",
                                              "word_start") if c in ds.column_names])

    def collator(self, epoch: int):
        return TagCollator(self.tokenizer)

    # -- model -----------------------------------------------------------------------------------------
    @staticmethod
    def auto_model():
        from transformers import AutoModelForTokenClassification

        return AutoModelForTokenClassification

    def inputs(self, batch: dict) -> dict:
        return {k: v for k, v in batch.items() if k not in ("labels", "word_start")}

    # -- loss and metrics ------------------------------------------------------------------------------
    def count(self, batch: dict) -> torch.Tensor:
        """Labelled pieces (first pieces of words; every piece with ``task.label_all_tokens``)."""
        return self.count_of(batch["labels"])

    def loss_sum(self, outputs, batch: dict) -> torch.Tensor:
        logits = outputs.logits.float()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), batch["labels"].view(-1), ignore_index=-100,
                               reduction="sum")

    def evaluator(self, device, ds=None):
        return TagEvaluator(self, device)

    def labelled(self, batch: dict) -> torch.Tensor:
        """The labelled pieces only, as the loss on the tags."""
        return batch["labels"] != -100

    # -- export and use --------------------------------------------------------------------------------
    def same_predictions(self, want, got, batch) -> torch.Tensor:
        """The same tag at every real (unpadded) position."""
        keep = batch["attention_mask"].bool()
        return got[keep].argmax(-1) == want[keep].argmax(-1)

    def export_meta(self) -> dict:
        d = self.cfg.data
        return {**super().export_meta(), "text_column": d.text_column, "label_column": d.label_column,
                "tag_column": d.tag_column, "label_all_tokens": self.cfg.task.label_all_tokens}

    def read_texts(self, path: str) -> tuple[list[str], list[str] | None, list[str]]:
        """A text column, or a column of token lists (JSON lines as in training: joined with spaces)."""
        if is_conll(path):
            raise UserError(f"predict: --file '{path}': give a .jsonl/.parquet file with a text (or token list) "
                            "column, or a .tsv/.csv one with a text column")
        texts, _, columns = super().read_texts(path)
        return [" ".join(t) if isinstance(t, list) else t for t in texts], None, columns

    @torch.no_grad()
    def predict(self, engine, texts: list[str], pairs: list[str] | None, batch_size: int) -> list[dict]:
        """Per text (split into words at whitespace): each word's tag and probability, and the entities."""
        names, bio = self.labels.names, scheme_is_bio(self.labels.names)
        results = []
        for i in range(0, len(texts), batch_size):
            words = [t.split() for t in texts[i:i + batch_size]]
            enc = encode_words(self.tokenizer, words, self.cfg.data.max_length, padding=True, return_tensors="pt")
            probs = torch.softmax(engine.forward(**{k: v.to(engine.device) for k, v in enc.items()}).logits.float(),
                                  dim=-1).cpu()
            for j, sentence in enumerate(words):
                firsts = {}
                for piece, w in enumerate(enc.word_ids(j)):
                    if w is not None and w not in firsts:
                        firsts[w] = piece
                tags, scores = [], []
                for w in range(len(firsts)):  # words after a cut are not tagged
                    p = probs[j, firsts[w]]
                    tags.append(names[int(p.argmax())])
                    scores.append(float(p.max()))
                spans = sorted(entities(tags, bio), key=lambda e: e[1])
                results.append({
                    "entities": [{"type": t, "text": " ".join(sentence[a:b + 1]), "start": a, "end": b + 1,
                                  "score": float(np.mean(scores[a:b + 1]))} for t, a, b in spans],
                    "tags": tags, "scores": scores, "words_cut": len(sentence) - len(tags)})
        return results

    def format_prediction(self, text: str, prediction: dict) -> str:
        found = " | ".join(f"{e['type']} {e['text']} [{e['start']}:{e['end']}] {e['score']:.2f}"
                           for e in prediction["entities"]) or "-"
        cut = f" ({prediction['words_cut']} words beyond --max-length not tagged)" if prediction["words_cut"] else ""
        return f"{found}{cut}\t{text}"

    def prediction_columns(self, prediction: dict) -> dict[str, str]:
        return {"entities": json.dumps(prediction["entities"]), "tags": " ".join(prediction["tags"]),
                "words_cut": str(prediction["words_cut"])}


class TagCollator:
    """transformers' DataCollatorForTokenClassification (labels padded with -100), plus the word-start mask
    padded with 0 on the same side."""

    def __init__(self, tokenizer):
        from transformers import DataCollatorForTokenClassification

        self.inner, self.left = DataCollatorForTokenClassification(tokenizer), tokenizer.padding_side == "left"

    def __call__(self, items: list[dict]) -> dict:
        starts = [it.pop("word_start") for it in items]
        batch = self.inner(items)
        width = batch["labels"].shape[1]
        pad = [[0] * (width - len(s)) for s in starts]
        batch["word_start"] = torch.tensor([p + s if self.left else s + p for s, p in zip(starts, pad)],
                                           dtype=torch.bool)
        return batch


class TagEvaluator:
    """Additive counts, reduced over ranks before the report: per entity type the true positives, predicted
    and gold entities; words right and scored; loss sum and labelled pieces; sentences. Each rank extracts
    the entities of its own sentences, so the sums equal one process's exactly (no strings gathered)."""

    def __init__(self, task: TokenClassificationTask, device):
        self.task, self.names = task, task.labels.names
        self.bio = scheme_is_bio(self.names)
        self.types = entity_types(self.names, self.bio)
        self.state = torch.zeros(3 * len(self.types) + 5, dtype=torch.float64, device=device)

    def counts(self, gold: list[list[str]], predicted: list[list[str]]) -> np.ndarray:
        """[tp per type, predicted per type, gold per type, words right, words, sentences] of sentences."""
        k, index = len(self.types), {t: i for i, t in enumerate(self.types)}
        out = np.zeros(3 * k + 3)
        for g, p in zip(gold, predicted):
            true, pred = entities(g, self.bio), entities(p, self.bio)
            for part, spans in enumerate((true & pred, pred, true)):
                for t, _, _ in spans:
                    out[part * k + index[t]] += 1
            out[3 * k] += sum(a == b for a, b in zip(g, p))
            out[3 * k + 1] += len(g)
            out[3 * k + 2] += 1
        return out

    def update(self, outputs, batch) -> None:
        starts = batch["word_start"].cpu()
        labels, preds = batch["labels"].cpu(), outputs.logits.argmax(-1).cpu()
        gold = [[self.names[i] for i in row[s].tolist()] for row, s in zip(labels, starts)]
        predicted = [[self.names[i] for i in row[s].tolist()] for row, s in zip(preds, starts)]
        counts = torch.from_numpy(self.counts(gold, predicted)).to(self.state.device)
        loss = torch.stack([self.task.loss_sum(outputs, batch).double(), self.task.count(batch)])
        self.state += torch.cat([counts, loss])

    def compute(self, all_reduce_sum) -> dict:
        """Sum the counts over ranks with ``all_reduce_sum``; the report (the same on every rank)."""
        k = len(self.types)
        total = all_reduce_sum(self.state).cpu().numpy()
        tp, predicted, gold = total[:k], total[k:2 * k], total[2 * k:3 * k]
        right, words, sentences, loss_sum, pieces = total[3 * k:]
        report = {"n": int(round(sentences)), "words": int(round(words)), "loss": loss_sum / max(pieces, 1)}
        if not words:
            return report
        p, r, f = prf(tp, predicted, gold)
        mp, mr, mf = prf(tp.sum(keepdims=True), predicted.sum(keepdims=True), gold.sum(keepdims=True))
        report.update({
            "entity_f1": float(mf[0]), "entity_precision": float(mp[0]), "entity_recall": float(mr[0]),
            "token_accuracy": float(right / words), "entities": int(round(gold.sum())),
            # Types neither in the data nor predicted are left out, as seqeval's report leaves them out.
            "per_type": {t: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                             "support": int(round(gold[i]))} for i, t in enumerate(self.types)
                         if gold[i] or predicted[i]},
        })
        return report
