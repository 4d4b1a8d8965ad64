"""The whole job, not only the step: configs/sentiment.yaml as a user runs it, against Trainer and the seed's script.

    python -m bench job_vs_trainer                          # the demo job, 3 rounds (about 25 min a round here)
    python -m bench job_vs_trainer --rounds 1 --arms dist_train,trainer
    python -m bench job_vs_trainer --tiny --train-rows 96 --rounds 1        # a quick smoke run

Every arm does the whole job of the config (default configs/sentiment.yaml): its epochs, batch, learning rate,
warmup, weight decay, clipping, max_length and seed, validation on the dev file every ``train.eval_every``
steps with the best weights kept, the test file evaluated with the best weights, and the model exported to a
folder. Each arm is a fresh process; its wall time runs from before the process starts to after it exits
(imports, tokenization, validation, checkpoints, the test pass and the export are all in it):

    dist_train   `dist-train train CONFIG` (what the README's headline job runs), into a new output_dir, with a
                 new tokenization cache (a first run: no cached work from an earlier round)
    trainer      the same job with transformers' Trainer at its best settings for it: datasets' csv loader and
                 map, DataCollatorWithPadding, train_sampling_strategy=group_by_length, eval and save every
                 eval_every steps, load_best_model_at_end on accuracy, save_total_limit=1, fused AdamW (its
                 default), then evaluate on test and save_model
    seed         the seed's script: every file tokenized once and padded to its longest row, fixed random
                 batches, the plain loop with torch's default AdamW, dev accuracy every eval_every steps with the
                 best state kept in memory, the test pass, save_pretrained

``--profile DIR`` samples every run with py-spy (``--nonblocking``, 20 Hz: the process is never paused) into
DIR/ARM-ROUND.txt and prints where each arm's time went, by phase (imports, data, model set-up, training steps,
validation, checkpoints, test, export); the profiled wall times are slightly slower than unprofiled ones.

Rounds alternate the arms (A B C A B C ...); the ratios use the median wall times (``trainer / dist_train``:
how many times longer Trainer takes). Each run also reports its best dev accuracy and
its test accuracy, so speed cannot hide a loss of accuracy. Results: printed and written to
bench/results/job_vs_trainer.json.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("dist_train", "trainer", "seed")
TINY = {"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 128, "max_position_embeddings": 128}


# -- the parent: the job's inputs, rounds, medians -----------------------------------------------------------
def job(a) -> dict:
    """What every arm reads: the files, the model folder and the hyperparameters of the config."""
    cfg = yaml.safe_load(Path(a.config).read_text())
    d, t = cfg["data"], cfg["train"]
    work = Path(a.work)
    files = {split: str(ROOT / d[key]) for split, key in (("train", "train"), ("dev", "validation"), ("test", "test"))}
    if a.train_rows:
        lines = Path(files["train"]).read_text().splitlines(keepends=True)
        files["train"] = str(work / "train.tsv")
        Path(files["train"]).write_text("".join(lines[: a.train_rows + 1]))
    return {"files": files, "model": str(work / "model") if a.tiny else cfg["model"]["pretrained"],
            "text": d["text_column"], "label": d["label_column"], "max_length": d["max_length"],
            "epochs": a.epochs or t["epochs"], "batch": t["micro_batch_size"], "lr": float(t["lr"]),
            "warmup_ratio": t["warmup_ratio"], "weight_decay": t["weight_decay"], "max_grad_norm": t["max_grad_norm"],
            "eval_every": t["eval_every"], "seed": t["seed"], "eval_batch": 64}


def prepare_tiny(a, spec: dict) -> None:
    """--tiny: a 2-layer width-64 BERT with the MiniLM tokenizer, saved as a pretrained folder."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    sys.path.insert(0, str(ROOT))
    from dist_train.model.files import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2"))
    cfg = dict(TINY)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg, vocab_size=len(tokenizer), num_labels=2)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(spec["model"])
    tokenizer.save_pretrained(spec["model"])


