"""Data: read local files, learn labels, tokenize (cached), and serve dynamically padded batches."""

from __future__ import annotations

from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding

from dist_train.data.tokenize import model_view


def make_loader(ds, batches: list[list[int]], tokenizer, num_workers: int = 0, pin_memory: bool = False):
    """A DataLoader over ``batches`` (index lists) of tokenized ``ds``, padding each batch to its longest row."""
    return DataLoader(model_view(ds), batch_sampler=batches, num_workers=num_workers, pin_memory=pin_memory,
                      collate_fn=DataCollatorWithPadding(tokenizer), persistent_workers=False)
