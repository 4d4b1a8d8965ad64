"""Start N workers of ``dist-train train`` (torchrun or the DeepSpeed launcher) and stay with them.

The launcher and its workers share a small folder, the *box* (``$DIST_TRAIN_LAUNCH_BOX``, a temporary
folder that lives as long as the launch):

- each worker writes ``rank-R.pid`` when it starts: the launcher passes the stop signals
  (``checkpoint.stop_signals``) and Ctrl-C on to exactly these processes. torchrun starts every worker in a
  session of its own, so a signal to the launcher (Kubernetes: only to PID 1) reaches no worker by itself;
  torchrun's own handling would SIGTERM the workers and SIGKILL them 30 s later, saved or not.
- a worker that stops on a user error (exit 2; 3 for a failed run) writes its one line to ``rank-R.error``
  instead of printing it: the launcher prints each different line once, not once per rank, and torchrun's
  report of the failure (a traceback and a table of ranks) is left out. Any other failure (a crash) keeps
  torchrun's full report.

torchrun runs through this module (``python -m launcher.launch``): the same torchrun, with the signals the
workers handle left to them (see ``torchrun_main``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dist_train.engine.options import use_deepspeed_cpu_accelerator
from dist_train.errors import UserError

BOX_ENV = "DIST_TRAIN_LAUNCH_BOX"
LEAVE_FLAG = "--leave-to-workers="
TORCHRUN_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")  # what torchrun itself handles by default
INTERRUPTED = 130  # a worker's exit status after Ctrl-C (saved and stopped, or nothing to save yet)
KILLED = 3  # a worker was killed by a signal: a failed run (RunFailed's exit status)


def killed(rank: int, signal_name: str) -> str:
    """The line for a worker that a signal ended (the kernel's out-of-memory killer, an administrator)."""
    why = " (the system ends a process so when memory runs out)" if signal_name == "SIGKILL" else ""
    return (f"rank {rank} was killed by {signal_name}{why}, and the run stopped with it; continue from its last "
            "checkpoint with the same command and checkpoint.resume=auto")


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


def check_endpoint(endpoint: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6-address]:PORT`` too) -> (host, port), or the error that says what is wrong."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port:
        raise UserError(f"launch: --rdzv-endpoint '{endpoint}' needs a port: HOST:PORT (e.g. head-node:29500)")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UserError(f"launch: --rdzv-endpoint '{endpoint}': port '{port}' is not a number in 1-65535")
    if any(c.isspace() or c in "/@?#" for c in host):
        raise UserError(f"launch: --rdzv-endpoint '{endpoint}': '{host}' is not a host name or address")
    return host.strip("[]"), int(port)


def check_args(args: LaunchArgs) -> None:
    if args.nproc_per_node < 1:
        raise UserError(f"launch: --nproc-per-node must be >= 1, got {args.nproc_per_node}")
    if args.nnodes < 1:
        raise UserError(f"launch: --nnodes must be >= 1, got {args.nnodes}")
    if args.max_restarts < 0:
        raise UserError(f"launch: --max-restarts must be >= 0, got {args.max_restarts}")
    if not 0 <= args.node_rank < args.nnodes:
        raise UserError(f"launch: --node-rank {args.node_rank} must be in [0, {args.nnodes})")
    if not args.rdzv_id.strip() or any(c.isspace() for c in args.rdzv_id):
        raise UserError(f"launch: --rdzv-id '{args.rdzv_id}' must be one word (no spaces), e.g. the job id")
    if args.rdzv_endpoint is not None:
        check_endpoint(args.rdzv_endpoint)


def build_command(args: LaunchArgs, config: str, overrides: list[str],
                  stop_signals: list[str] = ("SIGUSR1", "SIGTERM")) -> list[str]:
    check_args(args)
    worker = ["-m", "dist_train", "train", config, *overrides]
    if args.launcher == "torchrun":
        leave = [*stop_signals, "SIGINT"]
        cmd = [sys.executable, "-m", "launcher.launch", LEAVE_FLAG + ",".join(leave),
               f"--nproc-per-node={args.nproc_per_node}", f"--nnodes={args.nnodes}",
               f"--max-restarts={args.max_restarts}",
               "--signals-to-handle=" + ",".join(s for s in TORCHRUN_SIGNALS if s not in leave)]
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
            host, port = check_endpoint(args.rdzv_endpoint)
            cmd += [f"--master_addr={host}", f"--master_port={port}"]
        return cmd + ["--module", *worker[1:]]
    raise UserError(f"launch: unknown --launcher '{args.launcher}'; use torchrun or deepspeed")


