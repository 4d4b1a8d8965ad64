"""The loop's step accounting: the sums behind each log line, non-finite steps, and stop votes.

Everything stays on the device between log lines, so an ordinary step never waits for the host; the sums
are read (one all-reduce) where the host syncs anyway: at a log line, a validation or a save.
"""

from __future__ import annotations

from typing import Callable

import torch

from dist_train.errors import RunFailed


class StepAccounting:
    """Running sums since the last log line (loss sum, targets, examples, tokens), the non-finite steps seen
    and the first of them, and the last step's gradient norm and stop votes."""

    def __init__(self, device: torch.device, step: int, max_nonfinite_steps: int, lr: float,
                 last_checkpoint: Callable[[], object]):
        self.max_nonfinite_steps, self.lr, self.last_checkpoint = max_nonfinite_steps, lr, last_checkpoint
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, count, examples, tokens
        self.nonfinite = torch.zeros(1, dtype=torch.float64, device=device)  # bad steps seen (not skipped)
        self.first_bad = torch.full((3,), -1.0, dtype=torch.float64, device=device)  # step, loss, grad norm
        self.step = torch.full((), float(step), dtype=torch.float64, device=device)
        self.stop_votes = self.grad_norm = self.sums.new_zeros(())

    def add(self, sums: torch.Tensor, count: torch.Tensor, grad_norm: torch.Tensor, skipped: int) -> int:
        """Add one step (``sums``: loss sum, examples, tokens; ``count``: its targets). A step whose loss or
        (global) gradient norm is not finite adds no loss; it is counted instead, and the run stops at the
        next host sync (``check``) - unless ``max_nonfinite_steps`` lets the engine skip it. Returns the
        skipped steps so far (``skipped`` before this one)."""
        loss, examples, tokens = sums
        self.grad_norm = grad_norm
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        self.sums += torch.stack([torch.where(bad, 0.0, loss), torch.where(bad, 0.0, count), examples, tokens])
        self.step += 1
        if self.max_nonfinite_steps > 0:
            if bad.item():  # the engine read the norm on the host already: no new sync
                skipped += 1
                if skipped > self.max_nonfinite_steps:
                    raise self.diverged(self.step, loss / count, grad_norm)
            return skipped
        self.nonfinite += bad.double()
        first = bad & (self.first_bad[0] < 0)
        self.first_bad = torch.where(first, torch.stack([self.step, loss / count.clamp(min=1), grad_norm]),
                                     self.first_bad)
        return skipped

    def read(self, engine) -> tuple[float, float, float, float]:
        """The sums since the last log line over all ranks (loss sum, count, examples, tokens), then zeroed;
        a non-finite step on any rank raises the one-line failure first."""
        loss_sum, count, examples, tokens, bad = engine.all_reduce_sum(torch.cat([self.sums, self.nonfinite])).tolist()
        if bad:
            raise self.diverged()
        self.sums.zero_()
        return loss_sum, count, examples, tokens

    def check(self, engine) -> None:
        """Raise the one-line failure if any rank saw a non-finite step (a collective)."""
        if engine.all_reduce_sum(self.nonfinite).item() > 0:
            raise self.diverged()

    def diverged(self, step=None, loss=None, grad_norm=None) -> RunFailed:
        """The one-line failure for a non-finite step (every rank raises it alike)."""
        if step is None:
            step, loss, grad_norm = self.first_bad.tolist()
        last = self.last_checkpoint()
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was saved before it"
        return RunFailed(f"training diverged: step {int(step)} had a non-finite loss or gradient norm (loss "
                         f"{float(loss):.4g}, gradient norm {float(grad_norm):.4g}); {where}; nothing was exported. "
                         f"Lower train.lr (now {self.lr:g}), or let train.max_nonfinite_steps skip such steps")
