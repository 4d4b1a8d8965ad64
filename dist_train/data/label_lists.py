"""Label lists: documents with any number of labels (none included), for multi-label classification.

A row's labels are a list in JSON lines and Parquet (``["sports", "politics"]``, ``[]`` for none), or one
cell split at ``data.label_separator`` in TSV/CSV (``sports|politics``; an empty cell = none). Labels are
names: an integer in a list is the name it prints as, so a TSV and a JSONL of the same data give the same
label set. The set is learned from train (sorted, numerically when every name is an integer) into a
``LabelMap`` - saved and loaded as for one label per row - and every other file is checked against it.
"""

from __future__ import annotations

import math

from dist_train.data.labels import LabelMap, _looks_int
from dist_train.data.sources import file_format, line_of_row
from dist_train.errors import UserError


def read_label_lists(raw: list, path: str, separator: str | None) -> list[list[str]]:
    """Each row's label names (stripped, duplicates dropped, in the row's order); a row that is not a list
    of names, or a TSV/CSV without ``separator``, is an error naming the file (and line)."""
    fmt = file_format(path)
    cells = fmt in ("tsv", "csv")
    if cells and separator is None:
        raise UserError(f"'{path}': a .{fmt} holds a row's labels in one cell; set data.label_separator to the "
                        "character between them (e.g. '|': sports|politics; an empty cell = no labels)")
    rows = []
    for row, value in enumerate(raw):
        items = _cell_items(value, separator) if cells else _list_items(value, path, row)
        names = []
        for item in items:
            name = _name(item, path, row)
            if name not in names:
                names.append(name)
        rows.append(names)
    return rows


def _cell_items(value, separator: str) -> list:
    # pandas reads an all-numeric column as numbers, and an empty cell among them as NaN.
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    if isinstance(value, str):
        return [] if not value.strip() else value.split(separator)
    return [value]


def _list_items(value, path: str, row: int) -> list:
    if isinstance(value, list):
        return value
    where = f"'{path}': {line_of_row(path, row)}"
    if value is None:
        raise UserError(f"{where}: no label list; write [] for a document without labels")
    raise UserError(f"{where}: label {value!r} is not a list; multi_label reads a list of labels per row "
                    "(e.g. [\"sports\", \"politics\"], [] for none); for one label per row use "
                    "task.name=classification")


def _name(item, path: str, row: int) -> str:
    if isinstance(item, float) and item.is_integer():
        item = int(item)
    if isinstance(item, int) and not isinstance(item, bool):
        return str(item)
    if isinstance(item, str) and item.strip():
        return item.strip()
    what = "an empty label" if isinstance(item, str) else f"label {item!r} is not a name (a string or an integer)"
    raise UserError(f"'{path}': {line_of_row(path, row)}: {what}")


def learn_label_set(rows: list[list[str]], path: str, names: list[str] | None = None) -> LabelMap:
    """The training file's labels, sorted; ``names`` (``task.label_names``) display them."""
    found = {name for row in rows for name in row}
    if not found:
        raise UserError(f"'{path}': no row has a label; multi-label training needs labelled documents")
    numeric = all(_looks_int(name) for name in found)
    values = sorted(found, key=int if numeric else None)
    if names is not None and len(names) != len(values):
        raise UserError(f"task.label_names has {len(names)} names but '{path}' has {len(values)} labels "
                        f"({', '.join(values)})")
    return LabelMap(values=values, names=list(names) if names else values)


def multi_hot(rows: list[list[str]], labels: LabelMap, path: str) -> list[list[float]]:
    """One 0/1 vector over ``labels`` per row; a label training never saw names the file and line."""
    index = {str(value): i for i, value in enumerate(labels.values)}
    vectors = []
    for row, names in enumerate(rows):
        vector = [0.0] * labels.num_labels
        for name in names:
            if name not in index:
                raise UserError(f"'{path}': {line_of_row(path, row)}: label {name!r} never appears in the "
                                f"training data (known labels: {', '.join(map(str, labels.values))})")
            vector[index[name]] = 1.0
        vectors.append(vector)
    return vectors
