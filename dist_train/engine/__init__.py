"""Engines: how one or many processes train one model. The loop sees only the Engine interface.

The registry maps ``engine.kind`` to its class; the class answers everything else about the kind: its
config checks, its checkpoint format, whether it can resume a checkpoint of another format, and how a
checkpoint of its format becomes one whole state dict (export, in one process).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from dist_train.engine.base import MODEL_FILE, Engine
from dist_train.engine.dist_env import DistEnv, launched
from dist_train.engine.single import SingleEngine

# kind -> "module:Class"; imported on use, so DeepSpeed is imported only by runs that ask for it.
ENGINES = {
    "single": "dist_train.engine.single:SingleEngine",
    "ddp": "dist_train.engine.ddp:DDPEngine",
    "deepspeed": "dist_train.engine.deepspeed:DeepSpeedEngine",
    "fsdp": "dist_train.engine.fsdp:FSDPEngine",
}


def resolve_kind(kind: str) -> str:
    if kind == "auto":
        return "ddp" if launched() else "single"
    return kind


def engine_class(kind: str) -> type[Engine]:
    module, name = ENGINES[resolve_kind(kind)].split(":")
    return getattr(importlib.import_module(module), name)


def build_engine(cfg) -> Engine:
    cls = engine_class(cfg.engine.kind)
    cls.check_config(cfg)
    return cls.from_config(cfg)


def format_reader(checkpoint_format: str) -> type[Engine]:
    """The engine class that reads checkpoints of ``checkpoint_format``."""
    for kind in ENGINES:
        cls = engine_class(kind)
        if cls.checkpoint_format == checkpoint_format:
            return cls
    raise ValueError(f"no engine reads checkpoint format {checkpoint_format!r}")


def consolidated_state_dict(folder: str | Path, checkpoint_format: str) -> dict:
    """The whole model's weights from a checkpoint of any format, loaded in this one process."""
    return format_reader(checkpoint_format).consolidated_state_dict(folder)


__all__ = ["ENGINES", "MODEL_FILE", "DistEnv", "Engine", "SingleEngine", "build_engine", "consolidated_state_dict",
           "engine_class", "format_reader", "launched", "resolve_kind"]
