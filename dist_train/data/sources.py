"""Read one local table (TSV, CSV, JSONL/JSON, Parquet) into a ``datasets.Dataset``.

Loading goes through ``datasets`` (Arrow, memory-mapped, cached by file fingerprint). Whatever goes wrong
in reading becomes one UserError that names the file, and the line where the format has lines.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import json
import logging
import os
import re
from pathlib import Path

from dist_train.errors import UserError

FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def file_format(path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise UserError(f"'{path}': unknown file type '{suffix or '(none)'}'; use .tsv, .csv, .jsonl, .json or .parquet")
    return FORMATS[suffix]


def line_of_row(path: str, row: int) -> str:
    """Human position of data row ``row`` (0-based): a line number for text formats (after the header)."""
    fmt = file_format(path)
    if fmt in ("tsv", "csv"):
        return f"line {row + 2}"
    if fmt == "json":
        return f"line {row + 1}"
    return f"row {row + 1}"


def _check_readable(path: str, what: str | None = None) -> None:
    """``what``: the config key or option that named the file, said first when given."""
    p = Path(path)
    where = f"{what}: '{path}'" if what else f"'{path}'"
    if not p.exists():
        parent = next((a for a in p.parents if a.exists()), None)
        hint = f" ('{parent}' is a file)" if parent is not None and not parent.is_dir() else ""
        raise UserError(f"{where}: file not found{hint}")
    if p.is_dir():
        raise UserError(f"{where}: is a folder; give a data file")
    if not os.access(p, os.R_OK):
        raise UserError(f"{where}: cannot read the file (permission denied)")
    if p.stat().st_size == 0:
        raise UserError(f"{where}: the file is empty")


def _first_non_utf8(path: str) -> str | None:
    """``line N: byte 0x.. at column C`` for the first line that is not UTF-8, or None."""
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                return f"line {number}: byte 0x{line[exc.start]:02x} at column {exc.start + 1}"
    return None


def _check_utf8(path: str) -> None:
    """The whole file is UTF-8 (the JSON reader takes other bytes into Arrow strings that fail only when
    read); the error names the first bad line. One pass at the speed of the codec."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 24):
                decoder.decode(chunk)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise UserError(f"'{path}': {_first_non_utf8(path) or 'the end'} is not UTF-8 text; save the file as "
                        "UTF-8") from None


def _check_delimiter(path: str, fmt: str) -> None:
    """A .tsv whose header has commas and no tab (or a .csv the other way round) is the other format."""
    with open(path, "rb") as fh:
        header = fh.readline().decode("utf-8", errors="replace")
    if fmt == "tsv" and "\t" not in header and "," in header:
        raise UserError(f"'{path}': the header has commas and no tabs: the file looks comma-separated; "
                        "rename it to .csv (or separate its columns with tabs)")
    if fmt == "csv" and "," not in header and "\t" in header:
        raise UserError(f"'{path}': the header has tabs and no commas: the file looks tab-separated; "
                        "rename it to .tsv (or separate its columns with commas)")


def _first_bad_json_line(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                if not isinstance(json.loads(line), dict):
                    return f"line {number}: expected a JSON object per line"
            except json.JSONDecodeError as exc:
                return f"line {number}: {exc.msg}"
    return "not valid JSON lines"


def _explain(path: str, fmt: str, exc: BaseException) -> str:
    # datasets wraps the reader's error; the root cause carries the useful text.
    root = exc
    while root.__cause__ is not None or root.__context__ is not None:
        root = root.__cause__ or root.__context__
    text = str(root) or type(root).__name__
    if fmt in ("tsv", "csv"):
        m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", text)
        if m:
            sep = "tabs" if fmt == "tsv" else "commas"
            return (f"'{path}': line {m.group(2)}: malformed row: expected {m.group(1)} fields, saw {m.group(3)} "
                    f"(check for stray {sep})")
        if "No columns to parse" in text:
            return f"'{path}': the file has no header or rows"
    if "corresponds to no data" in text:
        return f"'{path}': has a header but no rows"
    if fmt != "parquet":
        bad = _first_non_utf8(path)
        if bad:
            return f"'{path}': {bad} is not UTF-8 text; save the file as UTF-8"
    if fmt == "json":
        return f"'{path}': {_first_bad_json_line(path)}"
    if "utf-8" in text.lower() or isinstance(root, UnicodeDecodeError):
        return f"'{path}': not UTF-8 text ({text.splitlines()[0]})"
    return f"'{path}': cannot be read as {fmt}: {text.splitlines()[0]}"


@contextlib.contextmanager
def quiet_datasets():
    """datasets logs a reader's failure ("Failed to read file ...") before it raises: our one line says it."""
    import datasets

    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(logging.CRITICAL + 1)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(max(level, logging.ERROR))


def read_table(path: str, cache_dir: str | None = None):
    """Load ``path`` as a Dataset. Raises UserError for a missing, empty, unreadable or malformed file."""
    import datasets

    _check_readable(path)
    fmt = file_format(path)
    if fmt in ("tsv", "csv"):
        _check_delimiter(path, fmt)
    if fmt == "json":
        _check_utf8(path)
    builder, kwargs = fmt, {}
    if fmt == "tsv":
        # Plain tab-separated text: quotes are ordinary characters (the seed's sentences contain them).
        builder, kwargs = "csv", {"delimiter": "\t", "quoting": csv.QUOTE_NONE}
    datasets.disable_progress_bars()
    try:
        with quiet_datasets():
            ds = datasets.load_dataset(builder, data_files={"data": str(Path(path).resolve())}, split="data",
                                       cache_dir=cache_dir, **kwargs)
    except Exception as exc:  # noqa: BLE001 - every reader failure becomes one clear line
        raise UserError(_explain(path, fmt, exc)) from None
    if len(ds) == 0:
        raise UserError(f"'{path}': has a header but no rows")
    return ds


def require_columns(ds, path: str, columns: dict[str, str]) -> None:
    """``columns`` maps a config key (e.g. data.text_column) to the column it names."""
    for key, column in columns.items():
        if column not in ds.column_names:
            found = ", ".join(ds.column_names)
            raise UserError(f"'{path}': no column '{column}' (columns found: {found}); set {key} to one of them")


def check_texts(ds, path: str, column: str) -> None:
    for row, value in enumerate(ds[column]):
        if not isinstance(value, str) or not value.strip():
            raise UserError(f"'{path}': {line_of_row(path, row)}: empty or missing text in column '{column}'")
