"""Unlabeled text for language modelling: read files into documents, tokenize once, pack into blocks.

Reading: plain-text files (a document per line, per blank-line-separated paragraph, or per file), JSONL or
tables with a text column; paths may be globs or folders. Tokenizing goes through ``datasets.map``
(``num_proc`` workers, cached on disk). The token ids of all documents are then written once, end to end
with a separator between documents, into one flat array on disk (``np.memmap``): a corpus larger than
memory is never held in memory, and a block of the stream is read only by the rank that trains on it.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
from pathlib import Path

import numpy as np
import torch

from dist_train.data.sources import FORMATS, _check_readable, _first_non_utf8, quiet_datasets, read_table, require_columns
from dist_train.errors import UserError

TEXT_SUFFIXES = (".txt", ".text", ".md", ".raw")


def corpus_files(spec: str | list[str], what: str = "data.train") -> list[str]:
    """Expand paths, globs and folders (every .txt/.jsonl/... file inside, sorted) into a list of files."""
    files: list[str] = []
    for item in [spec] if isinstance(spec, str) else spec:
        path = os.path.expanduser(item)
        if Path(path).is_dir():
            found = sorted(str(p) for p in Path(path).rglob("*") if p.is_file() and _readable_kind(str(p)))
            if not found:
                raise UserError(f"{what}: folder '{item}' holds no text files (.txt, .jsonl, .tsv, ...)")
        elif glob.has_magic(path):
            found = sorted(p for p in glob.glob(path, recursive=True) if Path(p).is_file())
            if not found:
                raise UserError(f"{what}: no file matches '{item}'")
        else:
            found = [path]
        files.extend(found)
    for path in files:
        _check_readable(path, what)
        if _readable_kind(path) is None:
            raise UserError(f"'{path}': unknown file type '{Path(path).suffix}'; use plain text "
                            f"({', '.join(TEXT_SUFFIXES)}), .jsonl, .tsv, .csv or .parquet")
    return files


def _readable_kind(path: str) -> str | None:
    suffix = Path(path).suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return "text"
    return "table" if suffix in FORMATS else None


def read_corpus(spec: str | list[str], text_column: str, text_unit: str, cache_dir: str | None = None,
                what: str = "data.train"):
    """All documents of ``spec`` as a ``datasets.Dataset`` with one column, ``text``: the plain-text files
    first (in the order given), then the tables. Empty documents are dropped when tokenizing."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    files = corpus_files(spec, what)
    parts = []
    texts = [f for f in files if _readable_kind(f) == "text"]
    if texts:
        try:
            with quiet_datasets():
                parts.append(datasets.load_dataset("text", data_files={"data": [str(Path(f).resolve()) for f in texts]},
                                                   split="data", sample_by=text_unit, cache_dir=cache_dir))
        except Exception as exc:  # noqa: BLE001 - a reader failure becomes one line naming the file
            for path in texts:
                bad = _first_non_utf8(path)
                if bad:
                    raise UserError(f"{what}: '{path}': {bad} is not UTF-8 text; save the file as UTF-8") from None
            raise UserError(f"{what}: cannot read {', '.join(texts)} as text: {str(exc).splitlines()[0]}") from None
    for path in (f for f in files if _readable_kind(f) == "table"):
        ds = read_table(path, cache_dir)
        require_columns(ds, path, {"data.text_column": text_column})
        ds = ds.select_columns([text_column])
        if text_column != "text":
            ds = ds.rename_column(text_column, "text")
        # The text reader's column type, so that text files and tables concatenate.
        parts.append(ds.cast_column("text", datasets.Value("string")))
    corpus = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return corpus


