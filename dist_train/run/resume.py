"""Resuming: which checkpoint a run continues from, whether its config may, and how much is left to do.

The data position is (epoch, batches of that epoch's plan consumed). A plan depends only on the seed,
the epoch and the micro-batch size, never on the world size or accumulation, so a checkpoint taken at
one world size resumes at another by cutting the rest of the plan into the new world's steps: no
example of the epoch is skipped or repeated, and nothing is replayed to get there (O(1)).
"""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from dist_train.run.checkpoint import CONFIG_FILE, STATE_FILE, checkpoints, require_valid, verify
from dist_train.config import Config, resume_policies, to_dict
from dist_train.engine.options import upgrade_engine_keys
from dist_train.errors import UserError


def find_checkpoint(cfg: Config) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The checkpoint ``checkpoint.resume`` asks for, checked against its manifest (None = start fresh), and
    the damaged ones skipped on the way there with what is wrong with each. Reads only."""
    spec = cfg.checkpoint.resume
    if spec is None:
        return None, []
    if spec == "auto":
        return newest_valid(Path(cfg.output_dir, "checkpoints"))
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"checkpoint.resume: '{spec}' does not exist; give a checkpoints/step-N folder, "
                        "a run's output_dir, or 'auto'")
    if not (path / STATE_FILE).is_file() and not (path / "manifest.json").is_file():
        root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        found, damaged = newest_valid(root)
        if found is None:
            raise UserError(f"checkpoint.resume: no complete checkpoint under '{spec}'")
        return found, damaged
    require_valid(path)
    return path, []


def newest_valid(root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint under ``root`` whose files match its manifest, and the newer damaged ones."""
    damaged = []
    for folder in checkpoints(root):
        problem = verify(folder)
        if problem is None:
            return folder, damaged
        damaged.append((folder, problem))
    return None, damaged


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def _policy(policies: dict[str, str], key: str) -> str:
    """The field's policy; keys inside free-form mappings (model.config.*, engine.deepspeed.config.*) take their
    field's. A key no field declares (an older version's) is fixed."""
    while key and key not in policies:
        key = key.rpartition(".")[0]
    return policies.get(key, "fixed")


def check_config(folder: Path, cfg: Config) -> None:
    """Refuse a resume whose config changes what the checkpoint continues; name the first changes."""
    # A checkpoint of an earlier version names some engine options by their old keys.
    saved = _flatten(upgrade_engine_keys(yaml.safe_load((folder / CONFIG_FILE).read_text())))
    now = _flatten(to_dict(cfg))
    policies = resume_policies()
    changed = [key for key in sorted(saved.keys() | now.keys())
               if saved.get(key) != now.get(key) and _policy(policies, key) != "may_change"]
    if changed:
        diffs = "; ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed[:3])
        more = f" (and {len(changed) - 3} more)" if len(changed) > 3 else ""
        raise UserError(f"checkpoint.resume: the config changed {diffs}{more} since checkpoint '{folder}'; a "
                        "resumed run keeps its model, task, tokenizer, data processing and optimizer - restore "
                        "those values, or start a new run in another output_dir")


def check_data(folder: Path, saved: dict, now: dict) -> None:
    if saved != now:
        raise UserError(f"checkpoint.resume: the training data differs from checkpoint '{folder}' "
                        f"({saved['examples']} examples then, {now['examples']} now, or other content); "
                        "resume with the same data.train (same rows, same tokenizer and max_length)")


def steps_left(epochs: float, batches_per_epoch: int, window: int, epoch: int, done: int) -> int:
    """Optimizer steps from (epoch, batches done) to the end of ``epochs`` epochs, ``window`` batches a step.

    Each epoch's last step may be short (the plan rarely divides evenly); a fractional last epoch ends
    after its share of the plan.
    """
    budget = epochs * batches_per_epoch
    position = epoch * batches_per_epoch + done
    left = 0
    while position < budget - 1e-9:
        this_epoch = min(batches_per_epoch - done, math.ceil(budget - position))
        left += math.ceil(this_epoch / window)
        position += batches_per_epoch - done
        done = 0
    return left


def check_engine(folder: Path, saved: dict, engine) -> None:
    """The engine must read the checkpoint's format (the registry's answer, not a list kept here)."""
    if not engine.can_resume(saved["engine"]):
        raise UserError(f"checkpoint '{folder}' was written by the {saved['engine']} engine and cannot continue "
                        f"on the {engine.checkpoint_format} engine; resume with the engine.kind it was trained with "
                        "(single and ddp share a format), or `dist-train export` it and start a new run from that")
