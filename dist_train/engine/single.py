"""One process, no launcher: the whole base engine as it is (world size 1, collectives are identities)."""

from __future__ import annotations

from dist_train.engine.base import Engine


class SingleEngine(Engine):
    """Trains in this process on its one device (CUDA if present, else CPU)."""
