"""The run folder (``output_dir``): who may write it, what a new run may replace, and when.

Guarantees (a failure never leaves less than there was):

- ``preflight`` checks everything about the folder before anything is written: it is a folder (or can be
  made one), writable, not held by another live run, and not an earlier run unless ``overwrite=true`` or a
  resume asks for it. ``dist-train launch`` runs it before starting any worker.
- One writer: rank 0 holds ``.dist-train.lock`` (host, pid, job ids) while the run lives. A lock left by a
  dead process of this host, or by an earlier attempt of the same SLURM job or torchrun run, is replaced
  with a message; a live one stops the second run at once.
- ``overwrite=true`` never deletes first: the old run's files are moved into ``.previous/`` inside the
  folder, deleted once the new run has saved its first checkpoint (it can then be resumed), and moved back
  if the new run ends before that - failed, diverged or stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path

from dist_train.errors import UserError
from dist_train.paths import can_write_in

RUN_FILES = ("config.yaml", "metrics.jsonl", "tb", "checkpoints", "final", "eval_report.json", "report.png")
LOCK_FILE = ".dist-train.lock"
PREVIOUS = ".previous"


def _ids() -> dict:
    """What identifies this process's run across restarts: host, pid, SLURM job, torchrun run."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "torchrun_run": os.environ.get("TORCHELASTIC_RUN_ID")}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_holder(out: Path) -> dict | None:
    """The live run holding ``out`` (its lock record), or None when the folder is free or the lock is stale."""
    path = Path(out, LOCK_FILE)
    try:
        holder = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None  # unreadable or half-written: treated as stale and replaced
    if _stale(holder):
        return None
    return holder


def _stale(holder: dict) -> bool:
    me = _ids()
    for key in ("slurm_job", "torchrun_run"):
        # An earlier attempt of this same job (SLURM requeue, torchrun restart) died holding it.
        if me[key] and holder.get(key) == me[key] and holder.get("pid") != me["pid"]:
            return True
    if holder.get("host") == me["host"]:
        return not _alive(int(holder.get("pid", -1)))
    return False  # another host: its process cannot be checked from here


def _describe(holder: dict) -> str:
    job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{job}"