def launch_env(args: LaunchArgs) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(worker_threads(args.nproc_per_node)))
    use_deepspeed_cpu_accelerator(env)
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


def preflight(cfg, nnodes: int = 1) -> None:
    """What the workers would find wrong at their start, found before any of them exists; writes nothing."""
    from dist_train.tasks import task_class
    from dist_train.model.files import check_weights, resolve_model_path
    from dist_train.run.run_dir import check_writable
    from dist_train.run.run_dir import preflight as check_output_dir

    if nnodes == 1:
        check_output_dir(cfg)
    else:  # another node's rank 0 may hold the folder already: only the first node can tell
        check_writable(Path(cfg.output_dir))
    m = cfg.model
    if m.pretrained is not None:
        check_weights(resolve_model_path(m.pretrained), "model.pretrained")
    if m.tokenizer is not None:
        resolve_model_path(m.tokenizer, "model.tokenizer")
    if cfg.distill.teacher is not None:
        check_weights(resolve_model_path(cfg.distill.teacher, "distill.teacher"), "distill.teacher")
    task_class(cfg.task.name).check_files(cfg.data)
    if cfg.train.precision == "fp16" and not _has_cuda():
        raise UserError("train.precision=fp16 needs a CUDA GPU; on CPU use train.precision=bf16 (or fp32)")


# -- the box: what workers tell their launcher ------------------------------------------------------------
def register_worker() -> None:
    """In a worker under `dist-train launch`: say where to send stop signals."""
    box = os.environ.get(BOX_ENV)
    if box and os.path.isdir(box):
        Path(box, f"rank-{os.environ.get('RANK', '0')}.pid").write_text(str(os.getpid()))


def write_error(rank: str, exit_code: int, message: str) -> bool:
    """In a worker under `dist-train launch`: leave the error line for the launcher; False elsewhere."""
    box = os.environ.get(BOX_ENV)
    if not box or not os.path.isdir(box):
        return False
    Path(box, f"rank-{rank}.error").write_text(json.dumps({"exit_code": exit_code, "message": message}))
    return True


def peer_error(wait_s: float = 3.0) -> bool:
    """In a worker under `dist-train launch` that failed unexpectedly: whether another rank stopped on a
    user error, waiting up to ``wait_s`` for its line. (A rank that stops on bad input ends its process
    group on the way out; the ranks waiting on it then fail with "connection closed": not news to the user.)"""
    import time

    box = os.environ.get(BOX_ENV)
    if not box or not os.path.isdir(box) or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return False
    deadline = time.monotonic() + wait_s
    while True:
        if _errors(box):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def _errors(box: str) -> dict[int, dict]:
    found = {}
    for path in Path(box).glob("rank-*.error"):
        try:
            found[int(path.stem[5:])] = json.loads(path.read_text())
        except (ValueError, OSError):
            continue
    return dict(sorted(found.items()))


def _worker_pids(box: str) -> list[int]:
    """This launch's live workers; a pid file of a worker that has ended (pid reused since) is skipped."""
    import psutil

    mine = {p.pid for p in psutil.Process().children(recursive=True)}
    pids = []
    for path in Path(box).glob("rank-*.pid"):
        try:
            pid = int(path.read_text())
        except (ValueError, OSError):
            continue
        if pid in mine:
            pids.append(pid)
    return pids


def error_lines(errors: dict[int, dict]) -> list[str]:
    """One line per different message: the same message from every rank is printed once, without rank."""
    messages = list(dict.fromkeys(e["message"] for e in errors.values()))
    if len(messages) == 1:
        return [f"dist-train: error: {messages[0]}"]
    first = {}
    for rank, e in errors.items():
        first.setdefault(e["message"], rank)
    return [f"dist-train: rank {rank}: error: {message}" for message, rank in first.items()]


