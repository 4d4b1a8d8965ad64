"""`dist-train convert`: a GGUF file becomes a plain Hugging Face folder with the same weights, logits and
tokenizer. The GGUF files are written here with the `gguf` package (tiny gemma3 and llama models, F32
tensors, the tokenizer metadata transformers' GGUF loader reads)."""

from __future__ import annotations

import errno
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli, snapshot

gguf = pytest.importorskip("gguf")

TEXT = "The cat sat on the mat, 42 times!"



def _writer(path, arch: str, hidden: int, layers: int, inter: int, heads: int, kv: int):
    """A GGUF writer with the hyperparameters every architecture here declares alike."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny {arch}")
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    return w

def _tensor(rng, *shape):
    return (rng.standard_normal(shape) * 0.1).astype(np.float32)


def write_gemma3(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """A 2-layer gemma3 (width 64) with a sentencepiece-style vocabulary of 342 tokens (byte fallback)."""
    rng = np.random.default_rng(seed)
    hidden, inter, layers, heads, kv, head_dim = 64, 128, 2, 4, 2, 16
    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    pieces = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-") + ["\u2581"]
    pieces += ["\u2581t", "\u2581th", "\u2581the", "he", "in", "\u2581a", "er", "an", "on", "\u2581c", "at", "is"]
    tokens = special + byte_tokens + pieces
    w = _writer(path, "gemma3", hidden, layers, inter, heads, kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_sliding_window(32)
    w.add_file_type(0)  # all F32
    w.add_tokenizer_model("llama")  # sentencepiece; transformers builds Gemma's tokenizer for a gemma3 file
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([-1000.0] * len(special) + [0.0] * (len(tokens) - len(special)))
    w.add_token_types([3] * len(special) + [6] * 256 + [1] * len(pieces))  # control, byte, normal
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    tensors = {"token_embd.weight": _tensor(rng, len(tokens), hidden), "output_norm.weight": 1 + _tensor(rng, hidden)}
    for i in range(layers):
        b = f"blk.{i}."
        tensors.update({
            b + "attn_norm.weight": 1 + _tensor(rng, hidden),
            b + "attn_q.weight": _tensor(rng, heads * head_dim, hidden),
            b + "attn_k.weight": _tensor(rng, kv * head_dim, hidden),
            b + "attn_v.weight": _tensor(rng, kv * head_dim, hidden),
            b + "attn_output.weight": _tensor(rng, hidden, heads * head_dim),
            b + "attn_q_norm.weight": 1 + _tensor(rng, head_dim),
            b + "attn_k_norm.weight": 1 + _tensor(rng, head_dim),
            b + "post_attention_norm.weight": 1 + _tensor(rng, hidden),
            b + "ffn_norm.weight": 1 + _tensor(rng, hidden),
            b + "ffn_gate.weight": _tensor(rng, inter, hidden),
            b + "ffn_up.weight": _tensor(rng, inter, hidden),
            b + "ffn_down.weight": _tensor(rng, hidden, inter),
            b + "post_ffw_norm.weight": 1 + _tensor(rng, hidden),
        })
    _finish(w, tensors)
    return tensors


def write_llama(path: Path, seed: int = 1) -> dict[str, np.ndarray]:
    """A 2-layer llama (width 64, untied output) with a byte-level BPE vocabulary (every byte, six merges)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(seed)
    hidden, inter, layers, heads, kv = 64, 128, 2, 4, 2
    head_dim = hidden // heads
    merged = ["\u0120t", "\u0120th", "\u0120the", "he", "in", "at"]
    tokens = ["<|begin|>", "<|end|>"] + list(bytes_to_unicode().values()) + merged
    w = _writer(path, "llama", hidden, layers, inter, heads, kv)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types([3, 3] + [1] * (len(tokens) - 2))
    w.add_token_merges(["\u0120 t", "\u0120t h", "\u0120th e", "h e", "i n", "a t"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_add_bos_token(True)
    tensors = {"token_embd.weight": _tensor(rng, len(tokens), hidden), "output_norm.weight": 1 + _tensor(rng, hidden),
               "output.weight": _tensor(rng, len(tokens), hidden)}
    for i in range(layers):
        b = f"blk.{i}."
        tensors.update({
            b + "attn_norm.weight": 1 + _tensor(rng, hidden),
            b + "attn_q.weight": _tensor(rng, hidden, hidden),
            b + "attn_k.weight": _tensor(rng, kv * head_dim, hidden),
            b + "attn_v.weight": _tensor(rng, kv * head_dim, hidden),
            b + "attn_output.weight": _tensor(rng, hidden, hidden),
            b + "ffn_norm.weight": 1 + _tensor(rng, hidden),
            b + "ffn_gate.weight": _tensor(rng, inter, hidden),
            b + "ffn_up.weight": _tensor(rng, inter, hidden),
            b + "ffn_down.weight": _tensor(rng, hidden, inter),
        })
    _finish(w, tensors)
    return tensors


def _finish(w, tensors: dict) -> None:
    for name, t in tensors.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def header_only(architecture: str) -> bytes:
    """A GGUF file with one key (general.architecture) and no tensors."""
    key, value = b"general.architecture", architecture.encode()
    return (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
            + struct.pack("<IQ", 8, len(value)) + value)


def reference(gguf_file: Path):
    """What transformers itself makes of the file: (tokenizer, model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    return (AutoTokenizer.from_pretrained(folder, gguf_file=name),
            AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32))


def check_same_model(gguf_file: Path, out: Path) -> tuple:
    """``out`` loads in plain transformers and is the file's model: every tensor, the logits, the tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, model = reference(gguf_file)
    plain_tok, plain = AutoTokenizer.from_pretrained(out), AutoModelForCausalLM.from_pretrained(out)
    assert not hasattr(plain.config, "quantization_config")
    assert plain.dtype == torch.float32
    want, got = model.state_dict(), plain.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    ids = plain_tok(TEXT, return_tensors="pt")
    assert ids.input_ids.tolist() == tok(TEXT, return_tensors="pt").input_ids.tolist()
    assert plain_tok.decode(ids.input_ids[0], skip_special_tokens=True) == TEXT
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, plain(**ids).logits)
    assert plain_tok.model_max_length == plain.config.max_position_embeddings == 128
    return plain, got


@pytest.mark.slow
def test_convert_gemma3_through_the_cli(tmp_path):
    src = tmp_path / "tiny-gemma3.gguf"
    tensors = write_gemma3(src)
    out = tmp_path / "models" / "tiny"
    result = run_cli("convert", src, out, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"to {out}" in result.stdout and "Gemma3ForCausalLM" in result.stdout
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]  # nothing left beside it
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in out.iterdir()}
    plain, got = check_same_model(src, out)
    assert type(plain).__name__ == "Gemma3ForCausalLM" and plain.config.num_hidden_layers == 2
    # The written tensors themselves: Gemma's norms are stored as 1 + weight in GGUF.
    assert np.array_equal(got["model.embed_tokens.weight"].numpy(), tensors["token_embd.weight"])
    assert np.array_equal(got["model.layers.1.mlp.down_proj.weight"].numpy(), tensors["blk.1.ffn_down.weight"])
    assert np.allclose(got["model.layers.0.input_layernorm.weight"].numpy(), tensors["blk.0.attn_norm.weight"] - 1)
    # Usable as model.pretrained in a config.
    from transformers import AutoModelForCausalLM

    from dist_train.model.files import load_pretrained, load_tokenizer

    model, fresh = load_pretrained(str(out), AutoModelForCausalLM)
    assert not fresh and load_tokenizer(str(out)).pad_token == "<pad>"


