"""Engines: how one or many processes train one model. The loop sees only the Engine interface.

The registry maps ``engine.kind`` to its class; the class answers everything else about the kind: its
config checks, its checkpoint format, whether it can resume a checkpoint of another format, and how a
checkpoint of its format becomes one whole state dict (export, in one process).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from dist_train.engine.options import SECTIONS, changed_options
from dist_train.errors import UserError

if TYPE_CHECKING:
    from dist_train.engine.base import Engine

# kind -> "module:Class"; imported on use, so DeepSpeed is imported only by runs that ask for it.
ENGINES = {
    "single": "dist_train.engine.single:SingleEngine",
    "ddp": "dist_train.engine.ddp:DDPEngine",
    "deepspeed": "dist_train.engine.deepspeed:DeepSpeedEngine",
    "fsdp": "dist_train.engine.fsdp:FSDPEngine",
}


def resolve_kind(kind: str) -> str:
    if kind == "auto":
        from dist_train.engine.dist_env import launched

        return "ddp" if launched() else "single"
    return kind


def engine_class(kind: str) -> type[Engine]:
    module, name = ENGINES[resolve_kind(kind)].split(":")
    return getattr(importlib.import_module(module), name)


def check_engine_config(cfg) -> None:
    """The engine's refusals of ``cfg`` (config loading runs this): options of another engine's section, then
    the engine class's own rules."""
    kind = resolve_kind(cfg.engine.kind)
    for section in SECTIONS:
        changed = changed_options(getattr(cfg.engine, section), f"engine.{section}") if section != kind else []
        if changed:
            why = "; fsdp always shards parameters, gradients and optimizer state" if kind == "fsdp" else ""
            raise UserError(f"config: {changed[0]} is an option of engine.kind={section}, but engine.kind is {cfg.engine.kind}; set "
                            f"engine.kind={section} or drop it{why}")
    engine_class(cfg.engine.kind).check_config(cfg)


def build_engine(cfg) -> Engine:
    return engine_class(cfg.engine.kind).from_config(cfg)  # cfg was checked when it was loaded


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


# Imported on first use, so that loading a config (which checks it against its engine) or reading the option
# classes does not start torch.
_LAZY = {"MODEL_FILE": "base", "Engine": "base", "DistEnv": "dist_env", "launched": "dist_env",
         "SingleEngine": "single"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"dist_train.engine.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'dist_train.engine' has no attribute '{name}'")


__all__ = ["ENGINES", "MODEL_FILE", "DistEnv", "Engine", "SingleEngine", "build_engine", "check_engine_config",
           "consolidated_state_dict", "engine_class", "format_reader", "launched", "resolve_kind"]
