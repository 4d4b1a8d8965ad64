"""Extractive question answering: the answer is a span of the context (SQuAD v1.1, and v2.0's "no answer").

Data (``dist_train/data/squad.py``): each question with its context is cut into windows of
``data.max_length`` tokens overlapping by ``task.stride``; the model (``AutoModelForQuestionAnswering``)
scores every token as the answer's start and end. Training: cross-entropy of the answer's first and last
token in each window (the first token where the window does not hold the answer), averaged over start and
end as transformers' heads do. Evaluation and prediction score each window's spans (start logit + end
logit, start <= end < start + ``task.max_answer_length``, inside the context), keep an example's best span
over all its windows, and - where training saw unanswerable questions - answer "" when the no-answer score
(both logits at the first token, the lowest over the windows) beats it by more than ``task.null_threshold``.
Exact match and F1 are SQuAD's (its normalisation, the best over the gold answers), per example.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dist_train.data.fingerprint import data_fingerprint
from dist_train.data.squad import EXAMPLE_COLUMNS, read_squad, tokenize_windows
from dist_train.data.tokenize import numbered
from dist_train.errors import UserError
from dist_train.tasks.base import Splits, Task

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
TARGETS = ("start_positions", "end_positions")
NO_SPAN = -1e30
"""The score of a window without any span inside its context (and of windows another rank scored)."""


def best_spans(start: torch.Tensor, end: torch.Tensor, offsets: torch.Tensor, attention: torch.Tensor,
               max_answer_length: int) -> torch.Tensor:
    """Per window [B]: the best span's score, its first and last character (+1), and the no-answer score,
    as a [B, 4] float64 tensor. ``start``/``end`` [B, L] logits, ``offsets`` [B, L, 2] (-1 off the context)."""
    start, end = start.double(), end.double()
    length = start.shape[1]
    inside = offsets[..., 0] >= 0
    i = torch.arange(length, device=start.device)
    band = (i[None, :] >= i[:, None]) & (i[None, :] < i[:, None] + max_answer_length)  # start <= end < start + max
    valid = inside[:, :, None] & inside[:, None, :] & band[None]
    scores = (start[:, :, None] + end[:, None, :]).masked_fill(~valid, float("-inf"))
    best, flat = scores.view(len(scores), -1).max(-1)
    first, last = flat // length, flat % length
    rows = torch.arange(len(scores), device=start.device)
    found = torch.isfinite(best)
    a = torch.where(found, offsets[rows, first, 0], -1).double()
    b = torch.where(found, offsets[rows, last, 1], -1).double()
    cls = attention.long().argmax(-1)  # the first real token: [CLS] (right padding) or the first after left pads
    null = start[rows, cls] + end[rows, cls]
    return torch.stack([torch.where(found, best, torch.full_like(best, NO_SPAN)), a, b, null], dim=1)


def answers(table: np.ndarray, example: list[int], contexts: list[str], n_examples: int, allow_null: bool,
            threshold: float) -> list[dict]:
    """Each example's answer from its windows' rows of ``table`` ([windows, 4] from ``best_spans``)."""
    best = [None] * n_examples
    null = [np.inf] * n_examples
    for w, e in enumerate(example):
        score, a, b, n = table[w]
        null[e] = min(null[e], n)
        if score > NO_SPAN and (best[e] is None or score > best[e][0]):
            best[e] = (score, int(a), int(b))
    out = []
    for e in range(n_examples):
        score, a, b = best[e] or (NO_SPAN, -1, -1)
        if best[e] is None or (allow_null and null[e] - score > threshold):
            out.append({"answer": "", "start": -1, "end": -1, "score": float(null[e]), "span_score": float(score)})
        else:
            out.append({"answer": contexts[e][a:b], "start": a, "end": b, "score": float(score),
                        "null_score": float(null[e])})
    return out


def squad_report(predictions: list[str], references: list[list[str]]) -> dict:
    """SQuAD's exact match and F1 (0-100) over all examples; with unanswerable ones also over those with
    and without an answer (SQuAD 2.0's HasAns / NoAns)."""
    from dist_train.evaluation.text_metrics import squad_scores

    report = squad_scores(predictions, [refs or [""] for refs in references])
    has = [i for i, refs in enumerate(references) if refs]
    if len(has) < len(references):
        no = [i for i, refs in enumerate(references) if not refs]
        for name, part in (("has_answer", has), ("no_answer", no)):
            scores = squad_scores([predictions[i] for i in part], [references[i] or [""] for i in part])
            report.update({f"{name}_exact_match": scores["exact_match"], f"{name}_f1": scores["f1"],
                           f"{name}_n": len(part)})
    return report


class QuestionAnsweringTask(Task):
    name = "question_answering"
    metrics = ("f1", "exact_match", "loss")
    architectures = ("ForQuestionAnswering",)
    peft_task_type = "QUESTION_ANS"
    summary = ("loss", "exact_match", "f1")
    can_predict = True
    can_distill = True
    task_fields = frozenset({"stride", "max_answer_length", "null_threshold"})

    def __init__(self, cfg):
        super().__init__(cfg)
        self.no_answer = False  # whether training saw unanswerable questions (then "" is an answer)
        self.outputs: list[dict] = []

    @classmethod
    def check_config(cls, cfg) -> None:
        d, t = cfg.data, cfg.task
        if t.stride >= d.max_length:
            raise UserError(f"config: task.stride {t.stride} must be less than data.max_length {d.max_length} (windows "
                            f"overlap by stride tokens); e.g. task.stride={d.max_length // 4}")
        if d.text_pair_column:
            raise UserError("config: data.text_pair_column: question_answering reads the question and context "
                            "fields of SQuAD-style data; remove it")

    @classmethod
    def check_files(cls, data) -> None:
        from dist_train.data.sources import _check_readable

        for split in ("train", "validation", "test"):
            path = getattr(data, split)
            if path is None:
                continue
            if not isinstance(path, str):
                raise UserError(f"data.{split}: question_answering reads one file per split, not a list")
            _check_readable(path, f"data.{split}")
            if Path(path).suffix.lower() not in (".json", ".jsonl"):
                raise UserError(f"data.{split}: '{path}': question_answering reads SQuAD JSON or JSON lines "
                                "(.json, .jsonl) with question, context and answers")

    # -- data ------------------------------------------------------------------------------------------
    def prepare(self, tokenizer) -> Splits:
        self.tokenizer = tokenizer
        d = self.cfg.data
        examples = read_squad(d.train, "data.train")
        self.no_answer = any(not e["answer_texts"] for e in examples)
        splits = self.splits_around(examples)
        splits.train = self._windows(splits.train)  # the questions are split first, then cut into windows
        return splits

    def hold_out(self, examples, fraction: float, seed: int) -> tuple:
        """Whole questions held out: one question's windows stay on one side."""
        order = np.random.default_rng(seed).permutation(len(examples))
        held = set(order[:max(1, round(fraction * len(examples)))].tolist())
        return ([e for i, e in enumerate(examples) if i not in held],
                self._windows([e for i, e in enumerate(examples) if i in held]))

    def split(self, path, what: str):
        return self._windows(read_squad(path, what))

    def _windows(self, examples: list[dict]):
        return tokenize_windows(examples, self.tokenizer, self.cfg.data.max_length, self.cfg.task.stride)

    def lengths(self, ds) -> list[int]:
        return ds["length"]

    def fingerprint(self, ds) -> dict:
        return data_fingerprint(len(ds), ds["length"], ds["start_positions"], ds["end_positions"])

    def view(self, ds):
        return numbered(ds).select_columns([c for c in (*MODEL_INPUTS, *TARGETS, "offsets", "index")
                                            if c in ds.column_names or c == "index"])

    def collator(self, epoch: int):
        return SpanCollator(self.tokenizer)

    # -- model -----------------------------------------------------------------------------------------
    @staticmethod
    def auto_model():
        from transformers import AutoModelForQuestionAnswering

        return AutoModelForQuestionAnswering

    def inputs(self, batch: dict) -> dict:
        return {k: v for k, v in batch.items() if k in MODEL_INPUTS}

    # -- loss and metrics ------------------------------------------------------------------------------
    def count(self, batch: dict) -> torch.Tensor:
        """Windows: each has one start and one end target."""
        return torch.tensor(float(len(batch["start_positions"])), dtype=torch.float64,
                            device=batch["start_positions"].device)

    def loss_sum(self, outputs, batch: dict) -> torch.Tensor:
        # (CE(start) + CE(end)) / 2 per window, as transformers' QA heads average them; summed over windows.
        start = F.cross_entropy(outputs.start_logits.float(), batch["start_positions"], reduction="sum")
        end = F.cross_entropy(outputs.end_logits.float(), batch["end_positions"], reduction="sum")
        return (start + end) / 2

    def evaluator(self, device, ds=None):
        return SpanEvaluator(self, device, ds)

    def soft_loss_sum(self, outputs, teacher, batch: dict, temperature: float) -> torch.Tensor:
        return (self.soft_kl_sum(outputs.start_logits, teacher.start_logits, temperature)
                + self.soft_kl_sum(outputs.end_logits, teacher.end_logits, temperature)) / 2

    def spans(self, outputs, batch: dict) -> torch.Tensor:
        return best_spans(outputs.start_logits, outputs.end_logits, batch["offsets"], batch["attention_mask"],
                          self.cfg.task.max_answer_length)

    def save_eval_outputs(self, path: Path) -> None:
        with open(path, "w") as fh:
            for row in self.outputs:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")

    # -- export and use --------------------------------------------------------------------------------
    def export_meta(self) -> dict:
        t = self.cfg.task
        return {**super().export_meta(), "stride": t.stride, "max_answer_length": t.max_answer_length,
                "null_threshold": t.null_threshold, "no_answer": self.no_answer}

    def restore(self, folder: str) -> None:
        from dist_train.use.export import read_meta

        self.no_answer = bool(read_meta(Path(folder)).get("no_answer", False))

    def command_line_inputs(self, texts: list[str]) -> tuple[list[str], list[str] | None]:
        if len(texts) % 2:
            raise UserError(f"predict: a question_answering model reads a question and its context: give "
                            f"--question Q --context C, or texts two at a time (QUESTION CONTEXT ...), not {len(texts)}")
        return texts[0::2], texts[1::2]

    def read_texts(self, path: str) -> tuple[list[str], list[str] | None, list[str]]:
        """Questions and contexts: SQuAD JSON or JSON lines (answers not needed), or a table with question and
        context columns."""
        if Path(path).suffix.lower() in (".json", ".jsonl"):
            examples = read_squad(path, "--file", need_answers=False)
            return [e["question"] for e in examples], [e["context"] for e in examples], ["question", "context"]
        from dist_train.data.sources import check_texts, read_table, require_columns

        ds = read_table(path)
        require_columns(ds, path, {"(question_answering)": "question", "(question_answering) ": "context"})
        for column in ("question", "context"):
            check_texts(ds, path, column)
        return list(ds["question"]), list(ds["context"]), ["question", "context"]

    @torch.no_grad()
    def predict(self, engine, texts: list[str], pairs: list[str] | None, batch_size: int) -> list[dict]:
        """Per question (with its context): the answer, its character span and score ("" = no answer)."""
        examples = [{"id": "", "question": q.lstrip(), "context": c, "answer_texts": [], "answer_starts": []}
                    for q, c in zip(texts, pairs)]
        for i, e in enumerate(examples):
            if not e["question"].strip() or not e["context"].strip():
                raise UserError(f"predict: question {i + 1} has an empty {'question' if not e['question'].strip() else 'context'}")
        ds = self._windows(examples)
        view, collate = self.view(ds), self.collator(0)
        table = np.zeros((len(ds), 4))
        for i in range(0, len(ds), batch_size):
            batch = {k: v.to(engine.device) for k, v in collate([view[j] for j in range(i, min(i + batch_size, len(ds)))]).items()}
            table[i:i + len(batch["index"])] = self.spans(engine.forward(**self.inputs(batch)), batch).cpu().numpy()
        return answers(table, ds["example"], pairs, len(examples), self.no_answer, self.cfg.task.null_threshold)

    def format_prediction(self, text: str, prediction: dict) -> str:
        answer = prediction["answer"] or "(no answer)"
        return f"{answer}\t{prediction['score']:.2f}\t{text.split(chr(9))[0]}"

    def prediction_columns(self, prediction: dict) -> dict[str, str]:
        return {"answer": prediction["answer"], "start": str(prediction["start"]), "end": str(prediction["end"]),
                "score": f"{prediction['score']:.4f}"}


class SpanCollator:
    """Model inputs padded by transformers' collator; the character offsets padded with -1 on the same side."""

    def __init__(self, tokenizer):
        from transformers import DataCollatorWithPadding

        self.inner, self.left = DataCollatorWithPadding(tokenizer), tokenizer.padding_side == "left"

    def __call__(self, items: list[dict]) -> dict:
        offsets = [it.pop("offsets") for it in items]
        batch = self.inner(items)
        width = batch["input_ids"].shape[1]
        rows = [([[-1, -1]] * (width - len(o)) + o) if self.left else (o + [[-1, -1]] * (width - len(o)))
                for o in offsets]
        batch["offsets"] = torch.tensor(rows, dtype=torch.long)
        return batch


class SpanEvaluator:
    """Each window's best span and no-answer score, written into its row of a [windows, 4] table (zeros in
    the rows other ranks score), plus the loss sum and window count; one all-reduce sums the table, then every
    rank picks each example's answer from all its windows - the same answers on any number of processes."""

    def __init__(self, task: QuestionAnsweringTask, device, ds):
        self.task, self.ds = task, ds
        self.table = torch.zeros(len(ds), 4, dtype=torch.float64, device=device)
        self.loss = torch.zeros(2, dtype=torch.float64, device=device)

    def update(self, outputs, batch) -> None:
        self.table[batch["index"]] = self.task.spans(outputs, batch)
        self.loss += torch.stack([self.task.loss_sum(outputs, batch).double(), self.task.count(batch)])

    def compute(self, all_reduce_sum) -> dict:
        total = all_reduce_sum(torch.cat([self.table.flatten(), self.loss])).cpu().numpy()
        table, (loss_sum, windows) = total[:-2].reshape(-1, 4), total[-2:]
        example = self.ds["example"]
        first = {}
        for w, e in enumerate(example):
            first.setdefault(e, w)
        # Examples in their file's order, their text from each one's first window.
        rows = self.ds.select([first[e] for e in range(len(first))]).select_columns(list(EXAMPLE_COLUMNS))[:]
        found = answers(table, example, rows["context"], len(first), self.task.no_answer,
                        self.task.cfg.task.null_threshold)
        references = rows["answer_texts"]
        self.task.outputs = [{"id": i, "question": q, "prediction": a["answer"], "answers": refs}
                             for i, q, a, refs in zip(rows["id"], rows["question"], found, references)]
        report = {"n": len(first), "windows": int(round(windows)), "loss": loss_sum / max(windows, 1)}
        return {**report, **squad_report([a["answer"] for a in found], references)}
