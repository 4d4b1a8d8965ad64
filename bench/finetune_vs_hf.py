"""Fine-tuning speed: dist-train against transformers' Trainer and the seed's padded-batches loop, same work.

    python -m bench finetune_vs_hf                        # MiniLM, 1,600 sentences, fp32, 3 rounds
    python -m bench finetune_vs_hf --precision bf16 --examples 320 --rounds 1
    python -m bench finetune_vs_hf --tiny --examples 128 --rounds 1       # a quick smoke run

Every arm fine-tunes the same model (all-MiniLM-L6-v2, or --tiny: a 2-layer width-64 BERT) on the same
first --examples rows of data/sentiment/train.tsv for one epoch, with the same hyperparameters (batch 32,
AdamW lr 1e-4, weight decay 0.01 off biases and LayerNorms, linear schedule with 6% warmup, clipping at 1.0,
max_length 64, seed 42), precision and thread count:

    dist_train       dist-train as configured by configs/sentiment.yaml (length-grouped dynamic batches; the
                     [CLS]-only last layer on, its default for this model)
    dist_train_stock the same with model.cls_only_last_layer=false: the whole last layer, as everyone else
    dist_train_malloc dist_train with train.reuse_host_memory=false: glibc's default handling of large blocks
    trainer          transformers Trainer, dynamic padding (DataCollatorWithPadding), random batches
    trainer_grouped  the same with train_sampling_strategy=group_by_length (group_by_length=True before v5)
    seed             the seed's approach: the whole set tokenized once, padded to its longest row, fixed
                     random batches of those tensors, the plain PyTorch loop
    bare             the least a loop can do on dist-train's own batches: the same length-grouped plan,
                     each batch padded to its longest row, the same (fused) AdamW, nothing else; the ratio
                     dist_train / bare is the framework's overhead

Each run is a fresh process; rounds alternate the arms (A B C D A B C D ...). Throughput is examples/s over
the optimizer steps after the first --warmup (the clock stops at each step's end, as a user's wall clock
would; set-up, tokenization and evaluation are outside it). Every run then reports its accuracy on all of
dev.tsv, so speed cannot hide a loss of accuracy. The ratios use the medians. Results: printed and written
to bench/results/finetune_vs_hf[_bf16].json.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("dist_train", "dist_train_stock", "dist_train_malloc", "trainer", "trainer_grouped", "seed", "bare")
HP = {"batch": 32, "lr": 1e-4, "weight_decay": 0.01, "warmup_ratio": 0.06, "max_grad_norm": 1.0,
      "max_length": 64, "seed": 42, "eval_batch": 64}
TINY = {"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 128, "max_position_embeddings": 128}


# -- the parent: data, rounds, medians --------------------------------------------------------------------
def prepare(a) -> None:
    """The shared inputs of every arm: the train slice and the model folder."""
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    lines = (ROOT / "data" / "sentiment" / "train.tsv").read_text().splitlines(keepends=True)
    if a.examples > len(lines) - 1:
        sys.exit(f"--examples {a.examples}: train.tsv has {len(lines) - 1} rows")
    (work / "train.tsv").write_text("".join(lines[: a.examples + 1]))
    dev = (ROOT / "data" / "sentiment" / "dev.tsv").read_text().splitlines(keepends=True)
    (work / "dev.tsv").write_text("".join(dev[: a.dev + 1]))
    if a.tiny and not (work / "model" / "config.json").exists():
        import torch
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(minilm_path())
        cfg = dict(TINY)
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg, vocab_size=len(tokenizer), num_labels=2)
        torch.manual_seed(0)
        AutoModelForSequenceClassification.from_config(config).save_pretrained(work / "model")
        tokenizer.save_pretrained(work / "model")


def real_tokens(a) -> int:
    """Tokens in the train slice without padding (what every arm must process at least)."""
    from transformers import AutoTokenizer

    texts, _ = read_tsv(Path(a.work) / "train.tsv")
    enc = AutoTokenizer.from_pretrained(model_folder(a))(texts, truncation=True, max_length=HP["max_length"])
    return sum(map(len, enc["input_ids"]))


def minilm_path() -> str:
    sys.path.insert(0, str(ROOT))
    from dist_train.model.files import resolve_model_path

    return resolve_model_path("all-MiniLM-L6-v2")


def run_arm(a, arm: str) -> dict:
    cmd = [sys.executable, __file__, "--arm", arm, *(f"--{k}={v}" for k, v in (
        ("work", a.work), ("precision", a.precision), ("warmup", a.warmup), ("examples", a.examples),
        ("dev", a.dev)))]
    cmd += ["--tiny"] if a.tiny else []
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.exit(f"{arm} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--examples", type=int, default=1600, help="training rows (one epoch)")
    p.add_argument("--dev", type=int, default=1000, help="dev.tsv rows for the accuracy check (default all)")
    p.add_argument("--warmup", type=int, default=5, help="untimed optimizer steps at the start of each run")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    p.add_argument("--tiny", action="store_true", help="a 2-layer width-64 BERT (smoke test)")
    p.add_argument("--work", default=str(ROOT / "output" / "bench-finetune-vs-hf"))
    p.add_argument("--out", default=None, help="JSON results (default bench/results/finetune_vs_hf[_bf16].json)")
    p.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.arm:
        return print(json.dumps(ARM_RUNNERS[a.arm](a)))
    arms = [x for x in a.arms.split(",") if x]
    if unknown := set(arms) - set(ARMS):
        sys.exit(f"--arms: unknown {', '.join(sorted(unknown))}; choose from {', '.join(ARMS)}")
    if math.ceil(a.examples / HP["batch"]) <= a.warmup:
        sys.exit(f"--examples {a.examples} gives no timed steps after --warmup {a.warmup}")
    prepare(a)
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    for r in range(a.rounds):
        for arm in arms:
            runs[arm].append(run_arm(a, arm))
            x = runs[arm][-1]
            print(f"round {r + 1} {arm:<16} {x['examples_per_s']:7.1f} examples/s   dev accuracy "
                  f"{x['dev_accuracy']:.4f}", flush=True)
    real = real_tokens(a)
    median = {arm: statistics.median(x["examples_per_s"] for x in rs) for arm, rs in runs.items()}
    ratios = {f"dist_train/{arm}": median["dist_train"] / median[arm] for arm in arms
              if arm != "dist_train" and "dist_train" in median}
    import torch
    import transformers

    result = {"model": "tiny" if a.tiny else "all-MiniLM-L6-v2", "examples": a.examples, "precision": a.precision,
              "threads": a.threads, "warmup_steps": a.warmup, "rounds": a.rounds, "hyperparameters": HP,
              "real_tokens": real, "runs": runs, "median_examples_per_s": median, "ratios": ratios,
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
              "command": " ".join(["python -m bench finetune_vs_hf", *sys.argv[1:]])}
    out = Path(a.out or ROOT / "bench" / "results" / f"finetune_vs_hf{'_bf16' if a.precision == 'bf16' else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("median examples/s: " + ", ".join(f"{arm} {v:.1f}" for arm, v in median.items()))
    print("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    fed = {arm: rs[0]["input_tokens"] / real for arm, rs in runs.items() if "input_tokens" in rs[0]}
    print(f"token positions fed per real token ({real:,} real): " + ", ".join(f"{k} {v:.2f}" for k, v in fed.items())
          + ("; dist_train feeds bare's batches" if "dist_train" in runs else ""))


# -- the arms (each in its own process) -------------------------------------------------------------------
def model_folder(a) -> str:
    return str(Path(a.work) / "model") if a.tiny else minilm_path()


def read_tsv(path) -> tuple[list[str], list[int]]:
    """What a user would write: plain TSV (the files hold bare quotes, so no CSV quoting)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r["sentence"] for r in rows], [int(r["label"]) for r in rows]


