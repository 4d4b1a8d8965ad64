"""Training checkpoints under ``output_dir/checkpoints/step-N``: complete, atomic, verifiable.

A checkpoint folder holds:

- the engine's files: model, optimizer, scheduler, loss scaler (``model.safetensors`` + ``optimizer.pt``...
  for single/DDP; DeepSpeed's ``deepspeed/`` folder with one optimizer shard per rank for ZeRO);
- ``rng-rank-R.pt``: each rank's random states (python, numpy, torch CPU and CUDA);
- ``trainer_state.json``: step, epoch and position in that epoch's plan, best metric, the log sums since
  the last log line, and the world it was written by;
- ``config.yaml``: the resolved config of the run;
- ``hf/``: model config, tokenizer, labels - with the weights, all that ``dist-train export`` needs;
- ``manifest.json``: size and CRC-32 of every other file, written last.

It is written into ``.tmp-step-N``, fsynced, and renamed into place (atomic), and only then does ``latest``
move. A folder whose files do not match its manifest is incomplete or corrupted: never resumed from.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import zlib
from pathlib import Path

import torch

from dist_train.errors import UserError
from dist_train.seeding import rng_state, set_rng_state

STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.yaml"
HF_DIR = "hf"
LATEST = "latest"


def rng_file(rank: int) -> str:
    return f"rng-rank-{rank}.pt"


class CheckpointManager:
    """Saves and loads checkpoints of one run; every rank calls ``save`` and ``load`` together."""

    def __init__(self, output_dir: str | Path, keep_last_n: int, engine, describe=None):
        """``describe(folder)`` writes the run's ``hf/`` description (rank 0 only)."""
        self.root = Path(output_dir, "checkpoints")
        self.keep_last_n = keep_last_n
        self.engine = engine
        self.describe = describe
        self.best_step: int | None = None
        self.kill_in_save = _kill_in_save_step(engine.rank)

    def path(self, step: int) -> Path:
        return self.root / f"step-{step}"

    def save(self, step: int, state: dict, config_text: str) -> Path:
        """Save engine state plus ``state`` as ``step-<step>``; returns its folder."""
        final = self.path(step)
        if final.exists():
            return final
        tmp = self.root / f".tmp-step-{step}"
        if self.engine.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.engine.barrier()
        self.engine.save(tmp)
        torch.save(rng_state(), tmp / rng_file(self.engine.rank))
        self.engine.barrier()
        if self.engine.is_main:
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
            (tmp / CONFIG_FILE).write_text(config_text)
            if self.describe:
                self.describe(tmp / HF_DIR)
            if step == self.kill_in_save:  # test hook: die with the checkpoint half written
                os.kill(os.getpid(), signal.SIGKILL)
            write_manifest(tmp)
            _fsync_tree(tmp)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            _write_atomic(self.root / LATEST, final.name)
            self._rotate()
        self.engine.barrier()
        return final

    def load(self, folder: Path, weights_only: bool = False) -> dict:
        """Restore the engine (and, unless ``weights_only``, this rank's random states); returns trainer state."""
        self.engine.load(folder, weights_only=weights_only)
        if not weights_only:
            mine = folder / rng_file(self.engine.rank)
            if mine.is_file():  # absent when resuming at a larger world: the new rank keeps its seeded state
                set_rng_state(torch.load(mine, weights_only=True))
        return read_state(folder)

    def mark_best(self, step: int) -> None:
        self.best_step = step

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
             for p in sorted(folder.rglob("*")) if p.is_file()}
    (folder / MANIFEST_FILE).write_text(json.dumps({"files": files}, indent=1))


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


def _kill_in_save_step(rank: int) -> int:
    """Test hook: DIST_TRAIN_KILL_IN_SAVE=STEP kills rank 0 (SIGKILL) while it writes checkpoint STEP."""
    value = os.environ.get("DIST_TRAIN_KILL_IN_SAVE", "")
    return int(value) if value.isdigit() and rank == 0 else -1
