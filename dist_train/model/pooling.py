"""How a sequence head sees the text: the model's own [CLS] pooler, or the mean over the real tokens.

A BERT-family classifier reads position 0 of the last layer through its pooler (a dense layer and tanh
trained by next-sentence prediction). Sentence-transformers models such as all-MiniLM-L6-v2 were trained
with mean pooling instead (their ``1_Pooling/config.json`` says so) and ship an untrained pooler. ``mean``
replaces the classifier's ``forward`` on that one instance: the masked mean of the last hidden states goes
through the model's dropout and linear classifier; the pooler is skipped. The parameters and their names
stay the stock architecture's, so checkpoints, ZeRO and exports are unchanged; the export records the
pooling in ``dist_train.json`` and dist-train's evaluate / predict / deploy rebuild it (a plain transformers
``pipeline`` would read [CLS] through the pooler instead: it needs this forward).
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import torch
from torch import nn

from dist_train.errors import UserError
from dist_train.model.files import resolve_model_path

def resolve(setting: str, pretrained: str | None) -> str:
    """``cls`` or ``mean`` for ``task.pooling``: ``auto`` reads the model folder's sentence-transformers
    pooling config (mean when it pools mean tokens), and is ``cls`` without one."""
    if setting != "auto":
        return setting
    if pretrained is None:
        return "cls"
    config = Path(resolve_model_path(pretrained), "1_Pooling", "config.json")
    try:
        modes = json.loads(config.read_text())
    except (OSError, ValueError):
        return "cls"
    return "mean" if modes.get("pooling_mode_mean_tokens") and not modes.get("pooling_mode_cls_token") else "cls"


def supported(model) -> bool:
    """A classifier whose head is the model's dropout then one linear layer over a pooled vector (BERT and
    its kin: MiniLM, ALBERT...)."""
    return (isinstance(getattr(model, "classifier", None), nn.Linear)
            and isinstance(getattr(model, "dropout", None), nn.Dropout)
            and getattr(model, "base_model", model) is not model and not hasattr(model, "peft_config"))


def apply(model, pooling: str) -> None:
    """Install ``pooling`` (``cls``: the model as it is)."""
    if pooling == "cls":
        return
    if not supported(model):
        raise UserError(f"task.pooling=mean: {type(model).__name__} is not a classifier with one linear layer over "
                        "a pooled vector (e.g. BertForSequenceClassification), or it has LoRA adapters; "
                        "use task.pooling=cls")
    model.forward = types.MethodType(_mean_forward, model)


def _mean_forward(model, input_ids=None, attention_mask=None, labels=None, **kwargs):
    from transformers.modeling_outputs import SequenceClassifierOutput

    kwargs.pop("return_dict", None)
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **kwargs)
    hidden = out.last_hidden_state
    if attention_mask is None:
        attention_mask = torch.ones(hidden.shape[:2], dtype=hidden.dtype, device=hidden.device)
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    # Padding positions carry no weight: a row's vector does not depend on the batch it was padded in.
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    return SequenceClassifierOutput(logits=model.classifier(model.dropout(pooled)))
