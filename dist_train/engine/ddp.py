"""Data parallel with torch DistributedDataParallel: one process per device, gradients all-reduced.

CUDA + NCCL when GPUs are present, else CPU + gloo. Ranks come from torchrun's environment.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.parallel import DistributedDataParallel

from dist_train.engine.dist_env import DistributedEngine


class DDPEngine(DistributedEngine):
    def prepare(self, model, make_optimizer=None, make_scheduler=None) -> None:
        super().prepare(model, make_optimizer, make_scheduler)
        ids = [self.device.index] if self.device.type == "cuda" else None
        self.ddp = DistributedDataParallel(self.model, device_ids=ids)

    def forward(self, **inputs):
        # Training forward goes through the DDP wrapper (it arms the gradient all-reduce); evaluation uses
        # the plain module, so ranks with different numbers of eval batches never wait on each other.
        module = self.ddp if self.model.training else self.model
        with self.autocast():
            return module(**inputs)

    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        # DDP all-reduces the MEAN of the ranks' gradients; the loop's loss is already normalised by the
        # global target count, so scale by world size to make the all-reduce a plain sum.
        loss = loss * self.world_size
        context = contextlib.nullcontext() if sync else self.ddp.no_sync()
        with context:
            super().backward(loss)
