"""Question answering data, SQuAD-style: read and check examples, then cut them into model windows.

Two layouts are read, either as ``.json`` or ``.jsonl``:

- SQuAD v1.1 / v2.0 JSON: ``{"data": [{"paragraphs": [{"context": ..., "qas": [{"id", "question",
  "answers": [{"text", "answer_start"}], "is_impossible"}]}]}]}``;
- flat rows, one object per line (or a JSON list): ``{"id", "question", "context", "answers"}`` with the
  answers as ``{"text": [...], "answer_start": [...]}`` (Hugging Face datasets' ``squad`` columns) or a
  list of ``{"text", "answer_start"}``; no answer (an empty list, or ``is_impossible``) = unanswerable.

Every answer must be found in its context at its character start: a data error names the question and
where it is. A context longer than a window (``data.max_length`` tokens with the question) is read in
windows overlapping by ``task.stride`` tokens; each window records which example it belongs to and the
character span of each of its context tokens, so that predictions map back to text.
"""

from __future__ import annotations

import json
from pathlib import Path

from dist_train.errors import UserError

EXAMPLE_COLUMNS = ("id", "question", "context", "answer_texts")


def _answers(raw, where: str) -> list[tuple[str, int]]:
    """(text, start) pairs of one question, from either answer layout."""
    if raw is None:
        return []
    if isinstance(raw, dict):
        texts, starts = raw.get("text", []), raw.get("answer_start", [])
        if len(texts) != len(starts):
            raise UserError(f"{where}: answers has {len(texts)} texts but {len(starts)} answer_start values")
        return list(zip(texts, starts))
    if isinstance(raw, list):
        try:
            return [(a["text"], a["answer_start"]) for a in raw]
        except (TypeError, KeyError):
            raise UserError(f"{where}: each answer needs 'text' and 'answer_start'") from None
    raise UserError(f"{where}: answers must be a list of {{text, answer_start}} or {{text: [...], answer_start: "
                    f"[...]}}, not {type(raw).__name__}")


def _example(row: dict, where: str, need_answers: bool) -> dict:
    question, context = row.get("question"), row.get("context")
    for name, value in (("question", question), ("context", context)):
        if not isinstance(value, str) or not value.strip():
            raise UserError(f"{where}: empty or missing {name}")
    answers = [] if row.get("is_impossible") else _answers(row.get("answers"), where)
    if need_answers and "answers" not in row and "is_impossible" not in row:
        raise UserError(f"{where}: no 'answers' (give [] for a question the context cannot answer)")
    for text, start in answers:
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{where}: an empty answer text; an unanswerable question has no answers ([])")
        if not isinstance(start, int) or isinstance(start, bool) or not 0 <= start < len(context):
            raise UserError(f"{where}: answer_start {start!r} is outside the context (0..{len(context) - 1})")
        found = context[start:start + len(text)]
        if found != text:
            raise UserError(f"{where}: the answer {text!r} is not at its answer_start {start} (the context there "
                            f"reads {found!r}); fix answer_start (the character offset of the answer)")
    return {"id": str(row.get("id", "")), "question": question.lstrip(), "context": context,
            "answer_texts": [t for t, _ in answers], "answer_starts": [s for _, s in answers]}


