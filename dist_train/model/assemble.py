"""Build a task's model: pretrained (model/files.py finds and loads it) or from a config, then LoRA, pooling
and the [CLS]-only last layer; ``model.keep_layers`` for a student of a teacher's layers."""

from __future__ import annotations

from dist_train.errors import UserError
from dist_train.model import cls_only
from dist_train.model import pooling as poolings
from dist_train.model.files import first_line, load_pretrained
from dist_train.model.lora import add_adapters


def build_model(model_cfg, auto_class, tokenizer, max_length: int, peft_task_type: str | None = None,
                pooling: str = "cls", announce: bool = True, **head_kwargs):
    """Build ``auto_class`` (e.g. AutoModelForSequenceClassification) from a pretrained folder or a config.

    From scratch, the vocabulary size and the pad/bos/eos ids come from the tokenizer unless the config
    sets them. With ``model.lora`` the pretrained model comes back as a peft LoRA model of
    ``peft_task_type`` (the task's): only the adapters and the fresh head train. ``pooling`` (``cls`` or
    ``mean``, resolved from ``task.pooling``): how a sequence head sees the text (dist_train/model/pooling.py).
    """
    model = _build(model_cfg, auto_class, tokenizer, max_length, peft_task_type, announce, **head_kwargs)
    poolings.apply(model, pooling)
    if pooling == "mean" and model_cfg.cls_only_last_layer is True:
        raise UserError("model.cls_only_last_layer=true needs the [CLS] head, but task.pooling is mean (it reads "
                        "every position of the last layer); set model.cls_only_last_layer=auto")
    cls_only.apply(model, model_cfg.cls_only_last_layer if pooling == "cls" else False)
    return model


def _build(model_cfg, auto_class, tokenizer, max_length: int, peft_task_type: str | None, announce: bool,
           **head_kwargs):
    from transformers import AutoConfig

    if model_cfg.pretrained is not None:
        model, fresh = load_pretrained(model_cfg.pretrained, auto_class, model_cfg.trust_remote_code, **head_kwargs)
        _check_fits(model.config, tokenizer, max_length, "model.pretrained")
        if model_cfg.keep_layers is not None:
            keep_layers(model, model_cfg.keep_layers)
        if getattr(model.config, "pad_token_id", 0) is None and tokenizer.pad_token_id is not None:
            # A decoder's sequence classifier finds each row's last real token through pad_token_id; without
            # it transformers refuses batches of more than one row.
            model.config.pad_token_id = tokenizer.pad_token_id
        if model_cfg.lora is not None:
            model = add_adapters(model, model_cfg.lora, peft_task_type, fresh, announce)
        return model
    kwargs = dict(model_cfg.config)
    model_type = kwargs.pop("model_type")
    kwargs.setdefault("vocab_size", len(tokenizer))
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if getattr(tokenizer, name, None) is not None:
            kwargs.setdefault(name, getattr(tokenizer, name))
    try:
        config = AutoConfig.for_model(model_type, **kwargs, **head_kwargs)
    except Exception as exc:  # noqa: BLE001 - transformers' config validation raises several types
        raise UserError(f"model.config: {' '.join(str(exc).split())}") from None
    _check_fits(config, tokenizer, max_length, "model.config")
    try:
        return auto_class.from_config(config, trust_remote_code=model_cfg.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - transformers validates many keys only when it builds the layers
        raise UserError(f"model.config: transformers cannot build a {model_type} model from it: "
                        f"{first_line(exc)}") from None


LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers")
"""Config keys that hold the number of transformer layers, by model family."""


def keep_layers(model, keep) -> list[int]:
    """Cut ``model`` to the layers ``keep`` names (indices, or an int k: every k-th from the first), in place:
    the transformer's layer list (the module list as long as the config's layer count) and the config."""
    from torch import nn

    config = model.config
    key = next((k for k in LAYER_COUNTS if isinstance(getattr(config, k, None), int)), None)
    if key is None:
        raise UserError(f"model.keep_layers: the {config.model_type} config has no layer count "
                        f"({', '.join(LAYER_COUNTS)}); build a smaller model with model.config instead")
    n = getattr(config, key)
    indices = list(range(0, n, keep)) if isinstance(keep, int) else sorted(keep)
    if max(indices) >= n:
        raise UserError(f"model.keep_layers {keep}: model.pretrained has {n} layers (0..{n - 1})")
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if not found:
        raise UserError(f"model.keep_layers: no list of {n} layers in this {config.model_type} model")
    name, layers = found[0]
    parent, _, attr = name.rpartition(".")
    kept = nn.ModuleList([layers[i] for i in indices])
    setattr(model.get_submodule(parent) if parent else model, attr, kept)
    for new, layer in enumerate(kept):  # decoders index their cache by layer
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new
    setattr(config, key, len(indices))
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in indices]
    return indices


def _check_fits(config, tokenizer, max_length: int, what: str) -> None:
    """The tokenizer's ids and data.max_length positions must exist in the model (else an index error deep
    inside the first forward pass)."""
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise UserError(f"{what}: the model has a vocabulary of {vocab} but the tokenizer has {len(tokenizer)} "
                        "tokens; use the model's own tokenizer, or set vocab_size >= the tokenizer's size")
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if positions is not None and max_length > positions:
        raise UserError(f"data.max_length {max_length} exceeds the model's {positions} positions; lower "
                        f"data.max_length or raise the model's max_position_embeddings / n_positions")