def step_sizes(a) -> list[int]:
    n, b = a.examples, HP["batch"]
    return [min(b, n - i) for i in range(0, n, b)]


def throughput(a, step_end_times: list[float]) -> float:
    """Examples/s over the steps after the warm-up ones, from each step's end time."""
    sizes = step_sizes(a)
    return sum(sizes[a.warmup:]) / (step_end_times[-1] - step_end_times[a.warmup - 1])


def dist_train_arm(a, stock: bool = False, reuse_host_memory: bool = True) -> dict:
    work = Path(a.work) / ("dist-train-stock" if stock else "dist-train" if reuse_host_memory else "dist-train-malloc")
    cfg = yaml.safe_load((ROOT / "configs" / "sentiment.yaml").read_text())
    model = {"pretrained": model_folder(a), "cls_only_last_layer": "auto" if not stock else False}
    cfg.update(output_dir=str(work / "run"), overwrite=True, model=model)
    cfg["data"].update(train=str(Path(a.work) / "train.tsv"), validation=str(Path(a.work) / "dev.tsv"),
                       test=None, max_length=HP["max_length"], cache_dir=str(work / "cache"))
    cfg["train"].update(epochs=1, micro_batch_size=HP["batch"], lr=HP["lr"], weight_decay=HP["weight_decay"],
                        warmup_ratio=HP["warmup_ratio"], max_grad_norm=HP["max_grad_norm"], seed=HP["seed"],
                        precision=a.precision, eval_every=0, eval_batch_size=HP["eval_batch"],
                        reuse_host_memory=reuse_host_memory)
    cfg["checkpoint"].update(every_epoch=False, load_best_at_end=False)
    # A log record every `warmup` steps: the first covers the warm-up steps, the others the timed ones.
    cfg["logging"] = {"every_steps": a.warmup, "progress_bar": False, "tensorboard": False}
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    from dist_train.config import load_config
    from dist_train.run.trainer import train

    train(load_config(work / "config.yaml"))
    records = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if r["split"] == "train"]
    timed = [(b["examples_seen"] - x["examples_seen"], b["examples_per_s"]) for x, b in zip(logged, logged[1:])]
    dev = [r for r in records if r["split"] == "validation"][-1]
    return {"examples_per_s": sum(n for n, _ in timed) / sum(n / v for n, v in timed),
            "dev_accuracy": dev["accuracy"], "steps": logged[-1]["step"]}


