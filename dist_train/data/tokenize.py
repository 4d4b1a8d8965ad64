"""Tokenize a labelled table once, through ``datasets.map`` (batched and cached on disk).

The cache key is the dataset fingerprint plus a hash of the mapping function with everything it closes
over (tokenizer, max_length, label ids), so a second run with the same inputs loads the cached Arrow file
instead of tokenizing again, and any change re-tokenizes.
"""

from __future__ import annotations

MODEL_COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "labels")


def tokenize_table(ds, tokenizer, text_column: str, pair_column: str | None, max_length: int,
                   label_ids: list[int] | None = None):
    """Return ``ds`` with input_ids, attention_mask (token_type_ids), ``length``, and ``labels`` if given.

    No padding here: batches are padded to their own longest example by the collator.
    """
    if label_ids is not None:
        ds = ds.add_column("labels", label_ids)
    keep = {"labels"} if label_ids is not None else set()

    def encode(batch):
        pairs = batch[pair_column] if pair_column else None
        out = tokenizer(batch[text_column], pairs, truncation=True, max_length=max_length)
        out["length"] = [len(ids) for ids in out["input_ids"]]
        return out

    return ds.map(encode, batched=True, batch_size=1000,
                  remove_columns=[c for c in ds.column_names if c not in keep])


def numbered(ds):
    """``ds`` with an ``index`` column: each example's position in it (an evaluator that needs every
    prediction puts each one in its place, whichever rank computed it)."""
    if "index" in ds.column_names:
        ds = ds.remove_columns("index")
    return ds.add_column("index", list(range(len(ds))))


def model_view(ds):
    """The columns a batch carries: what a model consumes, the targets and ``index`` where the examples are
    numbered (drops ``length`` and anything else)."""
    return ds.select_columns([c for c in (*MODEL_COLUMNS, "index") if c in ds.column_names])
