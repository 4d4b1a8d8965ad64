"""Stop on request, at any moment: stop signals (preemption, a user's request) and Ctrl-C.

Handled from the moment ``install`` is called (the CLI does so at process start) until ``restore``:

- ``setup`` (before the first optimizer step): nothing to save; the handler raises StopRequested, the run
  ends cleanly with a message (exit 0; Ctrl-C 130).
- ``train``: the handler only records the signal; the flag travels with the step's all-reduce, so every
  rank stops after the same step even if only one was signalled, saves a checkpoint and exits (0; 130
  after Ctrl-C).
- ``finish`` (final evaluation and export): recorded; the run finishes them, then exits.

A second Ctrl-C raises KeyboardInterrupt at once (the CLI turns it into one line, exit 130; the run's
teardown still removes half-written files).
"""

from __future__ import annotations

import signal
import threading

from dist_train.errors import StopRequested


class StopSignals:
    def __init__(self):
        self.received: str | None = None
        self.phase = "setup"
        self._interrupts = 0
        self._previous: dict = {}

    def install(self, names: list[str]) -> "StopSignals":
        """Handle exactly ``names`` and SIGINT (a later call with another list moves the handlers)."""
        if threading.current_thread() is not threading.main_thread():
            return self  # handlers can only be installed from the main thread (e.g. not inside a notebook worker)
        wanted = {signal.Signals[name] for name in [*names, "SIGINT"]}
        for sig in [s for s in self._previous if s not in wanted]:
            signal.signal(sig, self._previous.pop(sig))
        for sig in wanted - self._previous.keys():
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT":
            self._interrupts += 1
            if self._interrupts > 1:
                raise KeyboardInterrupt
        self.received = self.received or name
        if self.phase == "setup":
            raise StopRequested(name)

    @property
    def flag(self) -> float:
        return 1.0 if self.received else 0.0

    @property
    def exit_code(self) -> int:
        return 130 if self.received == "SIGINT" else 0

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


_current: StopSignals | None = None


def install(names: list[str]) -> StopSignals:
    """This process's stop handling (created on first use; the CLI calls this at process start)."""
    global _current
    if _current is None or not _current._previous:
        _current = StopSignals()
    return _current.install(names)


def uninstall() -> None:
    global _current
    if _current is not None:
        _current.restore()
        _current = None
