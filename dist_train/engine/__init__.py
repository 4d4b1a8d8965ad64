"""Engines: how one or many processes train one model. The loop sees only the Engine interface."""

from __future__ import annotations

from dist_train.engine.base import Engine
from dist_train.engine.dist_env import DistEnv, launched
from dist_train.engine.single import SingleEngine


def resolve_kind(kind: str) -> str:
    if kind == "auto":
        return "ddp" if launched() else "single"
    return kind


def build_engine(cfg) -> Engine:
    kind = resolve_kind(cfg.engine.kind)
    common = {"precision": cfg.train.precision, "max_grad_norm": cfg.train.max_grad_norm}
    if kind == "single":
        return SingleEngine(**common)
    env = DistEnv.from_environ(cfg.engine.timeout_s)
    if kind == "ddp":
        from dist_train.engine.ddp import DDPEngine

        return DDPEngine(env=env, **common)
    from dist_train.engine.deepspeed import DeepSpeedEngine

    return DeepSpeedEngine(cfg, env=env, **common)
