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


def shard(batches: list[list[int]], rank: int, world_size: int) -> list[tuple[list[int], float]]:
    """This rank's share of ``batches`` as (indices, weight) pairs, the same count on every rank.

    Ranks take batches round-robin. Where the batches do not divide evenly, the short ranks get fillers
    (a copy of the first batch with weight 0): they run forward/backward so that every rank joins every
    collective, and count for nothing.
    """
    per_rank = -(-len(batches) // world_size)
    mine = [(b, 1.0) for b in batches[rank::world_size]]
    return mine + [(batches[0], 0.0)] * (per_rank - len(mine))


def step_windows(plan: list[list[int]], grad_accum: int, rank: int, world_size: int):
    """Split one epoch's plan into optimizer steps; each step is this rank's (indices, weight) micro-batches.

    A step takes ``grad_accum x world_size`` consecutive batches of the plan (the global batch), so the
    examples of each step do not depend on how they are spread over ranks and accumulation.
    """
    window = grad_accum * world_size
    return [shard(plan[i:i + window], rank, world_size) for i in range(0, len(plan), window)]


def eval_plan(lengths: list[int], batch_size: int, rank: int = 0, world_size: int = 1):
    """This rank's evaluation batches as (indices, weight): every example exactly once over all ranks.

    Sorted by length so that dynamic padding wastes almost nothing; order does not matter for metrics.
    """
    order = np.argsort(np.asarray(lengths), kind="stable")
    batches = [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    return shard(batches, rank, world_size)
