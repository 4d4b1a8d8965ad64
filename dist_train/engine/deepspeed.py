"""DeepSpeed ZeRO (stages 0-3, optional CPU offload) behind the engine interface.

The DeepSpeed config is generated from ours (one source of truth); ``engine.deepspeed`` may add keys but
not contradict them. The LR schedule stays ours (a client scheduler), so DeepSpeed runs follow exactly the
same LR as single and DDP runs. bf16 runs as torch autocast over fp32 weights (fp32 master weights and
fp32 gradient accumulation at every stage); fp16 (GPU only) uses DeepSpeed's dynamic loss scaling.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from argparse import Namespace
from pathlib import Path

import torch

from dist_train.engine.base import load_trainable, trainable_names
from dist_train.engine.dist_env import DistEnv, DistributedEngine
from dist_train.engine.options import use_deepspeed_cpu_accelerator
from dist_train.errors import UserError

TAG = "deepspeed"


def _merge(base: dict, extra: dict, prefix: str = "") -> dict:
    """``extra`` added into ``base``; a key both set to different values is an error naming both."""
    out = dict(base)
    for key, value in extra.items():
        where = f"{prefix}{key}"
        if key in out and isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = _merge(out[key], value, where + ".")
        elif key in out and out[key] != value:
            raise UserError(f"config: engine.deepspeed.config.{where}={value!r} conflicts with {out[key]!r}, which dist-train "
                            "sets from the config; change the dist-train key instead (train.*, engine.*)")
        else:
            out[key] = value
    return out


def deepspeed_config(cfg, world_size: int) -> dict:
    t, e = cfg.train, cfg.engine.deepspeed
    zero: dict = {"stage": e.zero_stage}
    if e.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if e.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    ds = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": zero,
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _merge(ds, e.config or {})


class DeepSpeedEngine(DistributedEngine):
    checkpoint_format = "deepspeed"

    def __init__(self, cfg, precision: str = "fp32", max_grad_norm: float = 0.0, env: DistEnv | None = None,
                 **options):
        super().__init__(precision, max_grad_norm, env or DistEnv.from_environ(cfg.engine.timeout_s), **options)
        use_deepspeed_cpu_accelerator()
        self.scaler = None  # fp16 loss scaling is DeepSpeed's own
        if precision == "fp16":
            self.dtype = None  # DeepSpeed keeps fp16 weights itself; no autocast on top
        import deepspeed

        deepspeed.init_distributed(dist_backend=self.env.backend(self.device), timeout=None)
        self.ds_config = deepspeed_config(cfg, self.world_size)
        self.offload = cfg.engine.deepspeed.offload_optimizer
        # The model is built whole (not under zero.Init) and ZeRO-3 partitions it in initialize(): its
        # initial weights are then exactly those of every other engine under the same seed.

    @classmethod
    def from_config(cls, cfg) -> "DeepSpeedEngine":
        return cls(cfg, **cls.options(cfg))

    @classmethod
    def check_config(cls, cfg) -> None:
        e = cfg.engine.deepspeed
        if e.zero_stage not in (0, 1, 2, 3):
            raise UserError(f"config: engine.deepspeed.zero_stage must be 0, 1, 2 or 3, got {e.zero_stage}")
        if e.offload_optimizer and e.zero_stage < 1:
            raise UserError("config: engine.deepspeed.offload_optimizer needs engine.deepspeed.zero_stage >= 1")
        if e.offload_params and e.zero_stage != 3:
            raise UserError("config: engine.deepspeed.offload_params needs engine.deepspeed.zero_stage=3")
        if cfg.train.max_nonfinite_steps > 0 and e.zero_stage == 0:
            # ZeRO 1-3 drop a step whose gradient norm is not finite inside their own step(); stage 0 hands
            # the gradients to a plain optimizer and cannot be told to skip.
            raise UserError("config: train.max_nonfinite_steps > 0 needs engine.deepspeed.zero_stage >= 1 "
                            "(ZeRO-0 cannot skip a step); use zero_stage 1-3, engine.kind=ddp, or "
                            "max_nonfinite_steps=0")

    def prepare(self, model, make_optimizer=None, make_scheduler=None) -> None:
        import deepspeed

        zero = self.ds_config["zero_optimization"]
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        if zero["stage"] == 3 and hidden:
            # DeepSpeed's fixed ZeRO-3 bucket defaults (5e8 elements) allocate ~2 GB per rank even for a
            # small model; size them to the model as transformers' "auto" values do (user keys win).
            zero.setdefault("reduce_bucket_size", hidden * hidden)
            zero.setdefault("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden))
            zero.setdefault("stage3_param_persistence_threshold", 10 * hidden)

        def optimizer(_params):  # DeepSpeed calls this; ours groups parameters by name and module type
            built = make_optimizer(model)
            if not self.offload:
                return built
            # Offloaded optimizer state lives on CPU and steps there with DeepSpeed's CPU Adam.
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            d = built.defaults
            return DeepSpeedCPUAdam(built.param_groups, lr=d["lr"], betas=d["betas"], eps=d["eps"], adamw_mode=True)

        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer if make_optimizer else None, config=self.ds_config)
        self.model = self.ds.module
        if self.compile_backend:
            self.ds.compile(backend=self.compile_backend)  # DeepSpeed's own: it knows where ZeRO-3 hooks sit
        if make_scheduler is not None:
            # Our schedule, on the torch optimizer DeepSpeed finally steps (ZeRO wraps and regroups it), stepped
            # by us: every engine follows the same LR step for step.
            self.scheduler = make_scheduler(self.torch_optimizer())

    def torch_optimizer(self) -> torch.optim.Optimizer:
        opt = self.optimizer
        while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
            opt = opt.optimizer  # ZeRO optimizers wrap the torch one
        return opt

    def num_parameters(self, local: bool = False) -> int:
        # ZeRO-3 leaves an empty placeholder in each parameter: ds_numel is its full size, ds_tensor this
        # rank's shard.
        return sum((p.ds_tensor.numel() if local else p.ds_numel) if hasattr(p, "ds_tensor") else p.numel()
                   for p in self.unwrapped.parameters())

    def forward(self, **inputs):
        with self.autocast():
            return self.ds(**inputs)

    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        # DeepSpeed averages gradients over data-parallel ranks and (by default) divides by the
        # accumulation steps; our loss is already the global mean's share, so undo both.
        self.ds.set_gradient_accumulation_boundary(sync)
        self.ds.backward(loss * self.world_size, scale_wrt_gas=False)
        if not sync:
            self.ds.step()  # a no-op between boundaries; keeps DeepSpeed's micro-step count in line

    def step(self, skip_nonfinite: bool = False) -> torch.Tensor:
        # Clip, optimizer step, zero grads (at the boundary). ZeRO 1-3 drop a step whose gradient norm is
        # not finite by themselves (check_config refuses skipping at stage 0).
        self.ds.step()
        self.scheduler.step()
        norm = self.ds.get_global_grad_norm()
        return torch.as_tensor(0.0 if norm is None else float(norm))

    def train(self, mode: bool = True) -> None:
        self.ds.train(mode)

    def full_state_dict(self) -> dict | None:
        """The whole model's weights on rank 0 (gathered from ZeRO-3 shards); None on other ranks."""
        if not self.ds.zero_optimization_partition_weights():
            return super().full_state_dict()
        import deepspeed

        module = self.ds.module
        keys = set(module.state_dict().keys())  # names only: ZeRO-3 parameters are empty placeholders here
        full = {}
        for prefix, sub in module.named_modules():
            # One module at a time (a collective on every rank): the whole model is never gathered at once.
            with deepspeed.zero.GatheredParameters(list(sub.parameters(recurse=False))):
                if self.is_main:
                    for name, tensor in [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]:
                        key = f"{prefix}.{name}" if prefix else name
                        if key in keys:
                            full[key] = tensor.detach().cpu().clone()
        return full if self.is_main else None

    def save(self, folder: str | Path) -> None:
        # Our LR schedule is not DeepSpeed's, so its state travels as client state. Frozen parameters (LoRA)
        # stay out: they come back from model.pretrained.
        self.ds.save_checkpoint(str(folder), tag=TAG, client_state={"scheduler": self.scheduler.state_dict()},
                                exclude_frozen_parameters=trainable_names(self.ds.module) is not None)

    def load(self, folder: str | Path, weights_only: bool = False) -> None:
        folder = Path(folder)
        saved_world = len(list((folder / TAG).glob("*optim_states.pt")))
        # ZeRO partitions optimizer state by world size. At another world size, convert the checkpoint to
        # DeepSpeed's universal format (fp32 weights and Adam moments per parameter) and load that.
        resharded = self.ds.zero_optimization() and saved_world != self.world_size
        if resharded and weights_only:
            return self._load_weights(fp32_state_dict(folder))
        source = folder.parent / f".universal-{folder.name}" if resharded else folder
        if resharded:
            if self.is_main:
                to_universal(folder / TAG, source / TAG)
            self.barrier()
        # DeepSpeed's ZeRO-3 universal load copies param group 0's hyperparameters into every group, which
        # would give the no-decay group (biases, norms) weight decay; they are the config's, so keep ours.
        groups = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in self.torch_optimizer().param_groups]
        names = trainable_names(self.ds.module)
        # A trainable-only checkpoint must hold exactly the trained parameters (DeepSpeed's strict load would
        # ask for the frozen ones too).
        only_trained = None if names is None else lambda src, dst: load_trainable(dst, src, names, folder)
        try:
            with weights_only_loads(), universal_loading(self.ds, resharded):
                _, client = self.ds.load_checkpoint(str(source), tag=TAG, load_module_only=weights_only,
                                                    load_optimizer_states=not weights_only,
                                                    load_lr_scheduler_states=False, custom_load_fn=only_trained)
        finally:
            if resharded:
                self.barrier()
                if self.is_main:
                    shutil.rmtree(source, ignore_errors=True)
        for group, hyper in zip(self.torch_optimizer().param_groups, groups):
            group.update(hyper)
        # The same universal load gives every parameter group one shared `step` tensor, which Adam then
        # increments once per group per step (wrong bias correction); give each its own.
        for state in self.torch_optimizer().state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
        if not weights_only:
            self.scheduler.load_state_dict(client["scheduler"])

    @classmethod
    def consolidated_state_dict(cls, folder: str | Path) -> dict:
        return fp32_state_dict(folder)

    def _load_weights(self, state_dict: dict) -> None:
        """Copy full weights into the (possibly ZeRO-3 partitioned) model; optimizer state is untouched."""
        import deepspeed

        trained = trainable_names(self.ds.module)  # None: all; else the checkpoint holds only these
        params = {n: p for n, p in self.ds.module.named_parameters() if trained is None or n in trained}
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0,
                                               enabled=self.ds.zero_optimization_partition_weights()):
            with torch.no_grad():
                for name, param in params.items():
                    param.copy_(state_dict[name].to(param.dtype))


