"""PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters, gradients and optimizer state sharded.

Each transformer block is one FSDP unit, then the root (the embeddings and heads that are left), as
torchtitan applies it; the blocks are found from the Hugging Face model's ``_no_split_modules`` class
names, so no model code knows about parallelism. The optimizer is built after sharding, on the DTensor
shards each rank really trains, and steps only its shard. bf16 runs through FSDP's MixedPrecisionPolicy
(bf16 compute copies of the parameters, fp32 sharded master weights, fp32 gradient reduce-scatter) instead
of autocast; ``engine.offload_params`` keeps the shards (and the optimizer step) on CPU.

Checkpoints are torch.distributed.checkpoint (DCP) folders: every rank writes its own shards of the model
and of the Adam state into ``dcp/``, with the LR schedule; DCP re-cuts the shards at load, so a checkpoint
resumes at any world size, and one process reads it whole (``consolidated_state_dict``) without a
process group.

Loading is weights-only. DCP 2.13 reads a checkpoint three ways: tensors (``.distcp``) with
``torch.load(weights_only=True)``, which is safe; but ``.metadata`` with a plain ``pickle.load``, and the
non-tensor entries (optimizer hyperparameters, the scheduler state) with ``torch.load(weights_only=False)``,
either of which runs arbitrary code from a crafted checkpoint. Here ``.metadata`` goes through an
unpickler that admits only DCP's own metadata classes (and ``torch.Size``, dtypes, layouts, paths), and
the non-tensor entries through ``torch.load(weights_only=True)``; anything else is refused with a
UserError naming the checkpoint (tests/test_fsdp.py checks that DCP's own reader would have run the code).
The two overrides lean on private DCP names (``FileSystemReader._get_metadata_path``, ``_StorageInfo``,
``_traverse.set_element``), as of the pinned torch 2.13.
"""

from __future__ import annotations

import collections
import functools
import io
import pathlib
import pickle
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.tensor import DTensor

from dist_train.engine.base import trainable_names
from dist_train.engine.dist_env import DistEnv, DistributedEngine
from dist_train.errors import UserError

DCP_DIR = "dcp"


def shard_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules to shard as units of their own, innermost first (fully_shard goes bottom-up).

    Hugging Face names the blocks a model must not be split inside (``_no_split_modules``: BertLayer,
    GPT2Block, ...); without such names, every child of a ModuleList. A candidate that shares a parameter
    with a module outside it (input embeddings tied to the output projection) stays with the root:
    FSDP2 cannot gather one parameter in two units.
    """
    names = set(getattr(model, "_no_split_modules", None) or ())
    found = [m for m in model.modules() if m is not model and type(m).__name__ in names]
    if not found:
        found = [c for m in model.modules() if isinstance(m, torch.nn.ModuleList) for c in m]
    owners: dict[int, set[int]] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(id(module))
    units = []
    for unit in found:
        inside = {id(m) for m in unit.modules()}
        if all(owners[id(p)] <= inside for p in unit.parameters()):
            units.append(unit)
    return units[::-1]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class FSDPEngine(DistributedEngine):
    checkpoint_format = "dcp"

    def __init__(self, precision: str = "fp32", max_grad_norm: float = 0.0, env: DistEnv | None = None,
                 reshard_after_forward: bool = True, offload_params: bool = False, **options):
        super().__init__(precision, max_grad_norm, env, **options)
        self.reshard_after_forward = reshard_after_forward
        self.offload_params = offload_params
        self.dtype = None  # mixed precision is FSDP's MixedPrecisionPolicy, not autocast

    @classmethod
    def options(cls, cfg) -> dict:
        e = cfg.engine.fsdp
        return {**super().options(cfg), "reshard_after_forward": e.reshard_after_forward,
                "offload_params": e.offload_params}

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.train.precision == "fp16":
            raise UserError("config: train.precision=fp16 is not supported with engine.kind=fsdp (it would need a sharded "
                            "loss scaler); use train.precision=bf16 (no loss scaling needed) or fp32")
        if cfg.train.compile:
            raise UserError("config: train.compile is not supported with engine.kind=fsdp yet; use train.compile=false, "
                            "or engine.kind=ddp / deepspeed to compile")

    # -- set-up -----------------------------------------------------------------------------------------
    def prepare(self, model, make_optimizer=None, make_scheduler=None) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        # bf16: compute copies of the parameters in bf16, the gradient reduce-scatter in fp32 (summed at full
        # precision, as under DDP/ZeRO); the root casts its outputs to fp32, so the loss is computed in fp32
        # as under autocast. Blocks hand bf16 on to the next module unchanged.
        bf16 = self.precision == "bf16"
        block_mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
        root_mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                       output_dtype=torch.float32) if bf16 else None
        offload = CPUOffloadPolicy(pin_memory=self.device.type == "cuda") if self.offload_params else OffloadPolicy()
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        model = model.to(self.device)
        for unit, mp in [*((block, block_mp) for block in shard_units(model)), (model, root_mp)]:
            fully_shard(unit, mesh=mesh, reshard_after_forward=self.reshard_after_forward,
                        mp_policy=mp or MixedPrecisionPolicy(), offload_policy=offload)
            # The loop's loss is already normalised by the global target count: the reduce-scatter must
            # sum over ranks, not average; a plain SUM (gloo has no pre-multiplied sum).
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)
        # FSDP warns that the root returns views (the logits); the loop and the tasks read outputs only out of
        # place, so the lost-hook hazard it warns of cannot occur.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        self.model = model
        if make_optimizer is not None:
            self.optimizer = make_optimizer(model)
            self.scheduler = make_scheduler(self.optimizer)

    # -- the step ---------------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        # Without sync, each unit keeps its unsharded gradient and adds the next micro-batch to it; the last
        # micro-batch of the step reduce-scatters the sum once.
        self.model.set_requires_gradient_sync(sync)
        super().backward(loss)

    def step(self, skip_nonfinite: bool = False) -> torch.Tensor:
        # Gradients are DTensor shards: their norm is a DTensor until reduced over ranks (full_tensor), and
        # clipping every shard by that global norm is clipping the whole gradient.
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.max_grad_norm, norm)
        if not skip_nonfinite or torch.isfinite(norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return norm

    def num_parameters(self, local: bool = False) -> int:
        return sum((_local(p) if local else p).numel() for p in self.model.parameters())

    def optimizer_state_numel(self) -> int:
        return sum(_local(v).numel() for state in self.optimizer.state.values() for v in state.values()
                   if torch.is_tensor(v) and v.dim() > 0)

    # -- state ------------------------------------------------------------------------------------------
    def full_state_dict(self) -> dict | None:
        """The whole model on rank 0 (gathered unit by unit, copied to CPU as it goes); None elsewhere."""
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_main:
            return None
        # Tied weights (input embeddings = output projection) come back as separate copies; make each alias
        # the same tensor again, as in a plain model's state dict, so the export writes it once.
        names: dict[int, list[str]] = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(name)
        for first, *aliases in names.values():
            for alias in aliases:
                full[alias] = full[first]
        return full

    def _options(self) -> StateDictOptions:
        # Frozen parameters (LoRA) are neither saved nor loaded: they come back from model.pretrained. DCP
        # reads exactly the keys asked for (one absent fails the load); strict=False only lets the frozen
        # ones be absent from what it hands to the model.
        frozen = trainable_names(self.model) is not None
        return StateDictOptions(ignore_frozen_params=frozen, strict=not frozen)

    def _state(self, weights_only: bool = False) -> dict:
        if weights_only:
            return {"model": get_model_state_dict(self.model, options=self._options())}
        model, optimizer = get_state_dict(self.model, self.optimizer, options=self._options())
        return {"model": model, "optimizer": optimizer, "scheduler": self.scheduler.state_dict()}

    def save(self, folder: str | Path) -> None:
        _write(Path(folder, DCP_DIR), self._state())

    def load(self, folder: str | Path, weights_only: bool = False) -> None:
        state = self._state(weights_only)
        _read(Path(folder, DCP_DIR), state)
        if weights_only:
            set_model_state_dict(self.model, state["model"], options=self._options())
            return
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"], options=self._options())
        self.scheduler.load_state_dict(state["scheduler"])

    @classmethod
    def consolidated_state_dict(cls, folder: str | Path) -> dict:
        """Whole tensors of the size the metadata records, filled from every rank's shards; no process group."""
        reader = SafeReader(Path(folder, DCP_DIR))
        entries = _unwrapped(reader.path, reader.read_metadata).state_dict_metadata
        model = {key.removeprefix("model."): torch.empty(meta.size, dtype=meta.properties.dtype)
                 for key, meta in entries.items()
                 if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}
        _read(reader.path, {"model": model}, no_dist=True)
        return model