def run_arm(a, arm: str, run: int, spec: dict) -> dict:
    """One run of one arm in a fresh process, from a clean slate (no output, no cache of an earlier run)."""
    out = Path(a.work) / f"{arm}-{run}"
    for old in (out, Path(f"{out}-cache")):
        shutil.rmtree(old, ignore_errors=True)
    if arm == "dist_train":  # the real command, as the README runs it
        cmd = [sys.executable, "-m", "launcher", "train", a.config, f"output_dir={out}", "logging.progress_bar=false",
               f"data.cache_dir={out}-cache", f"data.train={spec['files']['train']}", f"train.epochs={spec['epochs']}",
               f"model.pretrained={spec['model']}"]
    else:
        cmd = [sys.executable, __file__, "--arm", arm, "--out-dir", str(out), "--work", a.work, "--config", a.config,
               *(["--train-rows", str(a.train_rows)] if a.train_rows else []),
               *(["--epochs", str(a.epochs)] if a.epochs else []), *(["--tiny"] if a.tiny else [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT), "HF_DATASETS_CACHE": f"{out}-cache"}
    if a.profile:
        Path(a.profile).mkdir(parents=True, exist_ok=True)
        cmd = ["py-spy", "record", "--nonblocking", "--subprocesses", "--rate", "20", "--format", "raw", "-o",
               str(Path(a.profile) / f"{arm}-{run}.txt"), "--", *cmd]
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{arm} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    report = dist_train_report(out) if arm == "dist_train" else json.loads(
        [line for line in result.stdout.strip().splitlines() if line.startswith("{")][-1])
    if not (Path(report["export"]) / "config.json").is_file():
        sys.exit(f"{arm}: no exported model in {report['export']}")
    if a.profile:
        report["phases_s"] = phases(Path(a.profile) / f"{arm}-{run}.txt", wall)
    return {"wall_s": wall, **report}


# Where a sample's time goes: the first phase (in this order) with a function on the sample's stack. The names
# are those of dist-train (dist_train/run/trainer.py's Run phases), transformers' Trainer and the seed's script.
PHASES = (
    ("checkpoints", ("CheckpointManager.save", "Trainer._save_checkpoint", "Trainer._load_best_model",
                     "Trainer._rotate_checkpoints")),
    ("export", ("export_model", "publish", "Trainer.save_model", "save_pretrained")),
    ("validation", ("Run.validate", "Trainer._maybe_log_save_evaluate", "seed_arm.<locals>.accuracy")),
    ("test", ("Run.finish", "Trainer.evaluate")),  # the seed's one test pass counts as validation
    ("data", ("Run._prepare_data", "Dataset.map", "DatasetDict.map", "load_dataset", "seed_arm.<locals>.tensors")),
    ("model set-up", ("Run._build_model", "from_pretrained", "Trainer.__init__")),
    ("training steps", ("Run.step", "Trainer.train", "seed_arm")),
    ("imports", ("_find_and_load",)),
)


def phases(profile: Path, wall: float) -> dict[str, float]:
    """Seconds per phase from a py-spy raw profile (samples of the busiest thread, scaled to the wall time)."""
    counts: dict[str, int] = {}
    for line in profile.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        names = {frame.split(" (")[0] for frame in stack.split(";")}
        phase = next((ph for ph, funcs in PHASES if names & set(funcs)), "other")
        counts[phase] = counts.get(phase, 0) + int(n)
    total = sum(counts.values()) or 1
    return {ph: round(wall * n / total, 1) for ph, n in sorted(counts.items(), key=lambda kv: -kv[1])}


def dist_train_report(out: Path) -> dict:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    dev = [r["accuracy"] for r in records if r["split"] == "validation"]
    test = json.loads((out / "eval_report.json").read_text())
    return {"best_dev_accuracy": max(dev), "test_accuracy": test["accuracy"], "export": str(out / "final")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "sentiment.yaml"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    p.add_argument("--train-rows", type=int, default=0, help="the first N training rows (default: all)")
    p.add_argument("--epochs", type=float, default=0, help="override the config's epochs")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--tiny", action="store_true", help="a 2-layer width-64 BERT (smoke test)")
    p.add_argument("--work", default=str(ROOT / "output" / "bench-job-vs-trainer"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "job_vs_trainer.json"))
    p.add_argument("--profile", metavar="DIR", help="sample every run with py-spy into DIR, print time per phase")
    p.add_argument("--arm", choices=("trainer", "seed"), help=argparse.SUPPRESS)
    p.add_argument("--out-dir", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.arm:
        return print(json.dumps(ARM_RUNNERS[a.arm](job(a), Path(a.out_dir))))
    arms = [x for x in a.arms.split(",") if x]
    if unknown := set(arms) - set(ARMS):
        sys.exit(f"--arms: unknown {', '.join(sorted(unknown))}; choose from {', '.join(ARMS)}")
    Path(a.work).mkdir(parents=True, exist_ok=True)
    spec = job(a)
    if a.tiny:
        prepare_tiny(a, spec)
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    for r in range(a.rounds):
        for arm in arms[r % len(arms):] + arms[: r % len(arms)]:
            runs[arm].append(x := run_arm(a, arm, r + 1, spec))
            print(f"round {r + 1} {arm:<11} {x['wall_s']:7.1f} s   best dev accuracy {x['best_dev_accuracy']:.4f}   "
                  f"test accuracy {x['test_accuracy']:.4f}", flush=True)
            if "phases_s" in x:
                print("    " + ", ".join(f"{ph} {t:.1f} s" for ph, t in x["phases_s"].items()), flush=True)
    median = {arm: statistics.median(x["wall_s"] for x in rs) for arm, rs in runs.items()}
    ratios = {f"{arm}/dist_train": median[arm] / median["dist_train"] for arm in arms
              if arm != "dist_train" and "dist_train" in median}
    import torch
    import transformers

    result = {"config": a.config, "model": "tiny" if a.tiny else spec["model"], "train_rows": a.train_rows or "all",
              "epochs": spec["epochs"], "threads": a.threads, "rounds": a.rounds, "runs": runs,
              "median_wall_s": median, "ratios": ratios,
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
              "command": " ".join(["python -m bench job_vs_trainer", *sys.argv[1:]])}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print("median wall s: " + ", ".join(f"{arm} {v:.1f}" for arm, v in median.items()))
    print("ratios (wall time, how many times dist-train's): "
          + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))


# -- the arms (each in its own process) -----------------------------------------------------------------------
def read_tsv(path: str, spec: dict) -> tuple[list[str], list[int]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r[spec["text"]] for r in rows], [int(r[spec["label"]]) for r in rows]


def total_steps(spec: dict, rows: int) -> int:
    return math.ceil(spec["epochs"] * math.ceil(rows / spec["batch"]))


def trainer_arm(spec: dict, out: Path) -> dict:
    import numpy as np
    from datasets import load_dataset
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments)

    tokenizer = AutoTokenizer.from_pretrained(model_path(spec))
    files = {"train": spec["files"]["train"], "validation": spec["files"]["dev"], "test": spec["files"]["test"]}
    raw = load_dataset("csv", data_files=files, delimiter="\t", quoting=csv.QUOTE_NONE)
    data = raw.map(lambda b: tokenizer(b[spec["text"]], truncation=True, max_length=spec["max_length"]),
                   batched=True, remove_columns=[spec["text"]]).rename_column(spec["label"], "labels")
    model = AutoModelForSequenceClassification.from_pretrained(model_path(spec), num_labels=2)
    steps = total_steps(spec, len(data["train"]))
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=spec["batch"], per_device_eval_batch_size=spec["eval_batch"],
        learning_rate=spec["lr"], weight_decay=spec["weight_decay"], max_grad_norm=spec["max_grad_norm"],
        warmup_steps=math.ceil(spec["warmup_ratio"] * steps), lr_scheduler_type="linear",
        num_train_epochs=spec["epochs"], seed=spec["seed"], train_sampling_strategy="group_by_length",
        eval_strategy="steps", eval_steps=spec["eval_every"], save_strategy="steps", save_steps=spec["eval_every"],
        load_best_model_at_end=True, metric_for_best_model="accuracy", greater_is_better=True, save_total_limit=1,
        logging_steps=20, report_to="none", disable_tqdm=True)

    def accuracy(pred):
        return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}

    trainer = Trainer(model=model, args=args, train_dataset=data["train"], eval_dataset=data["validation"],
                      data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy)
    trainer.train()
    dev = [r["eval_accuracy"] for r in trainer.state.log_history if "eval_accuracy" in r]
    test = trainer.evaluate(data["test"], metric_key_prefix="test")
    trainer.save_model(str(out / "final"))
    tokenizer.save_pretrained(out / "final")
    return {"best_dev_accuracy": max(dev), "test_accuracy": test["test_accuracy"], "export": str(out / "final")}


