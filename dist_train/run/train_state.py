"""Where a run stands: the one record that checkpoints write and resumes read (keys spelled once, here)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    """The epoch in progress (0-based)."""
    batches_done: int = 0
    """Micro-batches of this epoch's plan consumed. A step consumes a window of ``grad_accum x world_size``
    consecutive plan batches; the plan depends only on (seed, epoch, micro-batch size), so this position
    means the same thing at any world size."""
    examples_seen: float = 0.0
    """Training examples over all ranks, up to the last log line."""
    log_sums: list[float] = field(default_factory=lambda: [0.0] * 4)
    """Loss sum, loss count, examples and tokens since the last log line, over all ranks."""
    best_metric: float | None = None
    best_step: int | None = None
    validated_at: int = -1
    """The step of the last validation (-1: none)."""
    skipped_steps: int = 0
    """Non-finite steps skipped so far (``train.max_nonfinite_steps``)."""
    # Written for the checks of a resumed run, not restored:
    metric: str = ""
    world_size: int = 1
    window: int = 1
    engine: str = ""
    """The checkpoint format of the engine that wrote it."""
    total_steps: int = 0
    data: dict = field(default_factory=dict)
    """The training data's fingerprint (dist_train.data.fingerprint)."""

    RESTORED = ("step", "epoch", "batches_done", "examples_seen", "log_sums", "best_metric", "best_step",
                "validated_at", "skipped_steps")

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, saved: dict) -> None:
        """Continue from ``saved``: position, progress and best; the run's own settings stay as they are."""
        for key in self.RESTORED:
            if key in saved:  # skipped_steps is absent from checkpoints of earlier versions
                setattr(self, key, saved[key])

    def advance(self, window: int, plan_len: int) -> bool:
        """One optimizer step consumed ``window`` batches of a plan of ``plan_len``; True at the epoch's end."""
        self.step += 1
        self.batches_done = min(self.batches_done + window, plan_len)
        if self.batches_done == plan_len:
            self.epoch, self.batches_done = self.epoch + 1, 0
            return True
        return False

    def epoch_progress(self, plan_len: int) -> float:
        return self.epoch + self.batches_done / plan_len
