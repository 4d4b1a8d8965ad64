"""Resume cost: time to the first optimizer step when resuming at 10% and 90% of an epoch, against a fresh
start of the same run; and checkpoint save / load throughput.

    python bench/resume.py                      # MiniLM on 4,000 sentiment rows, 3 rounds, single process
    python bench/resume.py --rows 1000 --rounds 1 --model tiny   # a quick smoke run

1. A preparation run trains to 90% of one epoch, keeping the checkpoints taken at 10% and at 90%.
2. Rounds of three fresh processes each, in turn: a fresh start, a resume from the 10% checkpoint, a resume
   from the 90% checkpoint (each into its own output_dir, stopping after its first step). Each prints how
   long after start its first optimizer step finished; the ratios resume / fresh use the medians.
   A resume that replayed the data to find its place would get slower from 10% to 90%; an O(1) one does not.
3. In one process: save and load the checkpoint of a model with its Adam state several times (atomic
   write, fsync, CRC manifest, then verify + load), as MB/s. Loads read a file the OS has just cached.
Results: printed and written to bench/results/resume.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = {"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 128, "vocab_size": 30522, "max_position_embeddings": 128}


def write_config(work: Path, rows: int, model: str) -> tuple[Path, int]:
    lines = (ROOT / "data" / "sentiment" / "train.tsv").read_text().splitlines(keepends=True)
    (work / "train.tsv").write_text("".join(lines[: rows + 1]))
    model_cfg = {"pretrained": "all-MiniLM-L6-v2"} if model == "minilm" else {
        "config": TINY, "tokenizer": "all-MiniLM-L6-v2"}
    micro = 32
    steps_per_epoch = -(-rows // micro)
    cfg = {"output_dir": str(work / "prep"), "model": model_cfg,
           "data": {"train": str(work / "train.tsv"), "max_length": 64, "cache_dir": str(work / "cache")},
           "task": {"label_names": ["negative", "positive"]},
           "train": {"epochs": 1, "micro_batch_size": micro, "lr": 1e-4},
           "checkpoint": {"every_steps": 0, "keep_last_n": 100, "every_epoch": False},
           "logging": {"every_steps": 10, "progress_bar": False, "tensorboard": False}}
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, steps_per_epoch


def first_step_seconds(cfg: Path, *overrides: str) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))}
    result = subprocess.run([sys.executable, "-m", "dist_train", "train", str(cfg), *overrides], cwd=ROOT,
                            capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.exit(f"run failed: {result.stderr[-3000:]}")
    found = re.search(r"first optimizer step done ([\d.]+) s after start", result.stdout)
    return float(found.group(1))


def save_load_throughput(cfg_path: Path, work: Path, repeats: int) -> dict:
    """Checkpoint save / load MB/s of the bench model with Adam state, single engine, in this process."""
    from dist_train.run.checkpoint import CheckpointManager, require_valid
    from dist_train.config import load_config
    from dist_train.engine import build_engine
    from dist_train.run.optim import build_optimizer, build_scheduler
    from dist_train.tasks import build_task

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    cfg = load_config(cfg_path, ["engine.kind=single"])
    engine = build_engine(cfg)
    task = build_task(cfg)
    tokenizer = task.load_tokenizer()
    task.prepare(tokenizer)
    model = task.build_model()
    engine.prepare(model, lambda m: build_optimizer(m, cfg.train), lambda opt: build_scheduler(opt, cfg.train, 100))
    batch = tokenizer(["a fine film"] * 4, return_tensors="pt")
    engine.backward(engine.forward(**batch).logits.float().sum())
    engine.step()  # Adam state now exists
    ckpt = CheckpointManager(work / "throughput", keep_last_n=1, engine=engine)
    saves, loads, size = [], [], 0.0
    for i in range(repeats):
        start = time.perf_counter()
        folder = ckpt.save(i + 1, {"step": i + 1}, "{}")
        saves.append(time.perf_counter() - start)
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20
        start = time.perf_counter()
        require_valid(folder)  # what a resume does: check the manifest's sizes and CRCs, then load
        ckpt.load(folder)
        loads.append(time.perf_counter() - start)
    return {"checkpoint_mb": size, "save_s": statistics.median(saves), "load_s": statistics.median(loads),
            "save_mb_per_s": size / statistics.median(saves), "load_mb_per_s": size / statistics.median(loads)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4000, help="training rows (one epoch = rows / 32 steps)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (fresh, resume 10%%, resume 90%%)")
    parser.add_argument("--model", choices=["minilm", "tiny"], default="minilm")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "resume.json"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-resume-"))
    try:
        cfg, steps_per_epoch = write_config(work, args.rows, args.model)
        at10, at90 = max(1, round(0.1 * steps_per_epoch)), max(2, round(0.9 * steps_per_epoch))
        print(f"preparing: {args.model}, {args.rows} rows, {steps_per_epoch} steps an epoch; "
              f"checkpoints at steps {at10} and {at90}", flush=True)
        start = time.perf_counter()
        first_step_seconds(cfg, f"train.max_steps={at90}", f"checkpoint.every_steps={at10}")
        ckpts = work / "prep" / "checkpoints"
        for step in list(ckpts.glob("step-*")):
            if step.name not in (f"step-{at10}", f"step-{at90}"):
                shutil.rmtree(step)
        print(f"  prepared in {time.perf_counter() - start:.0f} s", flush=True)

        times: dict[str, list[float]] = {"fresh": [], "resume_10pct": [], "resume_90pct": []}
        for r in range(args.rounds):
            for name, extra in (("fresh", ["train.max_steps=1"]),
                                ("resume_10pct", [f"checkpoint.resume={ckpts / f'step-{at10}'}",
                                                  f"train.max_steps={at10 + 1}"]),
                                ("resume_90pct", [f"checkpoint.resume={ckpts / f'step-{at90}'}",
                                                  f"train.max_steps={at90 + 1}"])):
                out = work / f"{name}-{r}"
                seconds = first_step_seconds(cfg, f"output_dir={out}", "checkpoint.every_epoch=false", *extra)
                times[name].append(seconds)
                shutil.rmtree(out, ignore_errors=True)
                print(f"  round {r + 1} {name}: first step after {seconds:.2f} s", flush=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        io = save_load_throughput(cfg, work, repeats=3)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result = {"model": args.model, "rows": args.rows, "steps_per_epoch": steps_per_epoch, "rounds": args.rounds,
              "threads": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count())), "seconds": times,
              "median_s": med, "ratio_resume_10pct": med["resume_10pct"] / med["fresh"],
              "ratio_resume_90pct": med["resume_90pct"] / med["fresh"], **io}
    print(f"\ntime to first optimizer step (median of {args.rounds}): fresh {med['fresh']:.2f} s, "
          f"resume at 10% {med['resume_10pct']:.2f} s, at 90% {med['resume_90pct']:.2f} s")
    print(f"ratio resume/fresh: at 10% {result['ratio_resume_10pct']:.2f}, at 90% "
          f"{result['ratio_resume_90pct']:.2f}")
    print(f"checkpoint {io['checkpoint_mb']:.0f} MB: save {io['save_mb_per_s']:.0f} MB/s ({io['save_s']:.2f} s), "
          f"load {io['load_mb_per_s']:.0f} MB/s ({io['load_s']:.2f} s)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