def to_universal(src: Path, dst: Path) -> None:
    """DeepSpeed's own converter (ds_to_universal), run in this process."""
    from deepspeed.checkpoint import ds_to_universal

    shutil.rmtree(dst.parent, ignore_errors=True)
    args = Namespace(input_folder=str(src), output_folder=str(dst), num_extract_workers=1, num_merge_workers=1,
                     keep_temp_folder=False, strict=True, inject_missing_state=True)
    with weights_only_loads(), open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), \
            contextlib.redirect_stderr(quiet):
        ds_to_universal.main(args)


@contextlib.contextmanager
def universal_loading(ds, enabled: bool):
    """Make ``ds.load_checkpoint`` read DeepSpeed's universal format.

    The one private DeepSpeed attribute dist-train touches: DeepSpeed decides the format from its config
    (``checkpoint.load_universal``), fixed when the engine is built, while dist-train learns only at load
    time that the world size changed. The DeepSpeed versions this was tested with are pinned in
    pyproject.toml.
    """
    if not enabled:
        yield
        return
    ds._config.load_universal_checkpoint = True
    try:
        yield
    finally:
        ds._config.load_universal_checkpoint = False


@contextlib.contextmanager
def weights_only_loads():
    """Make DeepSpeed's checkpoint loads weights-only (it asks torch.load for weights_only=False).

    Its files hold tensors, plain containers and three of DeepSpeed's plain data classes; those are
    allow-listed, nothing else can be unpickled.
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    original = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
        torch.load = load
        try:
            yield
        finally:
            torch.load = original


def fp32_state_dict(folder: str | Path) -> dict:
    """The full fp32 weights of a DeepSpeed checkpoint of any ZeRO stage, in one process, no process group."""
    folder = Path(folder)
    use_deepspeed_cpu_accelerator()
    with weights_only_loads():
        if not list((folder / TAG).glob("*optim_states.pt")):  # stage 0: the module is whole in one file
            return torch.load(folder / TAG / "mp_rank_00_model_states.pt", map_location="cpu")["module"]
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=TAG)