# -- weights-only DCP loading --------------------------------------------------------------------------------
@functools.cache
def _metadata_classes() -> dict[tuple[str, str], object]:
    import torch.distributed.checkpoint.filesystem as fs
    import torch.distributed.checkpoint.metadata as md

    allowed = {(md.__name__, name): getattr(md, name) for name in (
        "Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata", "BytesStorageMetadata",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")}
    allowed[(fs.__name__, "_StorageInfo")] = fs._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    for cls in (pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath):
        allowed[("pathlib", cls.__name__)] = cls
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = _metadata_classes()
        if (module, name) in allowed:
            return allowed[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP checkpoint metadata")


class SafeReader(FileSystemReader):
    """DCP's file reader with ``.metadata`` unpickled against an allow-list (DCP uses plain pickle)."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as file:
            metadata = _MetadataUnpickler(file).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f".metadata holds a {type(metadata).__name__}, not DCP Metadata")
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """DCP's load planner with non-tensor entries read weights-only (DCP uses weights_only=False)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn],
                    torch.load(value, weights_only=True))


def _unwrapped(path: Path, fn, *args, **kwargs):
    """``fn``'s result. DCP wraps every rank's error in a CheckpointException, a BaseException that no caller
    expects: raise the error itself (an OSError for a full disk, say), and a refused unpickling as a
    UserError naming the checkpoint."""
    try:
        return fn(*args, **kwargs)
    except CheckpointException as exc:
        errors = [error for error, _ in exc.failures.values()]
    except pickle.UnpicklingError as exc:
        errors = [exc]
    refused = [e for e in errors if isinstance(e, pickle.UnpicklingError)]
    if refused:
        raise UserError(f"checkpoint '{path}' holds objects other than tensors and DCP metadata "
                        f"({str(refused[0]).splitlines()[0]}); refused to load it (dist-train loads checkpoints "
                        "weights-only)") from None
    raise errors[0] from None


def _write(path: Path, state: dict, no_dist: bool = False) -> None:
    _unwrapped(path, dcp.save, state, storage_writer=FileSystemWriter(path), no_dist=no_dist)


def _read(path: Path, state: dict, no_dist: bool = False) -> None:
    with warnings.catch_warnings():
        # DCP warns on every load without a process group, even when asked for one (no_dist).
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        _unwrapped(path, dcp.load, state, storage_reader=SafeReader(path), planner=SafePlanner(), no_dist=no_dist)
