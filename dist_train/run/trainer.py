"""The training loop, top to bottom. It talks to one Engine and one Task and never branches on either.

    train(cfg) = build -> resume -> for each step: step, log, validate, save -> finish

What surrounds the loop has a module of its own: the run folder (``run_dir``), checkpoints
(``checkpoint``), what a resume may change (``resume``), stop signals (``stopping``), the export
(``export``) and the test suite's fault injection (``faults``).
"""

from __future__ import annotations

import contextlib
import json
import math
import pickle
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from dist_train.config import Config, dump_yaml
from dist_train.data.sampler import step_windows, train_plan
from dist_train.engine import build_engine
from dist_train.engine.base import Engine
from dist_train.errors import RunFailed, UserError
from dist_train.evaluation.loop import evaluate
from dist_train.evaluation.metrics import MetricsSink, peak_memory_mb, peak_tflops, summary_line
from dist_train.use.export import export_model, publish
from dist_train.run import stopping
from dist_train.run.accounting import StepAccounting
from dist_train.run.checkpoint import CheckpointManager, complete, read_state, set_aside
from dist_train.run.distill import Distiller
from dist_train.run.faults import Faults
from dist_train.run.host_memory import reuse_freed_memory
from dist_train.run.optim import build_optimizer, build_scheduler
from dist_train.run.resume import check_config, check_data, check_engine, find_checkpoint, steps_left
from dist_train.run.run_dir import RunDir, preflight
from dist_train.run.seeding import seed_everything
from dist_train.run.train_state import TrainState
from dist_train.tasks import build_task


@dataclass
class RunResult:
    """What ``train`` returns. ``reports``: the final report of each split (``validation``, ``test``);
    ``stopped_at``: the step a stop signal ended the run after (None: it ran to the end); ``exit_code``:
    what the command exits with (0, or a stop signal's code)."""

    reports: dict[str, dict] = field(default_factory=dict)
    stopped_at: int | None = None
    exit_code: int = 0


def train(cfg: Config) -> RunResult:
    """Fine-tune (or train from scratch) as ``cfg`` says; returns the final reports by split."""
    with Run(cfg) as run:
        run.build()
        run.resume()
        for micro in run.batches():
            epoch_end = run.step(micro)
            # At a step boundary, in one order: log, validate, checkpoint (last, so that a resumed run
            # continues after all of it), then stop if a stop signal reached any rank.
            if run.log_due():
                run.log()
            if run.validation_due(epoch_end):
                run.validate()
            if run.save_due(epoch_end):
                run.save()
            if run.stop_now:
                return run.stop()
        return run.finish()