def run_workers(cmd: list[str], env: dict[str, str], stop_signals: list[str]) -> int:
    """Run the launcher command to its end, passing stop signals and Ctrl-C on to the workers; returns the
    exit status (the workers' own for a user error, whose line is printed once here)."""
    import subprocess

    passed_on = [signal.Signals[name] for name in dict.fromkeys([*stop_signals, "SIGINT"])]
    requested: dict[int, set[int]] = {}  # signal -> the workers it has reached
    with tempfile.TemporaryDirectory(prefix="dist-train-launch-") as box:
        def deliver() -> None:
            # A worker that registers later (still starting, or restarted by torchrun) gets it then.
            for signum, reached in requested.items():
                for pid in set(_worker_pids(box)) - reached:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signum)
                    reached.add(pid)

        def pass_on(signum, frame) -> None:
            requested[signum] = set()  # (again to every worker: a second Ctrl-C is a second request)
            deliver()

        def shut_down(signum, frame) -> None:
            proc.send_signal(signum)  # not a stop signal: torchrun ends the workers (as it would without us)

        # Ignored while the child starts (it inherits that; torchrun's wrapper replaces it), then passed on.
        ended = [sig for sig in (signal.SIGTERM, signal.SIGHUP) if sig not in passed_on]
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in [*passed_on, *ended]}
        try:
            proc = subprocess.Popen(cmd, env={**env, BOX_ENV: box})
            for sig in passed_on:
                signal.signal(sig, pass_on)
            for sig in ended:
                signal.signal(sig, shut_down)
            while True:
                try:
                    rc = proc.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    deliver()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        errors = _errors(box)
    if rc != 0 and errors:
        for line in error_lines(errors):
            print(line, file=sys.stderr, flush=True)
    return rc


# -- python -m launcher.launch: torchrun, with the workers' signals left to them ---------------------------
class _HoldBack(logging.Filter):
    """torchrun's log lines about a worker group that ends: held back until its failure is known, dropped
    when a worker stopped on a user error (the launcher prints that line instead), else let through."""

    def __init__(self, box: str | None):
        super().__init__()
        self.box, self.held, self.passing = box, [], False

    def filter(self, record: logging.LogRecord) -> bool:
        if self.passing:
            return True
        msg = str(record.msg)
        if msg.startswith("Sending process"):
            self.held.append(record)
            return False
        if msg.startswith("failed (exitcode") and record.args:  # (exitcode, local rank, pid, binary)
            if record.args[0] == INTERRUPTED or (self.box and _errors(self.box)):
                self.held.clear()
                return False
            self.release(logging.getLogger(record.name))
        return True

    def release(self, logger: logging.Logger) -> None:
        self.passing = True
        for record in self.held:
            logger.handle(record)
        self.held.clear()


def torchrun_main(argv: list[str]) -> int:
    leave = []
    if argv and argv[0].startswith(LEAVE_FLAG):
        leave = [s for s in argv.pop(0)[len(LEAVE_FLAG):].split(",") if s]
    # A Python handler that does nothing, not SIG_IGN: torchrun lives on, and its workers (new processes)
    # start with the default action instead of inheriting "ignore", then install their own handlers.
    for name in leave:
        signal.signal(signal.Signals[name], lambda signum, frame: None)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    box = os.environ.get(BOX_ENV)
    hold = _HoldBack(box)
    logger = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    logger.addFilter(hold)
    try:
        run(parse_args(argv))
        return 0
    except ChildFailedError as exc:
        errors = _errors(box) if box else {}
        if errors:  # a user error (the other ranks' failures follow from it): the launcher prints its line
            hold.held.clear()
            return next(iter(errors.values()))["exit_code"]
        rank, failure = exc.get_first_failure()
        if failure.exitcode == INTERRUPTED:
            hold.held.clear()
            return INTERRUPTED  # stopped by Ctrl-C after saving: the workers said so
        if failure.exitcode < 0:  # killed by a signal: it left no traceback to keep, so one line says it
            hold.held.clear()
            print(f"dist-train: error: {killed(rank, failure.signal_name())}", file=sys.stderr, flush=True)
            return KILLED
        raise
    finally:
        hold.release(logger)  # whatever is still held (e.g. after torchrun itself was signalled)


if __name__ == "__main__":
    sys.exit(torchrun_main(sys.argv[1:]))
