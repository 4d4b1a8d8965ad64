"""The training loop, top to bottom. It talks to one Engine and one Task and never branches on either."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dist_train.checkpoint import CheckpointManager
from dist_train.config import Config, dump_yaml
from dist_train.data import make_loader
from dist_train.data.sampler import step_windows, train_plan
from dist_train.engine import build_engine
from dist_train.errors import UserError
from dist_train.evaluate import evaluate
from dist_train.export import export_model
from dist_train.metrics import MetricsSink, peak_memory_mb, peak_tflops, summary_line
from dist_train.models import load_tokenizer
from dist_train.optim import build_optimizer, build_scheduler
from dist_train.tasks import build_task

RUN_FILES = ("config.yaml", "metrics.jsonl", "tb", "checkpoints", "final", "eval_report.json")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_output_dir(cfg: Config) -> Path:
    """Refuse to mix a new run into an old one unless ``overwrite`` is set (nothing is lost by accident)."""
    out = Path(cfg.output_dir)
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if existing and not cfg.overwrite:
        raise UserError(f"output_dir '{out}' already holds a run ({', '.join(existing)}); "
                        "choose another output_dir=... or pass overwrite=true to replace it")
    return out


def prepare_output_dir(out: Path, cfg: Config) -> None:
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_yaml(cfg))


def fault_injection(rank: int) -> int:
    """Test hook: DIST_TRAIN_FAIL_AT=RANK:STEP makes that rank raise after that optimizer step."""
    spec = os.environ.get("DIST_TRAIN_FAIL_AT", "")
    if ":" not in spec:
        return -1
    fail_rank, fail_step = spec.split(":")
    return int(fail_step) if int(fail_rank) == rank else -1


def rank_stats(engine) -> dict:
    """Per-rank peak memory, parameter and optimizer-state elements, gathered to every rank as lists."""
    mine = torch.tensor([peak_memory_mb(engine.device), engine.num_parameters(local=True),
                         engine.optimizer_state_numel()], dtype=torch.float64, device=engine.device)
    table = torch.zeros(engine.world_size, 3, dtype=torch.float64, device=engine.device)
    table[engine.rank] = mine
    table = engine.all_reduce_sum(table).tolist()
    return {"peak_memory_mb": [r[0] for r in table], "param_elements": [int(r[1]) for r in table],
            "optimizer_state_elements": [int(r[2]) for r in table]}


def train(cfg: Config) -> dict:
    """Fine-tune (or train from scratch) as ``cfg`` says; returns the final reports by split."""
    engine = build_engine(cfg)
    t = cfg.train
    out = check_output_dir(cfg)

    # Data first: every data error surfaces before anything is written to output_dir.
    task = build_task(cfg)
    if cfg.checkpoint.metric not in task.metrics:
        raise UserError(f"checkpoint.metric '{cfg.checkpoint.metric}' is not a {task.name} metric; "
                        f"choose one of: {', '.join(task.metrics)}")
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.pretrained, cfg.model.trust_remote_code,
                               what="model.tokenizer" if cfg.model.tokenizer else "model.pretrained")
    # Rank 0 tokenizes into the cache while the others wait (bounded by engine.timeout_s), then they load it.
    if not engine.is_main:
        engine.barrier()
    splits = task.prepare(tokenizer)
    if engine.is_main:
        engine.barrier()
        prepare_output_dir(out, cfg)
    engine.barrier()

    seed_everything(t.seed)
    model = task.build_model()

    # One step consumes `grad_accum` micro-batches on each of `world_size` ranks: a window of the plan.
    lengths = splits.train["length"]
    steps_per_epoch = math.ceil(math.ceil(len(lengths) / t.micro_batch_size) / (t.grad_accum * engine.world_size))
    total_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.epochs * steps_per_epoch)
    optimizer = build_optimizer(model, t)
    engine.prepare(model, optimizer, build_scheduler(optimizer, t, total_steps))

    ckpt = CheckpointManager(out, cfg.checkpoint.keep_last_n, engine)
    sink = MetricsSink(out, cfg.logging.tensorboard) if engine.is_main else None
    bar = tqdm(total=total_steps, desc="train", unit="step", mininterval=1.0,
               disable=not (engine.is_main and cfg.logging.progress_bar))
    better = (lambda a, b: a > b) if cfg.checkpoint.mode == "max" else (lambda a, b: a < b)
    best, validated_at = None, -1
    reports: dict = {}

    def state(epoch: int) -> dict:
        return {"step": step, "epoch": epoch, "best_metric": best, "best_step": ckpt.best_step,
                "metric": cfg.checkpoint.metric}

    def run_validation(epoch: int) -> None:
        nonlocal best, validated_at
        if splits.validation is None:
            return
        validated_at = step
        report = evaluate(engine, task, splits.validation, tokenizer, t.eval_batch_size)
        reports["validation"] = report
        if sink:
            sink.write("validation", step, {"epoch": epoch, **report})
            bar.write(summary_line(f"step {step} validation", report))
        value = report[cfg.checkpoint.metric]
        if best is None or better(value, best):
            best = value
            ckpt.mark_best(step)
            ckpt.save(step, state(epoch))

    # Running sums since the last log line, kept on device: no host sync on ordinary steps.
    zeros = lambda: torch.zeros(4, dtype=torch.float64, device=engine.device)  # noqa: E731
    acc = zeros()  # loss sum, loss count, examples, non-pad tokens
    last_log, step, epoch, seen = time.perf_counter(), 0, 0, 0.0
    fail_at = fault_injection(engine.rank)
    # MFU: ~6 FLOPs per parameter per (non-pad) token for forward + backward, against the peak of all ranks.
    flops_per_token = 6 * engine.num_parameters()
    peak_flops = peak_tflops(engine.device, cfg.logging.peak_tflops) * 1e12 * engine.world_size
    engine.train()
    while step < total_steps:
        plan = train_plan(lengths, t.micro_batch_size, t.seed, epoch, cfg.data.group_by_length)
        steps = step_windows(plan, t.grad_accum, engine.rank, engine.world_size)
        todo = steps[:total_steps - step]  # this epoch's steps, within the step budget
        batches = iter(make_loader(splits.train, [b for w in todo for b, _ in w], tokenizer,
                                   cfg.data.num_workers, pin_memory=engine.device.type == "cuda"))
        for index, local in enumerate(todo):
            micro = [{k: v.to(engine.device, non_blocking=True) for k, v in next(batches).items()}
                     for _ in local]
            # Loss normalisation: the step's gradient is that of the MEAN loss over every target (example
            # or token) in the global batch. Each micro-batch contributes sum(loss) / N_global, where
            # N_global counts targets over all micro-batches and ranks of this step, so a short last
            # window or uneven padding weighs nothing differently. Filler micro-batches (weight 0) keep
            # ranks in lockstep and add nothing. (Engines whose gradient all-reduce averages over ranks
            # rescale by world size inside backward.)
            counts = [task.count(b) * w for b, (_, w) in zip(micro, local)]
            n_global = engine.all_reduce_sum(sum(counts))
            for i, (b, (_, w)) in enumerate(zip(micro, local)):
                loss_sum = task.loss_sum(engine.forward(**task.inputs(b)), b) * w
                engine.backward(loss_sum / n_global, sync=i == len(micro) - 1)
                acc += torch.stack([loss_sum.detach().double(), counts[i],
                                    counts[i].new_tensor(len(b["input_ids"]) * w),
                                    b["attention_mask"].sum().double() * w])
            grad_norm = engine.step()
            step += 1
            bar.update(1)
            if step == fail_at:
                raise RuntimeError(f"injected failure at step {step} (DIST_TRAIN_FAIL_AT)")

            if step % cfg.logging.every_steps == 0 or step == total_steps:
                loss_sum, count, examples, tokens = engine.all_reduce_sum(acc).tolist()
                elapsed = time.perf_counter() - last_log
                seen += examples
                record = {"epoch": epoch + (index + 1) / len(steps), "loss": loss_sum / max(count, 1),
                          "lr": engine.lr(), "grad_norm": float(grad_norm), "examples_seen": seen,
                          "examples_per_s": examples / elapsed, "tokens_per_s": tokens / elapsed}
                if peak_flops:
                    record["mfu"] = record["tokens_per_s"] * flops_per_token / peak_flops
                if sink:
                    sink.write("train", step, record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                acc, last_log = zeros(), time.perf_counter()
            if t.eval_every > 0 and step % t.eval_every == 0:
                run_validation(epoch)
            if cfg.checkpoint.every_steps > 0 and step % cfg.checkpoint.every_steps == 0:
                ckpt.save(step, state(epoch))
        if len(todo) == len(steps):  # the whole epoch was consumed
            epoch += 1
            if t.eval_every <= 0:
                run_validation(epoch)
    bar.close()

    if validated_at != step:
        run_validation(epoch)
    per_rank = rank_stats(engine)
    if sink:
        sink.write("ranks", step, per_rank)
    ckpt.save(step, state(epoch))
    if cfg.checkpoint.load_best_at_end and ckpt.best_step is not None and ckpt.best_step != step:
        engine.load(ckpt.path(ckpt.best_step), weights_only=True)
        if engine.is_main:
            bar.write(f"loaded the best checkpoint (step {ckpt.best_step}, "
                      f"{cfg.checkpoint.metric} {best:.4f}) for final/")

    state_dict = engine.full_state_dict()
    if engine.is_main:
        meta = {"task": cfg.task.name, "text_column": cfg.data.text_column,
                "text_pair_column": cfg.data.text_pair_column, "label_column": cfg.data.label_column,
                "max_length": cfg.data.max_length}
        export_model(engine.unwrapped, tokenizer, out / "final", task.labels, meta, state_dict)
    if splits.test is not None:
        reports["test"] = evaluate(engine, task, splits.test, tokenizer, t.eval_batch_size)
        if engine.is_main:
            (out / "eval_report.json").write_text(json.dumps(reports["test"], indent=2))
            sink.write("test", step, reports["test"])
            print(summary_line("test", reports["test"]), flush=True)
    if sink:
        sink.close()
    engine.close()
    return reports