def trainer_arm(a, grouped: bool) -> dict:
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainerCallback, TrainingArguments)

    path = model_folder(a)
    tokenizer = AutoTokenizer.from_pretrained(path)

    def dataset(file):
        texts, labels = read_tsv(file)
        ds = Dataset.from_dict({"sentence": texts, "label": labels})
        return ds.map(lambda b: tokenizer(b["sentence"], truncation=True, max_length=HP["max_length"]),
                      batched=True, remove_columns=["sentence"])

    train_ds, dev_ds = dataset(Path(a.work) / "train.tsv"), dataset(Path(a.work) / "dev.tsv")
    torch.manual_seed(HP["seed"])
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    steps = len(step_sizes(a))
    strategy = {"train_sampling_strategy": "group_by_length" if grouped else "random"}
    args = TrainingArguments(
        output_dir=str(Path(a.work) / "trainer"), per_device_train_batch_size=HP["batch"],
        per_device_eval_batch_size=HP["eval_batch"], learning_rate=HP["lr"], weight_decay=HP["weight_decay"],
        warmup_steps=math.ceil(HP["warmup_ratio"] * steps), lr_scheduler_type="linear",
        max_grad_norm=HP["max_grad_norm"], num_train_epochs=1, seed=HP["seed"], bf16=a.precision == "bf16",
        use_cpu=not torch.cuda.is_available(), logging_steps=10**6, save_strategy="no", eval_strategy="no",
        report_to=[], disable_tqdm=True, dataloader_num_workers=0, **strategy)
    ends: list[float] = []
    pad, fed = DataCollatorWithPadding(tokenizer), [0, 0]

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            ends.append(time.perf_counter())

        def on_train_end(self, *_, **__):
            fed[1] = fed[0]  # what training fed (evaluation collates through the same function)

    def collate(features):  # Trainer's own collator, counting the token positions it feeds the model
        batch = pad(features)
        fed[0] += batch["input_ids"].numel()
        return batch

    trainer = Trainer(model=model, args=args, train_dataset=train_ds, data_collator=collate, callbacks=[Clock()])
    trainer.train()
    pred = trainer.predict(dev_ds)
    accuracy = float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())
    return {"examples_per_s": throughput(a, ends), "dev_accuracy": accuracy, "steps": len(ends),
            "input_tokens": fed[1]}