class TokenStream:
    """The token ids of a whole corpus, end to end, as a read-only memory map (opened lazily per process)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta = json.loads(self.path.with_suffix(".json").read_text())
        self.dtype, self.num_tokens, self.num_documents = np.dtype(meta["dtype"]), meta["tokens"], meta["documents"]
        self.fingerprint = meta["fingerprint"]
        self._array = None

    @property
    def array(self) -> np.ndarray:
        # Opened on first use, so that DataLoader workers each map the file instead of pickling the data.
        if self._array is None:
            self._array = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
        return self._array

    def __getstate__(self):
        return {**self.__dict__, "_array": None}


def tokenize_corpus(corpus, tokenizer, separator: str, num_proc: int | None, cache_root: str | Path,
                    what: str = "data.train") -> TokenStream:
    """Tokenize ``corpus`` (cached by datasets) and write its stream of ids once (cached by fingerprint).

    ``separator``: ``eos`` appends the tokenizer's end-of-text token to every document (causal LM);
    ``special`` encodes each document with the tokenizer's own special tokens, e.g. ``[CLS] doc [SEP]``
    (masked LM).
    """
    if separator == "eos" and tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no end-of-text token (eos_token) to separate documents; give a "
                        "tokenizer that has one, or train one with model.train_tokenizer.kind=bpe")
    eos = [tokenizer.eos_token_id] if separator == "eos" else []
    specials = separator == "special"

    def encode(batch):
        texts = [t for t in batch["text"] if t and t.strip()]
        ids = tokenizer(texts, add_special_tokens=specials, return_attention_mask=False,
                        return_token_type_ids=False)["input_ids"]
        return {"input_ids": [row + eos for row in ids]}

    tokenized = corpus.map(encode, batched=True, batch_size=1000, num_proc=num_proc, remove_columns=["text"])
    if len(tokenized) == 0:
        raise UserError(f"{what}: the corpus holds no text")
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32
    folder = Path(cache_root, "dist-train-tokens")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{tokenized._fingerprint}.bin"
    if not path.with_suffix(".json").is_file():
        # Written under temporary names and renamed (data first, then its description): a reader never
        # sees a half-written stream, and concurrent writers of the same stream produce the same bytes.
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        total = 0
        with open(tmp, "wb") as fh:
            for batch in tokenized.iter(batch_size=10_000):
                flat = np.fromiter(itertools.chain.from_iterable(batch["input_ids"]), dtype=dtype)
                fh.write(flat.tobytes())
                total += flat.size
        tmp.replace(path)
        meta = {"tokens": total, "documents": len(tokenized), "dtype": np.dtype(dtype).name,
                "fingerprint": tokenized._fingerprint}
        tmp_meta = path.with_name(f"{path.stem}.json.tmp-{os.getpid()}")
        tmp_meta.write_text(json.dumps(meta))
        tmp_meta.replace(path.with_suffix(".json"))
    return TokenStream(path)


class TokenBlocks(torch.utils.data.Dataset):
    """Fixed-length blocks cut from a TokenStream: block ``b`` is tokens ``[b*L, (b+1)*L)``.

    ``blocks`` selects which blocks this split holds (a train/validation split of one stream). The tail of
    the stream that does not fill a whole block is left out (fewer than L tokens).
    """

    def __init__(self, stream: TokenStream, block_len: int, blocks: np.ndarray | None = None):
        self.stream, self.block_len = stream, block_len
        self.blocks = np.arange(stream.num_tokens // block_len) if blocks is None else np.asarray(blocks)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict:
        b = int(self.blocks[i])
        ids = self.stream.array[b * self.block_len:(b + 1) * self.block_len]
        return {"input_ids": torch.from_numpy(ids.astype(np.int64)), "index": b}

    @property
    def lengths(self) -> list[int]:
        return [self.block_len] * len(self.blocks)

    def split(self, fraction: float, seed: int) -> tuple["TokenBlocks", "TokenBlocks"]:
        """(train, held out): ``fraction`` of the blocks, chosen at random with ``seed``, held out."""
        order = np.random.default_rng(seed).permutation(self.blocks)
        n = max(1, int(round(len(order) * fraction)))
        return TokenBlocks(self.stream, self.block_len, np.sort(order[n:])), \
            TokenBlocks(self.stream, self.block_len, np.sort(order[:n]))
