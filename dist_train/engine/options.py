"""Each engine's own options: the ``engine.deepspeed`` and ``engine.fsdp`` sections of a config.

Torch-free (the config module declares its engine section with these classes). The rules that tie an
option to the rest of the config are the engine class's ``check_config``; config loading runs it, so
``train``, ``launch`` and ``submit`` refuse the same settings before any worker or job starts.

Keys of earlier versions (``engine.zero_stage``, ``engine.offload_optimizer``, ``engine.offload_params``,
``engine.reshard_after_forward``, and ``engine.deepspeed`` as a mapping of DeepSpeed config keys) are read
as synonyms of their place in these sections: ``upgrade_engine_keys``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any, Optional

from dist_train.errors import UserError

# config.py's resume marks (written out here: config.py imports this module, not the other way round).
_FIXED = {"on_resume": "fixed"}


@dataclass
class DeepSpeedOptions:
    """``engine.kind: deepspeed`` (ZeRO)."""

    zero_stage: int = field(default=0, metadata=_FIXED)
    """ZeRO stage: 0 (plain data parallel), 1 (shard optimizer state), 2 (+ gradients), 3 (+ parameters)."""
    offload_optimizer: bool = field(default=False, metadata=_FIXED)
    """ZeRO-Offload: keep optimizer state (and the step) on CPU. Needs zero_stage >= 1."""
    offload_params: bool = False
    """ZeRO-3 parameter offload: keep parameters on CPU. Needs zero_stage 3."""
    config: Optional[dict[str, Any]] = None
    """Extra DeepSpeed config keys merged into the generated config (e.g. ``zero_optimization:
    {overlap_comm: true}``); a key that conflicts with a value dist-train sets from this config is an error
    naming both values."""


@dataclass
class FsdpOptions:
    """``engine.kind: fsdp`` (PyTorch FSDP2)."""

    reshard_after_forward: bool = True
    """Free each block's gathered parameters after its forward and gather them again for backward (less
    memory; false keeps them from forward to backward, one all-gather fewer per block and micro-batch)."""
    offload_params: bool = False
    """FSDP2's CPU offload: parameter and gradient shards on CPU, the optimizer steps there."""


# engine.kind -> the name of its option section in EngineConfig (kinds without options have none).
SECTIONS = {"deepspeed": DeepSpeedOptions, "fsdp": FsdpOptions}

# Keys of earlier versions, directly under engine: -> their section ("kind": the section of engine.kind).
_LEGACY = {"zero_stage": "deepspeed", "offload_optimizer": "deepspeed", "reshard_after_forward": "fsdp",
           "offload_params": "kind"}


def upgrade_engine_path(path: list[str], value: Any, kind: str) -> list[str] | None:
    """Where a key of an earlier version (``path``, dotted parts, given ``value``) lives now, under ``engine.kind``
    ``kind``; ``path`` itself for every other key; None for a legacy key at its default that the kind has no
    section for (an older run's saved config). ``engine.deepspeed`` given as DeepSpeed's own keys (none of
    them an option's name) is ``engine.deepspeed.config``."""
    if len(path) < 2 or path[0] != "engine":
        return path
    key = path[1]
    if key == "deepspeed":
        names = {f.name for f in dataclasses.fields(DeepSpeedOptions)}
        if len(path) > 2:
            return path if path[2] in names else ["engine", "deepspeed", "config", *path[2:]]
        if not isinstance(value, dict) or not value:
            return path
        own, foreign = [str(k) for k in value if k in names], [str(k) for k in value if k not in names]
        if own and foreign:
            raise UserError(f"config: engine.deepspeed mixes dist-train's options ({', '.join(own)}) with DeepSpeed "
                            f"config keys ({', '.join(foreign)}); put DeepSpeed's keys under engine.deepspeed.config")
        return ["engine", "deepspeed", "config"] if foreign else path
    if key not in _LEGACY or len(path) != 2:
        return path
    section = _LEGACY[key]
    if section == "kind":
        if kind not in SECTIONS:
            if value is False:
                return None
            raise UserError(f"config: engine.{key} needs engine.kind=fsdp, or deepspeed with zero_stage=3 "
                            f"(engine.kind is '{kind}')")
        section = kind
    return ["engine", section, key]


def upgrade_engine_keys(tree: dict, kind: str | None = None) -> dict:
    """``tree`` (a raw config mapping, e.g. a saved config.yaml) with earlier versions' engine keys moved to
    where they live now (``upgrade_engine_path``). Changes ``tree`` in place and returns it."""
    engine = tree.get("engine")
    if not isinstance(engine, dict):
        return tree
    kind = kind or engine.get("kind", "auto")
    for key in list(engine):
        new = upgrade_engine_path(["engine", str(key)], engine[key], kind)
        if new == ["engine", key]:
            continue
        value = engine.pop(key)
        if new is None:
            continue
        node = engine
        for part in new[1:-1]:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise UserError(f"config: '{'.'.join(new[:-1])}' must be a mapping of keys, got {node!r}")
        if new[-1] in node:
            raise UserError(f"config: engine.{key} and {'.'.join(new)} are both given; keep {'.'.join(new)}")
        node[new[-1]] = value
    return tree


def use_deepspeed_cpu_accelerator(env: MutableMapping[str, str] | None = None) -> None:
    """Without a GPU, point DeepSpeed at its CPU accelerator (in ``env``, default this process's environment):
    DeepSpeed otherwise probes for one and prints a warning, also when transformers merely imports it."""
    import torch  # here, not at the top: the option classes above stay torch-free

    if not torch.cuda.is_available():
        (os.environ if env is None else env).setdefault("DS_ACCELERATOR", "cpu")


def changed_options(options: Any, prefix: str) -> list[str]:
    """The keys of an option section set to other than their defaults, as ``prefix.key=value``."""
    default = type(options)()
    return [f"{prefix}.{f.name}={getattr(options, f.name)}" for f in dataclasses.fields(options)
            if getattr(options, f.name) != getattr(default, f.name)]
