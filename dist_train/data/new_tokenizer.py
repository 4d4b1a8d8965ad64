"""Train a new tokenizer on a corpus with the ``tokenizers`` library, saved as a Hugging Face folder.

Two kinds, the two model families dist-train pretrains:
- ``bpe``: byte-level BPE as in GPT-2 (no unknown tokens, one ``<|endoftext|>`` token that ends documents
  and also serves as padding);
- ``wordpiece``: as in BERT ([PAD] [UNK] [CLS] [SEP] [MASK], ``[CLS] text [SEP]`` added on encoding).

The folder loads with ``AutoTokenizer.from_pretrained`` and is saved with every checkpoint and export.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Iterator

EOS = "<|endoftext|>"
BERT_SPECIALS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                 "mask_token": "[MASK]"}


def train_tokenizer(texts: Iterable[str], kind: str, vocab_size: int, out_dir: str | Path,
                    min_frequency: int = 2, lowercase: bool = False):
    """Train on ``texts`` (an iterable of strings, read once) and save to ``out_dir``; returns the tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        if lowercase:
            tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        # The 256 byte symbols are the initial alphabet: any text encodes, there is no unknown token.
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        specials = {"bos_token": EOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    elif kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token=BERT_SPECIALS["unk_token"]))
        tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase, clean_text=True,
                                                    handle_chinese_chars=True, strip_accents=None)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                            special_tokens=list(BERT_SPECIALS.values()), show_progress=False)
        specials = dict(BERT_SPECIALS)
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}")
    tok.train_from_iterator(_batched(texts), trainer=trainer)
    if kind == "wordpiece":
        cls, sep = BERT_SPECIALS["cls_token"], BERT_SPECIALS["sep_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
            special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=1 << 30, **specials)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return fast


def _batched(texts: Iterable[str], size: int = 1000) -> Iterator[list[str]]:
    batch = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def cached_tokenizer(spec, corpus, cache_root: str | Path):
    """The tokenizer ``spec`` (a TokenizerTrainConfig) trained on ``corpus`` (a datasets.Dataset with a
    ``text`` column), from the cache when the same spec was trained on the same corpus before.

    The cache key is the corpus fingerprint (datasets hashes the data files) plus the spec, so an edited
    corpus or another vocabulary size trains anew.
    """
    from transformers import AutoTokenizer

    key = hashlib.sha256(json.dumps([corpus._fingerprint, asdict(spec)], sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(cache_root, "dist-train-tokenizers", f"{spec.kind}-{spec.vocab_size}-{key}")
    if not (folder / "tokenizer.json").is_file():
        tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
        texts = (text for batch in corpus.iter(batch_size=1000) for text in batch["text"])
        train_tokenizer(texts, spec.kind, spec.vocab_size, tmp, spec.min_frequency, spec.lowercase)
        if folder.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            tmp.replace(folder)
    return AutoTokenizer.from_pretrained(folder)
