"""Turn a GGUF file (llama.cpp's format, often 4-bit) into a plain Hugging Face model folder.

transformers reads GGUF itself and de-quantizes the weights to float32, but a model loaded that way refuses
``save_pretrained``. ``convert_gguf`` loads the file, rebuilds the same model as a plain one, checks every
weight is finite and writes safetensors, config, generation config and tokenizer into a folder beside
``out_dir``, which is swapped in once complete. The result loads with ``AutoModelForCausalLM.from_pretrained``
alone and can be a config's ``model.pretrained``.

Everything that can be wrong with the input (no file, not a GGUF file, a damaged one, an architecture
transformers cannot load, an output folder that is taken or not writable) is found from the file's header
(a fraction of a second, even for a vocabulary of 262,144 tokens), before the slow part.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from dist_train.errors import RunFailed, UserError
from dist_train.paths import check_creatable, written_beside

MAGIC = b"GGUF"

# GGUF value types: fixed-size scalars by struct code; 8 is a string, 9 an array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass
class GgufInfo:
    path: Path
    version: int
    architecture: str
    name: str | None
    tensors: int
    size: int


class _Damaged(Exception):
    pass


class _Header:
    """A cursor over the file's bytes (memory-mapped: nothing past the header is read)."""

    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.buf):
            raise _Damaged("the file ends inside its header")
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self, keep: bool = True) -> str | None:
        length = self.take("Q")
        if self.pos + length > len(self.buf):
            raise _Damaged("the file ends inside its header")
        raw = bytes(self.buf[self.pos:self.pos + length]) if keep else None
        self.pos += length
        return raw.decode("utf-8", errors="replace") if keep else None

    def value(self, kind: int, keep: bool = True):
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string(keep)
        if kind == _ARRAY:
            item, count = self.take("I"), self.take("Q")
            if item in _SCALARS:  # skipped whole: a vocabulary's scores are 262,144 floats
                size = struct.calcsize("<" + _SCALARS[item]) * count
                if self.pos + size > len(self.buf):
                    raise _Damaged("the file ends inside its header")
                self.pos += size
                return None
            if item not in (_STRING, _ARRAY):
                raise _Damaged(f"unknown value type {item}")
            for _ in range(count):
                self.value(item, False)
            return None
        raise _Damaged(f"unknown value type {kind}")


def read_header(path: str | Path) -> GgufInfo:
    """Check ``path`` is a whole GGUF file and read what convert needs from its header.

    Raises UserError for a missing file, a file that is not GGUF (its first bytes), or one whose header is
    damaged or whose tensors run past its end (a truncated copy or download).
    """
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    file = Path(path)
    if not file.exists():
        raise UserError(f"convert: GGUF_FILE '{file}' does not exist; give the path of a .gguf model file")
    if file.is_dir():
        raise UserError(f"convert: GGUF_FILE '{file}' is a folder; give the .gguf file inside it")
    try:
        with open(file, "rb") as fh:
            head = fh.read(4)
            if head != MAGIC:
                raise UserError(f"convert: '{file}' is not a GGUF file (it starts with {head!r}, a GGUF file with "
                                f"{MAGIC!r}); give a .gguf model file, e.g. from llama.cpp")
            size = os.fstat(fh.fileno()).st_size
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(file, buf, size, GGML_QUANT_SIZES, GGMLQuantizationType)
    except PermissionError:
        raise UserError(f"convert: GGUF_FILE '{file}' cannot be read: no read permission") from None
    except _Damaged as exc:
        raise UserError(f"convert: '{file}' is a damaged GGUF file ({exc}); copy or download it again") from None


