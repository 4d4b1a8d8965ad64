"""Write a trained model as a plain Hugging Face folder (safetensors, config with labels, tokenizer).

The folder loads with ``AutoModelForSequenceClassification.from_pretrained`` and works in
``transformers.pipeline``; ``labels.json`` and ``dist_train.json`` add what dist-train's own eval/predict use
(raw label values and the data columns the model was trained on).
"""

from __future__ import annotations

import json
from pathlib import Path

META_FILE = "dist_train.json"


def export_model(model, tokenizer, out_dir: str | Path, labels=None, meta: dict | None = None,
                 state_dict: dict | None = None) -> Path:
    """``state_dict`` (e.g. gathered from ZeRO-3 shards) replaces the model's own tensors when given."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(out)
    if labels is not None:
        labels.save(out)
    if meta:
        (out / META_FILE).write_text(json.dumps(meta, indent=2))
    return out


def read_meta(folder: str | Path) -> dict:
    path = Path(folder, META_FILE)
    return json.loads(path.read_text()) if path.is_file() else {}
