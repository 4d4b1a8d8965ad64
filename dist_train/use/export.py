"""Write a trained model as a plain Hugging Face folder (safetensors, config with labels, tokenizer).

The folder loads with the task's ``AutoModelFor...`` class and works in ``transformers.pipeline``;
``dist_train.json`` (the task's ``export_meta``) and the task's extra files (``labels.json``) add what
dist-train's own eval/predict use (raw label values, the data columns the model was trained on). ``export_checkpoint`` does the same
from any training checkpoint, whatever engine wrote it, in one process and without a launcher.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml

from dist_train.errors import RunFailed, UserError
from dist_train.model.lora import ADAPTER_CONFIG, is_lora, merge, merged_copy, rebuild
from dist_train.model.trainable import nonfinite
from dist_train.paths import written_beside

META_FILE = "dist_train.json"


def export_model(model, tokenizer, out_dir: str | Path, task, state_dict: dict | None = None,
                 weights: bool = True) -> Path:
    """The model, its tokenizer and what ``task`` records for later use (``dist_train.json`` from
    ``task.export_meta()``, files from ``task.save_extras``). ``state_dict`` (e.g. gathered from ZeRO-3
    shards) replaces the model's own tensors when given; ``weights=False`` writes everything but the
    weights (a checkpoint's description)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if weights:
        model.save_pretrained(out, safe_serialization=True, state_dict=state_dict)
    else:
        model.config.save_pretrained(out)
        if is_lora(model):  # how export_checkpoint puts the adapters back on the base
            model.peft_config["default"].save_pretrained(out)
    tokenizer.save_pretrained(out)
    task.save_extras(out)
    (out / META_FILE).write_text(json.dumps(task.export_meta(), indent=2))
    return out


def publish(model, tokenizer, out_dir: str | Path, task, state_dict: dict | None = None) -> Path:
    """Export to ``out_dir`` without ever leaving less than there was: the weights are checked to be
    finite, the folder is written beside it and swapped in; an earlier export is removed only then. A LoRA
    model is exported with its adapters merged (a plain model: no peft needed to use it)."""
    bad = nonfinite(state_dict if state_dict is not None else model.state_dict())
    if is_lora(model) and not bad:
        model = merged_copy(model, state_dict if state_dict is not None else model.state_dict())
        state_dict = None
        bad = nonfinite(model.state_dict())
    if bad:
        raise RunFailed(f"the final weights hold non-finite values ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); "
                        f"nothing was exported to {out_dir}; lower train.lr or resume from an earlier checkpoint")
    out = Path(out_dir)
    with written_beside(out, "the model") as tmp:
        export_model(model, tokenizer, tmp, task, state_dict=state_dict)
    return out


def read_meta(folder: str | Path) -> dict:
    path = Path(folder, META_FILE)
    return json.loads(path.read_text()) if path.is_file() else {}


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, adapter_only: bool = False) -> Path:
    """Write checkpoint ``step-N`` (from any engine; ZeRO shards are consolidated) as a Hugging Face folder.

    The model skeleton is built on the meta device and takes the loaded tensors as its own, so the full
    weights are held once, not twice. A LoRA checkpoint holds only the trained tensors: the base is loaded
    from the run's ``model.pretrained`` and the adapters merged in; ``adapter_only`` writes peft's adapter
    folder instead (adapter config and weights, and the tokenizer).
    """
    from transformers import AutoConfig, AutoTokenizer

    from dist_train.run.checkpoint import CONFIG_FILE, HF_DIR, read_state, require_valid
    from dist_train.engine import consolidated_state_dict
    from dist_train.tasks import task_class

    folder = Path(checkpoint)
    if not (folder / HF_DIR).is_dir():
        raise UserError(f"export: '{folder}' is not a dist-train checkpoint (no {HF_DIR}/ inside); give a "
                        "folder like output_dir/checkpoints/step-N")
    require_valid(folder)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "is not empty" if out.is_dir() else "is a file"
        raise UserError(f"export: '{out}' exists and {what}; choose a new folder")
    description = folder / HF_DIR
    lora = (description / ADAPTER_CONFIG).is_file()
    if adapter_only and not lora:
        raise UserError(f"export: --adapter-only needs a LoRA checkpoint (model.lora); '{folder}' holds a fully "
                        "fine-tuned model: export it without --adapter-only")
    meta = read_meta(description)
    config = AutoConfig.from_pretrained(description)
    auto_class = task_class(meta["task"]).auto_model()
    state_dict = consolidated_state_dict(folder, read_state(folder)["engine"])
    bad = nonfinite(state_dict)
    if bad:
        raise UserError(f"export: checkpoint '{folder}' holds non-finite weights ({', '.join(bad[:3])}); "
                        "export an earlier checkpoint")
    if lora:
        run = (yaml.safe_load((folder / CONFIG_FILE).read_text()) or {}).get("model") or {}
        if not run.get("pretrained"):
            raise UserError(f"export: '{folder}' is a LoRA checkpoint but its {CONFIG_FILE} names no "
                            "model.pretrained to rebuild the frozen base from")
        model = rebuild(run["pretrained"], bool(run.get("trust_remote_code")), description, auto_class, config,
                        state_dict, folder)
        if not adapter_only:
            model = merge(model)
    else:
        with torch.device("meta"):
            model = auto_class.from_config(config)
        _fill_tied(model, state_dict)
        missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
        if unexpected or [k for k in missing if k not in _tied(model)]:
            raise UserError(f"export: checkpoint weights do not fit the model (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]})")
        model.tie_weights()
    # Written beside the target and renamed into place: an interrupted export leaves no half folder.
    with written_beside(out, "the export") as tmp:
        if adapter_only:
            AutoTokenizer.from_pretrained(description).save_pretrained(tmp)
        else:
            shutil.copytree(description, tmp, ignore=shutil.ignore_patterns(ADAPTER_CONFIG))
        model.save_pretrained(tmp, safe_serialization=True)  # the peft model (adapter_only): its adapter folder
    return out


def _fill_tied(model, state_dict: dict) -> None:
    """A tied pair is stored once, under either name (safetensors keeps one of two shared tensors): give
    the other name the same tensor, so neither half of the pair is left on the meta device."""
    keys = getattr(model, "_tied_weights_keys", None)
    if not isinstance(keys, dict):
        return
    for target, source in keys.items():
        if source not in state_dict and target in state_dict:
            state_dict[source] = state_dict[target]
        elif target not in state_dict and source in state_dict:
            state_dict[target] = state_dict[source]


def _tied(model) -> set[str]:
    """Parameter names that share their tensor with another (saved once, restored by tie_weights)."""
    keys = getattr(model, "_tied_weights_keys", None) or []
    return set(keys if isinstance(keys, (list, tuple, set)) else dict(keys).keys())
