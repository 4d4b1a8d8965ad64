"""Checks on the paths a command will write, made before any work: a bad path never costs a training run or
an inference pass, and nothing is half-written."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path

from dist_train.errors import RunFailed, UserError


def can_write_in(folder: Path) -> bool:
    """Whether files can be created in ``folder``. Permission bits do not tell it for root, nor on a
    read-only mount or in /proc: an unnamed temporary file (no name ever appears in the folder) does."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def check_creatable(path: str | Path, flag: str) -> None:
    """``path`` can be created: its nearest existing ancestor is a folder this process may write into."""
    parent = Path(path).parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag} '{path}' cannot be created: '{parent}' is a file, not a folder")
    if not can_write_in(parent):
        raise UserError(f"{flag} '{path}' cannot be written: no write permission in '{parent}'")


def check_output_file(path: str, flag: str, inputs: tuple[str | None, ...] = ()) -> None:
    """``path`` can be written as a file and is none of ``inputs``: checked before any work, so a bad path
    never costs a whole inference pass."""
    out = Path(path)
    if out.is_dir():
        raise UserError(f"{flag} '{path}' is a folder; give a file path (e.g. {out / 'predictions.tsv'})")
    for given in inputs:
        if given and out.exists() and Path(given).exists() and out.resolve() == Path(given).resolve():
            raise UserError(f"{flag} '{path}' is the input file; give another path for the results")
    check_creatable(out, flag)
    if out.exists() and not os.access(out, os.W_OK):
        raise UserError(f"{flag} '{path}' cannot be written: the file is read-only")


def check_new_folder(out: Path, flag: str = "export: OUT_DIR") -> None:
    """``out`` may be created (or is an empty folder this process may write into); ``flag`` names it in errors
    (``command: ARG``)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} '{out}' is a file; give a new folder")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"{flag.split(':')[0]}: '{out}' exists and is not empty; choose a new folder")
    if out.is_dir() and not can_write_in(out):
        raise UserError(f"{flag} '{out}' cannot be written: no write permission")
    if not out.exists():
        check_creatable(out, flag)


def disk_full(exc: BaseException, folder: Path) -> bool:
    """Whether writing into ``folder`` failed for want of space: ENOSPC, or a library's own wording of it
    (safetensors: "StorageFull"; torch.save: "unexpected pos"), told by what is left free."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    if "No space left" in str(exc) or "StorageFull" in str(exc):
        return True
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


@contextlib.contextmanager
def written_beside(out: Path, what: str):
    """A folder beside ``out`` (``.NAME.tmp``) to write into; when the block succeeds it takes ``out``'s place
    (an earlier ``out`` is removed only then). On any failure it is removed, ``out`` is left as it was, and a
    full disk is one line (RunFailed) naming ``what``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = out.with_name(f".{out.name}.tmp"), out.with_name(f".{out.name}.old")
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    try:
        yield tmp
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, Exception) and not isinstance(exc, (UserError, RunFailed)) and disk_full(exc, out.parent):
            raise RunFailed(f"disk full: writing {what} to {out} failed (no space left on {out.parent}); nothing "
                            f"was left half-written and {out} is as it was; free space and run it again") from None
        raise
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
