"""Build the command that starts N workers (torchrun or the DeepSpeed launcher) for ``dist-train train``."""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass

from dist_train.errors import UserError


@dataclass
class LaunchArgs:
    nproc_per_node: int = 1
    """Worker processes on this node (one per GPU; on CPU, processes share the cores)."""
    nnodes: int = 1
    """Nodes in the job."""
    node_rank: int = 0
    """This node's rank (DeepSpeed launcher, static rendezvous)."""
    rdzv_endpoint: str | None = None
    """host:port of the rendezvous (multi-node); single node uses a private standalone rendezvous."""
    rdzv_id: str = "dist-train"
    """Job id shared by all nodes of one rendezvous."""
    max_restarts: int = 0
    """torchrun restarts the whole worker group this many times after a failure."""
    launcher: str = "torchrun"
    """``torchrun`` or ``deepspeed``."""


def worker_threads(nproc_per_node: int) -> int:
    """Cores per local worker: more threads than cores made 2 ranks on 2 cores 7x slower."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // nproc_per_node)


def build_command(args: LaunchArgs, config: str, overrides: list[str]) -> list[str]:
    if args.nproc_per_node < 1 or args.nnodes < 1:
        raise UserError("launch: --nproc-per-node and --nnodes must be >= 1")
    if not 0 <= args.node_rank < args.nnodes:
        raise UserError(f"launch: --node-rank {args.node_rank} must be in [0, {args.nnodes})")
    worker = ["-m", "dist_train", "train", config, *overrides]
    if args.launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc_per_node}",
               f"--nnodes={args.nnodes}", f"--max-restarts={args.max_restarts}"]
        if args.nnodes == 1 and not args.rdzv_endpoint:
            cmd.append("--standalone")
        else:
            if not args.rdzv_endpoint:
                raise UserError("launch: --nnodes > 1 needs --rdzv-endpoint HOST:PORT (the head node)")
            cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={args.rdzv_endpoint}", f"--rdzv-id={args.rdzv_id}"]
        return cmd + worker
    if args.launcher == "deepspeed":
        if args.max_restarts:
            raise UserError("launch: --max-restarts needs --launcher torchrun (the DeepSpeed launcher does not restart)")
        # --no_local_rank: workers read LOCAL_RANK from the environment, as under torchrun.
        # (run as a module of this Python, so an unactivated venv needs no `deepspeed` on PATH)
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--no_local_rank", f"--num_gpus={args.nproc_per_node}"]
        if args.nnodes > 1:  # (--num_nodes=1 makes the DeepSpeed launcher start a single rank)
            cmd += [f"--num_nodes={args.nnodes}", f"--node_rank={args.node_rank}"]
        if args.rdzv_endpoint:
            host, _, port = args.rdzv_endpoint.rpartition(":")
            cmd += [f"--master_addr={host}", f"--master_port={port}"]
        return cmd + ["--module", *worker[1:]]
    raise UserError(f"launch: unknown --launcher '{args.launcher}'; use torchrun or deepspeed")


def launch_env(args: LaunchArgs) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(worker_threads(args.nproc_per_node)))
    if not _has_cuda():
        env.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator, without its probing warning
    return env


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def render(cmd: list[str], env: dict[str, str]) -> str:
    return f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']} " + shlex.join(cmd)


def check_slurm_grant(nproc_per_node: int) -> None:
    """Inside a SLURM job, refuse more processes per node than it granted (instead of a hang or a crawl)."""
    if "SLURM_JOB_ID" not in os.environ:
        return
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
    if gpus and _has_cuda():
        granted, what = len(gpus.split(",")), "GPUs"
    elif "SLURM_CPUS_ON_NODE" in os.environ:
        granted, what = int(os.environ["SLURM_CPUS_ON_NODE"]), "CPUs"
    else:
        return
    if nproc_per_node > granted:
        raise UserError(f"launch: --nproc-per-node {nproc_per_node} asks for more processes than the {granted} "
                        f"{what} SLURM granted this node; submit with more (--cpus-per-task / --gpus-per-node) "
                        "or lower --nproc-per-node")
