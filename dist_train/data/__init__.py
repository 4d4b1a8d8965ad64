"""Data: read local files, learn labels, tokenize (cached), and serve dynamically padded batches."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding

from dist_train.data.tokenize import model_view


def make_loader(ds, batches: list[list[int]], tokenizer, num_workers: int = 0, pin_memory: bool = False,
                seed: int = 0):
    """A DataLoader over ``batches`` (index lists) of tokenized ``ds``, padding each batch to its longest row.

    It has its own generator: a DataLoader draws a seed for its workers at every ``iter()``, and drawing it
    from the global RNG would shift dropout's stream whenever a resumed run starts an iterator mid-epoch.
    """
    return DataLoader(model_view(ds), batch_sampler=batches, num_workers=num_workers, pin_memory=pin_memory,
                      collate_fn=DataCollatorWithPadding(tokenizer), persistent_workers=False,
                      generator=torch.Generator().manual_seed(seed))