class Run:
    """One run's parts and position; each phase of ``train`` is one method. Every attribute is declared here;
    ``build`` sets the parts, ``resume`` the position."""

    def __init__(self, cfg: Config):
        self.cfg, self.t = cfg, cfg.train
        self.signals = stopping.install(cfg.checkpoint.stop_signals)
        self.teardown = contextlib.ExitStack()
        self.run_dir = RunDir(cfg.output_dir)
        self.started = time.perf_counter()
        self.result = RunResult()
        # build(): the parts
        self.engine: Engine | None = None
        self.faults: Faults | None = None
        self.resume_from: Path | None = None  # the checkpoint to continue from, and damaged ones skipped
        self.damaged: list = []
        self.saved: dict | None = None  # its TrainState record
        self.task = self.tokenizer = self.splits = None
        self.metric: str = ""  # what picks the best checkpoint, and whether larger is better
        self.maximize = True
        self.lengths: list[int] = []  # training examples' lengths (the batch plan) and their fingerprint
        self.fingerprint: dict = {}
        self.window = self.plan_len = 0  # micro-batches per optimizer step (all ranks) and per epoch plan
        self.state: TrainState | None = None
        self.loss_sum = None  # the step's loss: the task's, or mixed with a teacher's
        self.ckpt: CheckpointManager | None = None
        self.acc: StepAccounting | None = None
        # resume() and the loop: output, progress, speed
        self.sink: MetricsSink | None = None
        self.bar = None
        self.last_log = 0.0
        self.flops_per_token = self.peak_flops = 0.0
        self.last_saved: int | None = None  # the step the newest checkpoint holds (one save per step)
        self.claimed = self.committed = self.trained = self.stop_now = False

    def __enter__(self) -> "Run":
        self.teardown.callback(stopping.uninstall)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Every exit path: sinks closed, half-written files removed, the lock released, handlers restored
        and the process group destroyed (in that order, each even if another fails). A collective that
        timed out becomes one line naming the ranks that did not answer."""
        explained = self.engine.explain_failure(exc) if exc is not None and self.engine is not None else None
        self.teardown.close()
        if explained:
            last = self._last_checkpoint()
            resume = f"; continue from {last} with checkpoint.resume=auto" if last else ""
            raise RunFailed(explained + resume) from None

    # -- build: every check before any write ----------------------------------------------------------------
    def build(self) -> None:
        """Engine, the checkpoint to resume, the run folder's lock, data and model."""
        cfg = self.cfg
        if cfg.train.reuse_host_memory:
            reuse_freed_memory()  # before any large tensor exists: it affects later allocations only
        self.engine = e = build_engine(cfg)
        self.teardown.callback(e.close)
        self.faults = Faults.from_env(e.rank)
        self.resume_from, self.damaged = find_checkpoint(cfg)
        self.saved = read_state(self.resume_from) if self.resume_from is not None else None
        if self.saved is not None:
            check_config(self.resume_from, cfg)  # before any work: a changed model or task fails at once
            check_engine(self.resume_from, self.saved, e)
        preflight(cfg, resuming=self.saved is not None, check_lock=e.is_main)
        if e.is_main:
            self.run_dir.lock()  # a second run into this folder stops here, at once
            self.teardown.callback(self.run_dir.unlock)
        self.faults.at_phase("setup")
        self._prepare_data()
        self._build_model()

    def _prepare_data(self) -> None:
        cfg, e = self.cfg, self.engine
        self.task = task = build_task(cfg, e.is_main)
        self.metric, self.maximize = task.best_metric(cfg.checkpoint.metric, cfg.checkpoint.mode)

        def prepare():
            self.tokenizer = task.load_tokenizer()
            self.splits = task.prepare(self.tokenizer)

        # Rank 0 trains the tokenizer and tokenizes into the cache while the others wait (for as long as
        # rank 0 is alive); then they load both from the cache. A data error on rank 0 ends every rank.
        e.run_on_main(prepare, "preparing the data (tokenizing into the cache)")
        if not e.is_main:
            prepare()
        self.splits.train = task.train_subset(self.splits.train)  # data.train_rows; the same rows on every rank
        self.lengths = task.lengths(self.splits.train)
        self.fingerprint = task.fingerprint(self.splits.train)
        if self.saved is not None:
            check_data(self.resume_from, self.saved["data"], self.fingerprint)

    def _build_model(self) -> None:
        cfg, t, e = self.cfg, self.t, self.engine
        seed_everything(t.seed)
        model = self.task.build_model()  # a model that does not fit the data is an error, before any write
        self.window = t.grad_accum * e.world_size
        self.state = s = TrainState(metric=self.metric, world_size=e.world_size, window=self.window,
                                    engine=e.checkpoint_format, data=self.fingerprint)
        if self.saved is not None:
            s.load_state_dict(self.saved)
        self.plan_len = -(-len(self.lengths) // t.micro_batch_size)  # micro-batches in an epoch's plan
        s.total_steps = t.max_steps if t.max_steps > 0 else s.step + steps_left(
            t.epochs, self.plan_len, self.window, s.epoch, s.batches_done)
        e.prepare(model, lambda m: build_optimizer(m, t), lambda opt: build_scheduler(opt, t, s.total_steps))
        # The loss of a step: the task's, or with distill.teacher the task's mixed with the teacher's.
        self.loss_sum = Distiller(cfg, self.task, e).loss_sum if cfg.distill.teacher else self.task.loss_sum

        def describe(folder):  # what export needs besides the weights
            export_model(e.unwrapped, self.tokenizer, folder, self.task, weights=False)

        self.ckpt = CheckpointManager(cfg.output_dir, cfg.checkpoint.keep_last_n, e, describe, self.faults)
        self.acc = StepAccounting(e.device, s.step, t.max_nonfinite_steps, t.lr, self._last_checkpoint)

    def _last_checkpoint(self):
        return next(iter(complete(self.ckpt.root)), None) if self.ckpt is not None else None

    # -- resume, then claim the folder ------------------------------------------------------------------
    def resume(self) -> None:
        """Continue exactly where the checkpoint was taken; only then is anything in output_dir changed."""
        e, s = self.engine, self.state
        if self.saved is not None:
            # Model, optimizer, scheduler and this rank's RNG continue exactly; the log sums (global) go to rank 0.
            load_start = time.perf_counter()
            try:
                self.ckpt.load(self.resume_from)
            except (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as exc:
                # Its files matched their manifest, so they were written so: say so rather than a traceback.
                raise UserError(f"checkpoint '{self.resume_from}' cannot be loaded: {' '.join(str(exc).split())[:200]}; "
                                "resume from an earlier checkpoint (nothing in output_dir was changed)") from None
            load_s = time.perf_counter() - load_start
            self.ckpt.best_step = s.best_step
            if e.is_main:
                self.acc.sums += torch.tensor(s.log_sums, dtype=torch.float64, device=e.device)
                print(self._resume_line(load_s), flush=True)
        self.signals.phase = "train"  # from here a stop signal is a request to save and stop
        self._claim_output()

    def _resume_line(self, load_s: float) -> str:
        s, saved, e = self.state, self.saved, self.engine
        moved = "" if saved["world_size"] == e.world_size and saved["window"] == self.window else (
            f"; world {saved['world_size']} x accumulation {saved['window'] // saved['world_size']} -> "
            f"world {e.world_size} x accumulation {self.t.grad_accum}, the rest of the epoch re-cut")
        size_mb = sum(f.stat().st_size for f in self.resume_from.rglob("*") if f.is_file()) / 2**20
        return (f"dist-train: resuming from {self.resume_from} at step {s.step} (epoch {s.epoch}, batch "
                f"{s.batches_done} of {self.plan_len}){moved}; loaded {size_mb:.0f} MB in {load_s:.2f} s")

    def _claim_output(self) -> None:
        """Rank 0 writes the run's files. A fresh run keeps an earlier run aside (run_dir) until it trains."""
        cfg, e = self.cfg, self.engine
        e.run_on_main(self._write_run_files, "writing the run's files")
        self.bar = tqdm(total=self.state.total_steps, initial=self.state.step, desc="train", unit="step",
                        mininterval=1.0, disable=not (e.is_main and cfg.logging.progress_bar))
        self.teardown.callback(self.bar.close)
        self.last_log = time.perf_counter()
        # MFU: ~6 FLOPs per parameter per (non-pad) token for forward + backward, against the peak of all ranks.
        self.flops_per_token = 6 * e.num_parameters()
        self.peak_flops = peak_tflops(e.device, cfg.logging.peak_tflops) * 1e12 * e.world_size
        e.train()

    def _write_run_files(self) -> None:
        cfg, rd = self.cfg, self.run_dir
        self.teardown.callback(self._leave_output)
        if self.saved is None:
            self.claimed = True
            rd.set_aside()
        else:
            for folder, problem in self.damaged:
                print(f"dist-train: warning: skipping checkpoint {folder}: {problem}; renamed it to "
                      f"{set_aside(folder).name}", file=sys.stderr, flush=True)
            rd.trim_metrics(self.state.step)
        rd.write("config.yaml", dump_yaml(cfg))
        self.sink = MetricsSink(cfg.output_dir, cfg.logging.tensorboard,
                                purge_step=self.state.step + 1 if self.saved else None)
        self.teardown.callback(self.sink.close)

    def _leave_output(self) -> None:
        """Rank 0, at exit: no half-written checkpoint survives and ``latest`` names the newest complete
        one; a fresh run that ends before its first checkpoint leaves the folder as it found it."""
        self.ckpt.repair()
        if self.claimed and not self.committed:
            self.run_dir.abandon()

    # -- the loop ---------------------------------------------------------------------------------------
    def batches(self):
        """This rank's micro-batches for each remaining optimizer step, epoch after epoch, from the saved
        position."""
        s, t, e = self.state, self.t, self.engine
        while s.step < s.total_steps:
            plan = train_plan(self.lengths, t.micro_batch_size, t.seed, s.epoch, self.cfg.data.group_by_length)
            # Resume mid-epoch: start at the saved position of the plan (a slice, nothing is replayed).
            todo = step_windows(plan[s.batches_done:], t.grad_accum, e.rank, e.world_size)[:s.total_steps - s.step]
            loader = iter(self.task.loader(self.splits.train, [b for w in todo for b, _ in w], s.epoch,
                                           self.cfg.data.num_workers, pin_memory=e.device.type == "cuda"))
            for local in todo:
                yield [({k: v.to(e.device, non_blocking=True) for k, v in next(loader).items()}, w)
                       for _, w in local]

    def step(self, micro: list) -> bool:
        """One optimizer step over this rank's micro-batches; True when it ends the epoch."""
        e, task = self.engine, self.task
        # Loss normalisation: the step's gradient is that of the MEAN loss over every target (example
        # or token) in the global batch. Each micro-batch contributes sum(loss) / N_global, where
        # N_global counts targets over all micro-batches and ranks of this step, so a short last
        # window or uneven padding weighs nothing differently. Filler micro-batches (weight 0) keep
        # ranks in lockstep and add nothing. (Engines whose gradient all-reduce averages over ranks
        # rescale by world size inside backward.)
        counts = [task.count(b) * w for b, w in micro]
        # One all-reduce carries the global target count and whether any rank was asked to stop.
        n_global, self.acc.stop_votes = e.all_reduce_sum(
            torch.stack([sum(counts), counts[0].new_tensor(self.signals.flag)]))
        n_global = n_global.clamp(min=1)  # a step without targets (e.g. nothing masked) adds zero, not NaN
        sums = torch.zeros(3, dtype=torch.float64, device=e.device)  # loss sum, examples, tokens
        for i, (b, w) in enumerate(micro):
            loss_sum = self.loss_sum(e.forward(**task.inputs(b)), b) * w
            e.backward(loss_sum / n_global, sync=i == len(micro) - 1)
            sums += torch.stack([loss_sum.detach().double(), sums.new_tensor(len(b["input_ids"]) * w),
                                 task.tokens(b).double() * w])
        grad_norm = e.step(skip_nonfinite=self.t.max_nonfinite_steps > 0).to(e.device, torch.float64)
        self.state.skipped_steps = self.acc.add(sums, sum(counts), grad_norm, self.state.skipped_steps)
        self.bar.update(1)
        if not self.trained:
            self._first_step_done()
        epoch_end = self.state.advance(self.window, self.plan_len)
        self.faults.after_step(self.state.step, e.unwrapped)
        return epoch_end

    def _first_step_done(self) -> None:
        self.trained = True
        if self.engine.is_main:
            print(f"dist-train: first optimizer step done {time.perf_counter() - self.started:.2f} s after start",
                  flush=True)

    def log_due(self) -> bool:
        s = self.state
        return s.step % self.cfg.logging.every_steps == 0 or s.step == s.total_steps

    def log(self) -> None:
        """The log line: sums since the last one over all ranks. Stop requests and non-finite steps are read
        here, where the host syncs anyway: ordinary steps never wait."""
        e, s = self.engine, self.state
        self.stop_now = self.acc.stop_votes.item() > 0
        loss_sum, count, examples, tokens = self.acc.read(e)
        elapsed = time.perf_counter() - self.last_log
        s.examples_seen += examples
        # No targets since the last line (every step skipped, nothing masked): no loss, rather than a 0.
        record = {"epoch": s.epoch_progress(self.plan_len), "loss": loss_sum / count if count else None, "lr": e.lr(),
                  "grad_norm": float(self.acc.grad_norm), "examples_seen": s.examples_seen,
                  "examples_per_s": examples / elapsed, "tokens_per_s": tokens / elapsed}
        if self.peak_flops:
            record["mfu"] = record["tokens_per_s"] * self.flops_per_token / self.peak_flops
        if s.skipped_steps:
            record["skipped_steps"] = s.skipped_steps
        if self.sink:
            self.sink.write("train", s.step, record)
            self.bar.set_postfix(loss=f"{record['loss'] or float('nan'):.4f}", lr=f"{record['lr']:.2e}")
        self.last_log = time.perf_counter()

    def validation_due(self, epoch_end: bool) -> bool:
        every = self.t.eval_every
        return (every > 0 and self.state.step % every == 0) or (every <= 0 and epoch_end)

    def validate(self) -> None:
        """Evaluate on validation; a better metric (never NaN) marks the best step and saves it."""
        s = self.state
        if self.splits.validation is None:
            return
        self.acc.check(self.engine)
        s.validated_at = s.step
        report = evaluate(self.engine, self.task, self.splits.validation, self.t.eval_batch_size, "validation")
        self.result.reports["validation"] = report
        if self.sink:
            self.sink.write("validation", s.step, {"epoch": s.epoch_progress(self.plan_len), **report})
            self.bar.write(summary_line(f"step {s.step} validation", report, self.task.summary))
        value = report[self.metric]
        if math.isfinite(value) and (s.best_metric is None or
                                     (value > s.best_metric if self.maximize else value < s.best_metric)):
            s.best_metric, s.best_step = value, s.step
            self.ckpt.mark_best(s.step)
            if self.last_saved == s.step:
                self.last_saved = None  # saved before this validation: again, with the best step recorded
            self.save()

    def save_due(self, epoch_end: bool) -> bool:
        every, c = self.cfg.checkpoint.every_steps, self.cfg.checkpoint
        return (every > 0 and self.state.step % every == 0) or (epoch_end and c.every_epoch) or self.stop_now

    def save(self) -> None:
        """A checkpoint of this step (a collective), never of non-finite weights; once per step (a step that
        validation saved as the best is not saved again)."""
        if self.last_saved == self.state.step:
            return
        self.acc.check(self.engine)
        self.state.log_sums = self.engine.all_reduce_sum(self.acc.sums).tolist()
        self.ckpt.save(self.state.step, self.state.state_dict(), dump_yaml(self.cfg))
        self.last_saved = self.state.step
        if not self.committed:
            self.committed = True  # the new run can be resumed: an earlier run set aside (overwrite) may go
            if self.engine.is_main:
                self.run_dir.drop_previous()

    # -- the end ----------------------------------------------------------------------------------------
    def stop(self) -> RunResult:
        """A stop signal reached some rank: the checkpoint of this step is saved (save_due); exit cleanly."""
        if self.engine.is_main:
            who = self.signals.received or "a stop signal"
            print(f"dist-train: stopped after step {self.state.step} on request ({who} on some rank); saved "
                  f"{self.ckpt.path(self.state.step)}; continue with checkpoint.resume=auto", flush=True)
        self.result.stopped_at, self.result.exit_code = self.state.step, self.signals.exit_code
        return self.result

    def finish(self) -> RunResult:
        """Final validation, checkpoint, best weights, export and test report. A stop signal now waits for
        them: they are the run's result."""
        self.signals.phase = "finish"
        self.faults.at_phase("finish")
        e, s = self.engine, self.state
        self.bar.close()
        if s.validated_at != s.step:
            self.validate()
        per_rank = rank_stats(e)
        if self.sink:
            self.sink.write("ranks", s.step, per_rank)
        self.save()
        self._load_best()
        self._export()
        if self.splits.test is not None:
            self.result.reports["test"] = report = evaluate(e, self.task, self.splits.test, self.t.eval_batch_size)
            if e.is_main:
                self.run_dir.write("eval_report.json", json.dumps(report, indent=2))  # small: no wait needed
                self.task.save_eval_outputs(self.run_dir.out / "test_outputs.jsonl")
                self.sink.write("test", s.step, report)
                print(summary_line("test", report, self.task.summary), flush=True)
        if e.is_main:
            self._draw_report()
        if self.signals.received:
            self.result.exit_code = self.signals.exit_code
        return self.result

    def _draw_report(self) -> None:
        """report.png: the run's curves. A picture never fails the run: a warning instead."""
        from dist_train.use.report import draw_runs

        try:
            draw_runs([self.run_dir.out], self.run_dir.out / "report.png")
        except Exception as exc:  # noqa: BLE001 - plotting must not cost the run its result
            print(f"dist-train: warning: report.png not drawn: {' '.join(str(exc).split())[:200]}", file=sys.stderr,
                  flush=True)

    def _load_best(self) -> None:
        s, e = self.state, self.engine
        if not self.cfg.checkpoint.load_best_at_end or s.best_step is None or s.best_step == s.step:
            return
        problem = self.ckpt.load_weights_verified(s.best_step)
        if not e.is_main:
            return
        if problem:
            print(f"dist-train: warning: the best checkpoint (step {s.best_step}) is damaged ({problem}); it was "
                  f"renamed aside and final/ holds the weights of the last step ({s.step}) instead", file=sys.stderr,
                  flush=True)
        else:
            self.bar.write(f"loaded the best checkpoint (step {s.best_step}, {self.metric} {s.best_metric:.4f}) "
                           "for final/")

    def _export(self) -> None:
        """final/: written beside the old one and swapped in; refused (on every rank) if not finite."""
        e = self.engine
        state_dict = e.full_state_dict()
        e.run_on_main(lambda: publish(e.unwrapped, self.tokenizer, self.run_dir.out / "final", self.task,
                                      state_dict=state_dict) and None, "exporting final/")


def rank_stats(engine) -> dict:
    """Per-rank peak memory, parameter and optimizer-state elements, gathered to every rank as lists."""
    mine = torch.tensor([peak_memory_mb(engine.device), engine.num_parameters(local=True),
                         engine.optimizer_state_numel()], dtype=torch.float64, device=engine.device)
    table = torch.zeros(engine.world_size, 3, dtype=torch.float64, device=engine.device)
    table[engine.rank] = mine
    table = engine.all_reduce_sum(table).tolist()
    return {"peak_memory_mb": [r[0] for r in table], "param_elements": [int(r[1]) for r in table],
            "optimizer_state_elements": [int(r[2]) for r in table]}