def check_writable(out: Path) -> None:
    """``out`` is (or can be made) a writable folder."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir '{out}' is a file; give a folder (a new one, or a run to continue)")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"output_dir '{out}' cannot be created: '{parent}' is a file")
    if not can_write_in(parent):
        raise UserError(f"output_dir '{out}' is not writable (no write permission on '{parent}'); choose "
                        "another output_dir=...")


def existing_run(out: Path) -> list[str]:
    return [name for name in RUN_FILES if (out / name).exists()]


def preflight(cfg, resuming: bool | None = None, check_lock: bool = True) -> None:
    """Every check on ``output_dir`` that can run before the run starts; writes nothing.

    ``resuming``: whether a checkpoint will be resumed (None: decide from ``checkpoint.resume`` alone, as the
    launcher does before any worker exists). ``check_lock``: False on ranks other than 0, whose own rank 0
    may already hold the lock.
    """
    out = Path(cfg.output_dir)
    check_writable(out)
    holder = lock_holder(out) if check_lock and out.is_dir() else None
    if holder is not None:
        raise UserError(f"output_dir '{out}' is in use by another dist-train run ({_describe(holder)}); wait "
                        f"for it, choose another output_dir=..., or delete {out / LOCK_FILE} if no run uses it")
    if resuming is None:
        resuming = cfg.checkpoint.resume is not None
    if resuming:
        return
    existing = existing_run(out)
    foreign = sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) if out.is_dir() else []
    if foreign and not existing:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise UserError(f"output_dir '{out}' holds files that are not a dist-train run's ({shown}); give a new or "
                        "empty folder (a run writes config.yaml, checkpoints/ and final/ into it)")
    # resume=auto that found no checkpoint starts fresh over what an early-ended attempt left behind;
    # a finished run or damaged checkpoints are never replaced without overwrite.
    leftovers_only = cfg.checkpoint.resume == "auto" and not (out / "final").exists() and not any(
        (out / "checkpoints").glob("step-*"))
    if existing and not cfg.overwrite and not leftovers_only and cfg.checkpoint.resume == "auto":
        # Asked to continue, and nothing can be continued: say why, not "pass checkpoint.resume=auto".
        if any((out / "checkpoints").glob("step-*")):
            why = (f"every checkpoint in '{out / 'checkpoints'}' is damaged (its files do not match its manifest), "
                   "so there is nothing to continue from")
        else:
            why = f"'{out}' holds a finished run ({', '.join(existing)}) but no checkpoint to continue from"
        raise UserError(f"checkpoint.resume=auto: {why}; start over with overwrite=true (the old run is kept "
                        "aside until the new one has a checkpoint), or choose another output_dir=...")
    if existing and not cfg.overwrite and not leftovers_only:
        raise UserError(f"output_dir '{out}' already holds a run ({', '.join(existing)}); choose another "
                        "output_dir=..., pass checkpoint.resume=auto to continue it, or overwrite=true to replace it")


class RunDir:
    """Rank 0's hold on the run folder: the lock, and the old run kept aside until the new one trains."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.created = False
        self.locked = False

    # -- the lock ------------------------------------------------------------------------------------------
    def lock(self) -> None:
        """Take the folder for this run (creating it); a live holder is an error, a stale one is replaced."""
        if not self.out.exists():
            self.out.mkdir(parents=True)
            self.created = True
        path = self.out / LOCK_FILE
        record = json.dumps(_ids())
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = lock_holder(self.out)
                if holder is not None:
                    raise UserError(f"output_dir '{self.out}' is in use by another dist-train run "
                                    f"({_describe(holder)}); wait for it or choose another output_dir=...") from None
                print(f"dist-train: replacing a stale lock in {self.out} (its run is no longer alive)",
                      file=sys.stderr, flush=True)
                path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(record)
            self.locked = True
            return
        raise UserError(f"output_dir '{self.out}': another run took the lock at the same moment; retry")

    def unlock(self) -> None:
        if self.locked:
            (self.out / LOCK_FILE).unlink(missing_ok=True)
            self.locked = False
        if self.created and self.out.is_dir() and not any(self.out.iterdir()):
            self.out.rmdir()  # the run ended before writing anything: leave no empty folder behind

    # -- overwrite: old run aside, deleted only once the new one trains ------------------------------------
    def set_aside(self) -> None:
        """Move an earlier run's files into ``.previous/`` (a leftover ``.previous`` from an attempt that
        ended before training is the older run: it is kept, and that attempt's files are dropped)."""
        aside = self.out / PREVIOUS
        names = existing_run(self.out)
        if aside.exists():
            for name in names:
                _remove(self.out / name)
            return
        if names:
            aside.mkdir()
            for name in names:
                os.replace(self.out / name, aside / name)

    def drop_previous(self) -> None:
        """The new run has a checkpoint: the old run's files are no longer needed."""
        _remove(self.out / PREVIOUS)

    def abandon(self) -> None:
        """A fresh run ended before its first optimizer step: remove what it wrote and put the old run
        (if one was set aside) back, so that the folder is as it was."""
        for name in RUN_FILES:
            _remove(self.out / name)
        aside = self.out / PREVIOUS
        if aside.is_dir():
            for item in aside.iterdir():
                os.replace(item, self.out / item.name)
            aside.rmdir()

    # -- writing -------------------------------------------------------------------------------------------
    def write(self, name: str, text: str) -> None:
        """Write a run file atomically (a reader sees the old or the new text, never half)."""
        tmp = self.out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.out / name)

    def trim_metrics(self, step: int) -> None:
        """A resumed run replays what came after its checkpoint: drop those records (and the end-of-run
        ones, which it writes again)."""
        path = self.out / "metrics.jsonl"
        if not path.is_file():
            return
        keep = [line for line in path.read_text().splitlines(keepends=True)
                if line.strip() and _keep_record(json.loads(line), step)]
        self.write("metrics.jsonl", "".join(keep))


def _keep_record(record: dict, step: int) -> bool:
    return record["step"] <= step and record["split"] not in ("ranks", "test")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
