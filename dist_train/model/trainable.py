"""What a model trains when some of it is frozen (LoRA): the trained parameters' names, and a checkpoint of only
those copied back in. Engines save and load through these; the model side rebuilds a LoRA export with them."""

from __future__ import annotations

from pathlib import Path

import torch

from dist_train.errors import UserError


def trainable_names(model: torch.nn.Module) -> set[str] | None:
    """The trained parameters' names when some parameters are frozen (LoRA), else None. A checkpoint then
    holds only these: the frozen ones come back, deterministically, from ``model.pretrained``."""
    params = dict(model.named_parameters())
    names = {name for name, p in params.items() if p.requires_grad}
    return names if len(names) < len(params) else None


def load_trainable(model: torch.nn.Module, state: dict, names: set[str], where: str | Path) -> None:
    """Copy a trainable-only checkpoint's tensors into ``model``; its parameters must be exactly ``names``
    (buffers it also holds are copied too). Anything else is a UserError naming ``where``."""
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    saved = set(state) - set(buffers)
    if saved != names:
        missing, unexpected = sorted(names - saved), sorted(saved - names)
        raise UserError(f"checkpoint '{where}' does not hold this model's trained parameters (missing "
                        f"{missing[:3]}, unexpected {unexpected[:3]}); it was written by another model or "
                        "model.lora setting")
    with torch.no_grad():
        for name, tensor in state.items():
            target = params.get(name, buffers.get(name))
            target.copy_(tensor.to(target.device, target.dtype))


def nonfinite(state_dict: dict) -> list[str]:
    """Names of the floating-point tensors holding NaN or inf."""
    return [k for k, t in state_dict.items() if t.is_floating_point() and not torch.isfinite(t).all()]
