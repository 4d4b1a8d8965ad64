"""Words with one tag each (NER, POS, chunking): read, check, and align word tags to sub-word pieces.

Two kinds of file, each read into a ``datasets.Dataset`` with the columns ``tokens``, ``tags`` (one per
token) and ``at`` (where the sentence is: its first line in a CoNLL file, its row in a table; for error
messages):

- CoNLL style (any file that is not ``.jsonl`` / ``.json`` / ``.parquet``): one word per line, its columns
  separated by tabs (or by spaces in a line without a tab), the word first and the tag in
  ``data.tag_column`` (default: the last column). A line that is empty or holds only whitespace ends a
  sentence; ``-DOCSTART-`` lines (CoNLL-2003) are document breaks. A file whose first line is
  ``# global.columns = ID FORM ...`` (CoNLL-U Plus) names its columns: ``data.tag_column`` may then be a
  name, the word is in ``FORM``, and lines starting with ``#`` are comments.
- JSON lines or Parquet: per row a list of tokens (``data.text_column``) and a list of tags
  (``data.label_column``).

Whatever is wrong (a word without its tag, an empty sentence, a tag training never saw) is one UserError
naming the file and the line.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from dist_train.data.sources import _check_readable, _check_utf8, line_of_row, read_table, require_columns
from dist_train.errors import UserError

TABLES = (".jsonl", ".json", ".parquet")
DOCSTART = "-DOCSTART-"


def is_conll(path: str) -> bool:
    return Path(path).suffix.lower() not in TABLES


def where(path: str, at: int, token: int | None = None) -> str:
    """``'path': line N`` of the sentence at ``at``, or of its token ``token``: a CoNLL file has a line per
    token, a table a line (or row) per sentence."""
    if is_conll(path):
        return f"'{path}': line {at + (token or 0)}"
    place = f"'{path}': {line_of_row(path, at)}"
    return place if token is None else f"{place}, token {token + 1}"


# -- reading -----------------------------------------------------------------------------------------------
def read_tagged(path: str, data_cfg, what: str):
    """The sentences of ``path`` (checked: every token has its tag, no sentence is empty)."""
    _check_readable(path, what)
    ds = _read_conll(path, data_cfg, what) if is_conll(path) else _read_table(path, data_cfg)
    if len(ds) == 0:
        raise UserError(f"{what}: '{path}' holds no sentences")
    return ds


def _conll_columns(path: str, tag_column: int | str | None) -> tuple[int, int, bool]:
    """(word column, tag column, whether ``#`` lines are comments); a named tag column needs the file's
    ``# global.columns`` line."""
    with open(path, encoding="utf-8") as fh:
        first = fh.readline()
    declared = re.match(r"#\s*global\.columns\s*=\s*(.+)", first)
    names = declared.group(1).split() if declared else None
    word = names.index("FORM") if names and "FORM" in names else 0
    if tag_column is None or isinstance(tag_column, int):
        return word, -1 if tag_column is None else tag_column, names is not None
    if names is None:
        raise UserError(f"'{path}': data.tag_column '{tag_column}' is a column name, but the file does not name its "
                        "columns (a first line '# global.columns = ...'); give the tag column's index instead "
                        "(0 = the first, -1 = the last)")
    if tag_column not in names:
        raise UserError(f"'{path}': no column '{tag_column}' (columns: {', '.join(names)}); set data.tag_column "
                        "to one of them")
    return word, names.index(tag_column), True


def conll_sentences(path: str, shown: str, word: int, tag: int, comments: bool, stamp=None):
    """Yield ``{"tokens", "tags", "at"}`` per sentence of ``path`` (``shown``: the path as the user gave it,
    for errors; ``stamp``: the file's size and time, so that the datasets cache, keyed on these arguments,
    notices an edited file)."""
    tokens, tags, start = [], [], 0
    with open(path, encoding="utf-8") as fh:
        for number, raw in enumerate(fh, 1):
            line = raw.rstrip("\r\n")
            columns = line.split("\t") if "\t" in line else line.split()
            boundary = not line.strip() or columns[0].strip() == DOCSTART
            if boundary or (comments and line.startswith("#")):
                if tokens and boundary:
                    yield {"tokens": tokens, "tags": tags, "at": start}
                    tokens, tags = [], []
                continue
            if not -len(columns) <= tag < len(columns) or tag % len(columns) == word % len(columns):
                raise UserError(f"'{shown}': line {number}: expected a word and its tag separated by a tab, found "
                                f"{len(columns)} column{'s' if len(columns) != 1 else ''} (data.tag_column {tag})")
            token, label = columns[word].strip(), columns[tag].strip()
            if not token:
                raise UserError(f"'{shown}': line {number}: empty word (tag '{label}')")
            if not label:
                raise UserError(f"'{shown}': line {number}: word '{token}' has an empty tag")
            if not tokens:
                start = number
            tokens.append(token)
            tags.append(label)
    if tokens:
        yield {"tokens": tokens, "tags": tags, "at": start}


def _read_conll(path: str, data_cfg, what: str):
    import datasets

    _check_utf8(path)
    word, tag, comments = _conll_columns(path, data_cfg.tag_column)
    st = os.stat(path)
    datasets.disable_progress_bars()
    try:
        # Declared, so that a file without sentences fails as "no data" (below), not as a schema never inferred.
        features = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                                      "tags": datasets.Sequence(datasets.Value("string")), "at": datasets.Value("int64")})
        return datasets.Dataset.from_generator(
            conll_sentences, features=features, cache_dir=data_cfg.cache_dir,
            gen_kwargs={"path": str(Path(path).resolve()), "shown": path, "word": word, "tag": tag, "comments": comments,
                        "stamp": (st.st_size, st.st_mtime_ns)})
    except Exception as exc:  # noqa: BLE001 - datasets wraps the generator's error; ours is the cause
        cause = exc
        while cause is not None and not isinstance(cause, UserError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise cause from None
        if "corresponds to no data" in str(exc):  # datasets cannot hold a split of no rows
            raise UserError(f"{what}: '{path}' holds no sentences") from None
        raise


def _read_table(path: str, data_cfg):
    ds = read_table(path, data_cfg.cache_dir)
    text, label = data_cfg.text_column, data_cfg.label_column
    require_columns(ds, path, {"data.text_column": text, "data.label_column": label})
    for row, (tokens, tags) in enumerate(zip(ds[text], ds[label])):
        at = f"'{path}': {line_of_row(path, row)}"
        for column, values in ((text, tokens), (label, tags)):
            if not isinstance(values, list):
                found = "nothing" if values is None else f"a {type(values).__name__}"
                raise UserError(f"{at}: column '{column}' holds {found}, not a list; each row needs a list of "
                                f"tokens ('{text}') and a list of their tags ('{label}')")
        if not tokens:
            raise UserError(f"{at}: empty sentence (no tokens in '{text}')")
        if len(tokens) != len(tags):
            raise UserError(f"{at}: {len(tokens)} tokens but {len(tags)} tags; give one tag per token")
        for i, (token, tag) in enumerate(zip(tokens, tags)):
            if not isinstance(token, str) or not token.strip():
                raise UserError(f"{at}: token {i + 1} is empty")
            if isinstance(tag, bool) or not isinstance(tag, (str, int)) or (isinstance(tag, str) and not tag.strip()):
                raise UserError(f"{at}: token {i + 1} ('{token}') has no tag (a tag is a string or an integer, got "
                                f"{tag!r})")
    ds = ds.select_columns([text, label])
    ds = ds.rename_columns({c: n for c, n in ((text, "tokens"), (label, "tags")) if c != n})
    return ds.add_column("at", list(range(len(ds))))


def check_known_tags(ds, path: str, known) -> None:
    """Every tag of ``ds`` is one of ``known`` (training's); else the error names the first other one."""
    known = set(known)
    for tags, at in zip(ds["tags"], ds["at"]):
        if not known.issuperset(tags):
            i = next(i for i, t in enumerate(tags) if t not in known)
            shown = ", ".join(map(str, sorted(known)))
            raise UserError(f"{where(path, at, i)}: tag {tags[i]!r} never appears in the training data "
                            f"(train's tags: {shown})")


# -- alignment ---------------------------------------------------------------------------------------------
def encode_words(tokenizer, words: list[list[str]], max_length: int, **kwargs):
    """Tokenize pre-split sentences (``word_ids()`` maps pieces back to words). A word the tokenizer turns
    into no piece at all (e.g. only zero-width or control characters) becomes the unknown token, so that
    only truncation at ``max_length`` ever leaves a word without a piece."""
    if not tokenizer.is_fast:
        raise UserError("token_classification needs a fast tokenizer (tokenizer.json): it maps pieces to words")
    enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length, **kwargs)
    if tokenizer.unk_token is None:
        return enc
    fixed = None
    for i, sentence in enumerate(words):
        seen = set(enc.word_ids(i))
        missing = [w for w in range(len(sentence)) if w not in seen]
        if not missing:
            continue
        pieces = tokenizer([sentence[w] for w in missing], add_special_tokens=False)["input_ids"]
        empty = [w for w, ids in zip(missing, pieces) if not ids]
        if empty:
            fixed = fixed or [list(s) for s in words]
            for w in empty:
                fixed[i][w] = tokenizer.unk_token
    if fixed is None:
        return enc
    return tokenizer(fixed, is_split_into_words=True, truncation=True, max_length=max_length, **kwargs)


