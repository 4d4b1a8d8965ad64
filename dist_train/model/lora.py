"""LoRA through peft (``model.lora``): frozen pretrained weights, trained low-rank adapters and task head.

The LoRA model is made where the model is built (``models.build_model``), so every engine just sees a model
with some frozen parameters: the optimizer takes the trainable ones (``optim.param_groups``), and the
engines' checkpoints hold only those (the frozen ones come back from ``model.pretrained``). ``final/`` and
``dist-train export`` write a plain Hugging Face model with the adapters merged in; ``--adapter-only``
writes peft's adapter folder instead.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import warnings
from pathlib import Path

import torch

from dist_train.errors import RunFailed, UserError
from dist_train.model.files import load_pretrained
from dist_train.model.trainable import load_trainable, trainable_names

ADAPTER_CONFIG = "adapter_config.json"  # peft's name; in a checkpoint's hf/ it marks a LoRA checkpoint


def is_lora(model) -> bool:
    peft = sys.modules.get("peft")  # never imported: no peft model exists (importing it costs seconds)
    return peft is not None and isinstance(model, peft.PeftModel)


def _targets(model, lora_cfg) -> list[str]:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    if lora_cfg.target_modules is not None:
        return list(lora_cfg.target_modules)
    model_type = getattr(model.config, "model_type", None)
    if model_type not in DEFAULTS:
        linear = sorted({name.rpartition(".")[2] for name, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear)})
        raise UserError(f"model.lora.target_modules: peft has no default LoRA layers for model type "
                        f"'{model_type}'; list them, e.g. model.lora.target_modules=[...] (this model's linear "
                        f"layers: {', '.join(linear[:10])})")
    return list(DEFAULTS[model_type])


@contextlib.contextmanager
def _quiet_peft():
    """Warnings peft gives that ask nothing of the user: GPT-2's attention is a Conv1D (peft notices and
    transposes), and peft asks transformers a question under its deprecated name."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
        yield


def add_adapters(model, lora_cfg, task_type: str, new_keys, announce: bool = True) -> torch.nn.Module:
    """``model`` (just loaded from ``model.pretrained``) as a peft LoRA model: everything frozen but the
    adapters and the modules whose weights ``new_keys`` says were not in the pretrained folder (the fresh
    task head: it must learn, and peft's ``modules_to_save`` keeps it trainable and saves it). ``announce``:
    print what trains (rank 0 only)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(task_type=task_type, r=lora_cfg.r, lora_alpha=lora_cfg.alpha,
                        lora_dropout=lora_cfg.dropout, target_modules=_targets(model, lora_cfg),
                        modules_to_save=sorted({k.rpartition(".")[0] for k in new_keys if "." in k}) or None)
    try:
        with _quiet_peft():
            peft_model = get_peft_model(model, config)
    except ValueError as exc:  # a target that matches no layer
        raise UserError(f"model.lora.target_modules: {' '.join(str(exc).split())[:300]}") from None
    if announce:
        trainable, total = peft_model.get_nb_trainable_parameters()
        print(f"dist-train: LoRA r={lora_cfg.r} on {', '.join(sorted(config.target_modules))}: {trainable:,} of "
              f"{total:,} parameters train ({100 * trainable / total:.2f}%)", flush=True)
    return peft_model


def merged_copy(model, state_dict: dict) -> torch.nn.Module:
    """A plain transformers model: LoRA ``model`` with its adapters merged into the base weights, made of
    ``state_dict`` (all of ``model``'s tensors: on ZeRO-3 gathered, elsewhere its own). ``model`` itself is
    untouched and keeps training or evaluating: the skeleton is built on the meta device and takes the tensors
    as its own, except the weights the merge writes into (every LoRA layer's ``base_layer``), which it takes as
    copies: peft >= 0.22 merges into the existing tensor even in safe mode, which would add the adapters to
    the live model's frozen weights a second time."""
    from peft import get_peft_model

    base = model.get_base_model()
    with torch.device("meta"), _quiet_peft():
        skeleton = get_peft_model(type(base)(copy.deepcopy(base.config)), copy.deepcopy(model.peft_config["default"]))
    own = {k: v.clone() if ".base_layer." in k else v for k, v in state_dict.items()}
    skeleton.load_state_dict(own, strict=True, assign=True)
    return merge(skeleton)


def merge(model) -> torch.nn.Module:
    """peft's ``merge_and_unload``, safe mode: every merged weight is checked finite before it is written
    (into ``model``'s own tensors: ``model`` is consumed)."""
    try:
        plain = model.merge_and_unload(safe_merge=True)
    except ValueError:
        raise RunFailed("merging the LoRA adapters into the base weights gave non-finite values; nothing was "
                        "exported; lower train.lr or export an earlier checkpoint") from None
    plain.tie_weights()
    return plain


def rebuild(pretrained: str, trust_remote_code: bool, description: Path, auto_class, config, state_dict: dict,
            where: Path) -> torch.nn.Module:
    """The LoRA model of a checkpoint (``where``), in one process: the frozen base from ``pretrained`` with the
    run's head config, the adapters as ``description`` (its ``adapter_config.json``) records them, and the
    checkpoint's trained tensors (exactly those, else a UserError)."""
    from peft import PeftConfig, get_peft_model

    base, _ = load_pretrained(pretrained, auto_class, trust_remote_code, config=config)
    with _quiet_peft():
        model = get_peft_model(base, PeftConfig.from_pretrained(str(description)))
    load_trainable(model, state_dict, trainable_names(model), where)
    return model
