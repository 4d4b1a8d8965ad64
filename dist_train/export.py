"""Write a trained model as a plain Hugging Face folder (safetensors, config with labels, tokenizer).

The folder loads with ``AutoModelForSequenceClassification.from_pretrained`` and works in
``transformers.pipeline``; ``labels.json`` and ``dist_train.json`` add what dist-train's own eval/predict use
(raw label values and the data columns the model was trained on). ``export_checkpoint`` does the same
from any training checkpoint, whatever engine wrote it, in one process and without a launcher.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from dist_train.errors import UserError

META_FILE = "dist_train.json"


def export_model(model, tokenizer, out_dir: str | Path, labels=None, meta: dict | None = None,
                 state_dict: dict | None = None, weights: bool = True) -> Path:
    """``state_dict`` (e.g. gathered from ZeRO-3 shards) replaces the model's own tensors when given;
    ``weights=False`` writes everything but the weights (a checkpoint's description)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if weights:
        model.save_pretrained(out, safe_serialization=True, state_dict=state_dict)
    else:
        model.config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if labels is not None:
        labels.save(out)
    if meta:
        (out / META_FILE).write_text(json.dumps(meta, indent=2))
    return out


def read_meta(folder: str | Path) -> dict:
    path = Path(folder, META_FILE)
    return json.loads(path.read_text()) if path.is_file() else {}


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write checkpoint ``step-N`` (from any engine; ZeRO shards are consolidated) as a Hugging Face folder.

    The model skeleton is built on the meta device and takes the loaded tensors as its own, so the full
    weights are held once, not twice.
    """
    from transformers import AutoConfig

    from dist_train.checkpoint import HF_DIR, read_state, require_valid
    from dist_train.engine import consolidated_state_dict
    from dist_train.tasks import TASKS

    folder = Path(checkpoint)
    if not (folder / HF_DIR).is_dir():
        raise UserError(f"export: '{folder}' is not a dist-train checkpoint (no {HF_DIR}/ inside); give a "
                        "folder like output_dir/checkpoints/step-N")
    require_valid(folder)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"export: '{out}' exists and is not empty; choose a new folder")
    description = folder / HF_DIR
    meta = read_meta(description)
    config = AutoConfig.from_pretrained(description)
    with torch.device("meta"):
        model = TASKS[meta["task"]].auto_model().from_config(config)
    state_dict = consolidated_state_dict(folder, read_state(folder)["engine"])
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    if unexpected or [k for k in missing if k not in _tied(model)]:
        raise UserError(f"export: checkpoint weights do not fit the model (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    model.tie_weights()
    shutil.copytree(description, out, dirs_exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    return out


def _tied(model) -> set[str]:
    """Parameter names that share their tensor with another (saved once, restored by tie_weights)."""
    keys = getattr(model, "_tied_weights_keys", None) or []
    return set(keys if isinstance(keys, (list, tuple, set)) else dict(keys).keys())
