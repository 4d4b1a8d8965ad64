"""Data: read local files, learn labels, tokenize (cached), and serve batches."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from dist_train.data.corpus import corpus_files
from dist_train.data.sources import _check_readable, file_format


def make_loader(ds, batches: list[list[int]], collate_fn, num_workers: int = 0, pin_memory: bool = False,
                seed: int = 0):
    """A DataLoader over ``batches`` (index lists) of ``ds``, each batch built by ``collate_fn``.

    It has its own generator: a DataLoader draws a seed for its workers at every ``iter()``, and drawing it
    from the global RNG would shift dropout's stream whenever a resumed run starts an iterator mid-epoch.
    """
    return DataLoader(ds, batch_sampler=batches, num_workers=num_workers, pin_memory=pin_memory,
                      collate_fn=collate_fn, persistent_workers=False,
                      generator=torch.Generator().manual_seed(seed))


def check_data_files(data, tables: bool = True) -> None:
    """Every data file that ``data`` (a DataConfig) names exists and can be read, without loading any: what
    `dist-train launch` checks before it starts a worker. ``tables``: one table per split (the task's
    ``reads_tables``); else corpora - paths, globs, folders or lists of these (see ``corpus_files``)."""
    for split in ("train", "validation", "test"):
        spec = getattr(data, split)
        if spec is None:
            continue
        if tables:
            _check_readable(spec, f"data.{split}")
            file_format(spec)
        else:
            corpus_files(spec, f"data.{split}")
