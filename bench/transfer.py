"""Transfer experiments: does pretraining pay off for sentiment classification on data/sentiment?

    python bench/transfer.py minilm              # (a) pretrained all-MiniLM-L6-v2 vs the same model from random init
    python bench/transfer.py pretrain            # (b) dist-train's own masked-LM pretraining vs its from-scratch twin
    python -m bench transfer curve               # learning curves: test accuracy against labelled examples

(a) fine-tunes all-MiniLM-L6-v2 with its pretrained weights and the same architecture from random init,
    same data, settings and budget, for each seed; prints the test accuracies and the gap.
(b) masked-LM-pretrains a small BERT with dist-train (configs/mlm_pretrain.yaml with the overrides below)
    on Austen plus the unlabeled sentences of data/sentiment/train.tsv, keeping a checkpoint at several
    budgets; exports each, fine-tunes each on data/sentiment with every seed, and fine-tunes the
    from-scratch twin (same config, same tokenizer, random weights) the same way. Prints test accuracy
    (mean over seeds) against pretraining tokens, and the gain over scratch.
curve: test accuracy against the number of labelled sentences (nested stratified subsets, ``data.train_rows``)
    for every arm: a small BERT from random init, the same pretrained by dist-train as a masked LM, a small GPT-2
    pretrained by dist-train as a causal LM (classified through its last real token), all-MiniLM-L6-v2 with the
    [CLS] pooler and with mean pooling, and all-MiniLM-L6-v2 after domain-adaptive masked-LM pretraining
    (configs/mlm_continue_minilm.yaml). Each fine-tuning lr is picked on dev; the picture goes next to the JSON.
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


def run(args: list[str], log: Path, threads: int | None = None) -> None:
    cmd = [sys.executable, "-m", "dist_train", "train", *args]
    print("$ dist-train train " + " ".join(args), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    with open(log, "w") as fh:
        code = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        raise SystemExit(f"failed (exit {code}); see {log}")


def finetune(work: Path, name: str, seed: int, model_args: list[str], extra: list[str]) -> float:
    out = work / f"ft-{name}-seed{seed}"
    run(["configs/sentiment.yaml", f"output_dir={out}", "overwrite=true", f"train.seed={seed}", *FINETUNE,
         *model_args, *extra], work / "logs" / f"ft-{name}-seed{seed}.log")
    return json.loads((out / "eval_report.json").read_text())["accuracy"]


def minilm(a) -> dict:
    work = Path(a.work)
    from dist_train.model.files import resolve_model_path

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



# (c) is (b)'s size in GPT-2 form, so the two pretraining objectives compare on one architecture size.
SMALL_GPT = {"n_layer": 2, "n_head": 2, "n_embd": 128, "n_positions": 256}
CURVE_ARMS = {
    "scratch": "small BERT, random init",
    "mlm": "small BERT, masked-LM pretrained by dist-train",
    "clm": "small GPT-2, causal-LM pretrained by dist-train",
    "minilm": "all-MiniLM-L6-v2, [CLS] pooler",
    "minilm_mean": "all-MiniLM-L6-v2, mean pooling",
    "minilm_dapt": "all-MiniLM-L6-v2 + domain-adaptive MLM",
}
SMALL_ARMS = ("scratch", "mlm", "clm")


def pretrain_once(work: Path, name: str, args: list[str], batch: int, block: int) -> dict:
    """Run one pretraining; a finished one in the work folder (its summary written last) is reused."""
    out = work / name
    summary = out / "curve_pretrain.json"
    if summary.is_file():
        print(f"reusing {out} (delete it to pretrain again)", flush=True)
        return json.loads(summary.read_text())
    started = time.perf_counter()
    run([*args, f"output_dir={out}", "overwrite=true", "logging.progress_bar=false", "logging.tensorboard=false",
         "logging.every_steps=50", "checkpoint.keep_last_n=1"], work / "logs" / f"{name}.log")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = max(r["step"] for r in records if r.get("split") == "train")
    validation = [r for r in records if r.get("split") == "validation"]
    result = {"minutes": (time.perf_counter() - started) / 60, "steps": steps,
              # Blocks are packed full (documents joined and cut), so every position is a real token.
              "tokens": steps * batch * block, "validation_loss": validation[-1]["loss"] if validation else None,
              "best_validation_loss": min((r["loss"] for r in validation), default=None), "model": str(out / "final")}
    summary.write_text(json.dumps(result, indent=2))
    return result


def curve_epochs(n: int, batch: int, min_steps: int) -> int:
    """Epochs for ``n`` labelled rows: at least one pass and at least ``min_steps`` optimizer steps, so that
    100 sentences train as many steps as 3,000 (a fixed number of epochs would leave small sets untrained)."""
    return max(1, -(-min_steps // -(-n // batch)))


def curve_run(work: Path, arm: str, model_args: list[str], n: int, draw: int, lr: float, a) -> dict:
    """One fine-tuning on the first ``n`` rows of draw ``draw`` (fine-tuning seed = draw); cached by name."""
    name = f"{arm}-n{n}-r{draw}-lr{lr:g}-b{a.batch}-s{a.min_steps}-e{a.evals}"  # a cached run is this recipe's
    out, cached = work / "ft" / name, work / "ft" / f"{name}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    epochs = curve_epochs(n, a.batch, a.min_steps)
    steps = epochs * -(-n // a.batch)
    started = time.perf_counter()
    run(["configs/sentiment.yaml", f"output_dir={out}", "overwrite=true", f"train.seed={draw}",
         f"data.train_rows={n}", f"data.train_rows_seed={draw}", f"data.cache_dir={work / 'cache'}",
         f"train.micro_batch_size={a.batch}", f"train.epochs={epochs}", f"train.lr={lr}",
         f"train.eval_every={max(1, steps // a.evals)}", "train.warmup_ratio=0.06", "checkpoint.keep_last_n=1",
         "logging.every_steps=50", "logging.progress_bar=false", "logging.tensorboard=false", *model_args],
        work / "logs" / f"{name}.log", threads=a.threads)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    dev = max(r["accuracy"] for r in records if r.get("split") == "validation")
    result = {"arm": arm, "n": n, "draw": draw, "lr": lr, "epochs": epochs, "steps": steps, "dev_accuracy": dev,
              "test_accuracy": json.loads((out / "eval_report.json").read_text())["accuracy"],
              "seconds": time.perf_counter() - started}
    cached.write_text(json.dumps(result))
    shutil.rmtree(out)  # the weights are not needed again; ~90 MB per MiniLM run
    return result


def run_all(jobs: list[tuple], parallel: int) -> list[dict]:
    """Fine-tunings side by side (each with its share of the cores), the longest first."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(lambda job: curve_run(*job), jobs))


