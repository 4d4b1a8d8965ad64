"""Data parallel with torch DistributedDataParallel: one process per device, gradients all-reduced.

CUDA + NCCL when GPUs are present, else CPU + gloo. Ranks come from torchrun's environment.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from dist_train.engine.base import Engine
from dist_train.engine.dist_env import DistEnv


class DDPEngine(Engine):
    def __init__(self, precision: str = "fp32", max_grad_norm: float = 0.0, env: DistEnv | None = None):
        self.env = env or DistEnv.from_environ()
        self.rank, self.local_rank, self.world_size = self.env.rank, self.env.local_rank, self.env.world_size
        super().__init__(precision, max_grad_norm)
        self.env.init_process_group(self.device)

    def prepare(self, model, optimizer, scheduler) -> None:
        super().prepare(model, optimizer, scheduler)
        ids = [self.device.index] if self.device.type == "cuda" else None
        self.ddp = DistributedDataParallel(self.model, device_ids=ids)

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.model

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

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def barrier(self) -> None:
        self.env.barrier()

    def close(self) -> None:
        self.env.destroy()
