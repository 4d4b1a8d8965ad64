"""The mapping between raw label values in the data (ints or strings) and class ids 0..K-1.

Learned from the training file, saved with the model, and applied to every other file: a label that
training never saw is an error naming the file and line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dist_train.data.sources import line_of_row
from dist_train.errors import UserError

LABELS_FILE = "labels.json"


def _kind(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "int" if value.is_integer() else "float"
    if isinstance(value, str):
        return "str"
    return type(value).__name__


def _looks_int(text: str) -> bool:
    try:
        int(text)
        return True
    except ValueError:
        return False


@dataclass
class LabelMap:
    values: list
    """Raw label values in class-id order (sorted)."""
    names: list[str]
    """Display names in class-id order (what id2label holds)."""

    @property
    def num_labels(self) -> int:
        return len(self.values)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}

    def value_to_id(self) -> dict:
        return {v: i for i, v in enumerate(self.values)}

    @classmethod
    def from_train(cls, raw: list, path: str, names: list[str] | None = None) -> "LabelMap":
        values = _clean(raw, path)
        kinds = {_kind(v) for v in values}
        if kinds == {"str"}:
            numeric = [_looks_int(v) for v in values]
            if any(numeric) and not all(numeric):
                row = numeric.index(not numeric[0])
                raise UserError(f"'{path}': mixed label types: '{values[0]}' looks like a number but "
                                f"'{values[row]}' ({line_of_row(path, row)}) does not; use one kind of label")
        elif kinds == {"float"} or "float" in kinds:
            row = [_kind(v) for v in values].index("float")
            raise UserError(f"'{path}': {line_of_row(path, row)}: label {values[row]!r} is not a class; labels must "
                            "be integers or strings (regression is not supported)")
        elif len(kinds) > 1:
            raise UserError(f"'{path}': mixed label types ({', '.join(sorted(kinds))}); use one kind of label")
        if "int" in kinds:
            values = [int(v) for v in values]
        return cls.of_classes(values, path, names)

    @classmethod
    def of_classes(cls, seen, path: str, names: list[str] | None = None, what: str = "label value",
                   plural: str = "labels") -> "LabelMap":
        """The map of the classes in ``seen`` (the training file's targets, sorted), named by ``names``
        (``task.label_names``, one per class in that order) or by the classes themselves."""
        classes = sorted(set(seen))
        if len(classes) < 2:
            raise UserError(f"'{path}': only one {what} ({classes[0]!r}) in the training data; need at least two")
        if names is not None and len(names) != len(classes):
            raise UserError(f"task.label_names has {len(names)} names but '{path}' has {len(classes)} {plural} "
                            f"({', '.join(map(str, classes))})")
        return cls(values=classes, names=list(names) if names else [str(c) for c in classes])

    def encode(self, raw: list, path: str) -> list[int]:
        """Class ids for ``raw``; unknown values are an error naming file and line."""
        values = _clean(raw, path)
        lookup = self.value_to_id()
        as_int = all(isinstance(v, int) for v in self.values)
        ids = []
        for row, value in enumerate(values):
            key = value
            if as_int and isinstance(value, (str, float)) and _looks_int(str(value).removesuffix(".0")):
                key = int(float(value))
            elif not as_int and not isinstance(value, str):
                key = str(value)
            if key not in lookup:
                known = ", ".join(map(str, self.values))
                raise UserError(f"'{path}': {line_of_row(path, row)}: label {value!r} never appears in the "
                                f"training data (known labels: {known})")
            ids.append(lookup[key])
        return ids

    def save(self, folder: str | Path) -> None:
        Path(folder, LABELS_FILE).write_text(json.dumps({"values": self.values, "names": self.names}, indent=2))

    @classmethod
    def load(cls, folder: str | Path, hf_config=None) -> "LabelMap":
        """From a dist-train export; else from a Hugging Face config's id2label (values = the names)."""
        path = Path(folder, LABELS_FILE)
        if path.is_file():
            data = json.loads(path.read_text())
            return cls(values=data["values"], names=data["names"])
        if hf_config is None:
            raise UserError(f"'{folder}': no {LABELS_FILE} and no model config to read labels from")
        names = [hf_config.id2label[i] for i in range(hf_config.num_labels)]
        if names == [f"LABEL_{i}" for i in range(len(names))]:  # transformers' default names: ids are the labels
            return cls(values=list(range(len(names))), names=names)
        return cls(values=names, names=names)


def _clean(raw: list, path: str) -> list:
    for row, value in enumerate(raw):
        if value is None or (isinstance(value, str) and not value.strip()):
            raise UserError(f"'{path}': {line_of_row(path, row)}: missing label")
        if isinstance(value, list):
            raise UserError(f"'{path}': {line_of_row(path, row)}: label {value!r} is a list; this task reads one "
                            "label per row; for any number of labels per row use task.name=multi_label")
    return [v.strip() if isinstance(v, str) else v for v in raw]
