"""Evaluation pass: every example exactly once over all ranks, metrics reduced before reporting."""

from __future__ import annotations

import torch

from dist_train.data.collate import EVAL_EPOCH
from dist_train.data.sampler import eval_plan


@torch.no_grad()
def evaluate(engine, task, ds, batch_size: int, what: str = "test") -> dict:
    """Run the model over ``ds`` (this rank's share) and return the task's report, reduced over ranks, with
    what the task adds (``generation_report``: scores of generated text). ``what`` names the split."""
    plan = eval_plan(task.lengths(ds), batch_size, engine.rank, engine.world_size)
    evaluator = task.evaluator(engine.device, ds)
    was_training = engine.model.training
    engine.train(False)
    for batch, (_, weight) in zip(task.loader(ds, [b for b, _ in plan], EVAL_EPOCH), plan):
        batch = {k: v.to(engine.device, non_blocking=True) for k, v in batch.items()}
        outputs = engine.forward(**task.inputs(batch))
        if weight:  # fillers only keep ranks in step (sharded engines gather parameters in forward)
            evaluator.update(outputs, batch)
    engine.train(was_training)
    report = evaluator.compute(engine.all_reduce_sum)
    return {**report, **task.generation_report(engine, ds, what, batch_size)}
