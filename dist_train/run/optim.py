"""AdamW parameter groups and the learning-rate schedule: the single place both are defined.

Every engine builds its optimizer and schedule from these (as factories, on the parameters it trains) and
takes its LR from ``lr_factor``, so that single, DDP, DeepSpeed and FSDP runs agree step for step.
"""

from __future__ import annotations

import math

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices only: never on biases, normalisation weights or 1-d params."""
    no_decay = set()
    for module in model.modules():
        if "norm" in type(module).__name__.lower():
            no_decay.update(id(p) for p in module.parameters(recurse=False))
    decay, plain = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (plain if id(p) in no_decay or name.endswith("bias") or p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, train_cfg) -> torch.optim.Optimizer:
    # fused=None leaves the choice to torch (foreach on CUDA, a per-parameter loop on CPU).
    return torch.optim.AdamW(param_groups(model, train_cfg.weight_decay), lr=train_cfg.lr,
                             betas=tuple(train_cfg.adam_betas), eps=train_cfg.adam_eps,
                             fused=True if train_cfg.fused_optimizer else None)


def warmup_steps(train_cfg, total_steps: int) -> int:
    if train_cfg.warmup_steps > 0:
        return train_cfg.warmup_steps
    return int(math.ceil(train_cfg.warmup_ratio * total_steps))


def lr_factor(step: int, total_steps: int, warmup: int, kind: str, min_ratio: float) -> float:
    """LR multiplier for optimizer step ``step`` (0-based): linear warmup, then linear/cosine decay to min_ratio."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    shape = 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * shape


def build_scheduler(optimizer, train_cfg, total_steps: int):
    warmup = warmup_steps(train_cfg, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, train_cfg.scheduler, train_cfg.min_lr_ratio))