def _parse(file: Path, buf, size: int, quant_sizes, quant_type) -> GgufInfo:
    h = _Header(buf)
    h.pos = 4
    version = h.take("I")
    if version not in (2, 3):
        raise UserError(f"convert: '{file}' is GGUF version {version}; transformers reads versions 2 and 3 "
                        "(convert the model again with a current llama.cpp)")
    n_tensors, n_kv = h.take("Q"), h.take("Q")
    fields = {}
    for _ in range(n_kv):
        key, kind = h.string(), h.take("I")
        fields[key] = h.value(kind)
    ends = []
    for _ in range(n_tensors):
        name, n_dims = h.string(), h.take("I")
        if n_dims > 4:
            raise _Damaged(f"tensor '{name}' has {n_dims} dimensions")
        count = 1
        for _ in range(n_dims):
            count *= h.take("Q")
        kind, offset = h.take("I"), h.take("Q")
        try:
            block, block_bytes = quant_sizes[quant_type(kind)]
        except (ValueError, KeyError):
            raise _Damaged(f"tensor '{name}' has the unknown type {kind}") from None
        ends.append((offset + count // block * block_bytes, name))
    alignment = fields.get("general.alignment") or 32
    start = -(-h.pos // alignment) * alignment
    if ends:
        end, name = max(ends)
        if start + end > size:
            raise _Damaged(f"{size} bytes, but its tensors (the last: '{name}') need {start + end}")
    architecture = fields.get("general.architecture")
    if not isinstance(architecture, str) or not architecture:
        raise _Damaged("no general.architecture in its metadata")
    name = fields.get("general.name")
    return GgufInfo(file, version, architecture, name if isinstance(name, str) else None, n_tensors, size)


def supported_architectures() -> list[str]:
    """The architectures (transformers' spelling) that this transformers' GGUF loader reads."""
    from transformers.integrations.gguf import GGUF_CONFIG_ARCHS
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted((set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}) | set(GGUF_CONFIG_ARCHS))


def _transformers_spelling(architecture: str) -> str:
    """llama.cpp's name of an architecture as transformers spells it (qwen2moe: qwen2_moe, gpt-oss: gpt_oss)."""
    name = re.sub(r"(\d)moe$", r"\1_moe", architecture.lower().replace("-", "_"))
    return "t5" if name == "t5encoder" else name


def check_architecture(info: GgufInfo) -> None:
    import transformers

    supported = supported_architectures()
    if info.architecture not in supported and _transformers_spelling(info.architecture) not in supported:
        raise UserError(f"convert: '{info.path}' holds a '{info.architecture}' model, which transformers "
                        f"{transformers.__version__} cannot load from GGUF; its GGUF loader supports: "
                        f"{', '.join(supported)}")


def check_out_dir(out: Path, overwrite: bool, gguf_file: Path) -> None:
    """``out`` can take the converted model: a new or empty folder (any folder with ``overwrite``) whose
    parent can be written (the new folder is written beside it, then swapped in)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"convert: OUT_DIR '{out}' is a file; give a new folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"convert: OUT_DIR '{out}' exists and is not empty; choose a new folder, or add "
                        "--overwrite to replace it once the new model is complete")
    if out.is_dir() and gguf_file.resolve().is_relative_to(out.resolve()):
        raise UserError(f"convert: GGUF_FILE '{gguf_file}' is inside OUT_DIR '{out}'; choose another OUT_DIR")
    check_creatable(out, "convert: OUT_DIR")


def convert_gguf(gguf_file: str | Path, out_dir: str | Path, overwrite: bool = False,
                 log=print) -> Path:
    """Write the GGUF model ``gguf_file`` as a plain Hugging Face folder ``out_dir`` (float32 safetensors,
    config, generation config, tokenizer) and return its path.

    Every check on the input and on ``out_dir`` comes first; ``out_dir`` is replaced (``overwrite``) only
    once the new folder is complete, and is left as it was when anything fails.
    """
    src, out = Path(gguf_file), Path(out_dir)
    info = read_header(src)
    check_architecture(info)
    check_out_dir(out, overwrite, src)

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    folder, name = str(src.resolve().parent), src.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except Exception as exc:  # noqa: BLE001 - metadata transformers cannot map fails in many ways
        raise UserError(f"convert: transformers cannot read the model description in '{src}': "
                        f"{first_line(exc)}") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UserError(f"convert: '{src}' holds a {config.model_type} model, which is not a causal language model; "
                        "convert writes decoder-only language models (llama, gemma3, qwen2, ...)")

    start = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"convert: transformers cannot build the tokenizer of '{src}': {first_line(exc)}") from None
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"convert: transformers cannot load the weights of '{src}': {first_line(exc)}") from None
    model = _plain_copy(loaded)
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions and tokenizer.model_max_length > positions:  # GGUF states no limit for the tokenizer
        tokenizer.model_max_length = positions
    generation = getattr(loaded, "generation_config", None)
    del loaded

    from dist_train.model.trainable import nonfinite

    bad = nonfinite(model.state_dict())
    if bad:
        raise RunFailed(f"convert: '{src}' de-quantizes to non-finite values ({', '.join(bad[:3])}"
                        f"{', ...' if len(bad) > 3 else ''}); nothing was written to {out}")
    _write_beside(model, tokenizer, generation, out)
    params = sum(p.numel() for p in model.parameters())
    log(f"converted {src} ({info.architecture}, {params / 1e6:.1f}M parameters, {type(model).__name__}) to {out} "
        f"in {time.perf_counter() - start:.0f} s")
    return out


def _plain_copy(loaded):
    """The same model as a plain one (transformers will not save a model it loaded from GGUF): built from its
    config without the GGUF quantization entry, with every tensor loaded into it."""
    import torch
    from transformers import AutoModelForCausalLM

    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    return model.eval()


def _write_beside(model, tokenizer, generation, out: Path) -> None:
    """Write into ``.NAME.tmp`` beside ``out``, check the weights file, then swap it in."""
    from dist_train.model.files import check_weights

    try:
        with written_beside(out, "the converted model") as tmp:
            if generation is not None:
                model.generation_config = generation
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            check_weights(tmp, "convert")
    except OSError as exc:
        raise RunFailed(f"convert: writing the model failed ({exc.strerror or exc}); {out} was left as it was") from None