def align(word_ids: list[int | None], tags: list[int], all_pieces: bool) -> tuple[list[int], list[int], int]:
    """(piece labels, word starts, words cut): the first piece of a word carries its tag and marks the word
    (what is scored); its other pieces carry -100 (ignored by the loss), or the same tag when
    ``all_pieces``. Words cut: those left without a piece by truncation."""
    labels, starts, previous = [], [], None
    for w in word_ids:
        first = w is not None and w != previous
        labels.append(tags[w] if first or (w is not None and all_pieces) else -100)
        starts.append(int(first))
        previous = w
    return labels, starts, len(tags) - sum(starts)


def tokenize_tagged(ds, tokenizer, max_length: int, lookup: dict, all_pieces: bool):
    """``ds`` (tokens/tags) as input_ids, attention_mask (token_type_ids), ``labels``, ``word_start``,
    ``length`` and ``cut`` (words lost to truncation), through ``datasets.map`` (cached)."""

    def encode(batch):
        enc = encode_words(tokenizer, batch["tokens"], max_length)
        out = {k: enc[k] for k in enc.keys()}
        aligned = [align(enc.word_ids(i), [lookup[t] for t in tags], all_pieces)
                   for i, tags in enumerate(batch["tags"])]
        out["labels"], out["word_start"], out["cut"] = (list(col) for col in zip(*aligned))
        out["length"] = [len(ids) for ids in enc["input_ids"]]
        return out

    return ds.map(encode, batched=True, batch_size=1000, remove_columns=ds.column_names)
