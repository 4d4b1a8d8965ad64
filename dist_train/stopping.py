"""Stop on request: signals that make the run checkpoint and stop cleanly (preemption, a user's request).

The handler only records the signal; the loop acts at the next step boundary. The flag travels with the
step's all-reduce, so every rank stops after the same step even if only one of them was signalled.
"""

from __future__ import annotations

import signal
import threading


class StopSignals:
    def __init__(self, names: list[str]):
        self.received: str | None = None
        self._previous: dict = {}
        if threading.current_thread() is not threading.main_thread():
            return  # handlers can only be installed from the main thread (e.g. not inside a notebook worker)
        for name in names:
            sig = signal.Signals[name]
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    @property
    def flag(self) -> float:
        return 1.0 if self.received else 0.0

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
