"""Engines: how one or many processes train one model. The loop sees only the Engine interface."""

from __future__ import annotations

from dist_train.engine.base import Engine
from dist_train.engine.single import SingleEngine

ENGINES = {"single": SingleEngine}


def build_engine(cfg) -> Engine:
    return ENGINES[cfg.engine.kind](precision=cfg.train.precision, max_grad_norm=cfg.train.max_grad_norm)
