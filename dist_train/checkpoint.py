"""Training checkpoints under ``output_dir/checkpoints/step-N``: atomic saves, rotation, the best one kept.

A checkpoint is written into a temporary folder and renamed into place only when complete, so a folder
named ``step-N`` is always whole; ``latest`` is updated after the rename.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

STATE_FILE = "trainer_state.json"


class CheckpointManager:
    def __init__(self, output_dir: str | Path, keep_last_n: int, engine):
        self.root = Path(output_dir, "checkpoints")
        self.keep_last_n = keep_last_n
        self.engine = engine
        self.best_step: int | None = None

    def path(self, step: int) -> Path:
        return self.root / f"step-{step}"

    def save(self, step: int, state: dict) -> Path:
        """Save engine state plus ``state`` (step, epoch, metrics) as ``step-<step>``; returns its folder."""
        final = self.path(step)
        if final.exists():
            return final
        tmp = self.root / f".tmp-step-{step}"
        if self.engine.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.engine.barrier()
        self.engine.save(tmp)
        self.engine.barrier()
        if self.engine.is_main:
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
            _fsync_tree(tmp)
            os.replace(tmp, final)
            (self.root / "latest").write_text(final.name)
            self._rotate()
        self.engine.barrier()
        return final

    def mark_best(self, step: int) -> None:
        self.best_step = step

    def _rotate(self) -> None:
        steps = sorted(int(p.name.split("-")[1]) for p in self.root.glob("step-*") if p.is_dir())
        keep = set(steps[-self.keep_last_n:])
        if self.best_step is not None:
            keep.add(self.best_step)
        for step in steps:
            if step not in keep:
                shutil.rmtree(self.path(step), ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
