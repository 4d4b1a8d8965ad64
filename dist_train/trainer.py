"""The training loop, top to bottom. It talks to one Engine and one Task and never branches on either."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import torch
from tqdm import tqdm

from dist_train.checkpoint import CheckpointManager, read_state
from dist_train.config import Config, dump_yaml
from dist_train.data.sampler import step_windows, train_plan
from dist_train.engine import build_engine
from dist_train.errors import UserError
from dist_train.evaluate import evaluate
from dist_train.export import export_model
from dist_train.metrics import MetricsSink, peak_memory_mb, peak_tflops, summary_line
from dist_train.optim import build_optimizer, build_scheduler
from dist_train.resume import check_config, check_data, check_engine, find_checkpoint, steps_left
from dist_train.seeding import seed_everything
from dist_train.stopping import StopSignals
from dist_train.tasks import build_task

RUN_FILES = ("config.yaml", "metrics.jsonl", "tb", "checkpoints", "final", "eval_report.json")


def check_output_dir(cfg: Config, resume_from: Path | None) -> Path:
    """Refuse to mix a new run into an old one unless ``overwrite`` is set (nothing is lost by accident)."""
    out = Path(cfg.output_dir)
    if resume_from is not None:
        return out
    existing = [name for name in RUN_FILES if (out / name).exists()]
    # resume=auto that found no checkpoint starts fresh over what an early-killed attempt left behind;
    # a finished run or damaged checkpoints are never replaced without overwrite.
    leftovers_only = cfg.checkpoint.resume == "auto" and not (out / "final").exists() and not any(
        (out / "checkpoints").glob("step-*"))
    if existing and not cfg.overwrite and not leftovers_only:
        raise UserError(f"output_dir '{out}' already holds a run ({', '.join(existing)}); choose another "
                        "output_dir=..., pass checkpoint.resume=auto to continue it, or overwrite=true to replace it")
    return out


def prepare_output_dir(out: Path, cfg: Config, resumed_step: int | None) -> None:
    """Fresh run: clear the run files. Resumed run: drop the records written after the checkpoint."""
    if resumed_step is None:
        for name in RUN_FILES:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    else:
        metrics = out / "metrics.jsonl"
        if metrics.is_file():
            # Records after the checkpoint are replayed by the resumed run; end-of-run records are rewritten.
            keep = [line for line in metrics.read_text().splitlines(keepends=True)
                    if _keep_record(json.loads(line), resumed_step)]
            metrics.write_text("".join(keep))
        for name in ("final", "eval_report.json"):
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_yaml(cfg))


def _keep_record(record: dict, step: int) -> bool:
    return record["step"] <= step and record["split"] not in ("ranks", "test")


def fault_injection(rank: int) -> tuple[int, bool]:
    """Test hook: DIST_TRAIN_FAIL_AT=RANK:STEP[:kill] makes that rank raise (or die by SIGKILL) after that
    optimizer step, in the first attempt only (torchrun's restarts resume past it)."""
    spec = os.environ.get("DIST_TRAIN_FAIL_AT", "").split(":")
    if len(spec) < 2 or int(spec[0]) != rank or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return -1, False
    return int(spec[1]), spec[2:] == ["kill"]


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
    started = time.perf_counter()
    engine = build_engine(cfg)
    t = cfg.train
    resume_from = find_checkpoint(cfg)
    if resume_from is not None:
        check_config(resume_from, cfg)  # before any work: a changed model or task fails at once
    saved = read_state(resume_from) if resume_from is not None else None
    if saved is not None:
        check_engine(resume_from, saved, engine.checkpoint_format)
    out = check_output_dir(cfg, resume_from)

    # Data first: every data error surfaces before anything is written to output_dir.
    task = build_task(cfg)
    metric = cfg.checkpoint.metric or task.metrics[0]
    if metric not in task.metrics:
        raise UserError(f"checkpoint.metric '{metric}' is not a {task.name} metric; "
                        f"choose one of: {', '.join(task.metrics)}")
    mode = cfg.checkpoint.mode or ("min" if metric in ("loss", "perplexity") else "max")
    # Rank 0 trains the tokenizer and tokenizes into the cache while the others wait (bounded by
    # engine.timeout_s), then they load both from the cache.
    if not engine.is_main:
        engine.barrier()
    tokenizer = task.load_tokenizer()
    splits = task.prepare(tokenizer)
    lengths = task.lengths(splits.train)
    fingerprint = task.fingerprint(splits.train)
    if saved is not None:
        check_data(resume_from, saved["data"], fingerprint)
    seed_everything(t.seed)
    model = task.build_model()  # before output_dir is touched: a model that does not fit the data is an error
    if engine.is_main:
        engine.barrier()
        prepare_output_dir(out, cfg, saved["step"] if saved else None)
    engine.barrier()

    # Position in the run: optimizer steps done, epoch, and batches of that epoch's plan consumed. One step
    # consumes a window of `grad_accum x world_size` consecutive plan batches.
    step, epoch, done = (saved["step"], saved["epoch"], saved["batches_done"]) if saved else (0, 0, 0)
    window = t.grad_accum * engine.world_size
    batches_per_epoch = -(-len(lengths) // t.micro_batch_size)
    total_steps = t.max_steps if t.max_steps > 0 else step + steps_left(t.epochs, batches_per_epoch, window,
                                                                         epoch, done)
    optimizer = build_optimizer(model, t)
    engine.prepare(model, optimizer, build_scheduler(optimizer, t, total_steps))

    def describe(folder: Path) -> None:  # what export needs besides the weights
        export_model(engine.unwrapped, tokenizer, folder, task.labels, export_meta(cfg), weights=False)

    ckpt = CheckpointManager(out, cfg.checkpoint.keep_last_n, engine, describe)
    better = (lambda a, b: a > b) if mode == "max" else (lambda a, b: a < b)
    best, validated_at, seen = None, -1, 0.0
    # Running sums since the last log line, kept on device: no host sync on ordinary steps.
    zeros = lambda: torch.zeros(4, dtype=torch.float64, device=engine.device)  # noqa: E731
    acc = zeros()  # loss sum, loss count, examples, non-pad tokens
    if saved is not None:
        # Model, optimizer, scheduler and this rank's RNG continue exactly; the log sums (global) go to rank 0.
        load_start = time.perf_counter()
        ckpt.load(resume_from)
        load_s = time.perf_counter() - load_start
        ckpt.best_step, best, validated_at = saved["best_step"], saved["best_metric"], saved["validated_at"]
        seen = saved["examples_seen"]
        if engine.is_main:
            acc += torch.tensor(saved["log_sums"], dtype=torch.float64, device=engine.device)
            moved = "" if saved["world_size"] == engine.world_size and saved["window"] == window else (
                f"; world {saved['world_size']} x accumulation {saved['window'] // saved['world_size']} -> "
                f"world {engine.world_size} x accumulation {t.grad_accum}, the rest of the epoch re-cut")
            size_mb = sum(f.stat().st_size for f in resume_from.rglob("*") if f.is_file()) / 2**20
            print(f"dist-train: resuming from {resume_from} at step {step} (epoch {epoch}, batch {done} of "
                  f"{batches_per_epoch}){moved}; loaded {size_mb:.0f} MB in {load_s:.2f} s", flush=True)

    sink = MetricsSink(out, cfg.logging.tensorboard, purge_step=step + 1 if saved else None) if engine.is_main else None
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", mininterval=1.0,
               disable=not (engine.is_main and cfg.logging.progress_bar))
    reports: dict = {}

    def state() -> dict:
        """Everything besides engine and RNG that the run needs to continue from here (a collective)."""
        return {"step": step, "epoch": epoch, "batches_done": done, "examples_seen": seen,
                "log_sums": engine.all_reduce_sum(acc).tolist(), "best_metric": best,
                "best_step": ckpt.best_step, "validated_at": validated_at, "metric": metric,
                "world_size": engine.world_size, "window": window, "engine": engine.checkpoint_format,
                "total_steps": total_steps, "data": fingerprint}

    def save() -> None:
        ckpt.save(step, state(), dump_yaml(cfg))

    def run_validation() -> None:
        nonlocal best, validated_at
        if splits.validation is None:
            return
        validated_at = step
        report = evaluate(engine, task, splits.validation, t.eval_batch_size)
        reports["validation"] = report
        if sink:
            sink.write("validation", step, {"epoch": epoch + done / batches_per_epoch, **report})
            bar.write(summary_line(f"step {step} validation", report))
        value = report[metric]
        if best is None or better(value, best):
            best = value
            ckpt.mark_best(step)
            save()

    last_log, stop_now = time.perf_counter(), False
    stop = StopSignals(cfg.checkpoint.stop_signals)
    fail_at, kill = fault_injection(engine.rank)
    # MFU: ~6 FLOPs per parameter per (non-pad) token for forward + backward, against the peak of all ranks.
    flops_per_token = 6 * engine.num_parameters()
    peak_flops = peak_tflops(engine.device, cfg.logging.peak_tflops) * 1e12 * engine.world_size
    engine.train()
    while step < total_steps:
        plan = train_plan(lengths, t.micro_batch_size, t.seed, epoch, cfg.data.group_by_length)
        # Resume mid-epoch: start at the saved position of the plan (a slice, nothing is replayed).
        todo = step_windows(plan[done:], t.grad_accum, engine.rank, engine.world_size)[:total_steps - step]
        batches = iter(task.loader(splits.train, [b for w in todo for b, _ in w], epoch, cfg.data.num_workers,
                                   pin_memory=engine.device.type == "cuda"))
        for local in todo:
            micro = [{k: v.to(engine.device, non_blocking=True) for k, v in next(batches).items()}
                     for _ in local]
            # Loss normalisation: the step's gradient is that of the MEAN loss over every target (example
            # or token) in the global batch. Each micro-batch contributes sum(loss) / N_global, where
            # N_global counts targets over all micro-batches and ranks of this step, so a short last
            # window or uneven padding weighs nothing differently. Filler micro-batches (weight 0) keep
            # ranks in lockstep and add nothing. (Engines whose gradient all-reduce averages over ranks
            # rescale by world size inside backward.)
            counts = [task.count(b) * w for b, (_, w) in zip(micro, local)]
            # One all-reduce carries the global target count and whether any rank was asked to stop.
            n_global, stop_votes = engine.all_reduce_sum(torch.stack([sum(counts), counts[0].new_tensor(stop.flag)]))
            n_global = n_global.clamp(min=1)  # a step without targets (e.g. nothing masked) adds zero, not NaN
            for i, (b, (_, w)) in enumerate(zip(micro, local)):
                loss_sum = task.loss_sum(engine.forward(**task.inputs(b)), b) * w
                engine.backward(loss_sum / n_global, sync=i == len(micro) - 1)
                acc += torch.stack([loss_sum.detach().double(), counts[i],
                                    counts[i].new_tensor(len(b["input_ids"]) * w),
                                    task.tokens(b).double() * w])
            grad_norm = engine.step()
            if started and engine.is_main:  # once per process: how long until training really runs
                print(f"dist-train: first optimizer step done {time.perf_counter() - started:.2f} s after start",
                      flush=True)
            started = 0.0
            step += 1
            done = min(done + window, len(plan))
            epoch_end = done == len(plan)
            if epoch_end:
                epoch, done = epoch + 1, 0
            bar.update(1)
            if step == fail_at:
                if kill:
                    os.kill(os.getpid(), signal.SIGKILL)
                raise RuntimeError(f"injected failure at step {step} (DIST_TRAIN_FAIL_AT)")

            # Everything that happens at a step boundary, in one order: log, validate, checkpoint (last, so
            # that a resumed run continues after all of it).
            if step % cfg.logging.every_steps == 0 or step == total_steps:
                # Stop requests are read here, where the log line syncs with the host anyway: a stop comes
                # at most logging.every_steps steps after the signal, and ordinary steps never wait.
                stop_now = stop_votes.item() > 0
                loss_sum, count, examples, tokens = engine.all_reduce_sum(acc).tolist()
                elapsed = time.perf_counter() - last_log
                seen += examples
                record = {"epoch": epoch + done / len(plan), "loss": loss_sum / max(count, 1),
                          "lr": engine.lr(), "grad_norm": float(grad_norm), "examples_seen": seen,
                          "examples_per_s": examples / elapsed, "tokens_per_s": tokens / elapsed}
                if peak_flops:
                    record["mfu"] = record["tokens_per_s"] * flops_per_token / peak_flops
                if sink:
                    sink.write("train", step, record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                acc, last_log = zeros(), time.perf_counter()
            if (t.eval_every > 0 and step % t.eval_every == 0) or (t.eval_every <= 0 and epoch_end):
                run_validation()
            every = cfg.checkpoint.every_steps
            if (every > 0 and step % every == 0) or (epoch_end and cfg.checkpoint.every_epoch) or stop_now:
                save()
            if stop_now:
                break
        if stop_now:
            break
    bar.close()
    stop.restore()
    if stop_now:
        if engine.is_main:
            print(f"dist-train: stopped after step {step} on request ({stop.received or 'a stop signal'} on some "
                  f"rank); saved {ckpt.path(step)}; continue with checkpoint.resume=auto", flush=True)
        if sink:
            sink.close()
        engine.close()
        return {"stopped_at": step}

    if validated_at != step:
        run_validation()
    per_rank = rank_stats(engine)
    if sink:
        sink.write("ranks", step, per_rank)
    save()
    if cfg.checkpoint.load_best_at_end and ckpt.best_step is not None and ckpt.best_step != step:
        ckpt.load(ckpt.path(ckpt.best_step), weights_only=True)
        if engine.is_main:
            bar.write(f"loaded the best checkpoint (step {ckpt.best_step}, "
                      f"{metric} {best:.4f}) for final/")

    state_dict = engine.full_state_dict()
    if engine.is_main:
        export_model(engine.unwrapped, tokenizer, out / "final", task.labels, export_meta(cfg), state_dict=state_dict)
    if splits.test is not None:
        reports["test"] = evaluate(engine, task, splits.test, t.eval_batch_size)
        if engine.is_main:
            (out / "eval_report.json").write_text(json.dumps(reports["test"], indent=2))
            sink.write("test", step, reports["test"])
            print(summary_line("test", reports["test"]), flush=True)
    if sink:
        sink.close()
    engine.close()
    return reports


def export_meta(cfg: Config) -> dict:
    """What dist-train's own eval/predict read back from an exported folder."""
    return {"task": cfg.task.name, "text_column": cfg.data.text_column,
            "text_pair_column": cfg.data.text_pair_column, "label_column": cfg.data.label_column,
            "max_length": cfg.data.max_length, "text_unit": cfg.data.text_unit,
            "mlm_probability": cfg.task.mlm_probability, "whole_word_mask": cfg.task.whole_word_mask}
