"""The process-group environment of a worker: ranks from the launcher, backend, bounded timeouts."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from dist_train.engine.base import Engine
from dist_train.errors import RunFailed, UserError

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
    store: object = None
    """The rendezvous key-value store (torch.distributed's TCPStore), under this attempt's prefix."""

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
        self.store = self._make_store(timeout)
        dist.init_process_group(self.backend(device), rank=self.rank, world_size=self.world_size,
                                timeout=timeout, store=self.store)
        self.store.set(f"dist-train/pid/{self.rank}", f"{socket.gethostname()}:{os.getpid()}")

    def _make_store(self, timeout: timedelta):
        """The store the process group meets in, kept for dist-train's own keys (waits, diagnosis).

        Under torchrun it is the agent's store, with one key prefix per restart attempt: torchrun keeps its
        store (and port) across ``--max-restarts``, so without a prefix the restarted ranks would read the
        dead group's addresses ("Connection refused"). Elsewhere rank 0 serves it, as ``env://`` would.
        """
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), self.world_size,
                              is_master=not agent and self.rank == 0, timeout=timeout)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        return dist.PrefixStore(f"/dist-train/attempt_{attempt}", store)

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def destroy(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    # -- rank 0 alone, the others waiting ----------------------------------------------------------------
    def run_on_main(self, fn, what: str, serial: int):
        """Rank 0 runs ``fn`` while the others wait as long as rank 0 shows signs of life (a heartbeat in the
        store), not a fixed timeout: tokenizing a large corpus or writing a large checkpoint may take longer
        than ``engine.timeout_s``, a rank 0 that stops answering may not. Every rank returns rank 0's result
        (JSON); a UserError on rank 0 is raised on every rank, with its line."""
        key = f"dist-train/main/{serial}"
        if self.rank != 0:
            return self._result(key, what)
        with _Heartbeat(self.store):
            try:
                result = fn()
            except UserError as exc:
                self.store.set(key, json.dumps({"error": str(exc), "code": exc.exit_code}))
                raise
            except BaseException:
                self.store.set(key, json.dumps({"crash": True}))
                raise
        self.store.set(key, json.dumps({"result": result}))
        return result

    def _result(self, key: str, what: str):
        beats, last_change, pause = None, time.monotonic(), 0.005
        # Polled (store.wait with a short timeout would log a C++ warning at every timeout): quickly at first,
        # since most of these waits are short, then every half second.
        while not self.store.check([key]):
            time.sleep(pause)
            pause = min(2 * pause, 0.5)
            now = self.store.get(_Heartbeat.KEY) if self.store.check([_Heartbeat.KEY]) else None
            if now != beats:
                beats, last_change = now, time.monotonic()
            elif time.monotonic() - last_change > self.timeout_s:
                raise RunFailed(f"rank 0 stopped answering while {what} (no sign of life for "
                                f"{self.timeout_s:g} s, engine.timeout_s)")
        reply = json.loads(self.store.get(key))
        if "error" in reply:
            raise (RunFailed if reply["code"] == RunFailed.exit_code else UserError)(reply["error"])
        if "crash" in reply:
            raise RunFailed(f"rank 0 failed while {what} (its error is above)")
        return reply["result"]

    # -- a collective that timed out ------------------------------------------------------------------
    def missing_ranks(self, grace_s: float = 5.0) -> list[int] | None:
        """After a collective failed: the ranks that do not answer within ``grace_s`` (None: the store itself
        did not answer). Ranks that are stopped (SIGSTOP) on this host are killed, so that the job ends now
        rather than when the launcher's own shutdown gives up on them."""
        try:
            self.store.set_timeout(timedelta(seconds=grace_s))
            self.store.set(f"dist-train/alive/{self.rank}", "1")
            deadline = time.monotonic() + grace_s
            while True:
                missing = [r for r in range(self.world_size) if not self.store.check([f"dist-train/alive/{r}"])]
                if not missing or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            for r in missing:
                host, pid = self.store.get(f"dist-train/pid/{r}").decode().rsplit(":", 1)
                if host == socket.gethostname() and _stopped(int(pid)):
                    os.kill(int(pid), signal.SIGKILL)
            return missing
        except (dist.DistError, RuntimeError, ValueError):
            return None


class _Heartbeat:
    """While rank 0 works alone, a thread bumps a counter in the store every second: the others wait for as
    long as it moves."""

    KEY = "dist-train/heartbeat"

    def __init__(self, store):
        self.store, self.stop = store, threading.Event()

    def __enter__(self):
        self.thread = threading.Thread(target=self._beat, daemon=True)
        self.thread.start()
        return self

    def _beat(self) -> None:
        while not self.stop.wait(1.0):
            try:
                self.store.add(self.KEY, 1)
            except (dist.DistError, RuntimeError):
                return

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def _stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped (state T in /proc/PID/stat)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def collective_timed_out(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that timed out: some rank did not arrive. (A peer that died instead
    - "Connection closed by peer" - has its own error, which the launcher reports as the root cause.)"""
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(s in text for s in ("Timed out", "timed out", "Timeout"))


class DistributedEngine(Engine):
    """An engine with one process per device in a torch.distributed process group (DDP, DeepSpeed, FSDP)."""

    def __init__(self, precision: str = "fp32", max_grad_norm: float = 0.0, env: DistEnv | None = None,
                 **options):
        self.env = env or DistEnv.from_environ()
        self.rank, self.local_rank, self.world_size = self.env.rank, self.env.local_rank, self.env.world_size
        super().__init__(precision, max_grad_norm, **options)
        self.env.init_process_group(self.device)
        self._serial = 0

    @classmethod
    def options(cls, cfg) -> dict:
        return {**super().options(cfg), "env": DistEnv.from_environ(cfg.engine.timeout_s)}

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def barrier(self) -> None:
        self.env.barrier()

    def run_on_main(self, fn, what: str):
        self._serial += 1  # every rank calls run_on_main in the same order: the serial names the call
        return self.env.run_on_main(fn, what, self._serial)

    def explain_failure(self, exc: BaseException) -> str | None:
        if not collective_timed_out(exc):
            return None
        missing = self.env.missing_ranks()
        who = ("the rendezvous store did not answer either, so which rank is unknown" if missing is None else
               f"rank {', '.join(map(str, missing))} did not answer" if missing else "every rank answered afterwards")
        return (f"a collective operation failed on rank {self.rank} ({' '.join(str(exc).split())[:160]}): {who} "
                f"within engine.timeout_s={self.env.timeout_s:g} s (stopped, hung or dead)")

    def close(self) -> None:
        self.env.destroy()
