"""The process-group environment of a worker: ranks from the launcher, backend, bounded timeouts."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from dist_train.engine.base import Engine
from dist_train.errors import UserError

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched() -> bool:
    """True inside torchrun / the DeepSpeed launcher (they set RANK, WORLD_SIZE, LOCAL_RANK)."""
    return all(v in os.environ for v in LAUNCHER_VARS)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _int_env(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer (set by the launcher)") from None


@dataclass
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    timeout_s: float = 300.0

    @classmethod
    def from_environ(cls, timeout_s: float = 300.0) -> "DistEnv":
        """Read the launcher's variables; without a launcher, a world of one on a free local port."""
        if not launched():
            os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                               "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                               "MASTER_PORT": os.environ.get("MASTER_PORT", str(_free_port()))})
        env = cls(_int_env("RANK"), _int_env("LOCAL_RANK"), _int_env("WORLD_SIZE"), timeout_s)
        if not 0 <= env.rank < env.world_size:
            raise UserError(f"RANK={env.rank} is outside WORLD_SIZE={env.world_size}")
        return env

    def backend(self, device: torch.device) -> str:
        return "nccl" if device.type == "cuda" else "gloo"

    def init_process_group(self, device: torch.device) -> None:
        if dist.is_initialized():
            return
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # A bounded timeout: a rank that never arrives fails the job instead of a silent 30-minute hang.
        timeout = timedelta(seconds=self.timeout_s)
        dist.init_process_group(self.backend(device), rank=self.rank, world_size=self.world_size,
                                timeout=timeout, store=self._restart_store(timeout))

    def _restart_store(self, timeout: timedelta):
        """Under torchrun, the agent's store with one key prefix per restart attempt (None otherwise).

        torchrun keeps its store (and port) across ``--max-restarts``, so without a prefix the restarted
        ranks read the dead group's addresses from it and fail to connect ("Connection refused").
        """
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
            return None
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), self.world_size,
                              is_master=False, timeout=timeout)
        return dist.PrefixStore(f"/dist-train/attempt_{attempt}", store)

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def destroy(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


class DistributedEngine(Engine):
    """An engine with one process per device in a torch.distributed process group (DDP, DeepSpeed, FSDP)."""

    def __init__(self, precision: str = "fp32", max_grad_norm: float = 0.0, env: DistEnv | None = None,
                 **options):
        self.env = env or DistEnv.from_environ()
        self.rank, self.local_rank, self.world_size = self.env.rank, self.env.local_rank, self.env.world_size
        super().__init__(precision, max_grad_norm, **options)
        self.env.init_process_group(self.device)

    @classmethod
    def options(cls, cfg) -> dict:
        return {**super().options(cfg), "env": DistEnv.from_environ(cfg.engine.timeout_s)}

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def barrier(self) -> None:
        self.env.barrier()

    def close(self) -> None:
        self.env.destroy()
