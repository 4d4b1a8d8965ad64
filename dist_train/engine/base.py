"""The engine interface: everything the training loop may ask of "how processes train together".

The loop only calls these methods; one process, DDP, DeepSpeed and FSDP differ behind them, never in the
loop. An engine owns the optimizer and the LR schedule (it builds them from the loop's factories, on the
parameters it really trains) and its checkpoint format (what ``save`` writes, what ``load`` reads, and how
a checkpoint becomes one whole state dict for export).
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from dist_train.errors import UserError
from dist_train.model.trainable import load_trainable, trainable_names  # noqa: F401 - the engines' checkpoints

MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.pt"
SCHED_FILE = "scheduler.pt"
SCALER_FILE = "scaler.pt"

MakeOptimizer = Callable[[torch.nn.Module], torch.optim.Optimizer]
MakeScheduler = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


def cpu_has_native_bf16() -> bool | None:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); None where it cannot be told."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_device(local_rank: int = 0) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


class Engine:
    """Base engine: one model replica per process, plain torch optimizer, autocast mixed precision."""

    rank = 0
    local_rank = 0
    world_size = 1
    checkpoint_format = "torch"
    """What ``save`` writes; a checkpoint resumes only on an engine of the same format (any world size)."""

    def __init__(self, precision: str = "fp32", max_grad_norm: float = 0.0, tf32: bool = True,
                 compile_backend: str | None = None):
        self.device = pick_device(self.local_rank)
        if self.device.type == "cuda":
            # Process-wide; only on GPU processes, so CPU matmuls stay IEEE fp32. (The legacy call, not the
            # per-backend fp32_precision flags: mixing the two APIs makes torch.get_float32_matmul_precision raise.)
            torch.set_float32_matmul_precision("high" if tf32 else "highest")
        self.compile_backend = compile_backend
        if precision == "fp16" and self.device.type != "cuda":
            raise UserError("train.precision=fp16 needs a CUDA GPU; on CPU use train.precision=bf16 (or fp32)")
        self.precision = precision
        if precision == "bf16" and self.device.type == "cpu" and cpu_has_native_bf16() is False and self.is_main:
            warnings.warn("train.precision=bf16 on a CPU without native bf16 (no avx512_bf16/amx_bf16 in "
                          "/proc/cpuinfo): autocast emulates it and ran ~18x slower than fp32 on such a CPU; "
                          "consider train.precision=fp32", stacklevel=2)
        self.max_grad_norm = max_grad_norm
        self.dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        # fp16 needs dynamic loss scaling (small gradients underflow); bf16 has fp32's range and does not.
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None
        self.model = self.optimizer = self.scheduler = None

    @classmethod
    def options(cls, cfg) -> dict:
        """Constructor arguments every engine takes from the config."""
        t = cfg.train
        return {"precision": t.precision, "max_grad_norm": t.max_grad_norm, "tf32": t.tf32,
                "compile_backend": t.compile_backend if t.compile else None}

    @classmethod
    def from_config(cls, cfg) -> "Engine":
        return cls(**cls.options(cfg))

    @classmethod
    def check_config(cls, cfg) -> None:
        """Refuse settings this engine cannot honour (a UserError), before anything is built."""

    @classmethod
    def can_resume(cls, checkpoint_format: str) -> bool:
        return checkpoint_format == cls.checkpoint_format

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- set-up -----------------------------------------------------------------------------------------
    def prepare(self, model: torch.nn.Module, make_optimizer: MakeOptimizer | None = None,
                make_scheduler: MakeScheduler | None = None) -> None:
        """Take the model (moved to this process's device) and build its optimizer and LR schedule.

        Without factories the engine only runs the model (evaluation, prediction).
        """
        self.model = model.to(self.device)
        if self.compile_backend:
            # In place: state-dict keys, export and checkpoints stay those of the plain model.
            self.model.compile(backend=self.compile_backend)
        if make_optimizer is not None:
            self.optimizer = make_optimizer(self.model)
            self.scheduler = make_scheduler(self.optimizer)

    @property
    def unwrapped(self) -> torch.nn.Module:
        """The plain model (for export and state dicts), without any distributed wrapper."""
        return self.model

    # -- the step ---------------------------------------------------------------------------------------
    def autocast(self):
        """Forward passes run under this context (mixed precision when asked for; master weights stay fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def forward(self, **inputs):
        with self.autocast():
            return self.model(**inputs)

    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        """Accumulate gradients of ``loss``; ``sync`` is False for all but the last micro-batch of a step."""
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, skip_nonfinite: bool = False) -> torch.Tensor:
        """Clip, apply the optimizer and LR schedule, zero the gradients; returns the pre-clip gradient norm.

        ``skip_nonfinite``: when the (global) gradient norm is not finite, drop the gradients instead of
        applying them; the LR schedule still advances, so a skipped step is still a step. This reads the
        norm on the host (one sync), which is why it is only asked for when skipping is allowed.
        """
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        limit = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, limit)
        if skip_nonfinite and not torch.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler:
                self.scaler.update()  # the scaler saw the inf and lowers its scale, as after its own skip
        else:
            if self.scaler:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return norm

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def num_parameters(self, local: bool = False) -> int:
        """Parameter elements of the model; ``local``: only those this rank holds (sharded engines)."""
        return sum(p.numel() for p in self.unwrapped.parameters())

    def torch_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer that finally steps (a sharding engine may wrap it)."""
        return self.optimizer

    def optimizer_state_numel(self) -> int:
        """Elements of optimizer state (Adam moments) held by this rank."""
        seen = 0
        for state in self.torch_optimizer().state.values():
            seen += sum(v.numel() for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
        return seen

    # -- collectives ------------------------------------------------------------------------------------
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of ``tensor`` over all processes (returned; the input may be reused)."""
        return tensor

    def barrier(self) -> None:
        pass

    def run_on_main(self, fn, what: str):
        """Rank 0 runs ``fn`` (writing files, say) while the others wait for it; every rank returns its
        (JSON) result, and a UserError on rank 0 is raised on every rank. ``what`` names the work in the
        message if rank 0 stops answering."""
        return fn()

    def explain_failure(self, exc: BaseException) -> str | None:
        """If ``exc`` is a collective that timed out: one line saying which ranks did not answer."""
        return None

    # -- state ------------------------------------------------------------------------------------------
    def full_state_dict(self) -> dict | None:
        """The whole model's weights on the main process (None elsewhere); every rank must call it."""
        return self.unwrapped.state_dict() if self.is_main else None

    def save(self, folder: str | Path) -> None:
        """Write model (its trained parameters), optimizer, scheduler (and loss-scaler) state into ``folder``."""
        folder = Path(folder)
        if not self.is_main:
            return
        names = trainable_names(self.unwrapped)
        if names is None:
            save_model(self.unwrapped, str(folder / MODEL_FILE))
        else:
            save_file({n: p.detach().contiguous() for n, p in self.unwrapped.named_parameters() if n in names},
                      str(folder / MODEL_FILE))
        torch.save(self.optimizer.state_dict(), folder / OPTIM_FILE)
        torch.save(self.scheduler.state_dict(), folder / SCHED_FILE)
        if self.scaler:
            torch.save(self.scaler.state_dict(), folder / SCALER_FILE)

    def load(self, folder: str | Path, weights_only: bool = False) -> None:
        """Restore what ``save`` wrote; ``weights_only`` restores just the model weights."""
        folder = Path(folder)
        names = trainable_names(self.unwrapped)
        if names is None:
            load_model(self.unwrapped, str(folder / MODEL_FILE), device=str(self.device))
        else:
            load_trainable(self.unwrapped, load_file(str(folder / MODEL_FILE), device=str(self.device)), names, folder)
        if weights_only:
            return
        self.optimizer.load_state_dict(torch.load(folder / OPTIM_FILE, weights_only=True, map_location=self.device))
        self.scheduler.load_state_dict(torch.load(folder / SCHED_FILE, weights_only=True))
        if self.scaler:
            self.scaler.load_state_dict(torch.load(folder / SCALER_FILE, weights_only=True))

    @classmethod
    def consolidated_state_dict(cls, folder: str | Path) -> dict:
        """The whole model's weights from a checkpoint of this format, read in this one process (a model with
        frozen parameters: the trained ones)."""
        return load_file(str(Path(folder, MODEL_FILE)))

    def close(self) -> None:
        pass
