"""Training checkpoints under ``output_dir/checkpoints/step-N``: complete, atomic, verifiable.

A checkpoint folder holds:

- the engine's files: model, optimizer, scheduler, loss scaler (``model.safetensors`` + ``optimizer.pt``...
  for single/DDP; DeepSpeed's ``deepspeed/`` folder with one optimizer shard per rank for ZeRO; FSDP's
  ``dcp/`` folder, torch.distributed.checkpoint's shards, one file per rank);
- ``rng-rank-R.pt``: each rank's random states (python, numpy, torch CPU and CUDA);
- ``trainer_state.json``: step, epoch and position in that epoch's plan, best metric, the log sums since
  the last log line, and the world it was written by;
- ``config.yaml``: the resolved config of the run;
- ``hf/``: model config, tokenizer, labels - with the weights, all that ``dist-train export`` needs;
- ``manifest.json``: size and CRC-32 of every other file, written last.

It is written into ``.tmp-step-N``, fsynced, and renamed into place (atomic), and only then does ``latest``
move. A folder whose files do not match its manifest is incomplete or corrupted: never resumed from, never
exported, renamed ``step-N.damaged`` when found. At every exit, leftover temporary folders are removed and
``latest`` names the newest complete checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import zlib
from pathlib import Path

import torch

from dist_train.errors import RunFailed, UserError
from dist_train.run.faults import NONE as NO_FAULTS
from dist_train.run.seeding import rng_state, set_rng_state

STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.yaml"
HF_DIR = "hf"
LATEST = "latest"


def rng_file(rank: int) -> str:
    return f"rng-rank-{rank}.pt"


class CheckpointManager:
    """Saves and loads checkpoints of one run; every rank calls ``save`` and ``load`` together."""

    def __init__(self, output_dir: str | Path, keep_last_n: int, engine, describe=None, faults=NO_FAULTS):
        """``describe(folder)`` writes the run's ``hf/`` description (rank 0 only)."""
        self.root = Path(output_dir, "checkpoints")
        self.keep_last_n = keep_last_n
        self.engine = engine
        self.describe = describe
        self.faults = faults
        self.best_step: int | None = None

    def path(self, step: int) -> Path:
        return self.root / f"step-{step}"

    def save(self, step: int, state: dict, config_text: str) -> Path:
        """Save engine state plus ``state`` as ``step-<step>``; returns its folder.

        A complete checkpoint of that step is kept as it is; a damaged one is renamed aside first. A save
        that fails (disk full, say) on any rank fails on every rank, with its temporary folder removed.
        """
        final = self.path(step)

        def complete_already() -> bool:
            if final.exists() and verify(final) is not None:
                set_aside(final)
            return final.exists()

        # Rank 0 decides for all: ranks that looked at the folder at different moments must agree.
        if self.engine.run_on_main(complete_already, f"checking checkpoint {final.name}"):
            return final
        tmp = self.root / f".tmp-step-{step}"
        problem = self._no_room(tmp)
        if problem is None:
            try:
                if self.engine.is_main:
                    shutil.rmtree(tmp, ignore_errors=True)
                    tmp.mkdir(parents=True)
                self.engine.barrier()
                self.engine.save(tmp)
                torch.save(rng_state(), tmp / rng_file(self.engine.rank))
            except (OSError, RuntimeError) as exc:
                problem = _write_failure(exc, tmp)
        self._agree(problem, tmp)
        self.engine.run_on_main(lambda: self._complete(tmp, final, step, state, config_text),
                                f"completing checkpoint {final.name}")
        return final

    def _complete(self, tmp: Path, final: Path, step: int, state: dict, config_text: str) -> None:
        """Rank 0: the run's own files, the manifest, then the atomic rename and ``latest``."""
        try:
            self._finish_folder(tmp, final, step, state, config_text)
        except (OSError, RuntimeError) as exc:
            problem = _write_failure(exc, tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            raise RunFailed(_disk_message(problem, self.root)) from None

    def _finish_folder(self, tmp: Path, final: Path, step: int, state: dict, config_text: str) -> None:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        (tmp / CONFIG_FILE).write_text(config_text)
        if self.describe:
            self.describe(tmp / HF_DIR)
        self.faults.in_save(step)
        write_manifest(tmp)
        _fsync_tree(tmp)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        _write_atomic(self.root / LATEST, final.name)
        self._rotate()

    def _no_room(self, tmp: Path) -> str | None:
        """Whether this rank's disk lacks room for a checkpoint the size of the newest one."""
        previous = next(iter(complete(self.root)), None)
        if previous is None:
            return None
        need = sum(size for size, _ in _manifest(previous).values())
        free = shutil.disk_usage(self.root).free
        if free < need:
            return f"checkpoint needs about {need / 2**20:.0f} MB (the size of {previous.name}) but {free / 2**20:.0f} MB are free"
        return None

    def _agree(self, problem: str | None, tmp: Path) -> None:
        """One rank's failure is every rank's: all raise together instead of waiting for each other."""
        failed = self.engine.all_reduce_sum(torch.tensor([float(problem is not None)], device=self.engine.device))
        if failed.item() == 0:
            return
        if self.engine.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise RunFailed(_disk_message(problem or "another rank could not write its part of the checkpoint", self.root))

    def load(self, folder: Path, weights_only: bool = False) -> dict:
        """Restore the engine (and, unless ``weights_only``, this rank's random states); returns trainer state."""
        self.engine.load(folder, weights_only=weights_only)
        if not weights_only:
            mine = folder / rng_file(self.engine.rank)
            if mine.is_file():  # absent when resuming at a larger world: the new rank keeps its seeded state
                set_rng_state(torch.load(mine, weights_only=True))
        return read_state(folder)

    def load_weights_verified(self, step: int) -> str | None:
        """Load checkpoint ``step``'s weights after checking its manifest (on every rank, agreed); returns
        what was wrong (the checkpoint is then renamed aside and nothing is loaded), or None."""
        folder = self.path(step)

        def check():
            problem = verify(folder)
            if problem is not None:
                set_aside(folder)
            return problem

        problem = self.engine.run_on_main(check, f"verifying checkpoint {folder.name}")
        if problem is None:
            self.engine.load(folder, weights_only=True)
        return problem

    def mark_best(self, step: int) -> None:
        self.best_step = step

    def repair(self) -> None:
        """Rank 0 at exit: no half-written folder survives, and ``latest`` names the newest complete one."""
        if not self.root.is_dir():
            return
        for stale in [*self.root.glob(".tmp-step-*"), *self.root.glob(".universal-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        (self.root / (LATEST + ".tmp")).unlink(missing_ok=True)
        newest = next(iter(complete(self.root)), None)
        latest = self.root / LATEST
        if newest is not None and (not latest.is_file() or latest.read_text() != newest.name):
            _write_atomic(latest, newest.name)

    def _rotate(self) -> None:
        steps = [step_of(p) for p in checkpoints(self.root)]
        keep = set(sorted(steps)[-self.keep_last_n:])
        if self.best_step is not None:
            keep.add(self.best_step)
        for step in steps:
            if step not in keep:
                shutil.rmtree(self.path(step), ignore_errors=True)
        for stale in self.root.glob(".tmp-step-*"):  # leftovers of a save that was killed
            shutil.rmtree(stale, ignore_errors=True)


def set_aside(folder: Path) -> Path:
    """Rename a damaged checkpoint to ``step-N.damaged`` (kept for inspection; never resumed from)."""
    target = folder.with_name(folder.name + ".damaged")
    n = 1
    while target.exists():
        n += 1
        target = folder.with_name(f"{folder.name}.damaged{n}")
    os.replace(folder, target)
    return target


def _write_failure(exc: BaseException, tmp: Path) -> str:
    """What went wrong writing a checkpoint, in words; anything that is not the disk is raised as it is.

    torch.save reports a full disk as a RuntimeError ("unexpected pos ..."), so the free space decides.
    """
    full = isinstance(exc, OSError) and exc.errno == errno.ENOSPC
    if not full and tmp.parent.is_dir() and shutil.disk_usage(tmp.parent).free < 1 << 20:
        full = True
    if full:
        return f"writing {tmp} failed: No space left on device"
    if isinstance(exc, OSError):
        return f"writing {tmp} failed: {exc.strerror or exc}"
    raise exc


def _disk_message(problem: str, root: Path) -> str:
    full = "No space left" in problem or "needs about" in problem
    what = "disk full" if full else "cannot save a checkpoint"
    return (f"{what}: {problem} on {root}; free space (or lower checkpoint.keep_last_n) and continue with "
            "checkpoint.resume=auto")


# -- reading and checking ------------------------------------------------------------------------------
def step_of(folder: Path) -> int:
    return int(folder.name.split("-", 1)[1])


def checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders under ``root`` (``output_dir/checkpoints``), newest first."""
    found = [p for p in Path(root).glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=step_of, reverse=True)


def read_state(folder: Path) -> dict:
    return json.loads((Path(folder) / STATE_FILE).read_text())


def write_manifest(folder: Path) -> None:
    files = {str(p.relative_to(folder)): [p.stat().st_size, _crc32(p)]
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST_FILE}
    (folder / MANIFEST_FILE).write_text(json.dumps({"files": files}, indent=1))


def complete(root: Path) -> list[Path]:
    """Checkpoints under ``root`` that finished saving (their manifest exists), newest first."""
    return [p for p in checkpoints(root) if (p / MANIFEST_FILE).is_file()]


def _manifest(folder: Path) -> dict:
    return json.loads((Path(folder) / MANIFEST_FILE).read_text())["files"]


def verify(folder: Path) -> str | None:
    """None if every file of the checkpoint matches its manifest; else what is wrong, in a few words."""
    folder = Path(folder)
    manifest = folder / MANIFEST_FILE
    if not manifest.is_file():
        return "it has no manifest.json (the save never finished)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return "its manifest.json is damaged"
    for name, (size, crc) in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, expected {size} (truncated?)"
        if _crc32(path) != crc:
            return f"{name} does not match its checksum (corrupted)"
    return None


def require_valid(folder: Path) -> None:
    problem = verify(folder)
    if problem:
        raise UserError(f"checkpoint '{folder}' cannot be used: {problem}; resume from an earlier checkpoint "
                        f"in {folder.parent} or use checkpoint.resume=auto (it skips damaged ones)")


# -- files ---------------------------------------------------------------------------------------------
def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        elif path.is_dir():
            _fsync_dir(path)
    _fsync_dir(folder)


