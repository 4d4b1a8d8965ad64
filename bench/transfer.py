"""Transfer experiments: does pretraining pay off for sentiment classification on data/sentiment?

    python bench/transfer.py minilm              # (a) pretrained all-MiniLM-L6-v2 vs the same model from random init
    python bench/transfer.py pretrain            # (b) dist-train's own masked-LM pretraining vs its from-scratch twin

(a) fine-tunes all-MiniLM-L6-v2 with its pretrained weights and the same architecture from random init,
    same data, settings and budget, for each seed; prints the test accuracies and the gap.
(b) masked-LM-pretrains a small BERT with dist-train (configs/mlm_pretrain.yaml with the overrides below)
    on Austen plus the unlabeled sentences of data/sentiment/train.tsv, keeping a checkpoint at several
    budgets; exports each, fine-tunes each on data/sentiment with every seed, and fine-tunes the
    from-scratch twin (same config, same tokenizer, random weights) the same way. Prints test accuracy
    (mean over seeds) against pretraining tokens, and the gain over scratch.
Every run is a real `dist-train train` command (they are printed); results go to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The small BERT of (b): 2 layers of width 128 is what 20 CPU minutes can pretrain on 2 cores here.
SMALL_BERT = {"num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 2, "intermediate_size": 512,
              "max_position_embeddings": 256}
FINETUNE = ["train.micro_batch_size=32", "train.eval_every=0", "train.warmup_ratio=0.06", "logging.every_steps=50",
            "logging.progress_bar=false", "logging.tensorboard=false", "checkpoint.keep_last_n=1"]


def run(args: list[str], log: Path) -> None:
    cmd = [sys.executable, "-m", "dist_train", "train", *args]
    print("$ dist-train train " + " ".join(args), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        code = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=os.environ).returncode
    if code != 0:
        sys.exit(f"failed (exit {code}); see {log}")


def finetune(work: Path, name: str, seed: int, model_args: list[str], extra: list[str]) -> float:
    out = work / f"ft-{name}-seed{seed}"
    run(["configs/sentiment.yaml", f"output_dir={out}", "overwrite=true", f"train.seed={seed}", *FINETUNE,
         *model_args, *extra], work / "logs" / f"ft-{name}-seed{seed}.log")
    return json.loads((out / "eval_report.json").read_text())["accuracy"]


def minilm(a) -> dict:
    work = Path(a.work)
    from dist_train.models import resolve_model_path

    config = json.loads(Path(resolve_model_path("all-MiniLM-L6-v2"), "config.json").read_text())
    keys = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size", "hidden_act", "max_position_embeddings", "type_vocab_size", "layer_norm_eps")
    scratch = ["model.pretrained=null", "model.tokenizer=all-MiniLM-L6-v2"] + [
        f"model.config.{k}={config[k]}" for k in keys]
    extra = [f"train.epochs={a.epochs}", f"train.lr={a.lr}"]
    rows = []
    for seed in a.seeds:
        pre = finetune(work, "pretrained", seed, [], extra)
        rnd = finetune(work, "random-init", seed, scratch, extra)
        rows.append({"seed": seed, "pretrained": pre, "random_init": rnd})
        print(f"seed {seed}: pretrained {pre:.4f}  random init {rnd:.4f}", flush=True)
    mean = {k: statistics.mean(r[k] for r in rows) for k in ("pretrained", "random_init")}
    result = {"experiment": "minilm", "epochs": a.epochs, "lr": a.lr, "runs": rows, "mean": mean,
              "gap_points": 100 * (mean["pretrained"] - mean["random_init"])}
    print(f"\ntest accuracy, mean of {len(rows)} seeds: pretrained {mean['pretrained']:.4f}, random init "
          f"{mean['random_init']:.4f}, gap {result['gap_points']:+.1f} points")
    return result


def pretrain(a) -> dict:
    work = Path(a.work)
    pre_out = work / "pretrain"
    every = a.steps // a.points
    model_cfg = [f"model.config.{k}={v}" for k, v in SMALL_BERT.items()]
    train_text = (["data/corpus/austen.txt"] if a.austen else []) + ["data/sentiment/train.tsv"] * a.in_domain_copies
    started = time.perf_counter()
    if not a.finetune_only:
        run(["configs/mlm_pretrain.yaml", f"output_dir={pre_out}", "overwrite=true", *model_cfg,
             f"data.train=[{','.join(train_text)}]", "data.text_column=sentence",
             f"model.train_tokenizer.vocab_size={a.vocab}", f"train.max_steps={a.steps}", f"train.lr={a.pretrain_lr}",
             f"data.max_length={a.block}", f"task.whole_word_mask={str(a.whole_word).lower()}",
             f"train.micro_batch_size={a.pretrain_batch}", f"train.eval_every={every}", f"checkpoint.every_steps={every}",
             f"checkpoint.keep_last_n={a.points + 1}", "checkpoint.every_epoch=false", "checkpoint.load_best_at_end=false",
             "logging.progress_bar=false", "logging.every_steps=50"], work / "logs" / "pretrain.log")
    pretrain_s = time.perf_counter() - started  # (--finetune-only: the checkpoints of an earlier run)
    points = []
    for step in range(every, a.steps + 1, every):
        ckpt = pre_out / "checkpoints" / f"step-{step}"
        dest = work / f"pretrained-{step}"
        shutil.rmtree(dest, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "dist_train", "export", str(ckpt), str(dest)], cwd=ROOT, check=True,
                       capture_output=True)
        state = json.loads((ckpt / "trainer_state.json").read_text())
        tokens = state["step"] * a.pretrain_batch * state["window"] * a.block  # blocks are full: no padding
        points.append({"step": step, "tokens": tokens, "model": dest})
    validation = [json.loads(line) for line in (pre_out / "metrics.jsonl").read_text().splitlines()]
    val_loss = {r["step"]: r["loss"] for r in validation if r["split"] == "validation"}
    extra = [f"train.epochs={a.epochs}", f"train.lr={a.lr}"]
    scratch = ["model.pretrained=null", f"model.tokenizer={pre_out / 'final'}", "model.config.model_type=bert",
               *model_cfg]
    table = {"scratch": {"tokens": 0, "accuracy": [finetune(work, "scratch", s, scratch, extra) for s in a.seeds]}}
    for p in points:
        table[f"step-{p['step']}"] = {"tokens": p["tokens"], "mlm_validation_loss": val_loss.get(p["step"]),
                                      "accuracy": [finetune(work, f"pt{p['step']}", s, [f"model.pretrained={p['model']}"],
                                                            extra) for s in a.seeds]}
    base = statistics.mean(table["scratch"]["accuracy"])
    print(f"\npretraining: {a.steps} steps in {pretrain_s / 60:.1f} min; fine-tuning: {a.epochs} epochs at lr {a.lr}, "
          f"seeds {a.seeds}")
    print(f"{'model':<12} {'pretrain tokens':>15} {'MLM val loss':>12} {'test acc (mean)':>15} {'gain (points)':>13}")
    for name, row in table.items():
        row["mean"] = statistics.mean(row["accuracy"])
        row["gain_points"] = 100 * (row["mean"] - base)
        loss = row.get("mlm_validation_loss")
        print(f"{name:<12} {row['tokens']:>15,} {loss if loss is None else round(loss, 3)!s:>12} "
              f"{row['mean']:>15.4f} {row['gain_points']:>+13.1f}")
    return {"experiment": "pretrain", "pretrain_minutes": None if a.finetune_only else pretrain_s / 60, "settings": vars(a) | {"model": SMALL_BERT},
            "table": table}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="experiment", required=True)
    m = sub.add_parser("minilm", help="(a) pretrained all-MiniLM-L6-v2 vs random init")
    m.add_argument("--epochs", type=float, default=1.0)
    m.add_argument("--lr", type=float, default=1e-4)
    b = sub.add_parser("pretrain", help="(b) dist-train MLM pretraining vs from scratch, gain against tokens")
    b.add_argument("--steps", type=int, default=2400, help="pretraining optimizer steps")
    b.add_argument("--points", type=int, default=4, help="checkpoints along the pretraining to fine-tune")
    b.add_argument("--pretrain-batch", type=int, default=32)
    b.add_argument("--pretrain-lr", type=float, default=1e-3)
    b.add_argument("--vocab", type=int, default=8000)
    b.add_argument("--in-domain-copies", type=int, default=1, help="times the sentiment sentences enter the corpus")
    b.add_argument("--no-austen", dest="austen", action="store_false", help="pretrain on the sentiment sentences only")
    b.add_argument("--block", type=int, default=128, help="pretraining block length (tokens)")
    b.add_argument("--whole-word", action="store_true", help="whole-word masking")
    b.add_argument("--finetune-only", action="store_true",
                   help="reuse the pretraining checkpoints already in the work folder; fine-tune only")
    b.add_argument("--tag", default="", help="suffix of the work folder and results file (several settings)")
    b.add_argument("--epochs", type=float, default=4.0)
    b.add_argument("--lr", type=float, default=3e-4)
    for q in (m, b):
        q.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
        q.add_argument("--work", default=str(ROOT / "output" / "transfer"))
        q.add_argument("--out", help="results JSON (default bench/results/transfer_EXPERIMENT.json)")
    a = p.parse_args()
    name = a.experiment + (f"_{a.tag}" if getattr(a, "tag", "") else "")
    a.work = str(Path(a.work) / name)
    result = minilm(a) if a.experiment == "minilm" else pretrain(a)
    out = Path(a.out or ROOT / "bench" / "results" / f"transfer_{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
