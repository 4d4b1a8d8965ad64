"""Data: read local files, learn labels, tokenize (cached), and serve batches."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader


def make_loader(ds, batches: list[list[int]], collate_fn, num_workers: int = 0, pin_memory: bool = False,
                seed: int = 0):
    """A DataLoader over ``batches`` (index lists) of ``ds``, each batch built by ``collate_fn``.

    It has its own generator: a DataLoader draws a seed for its workers at every ``iter()``, and drawing it
    from the global RNG would shift dropout's stream whenever a resumed run starts an iterator mid-epoch.
    """
    return DataLoader(ds, batch_sampler=batches, num_workers=num_workers, pin_memory=pin_memory,
                      collate_fn=collate_fn, persistent_workers=False,
                      generator=torch.Generator().manual_seed(seed))
