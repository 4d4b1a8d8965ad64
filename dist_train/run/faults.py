"""Fault injection for the test suite, in one place: read once at start, inert unless a test asks.

Variables (each names the rank it acts on; faults act in the first torchrun attempt only, so restarts
resume past them):

- ``DIST_TRAIN_FAIL_AT=RANK:STEP[:kill]``: after optimizer step STEP, raise (or die by SIGKILL).
- ``DIST_TRAIN_KILL_IN_SAVE=STEP``: rank 0 dies by SIGKILL while writing checkpoint STEP.
- ``DIST_TRAIN_SIGNAL_AT=RANK:PHASE:SIGNAL``: send SIGNAL to this process at PHASE: ``setup`` (before the
  first step), ``step-N`` (after optimizer step N), ``finish`` (after training, before the final
  evaluation and export).
- ``DIST_TRAIN_FREEZE_AT=RANK:STEP``: SIGSTOP this process after step STEP (a rank that stops answering).
- ``DIST_TRAIN_NAN_AT=RANK:STEP``: the first training forward pass of step STEP returns NaN logits on RANK
  (a diverging step: NaN loss, NaN gradients after the all-reduce).
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass


def _spec(name: str, rank: int) -> list[str] | None:
    """The fields after ``RANK:`` of variable ``name`` if it targets ``rank`` in the first attempt."""
    value = os.environ.get(name)
    if not value or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return None
    head, *rest = value.split(":")
    return rest if head.isdigit() and int(head) == rank else None


@dataclass
class Faults:
    fail_at: int = -1
    kill: bool = False
    kill_in_save: int = -1
    signal_at: tuple[str, int] | None = None
    freeze_at: int = -1
    nan_at: int = -1

    @classmethod
    def from_env(cls, rank: int) -> "Faults":
        f = cls()
        if spec := _spec("DIST_TRAIN_FAIL_AT", rank):
            f.fail_at, f.kill = int(spec[0]), spec[1:] == ["kill"]
        save = os.environ.get("DIST_TRAIN_KILL_IN_SAVE", "")
        if save.isdigit() and rank == 0:
            f.kill_in_save = int(save)
        if spec := _spec("DIST_TRAIN_SIGNAL_AT", rank):
            f.signal_at = (spec[0], int(signal.Signals[spec[1]]))
        if spec := _spec("DIST_TRAIN_FREEZE_AT", rank):
            f.freeze_at = int(spec[0])
        if spec := _spec("DIST_TRAIN_NAN_AT", rank):
            f.nan_at = int(spec[0])
        return f

    def at_phase(self, phase: str) -> None:
        """Called by the loop at ``setup``, ``step-N`` and ``finish``."""
        if self.signal_at and self.signal_at[0] == phase:
            os.kill(os.getpid(), self.signal_at[1])

    def after_step(self, step: int, model) -> None:
        """Called by the loop after optimizer step ``step`` (``model``: the plain model)."""
        self.at_phase(f"step-{step}")
        if step + 1 == self.nan_at:
            _poison_next_training_forward(model)
        if step == self.freeze_at:
            os.kill(os.getpid(), signal.SIGSTOP)
        if step == self.fail_at:
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected failure at step {step} (DIST_TRAIN_FAIL_AT)")

    def in_save(self, step: int) -> None:
        """Called by the checkpoint writer with the checkpoint half written."""
        if step == self.kill_in_save:
            os.kill(os.getpid(), signal.SIGKILL)


def _poison_next_training_forward(model) -> None:
    def hook(module, args, output):
        if not module.training:
            return output  # validation in between is left alone
        handle.remove()
        output.logits = output.logits * float("nan")
        return output

    handle = model.register_forward_hook(hook)


NONE = Faults()