def seed_arm(spec: dict, out: Path) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

    tokenizer = AutoTokenizer.from_pretrained(model_path(spec))

    def tensors(path):  # the whole file at once, padded to its longest row
        texts, labels = read_tsv(path, spec)
        enc = tokenizer(texts, padding=True, truncation=True, max_length=spec["max_length"], return_tensors="pt")
        return torch.utils.data.TensorDataset(enc["input_ids"], enc["attention_mask"], torch.tensor(labels))

    torch.manual_seed(spec["seed"])
    train_set, dev_set, test_set = (tensors(spec["files"][s]) for s in ("train", "dev", "test"))
    loader = torch.utils.data.DataLoader(train_set, batch_size=spec["batch"], shuffle=True)
    model = AutoModelForSequenceClassification.from_pretrained(model_path(spec), num_labels=2)
    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=spec["weight_decay"])
    steps = total_steps(spec, len(train_set))
    sched = get_linear_schedule_with_warmup(opt, math.ceil(spec["warmup_ratio"] * steps), steps)

    def accuracy(dataset) -> float:
        model.eval()
        correct = 0
        with torch.no_grad():
            for ids, mask, labels in torch.utils.data.DataLoader(dataset, batch_size=spec["eval_batch"]):
                correct += (model(input_ids=ids, attention_mask=mask).logits.argmax(-1) == labels).sum().item()
        model.train()
        return correct / len(dataset)

    best, best_state, step = -1.0, None, 0
    model.train()
    while step < steps:
        for ids, mask, labels in loader:
            F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec["max_grad_norm"])
            opt.step()
            sched.step()
            opt.zero_grad()
            step += 1
            if step % spec["eval_every"] == 0 or step == steps:
                if (dev := accuracy(dev_set)) > best:
                    best, best_state = dev, copy.deepcopy(model.state_dict())
            if step == steps:
                break
    model.load_state_dict(best_state)
    test = accuracy(test_set)
    model.save_pretrained(out / "final")
    tokenizer.save_pretrained(out / "final")
    return {"best_dev_accuracy": best, "test_accuracy": test, "export": str(out / "final")}


def model_path(spec: dict) -> str:
    sys.path.insert(0, str(ROOT))
    from dist_train.model.files import resolve_model_path

    return resolve_model_path(spec["model"])


ARM_RUNNERS = {"trainer": trainer_arm, "seed": seed_arm}

if __name__ == "__main__":
    main()