def _rows(path: str, what: str):
    """(row, where) of every question in the file, in either layout."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        whole = json.loads(text)
    except ValueError:
        whole = None
    if isinstance(whole, dict) and "data" in whole:  # SQuAD JSON
        for a, article in enumerate(whole["data"]):
            for p, paragraph in enumerate(article.get("paragraphs", [])):
                for q, qa in enumerate(paragraph.get("qas", [])):
                    where = f"{what} '{path}': question {qa.get('id', '?')!r} (data[{a}].paragraphs[{p}].qas[{q}])"
                    yield {**qa, "context": paragraph.get("context")}, where
        return
    if isinstance(whole, list):
        for i, row in enumerate(whole):
            yield row, f"{what} '{path}': item {i + 1}"
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise UserError(f"{what} '{path}': line {number} is not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{what} '{path}': line {number} is not a JSON object")
        yield row, f"{what} '{path}': line {number} (id {row.get('id', '?')!r})"


def read_squad(path: str, what: str, need_answers: bool = True) -> list[dict]:
    """The examples of a SQuAD-style file: id, question, context, answer texts and character starts."""
    from dist_train.data.sources import _check_readable, _check_utf8

    _check_readable(path, what)
    if Path(path).suffix.lower() not in (".json", ".jsonl"):
        raise UserError(f"{what}: '{path}': question_answering reads SQuAD JSON or JSON lines (.json, .jsonl) "
                        "with question, context and answers")
    _check_utf8(path)
    examples = [_example(row, where, need_answers) for row, where in _rows(path, what)]
    if not examples:
        raise UserError(f"{what}: '{path}' holds no questions")
    return examples


def tokenize_windows(examples: list[dict], tokenizer, max_length: int, stride: int):
    """One row per window: the model's inputs, the training targets (the answer's first and last token, or
    the first token where the window holds no answer), ``example`` (its example's position), ``offsets``
    (each context token's character span, [-1, -1] elsewhere), ``length``, and its example's id, question,
    context and answer texts."""
    import datasets

    if not getattr(tokenizer, "is_fast", False):
        raise UserError("question_answering needs a fast tokenizer (character offsets): the model's tokenizer "
                        f"({type(tokenizer).__name__}) has none; use a model with a tokenizer.json")
    question_first = tokenizer.padding_side == "right"
    ds = datasets.Dataset.from_list([{**e, "example": i} for i, e in enumerate(examples)])

    def encode(batch):
        q, c = batch["question"], batch["context"]
        try:
            enc = tokenizer(q if question_first else c, c if question_first else q, max_length=max_length,
                            truncation="only_second" if question_first else "only_first", stride=stride,
                            return_overflowing_tokens=True, return_offsets_mapping=True)
        except Exception as exc:  # noqa: BLE001 - tokenizers says "sequence too long" in its own words
            longest = max(len(tokenizer(x)["input_ids"]) for x in q)
            raise UserError(f"a question of {longest} tokens leaves no room for its context in data.max_length "
                            f"{max_length} with task.stride {stride} ({str(exc).splitlines()[0][:120]}); raise "
                            "data.max_length or lower task.stride") from None
        side = 1 if question_first else 0
        out = {k: enc[k] for k in enc.keys() if k in ("input_ids", "attention_mask", "token_type_ids")}
        out.update(example=[], offsets=[], start_positions=[], end_positions=[], length=[],
                   **{k: [] for k in EXAMPLE_COLUMNS})
        for w, source in enumerate(enc["overflow_to_sample_mapping"]):
            ids, seq = enc["input_ids"][w], enc.sequence_ids(w)
            offsets = [list(o) if s == side else [-1, -1] for o, s in zip(enc["offset_mapping"][w], seq)]
            cls = ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0
            start = end = cls
            if batch["answer_starts"][source]:  # train on the first answer, as SQuAD's training set has one
                a = batch["answer_starts"][source][0]
                b = a + len(batch["answer_texts"][source][0])
                inside = [i for i, (s, e) in enumerate(offsets) if s >= 0]
                if inside and offsets[inside[0]][0] <= a and offsets[inside[-1]][1] >= b:
                    start = next(i for i in inside if offsets[i][1] > a)
                    end = next(i for i in reversed(inside) if offsets[i][0] < b)
            out["example"].append(batch["example"][source])
            out["offsets"].append(offsets)
            out["start_positions"].append(start)
            out["end_positions"].append(end)
            out["length"].append(len(ids))
            for k in EXAMPLE_COLUMNS:  # each window carries its example's text: evaluation scores examples
                out[k].append(batch[k][source])
        return out

    datasets.disable_progress_bars()
    return ds.map(encode, batched=True, batch_size=256, remove_columns=ds.column_names)
