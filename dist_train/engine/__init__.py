"""Engines: how one or many processes train one model. The loop sees only the Engine interface."""

from __future__ import annotations

from pathlib import Path

from dist_train.engine.base import MODEL_FILE, Engine
from dist_train.engine.dist_env import DistEnv, launched
from dist_train.engine.single import SingleEngine


def resolve_kind(kind: str) -> str:
    if kind == "auto":
        return "ddp" if launched() else "single"
    return kind


def build_engine(cfg) -> Engine:
    kind = resolve_kind(cfg.engine.kind)
    t = cfg.train
    common = {"precision": t.precision, "max_grad_norm": t.max_grad_norm, "tf32": t.tf32,
              "compile_backend": t.compile_backend if t.compile else None}
    if kind == "single":
        return SingleEngine(**common)
    env = DistEnv.from_environ(cfg.engine.timeout_s)
    if kind == "ddp":
        from dist_train.engine.ddp import DDPEngine

        return DDPEngine(env=env, **common)
    from dist_train.engine.deepspeed import DeepSpeedEngine

    return DeepSpeedEngine(cfg, env=env, **common)


def consolidated_state_dict(folder: str | Path, checkpoint_format: str) -> dict:
    """The whole model's weights from a checkpoint of either format, loaded in this one process."""
    if checkpoint_format == "deepspeed":
        from dist_train.engine.deepspeed import fp32_state_dict

        return fp32_state_dict(folder)
    from safetensors.torch import load_file

    return load_file(str(Path(folder, MODEL_FILE)))