def curve(a) -> dict:
    work = Path(a.work)
    started = time.perf_counter()
    text = [f"data.train=[data/corpus/austen.txt{',data/sentiment/train.tsv' * a.in_domain_copies}]",
            "data.text_column=sentence", f"data.max_length={a.block}", f"train.micro_batch_size={a.pretrain_batch}"]
    pretraining = {}
    need = set(a.arms)
    if need & {"scratch", "mlm"}:  # scratch borrows the MLM run's tokenizer (trained on the same text)
        pretraining["mlm"] = pretrain_once(
            work, "pretrain-mlm", ["configs/mlm_pretrain.yaml", *text, f"train.max_steps={a.mlm_steps}",
                                   f"train.eval_every={a.mlm_steps // 4}", f"train.lr={a.pretrain_lr}",
                                   *[f"model.config.{k}={v}" for k, v in SMALL_BERT.items()]],
            a.pretrain_batch, a.block)
    if "clm" in need:
        pretraining["clm"] = pretrain_once(
            work, "pretrain-clm", ["configs/clm_pretrain.yaml", *text, f"train.max_steps={a.clm_steps}",
                                   f"train.eval_every={a.clm_steps // 4}", f"train.lr={a.pretrain_lr}",
                                   *[f"model.config.{k}={v}" for k, v in SMALL_GPT.items()]],
            a.pretrain_batch, a.block)
    if "minilm_dapt" in need:
        pretraining["minilm_dapt"] = pretrain_once(work, "pretrain-minilm-dapt", ["configs/mlm_continue_minilm.yaml"],
                                                   32, 128)
    for arm, row in pretraining.items():
        print(f"pretraining {arm}: {row['steps']} steps, {row['tokens']:,} tokens, {row['minutes']:.1f} min, "
              f"validation loss {row['validation_loss']:.3f}", flush=True)
    if a.pretrain_only:
        return {"experiment": "curve", "pretraining": pretraining}
    models = {
        "scratch": ["model.pretrained=null", f"model.tokenizer={pretraining.get('mlm', {}).get('model')}",
                    "model.config.model_type=bert", *[f"model.config.{k}={v}" for k, v in SMALL_BERT.items()]],
        "mlm": [f"model.pretrained={pretraining.get('mlm', {}).get('model')}"],
        "clm": [f"model.pretrained={pretraining.get('clm', {}).get('model')}"],
        "minilm": ["task.pooling=cls"],
        "minilm_mean": ["task.pooling=mean"],
        "minilm_dapt": [f"model.pretrained={pretraining.get('minilm_dapt', {}).get('model')}", "task.pooling=cls"],
    }
    # lr per arm, picked on dev accuracy (never test) at one few-label size with the first draw.
    grid = {arm: a.small_lrs if arm in SMALL_ARMS else a.minilm_lrs for arm in a.arms}
    tuning = run_all([(work, arm, models[arm], a.tune_size, 1, lr, a) for arm in a.arms for lr in grid[arm]],
                     a.parallel)
    lr = {arm: max((r for r in tuning if r["arm"] == arm), key=lambda r: r["dev_accuracy"])["lr"] for arm in a.arms}
    print("lr per arm (best dev accuracy at", a.tune_size, "labels):", lr, flush=True)
    runs_at = {n: a.large_runs if n >= a.large_from else a.runs for n in a.sizes}
    jobs = [(work, arm, models[arm], n, draw, lr[arm], a) for n in sorted(a.sizes, reverse=True) for arm in a.arms
            for draw in range(1, runs_at[n] + 1)]
    runs = run_all(jobs, a.parallel)
    table = {}
    for arm in a.arms:
        table[arm] = {"label": CURVE_ARMS[arm], "lr": lr[arm], "sizes": {}}
        for n in a.sizes:
            acc = [r["test_accuracy"] for r in runs if r["arm"] == arm and r["n"] == n]
            dev = [r["dev_accuracy"] for r in runs if r["arm"] == arm and r["n"] == n]
            table[arm]["sizes"][n] = {"test": acc, "mean": statistics.mean(acc),
                                      "std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                                      "dev_mean": statistics.mean(dev)}
    wall = time.perf_counter() - started
    result = {"experiment": "curve", "wall_minutes": wall / 60, "settings": vars(a) | {"small_bert": SMALL_BERT,
              "small_gpt": SMALL_GPT}, "pretraining": pretraining, "lr_tuning": tuning, "table": table,
              "recipe": {str(n): {"epochs": curve_epochs(n, a.batch, a.min_steps)} for n in a.sizes}}
    print(f"\ntest accuracy (mean +- std over {runs_at} runs per size: draw r and fine-tuning seed r), "
          f"recipe: batch {a.batch}, >= {a.min_steps} steps, epochs {[curve_epochs(n, a.batch, a.min_steps) for n in a.sizes]}")
    print(f"{'arm':<13} {'lr':>7} " + " ".join(f"{n:>13,}" for n in a.sizes))
    for arm, row in table.items():
        print(f"{arm:<13} {row['lr']:>7g} " + " ".join(
            f"{row['sizes'][n]['mean']:>7.3f}+-{row['sizes'][n]['std']:.3f}" for n in a.sizes))
    if "scratch" in table:
        for arm in ("mlm", "clm"):
            if arm in table:
                print(f"{arm} - scratch (points): " + " ".join(
                    f"{100 * (table[arm]['sizes'][n]['mean'] - table['scratch']['sizes'][n]['mean']):+.1f}" for n in a.sizes))
    if {"minilm", "minilm_dapt"} <= set(table):
        print("minilm_dapt - minilm (points): " + " ".join(
            f"{100 * (table['minilm_dapt']['sizes'][n]['mean'] - table['minilm']['sizes'][n]['mean']):+.1f}" for n in a.sizes))
    print(f"total wall time {wall / 60:.1f} min")
    return result


def draw_curve(result: dict, out: Path) -> Path:
    """Test accuracy against labelled examples (log x), one line per arm, a band of +- one std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dist_train.use.report import band_panel, save

    sizes = sorted(int(n) for n in next(iter(result["table"].values()))["sizes"])
    curves = {row["label"]: ([row["sizes"][str(n)]["mean"] for n in sizes], [row["sizes"][str(n)]["std"] for n in sizes])
              for row in result["table"].values()}
    fig, ax = plt.subplots(figsize=(9, 6), dpi=100)
    band_panel(ax, sizes, curves, "labelled training sentences (log scale)", "test accuracy (data/sentiment)",
               log_x=True)
    ax.set_xticks(sizes, [f"{n:,}" for n in sizes])
    ax.set_title("Few labels: test accuracy against labelled sentences (mean ± one std over runs)")
    return save(fig, out)


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
    c = sub.add_parser("curve", help="learning curves: test accuracy against labelled examples, every arm")
    c.add_argument("--arms", nargs="+", default=list(CURVE_ARMS), choices=list(CURVE_ARMS))
    c.add_argument("--sizes", type=int, nargs="+", default=[100, 300, 1000, 3000, 8568])
    c.add_argument("--runs", type=int, default=3, help="runs per point: run r uses subset draw r and fine-tuning seed r")
    c.add_argument("--large-runs", type=int, default=2,
                   help="runs per point from --large-from labels on (their spread is the smallest; time)")
    c.add_argument("--large-from", type=int, default=3000)
    c.add_argument("--batch", type=int, default=16, help="fine-tuning batch")
    c.add_argument("--min-steps", type=int, default=100, help="fine-tuning steps at least (small sets: more epochs)")
    c.add_argument("--evals", type=int, default=1,
                   help="dev evaluations per fine-tuning (the best is tested; 1: the end of training only)")
    c.add_argument("--tune-size", type=int, default=300, help="labelled rows at which each arm's lr is picked on dev")
    c.add_argument("--small-lrs", type=float, nargs="+", default=[3e-4, 1e-3])
    c.add_argument("--minilm-lrs", type=float, nargs="+", default=[5e-5, 1e-4])
    c.add_argument("--mlm-steps", type=int, default=1200, help="masked-LM pretraining steps (~10 min here)")
    c.add_argument("--clm-steps", type=int, default=1200, help="causal-LM pretraining steps")
    c.add_argument("--pretrain-lr", type=float, default=1e-3)
    c.add_argument("--pretrain-batch", type=int, default=32)
    c.add_argument("--block", type=int, default=128, help="pretraining block length (tokens)")
    c.add_argument("--in-domain-copies", type=int, default=3, help="times the sentiment sentences enter the corpus")
    c.add_argument("--pretrain-only", action="store_true", help="stop after the pretraining runs")
    c.add_argument("--parallel", type=int, default=2, help="fine-tunings at once")
    c.add_argument("--tag", default="")
    for q in (m, b):
        q.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    for q in (m, b, c):
        q.add_argument("--work", default=str(ROOT / "output" / "transfer"))
        q.add_argument("--out", help="results JSON (default bench/results/transfer_EXPERIMENT.json)")
    a = p.parse_args()
    name = a.experiment + (f"_{a.tag}" if getattr(a, "tag", "") else "")
    a.work = str(Path(a.work) / name)
    if a.experiment == "curve":
        a.threads = max(1, (os.cpu_count() or 1) // a.parallel)
    result = {"minilm": minilm, "pretrain": pretrain, "curve": curve}[a.experiment](a)
    out = Path(a.out or ROOT / "bench" / "results" / f"transfer_{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    if a.experiment == "curve" and "table" in result:
        print(f"wrote {draw_curve(json.loads(out.read_text()), out.with_suffix('.png'))}")


if __name__ == "__main__":
    main()
