"""Which examples go into which batch, on which rank: deterministic plans, computed up front per epoch.

A plan is a list of batches (lists of example indices). It depends only on (seed, epoch, lengths, batch
size, world size), so every rank derives the same global plan without communicating and a resumed run can
jump straight to any position in it.
"""

from __future__ import annotations

import numpy as np

MEGABATCH = 50  # batches per length-sorted chunk (as in transformers' LengthGroupedSampler)


def train_plan(lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[list[int]]:
    """One epoch's batches in training order (global: before splitting over ranks).

    group_by_length: shuffle, sort each chunk of MEGABATCH batches by length (little padding), then shuffle
    the batch order so that long and short batches are interleaved across the epoch.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if group_by_length:
        lens = np.asarray(lengths)
        chunk = batch_size * MEGABATCH
        order = np.concatenate([
            part[np.argsort(-lens[part], kind="stable")] for part in np.split(order, range(chunk, len(order), chunk))
        ])
    batches = [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    if group_by_length:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def eval_plan(lengths: list[int], batch_size: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """This rank's evaluation batches: every example exactly once over all ranks, no padding duplicates.

    Sorted by length so that dynamic padding wastes almost nothing; order does not matter for metrics.
    """
    order = np.argsort(np.asarray(lengths), kind="stable")
    batches = [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    return batches[rank::world_size]