def seed_arm(a) -> dict:
    import torch
    from transformers import AutoTokenizer

    path = model_folder(a)
    tokenizer = AutoTokenizer.from_pretrained(path)

    def tensors(file):  # the whole set at once, padded to its longest row
        texts, labels = read_tsv(file)
        enc = tokenizer(texts, padding=True, truncation=True, max_length=HP["max_length"], return_tensors="pt")
        return torch.utils.data.TensorDataset(enc["input_ids"], enc["attention_mask"], torch.tensor(labels))

    train_set, dev_set = tensors(Path(a.work) / "train.tsv"), tensors(Path(a.work) / "dev.tsv")
    loader = torch.utils.data.DataLoader(train_set, batch_size=HP["batch"], shuffle=True)
    dev = torch.utils.data.DataLoader(dev_set, batch_size=HP["eval_batch"])
    # A plain loop's optimizer: torch's default AdamW (a per-parameter loop on CPU).
    return plain_loop(a, path, loader, dev, fused=None)


def bare_arm(a) -> dict:
    import torch
    from transformers import AutoTokenizer

    from dist_train.data.sampler import train_plan

    path = model_folder(a)
    tokenizer = AutoTokenizer.from_pretrained(path)

    def batches(file, plan):  # dist-train's batches (same indices), each padded to its own longest row
        texts, labels = read_tsv(file)
        enc = tokenizer(texts, truncation=True, max_length=HP["max_length"], return_token_type_ids=False)
        out = []
        for b in plan([len(ids) for ids in enc["input_ids"]]):
            pad = tokenizer.pad({k: [enc[k][i] for i in b] for k in enc}, return_tensors="pt")
            out.append((pad["input_ids"], pad["attention_mask"], torch.tensor([labels[i] for i in b])))
        return out

    train = batches(Path(a.work) / "train.tsv", lambda lens: train_plan(lens, HP["batch"], HP["seed"], 0, True))
    dev = batches(Path(a.work) / "dev.tsv", lambda lens: [
        list(range(i, min(i + HP["eval_batch"], len(lens)))) for i in range(0, len(lens), HP["eval_batch"])])
    return plain_loop(a, path, train, dev, fused=True)


def plain_loop(a, path: str, train, dev, fused) -> dict:
    """Forward, mean cross-entropy, backward, clip, AdamW, schedule; then dev accuracy. Nothing else."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForSequenceClassification, get_linear_schedule_with_warmup

    torch.manual_seed(HP["seed"])
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
    plain = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": HP["weight_decay"]},
                             {"params": plain, "weight_decay": 0.0}], lr=HP["lr"], fused=fused)
    steps = len(step_sizes(a))
    sched = get_linear_schedule_with_warmup(opt, math.ceil(HP["warmup_ratio"] * steps), steps)
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.precision == "bf16")
    ends, fed = [], 0
    model.train()
    for ids, mask, labels in train:
        fed += ids.numel()
        with amp:
            logits = model(input_ids=ids, attention_mask=mask).logits
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), HP["max_grad_norm"])
        opt.step()
        sched.step()
        opt.zero_grad()
        ends.append(time.perf_counter())
    model.eval()
    correct = total = 0
    with torch.no_grad(), amp:
        for ids, mask, labels in dev:
            correct += (model(input_ids=ids, attention_mask=mask).logits.argmax(-1) == labels).sum().item()
            total += len(labels)
    return {"examples_per_s": throughput(a, ends), "dev_accuracy": correct / total, "steps": len(ends),
            "input_tokens": fed}


ARM_RUNNERS = {"dist_train": dist_train_arm, "dist_train_stock": lambda a: dist_train_arm(a, stock=True),
               "dist_train_malloc": lambda a: dist_train_arm(a, reuse_host_memory=False),
               "trainer": lambda a: trainer_arm(a, grouped=False),
               "trainer_grouped": lambda a: trainer_arm(a, grouped=True), "seed": seed_arm, "bare": bare_arm}

if __name__ == "__main__":
    main()