def test_convert_llama_with_a_byte_level_tokenizer(tmp_path):
    from dist_train.model.gguf import convert_gguf

    src = tmp_path / "tiny-llama.gguf"
    tensors = write_llama(src)
    out = convert_gguf(src, tmp_path / "llama", log=lambda line: None)
    plain, got = check_same_model(src, out)
    assert not plain.config.tie_word_embeddings
    assert np.array_equal(got["lm_head.weight"].numpy(), tensors["output.weight"])
    # transformers undoes llama.cpp's row permutation of the query and key projections.
    q = tensors["blk.0.attn_q.weight"]
    assert not np.array_equal(got["model.layers.0.self_attn.q_proj.weight"].numpy(), q)
    assert np.array_equal(np.sort(got["model.layers.0.self_attn.q_proj.weight"].numpy(), axis=None), np.sort(q, axis=None))


def test_overwrite_replaces_only_a_complete_folder(tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    from dist_train.errors import RunFailed, UserError
    from dist_train.model.gguf import convert_gguf

    src, out = tmp_path / "a.gguf", tmp_path / "out"
    write_gemma3(src)
    out.mkdir()
    (out / "keep.txt").write_text("an earlier model")
    with pytest.raises(UserError, match="exists and is not empty"):
        convert_gguf(src, out)
    before = snapshot(tmp_path)

    def full_disk(self, folder, **kwargs):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    with pytest.raises(RunFailed, match="disk full: writing the converted model"):
        convert_gguf(src, out, overwrite=True, log=lambda line: None)
    assert snapshot(tmp_path) == before  # the old folder as it was, nothing half-written beside it
    monkeypatch.undo()
    convert_gguf(src, out, overwrite=True, log=lambda line: None)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "out"]


@pytest.mark.parametrize("make, fragment", [
    (lambda p: p.write_bytes(header_only("bert")), "holds a 'bert' model, which transformers"),
    (lambda p: p.write_bytes(header_only("bert")), "cannot load from GGUF; its GGUF loader supports: bloom, "),
    (lambda p: p.write_bytes(header_only("t5")), "is not a causal language model"),
    (lambda p: p.write_bytes(b"GGUF" + struct.pack("<I", 1)), "GGUF version 1"),
    (lambda p: p.write_bytes(header_only("llama")[:-3]), "is a damaged GGUF file (the file ends inside its header)"),
    ("truncated", "is a damaged GGUF file"),
    ("inside", "is inside OUT_DIR"),
], ids=["architecture", "architecture-list", "not-causal", "version", "header-cut", "truncated", "gguf-inside-out-dir"])
def test_bad_gguf_is_one_line(tmp_path, make, fragment, capfd):
    from launcher.cli import main

    src, out = tmp_path / "model.gguf", tmp_path / "out"
    if make == "truncated":
        write_gemma3(src)
        src.write_bytes(src.read_bytes()[:-1000])
    elif make == "inside":
        out.mkdir()
        src = out / "model.gguf"
        write_gemma3(src)
    else:
        make(src)
    before = snapshot(tmp_path)
    code = main(["convert", str(src), str(out)] + (["--overwrite"] if make == "inside" else []))
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("dist-train: error: convert: ") and fragment in lines[0], lines[0]
    assert snapshot(tmp_path) == before
