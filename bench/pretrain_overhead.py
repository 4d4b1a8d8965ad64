"""Framework overhead of causal-LM pretraining: dist-train against a bare PyTorch loop on the same work.

    python bench/pretrain_overhead.py                  # configs/clm_pretrain.yaml's model, 3 rounds
    python bench/pretrain_overhead.py --tiny --steps 8 --rounds 1    # a quick smoke run

Both sides train the same GPT-2-style model (same config, seed, micro-batch, block length, AdamW settings,
gradient clipping, LR schedule and thread count) on the same token blocks, already tokenized (the stream
dist-train wrote to its cache). The bare loop is the plain PyTorch loop a user would write: random blocks
from the memory-mapped stream, forward, cross-entropy, backward, clip, step (the same fused AdamW, so the
ratio is framework overhead, not a kernel choice). Each side runs in a fresh process; rounds alternate
dist-train, bare, dist-train, bare... Throughput is tokens/s over the steps after the first ``--warmup``
ones (dist-train: from its own log records; bare: timed the same way). The ratio dist-train / bare uses
the medians. Results: printed and written to bench/results/pretrain_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "clm_pretrain.yaml"
TINY = {"n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 128}


def overrides(a) -> list[str]:
    out = [f"train.max_steps={a.warmup + a.steps}", f"logging.every_steps={a.warmup}", "data.validation_split=0",
           "train.eval_every=0", "checkpoint.every_epoch=false", "checkpoint.load_best_at_end=false",
           "logging.progress_bar=false", "logging.tensorboard=false", "overwrite=true", f"train.seed={a.seed}",
           f"data.cache_dir={a.work}/cache", f"train.reuse_host_memory={a.host_memory == 'reuse'}"]
    if a.tiny:
        out += [f"model.config.{k}={v}" for k, v in TINY.items()] + ["model.train_tokenizer.vocab_size=2000"]
    return out


def dist_train_run(a) -> float:
    out = Path(a.work) / "dist-train"
    # Log every `warmup` steps: the first record covers the warm-up steps, the later ones the timed steps.
    cmd = [sys.executable, "-m", "dist_train", "train", str(CONFIG), f"output_dir={out}", *overrides(a)]
    if a.steps % a.warmup:
        sys.exit("--steps must be a multiple of --warmup (dist-train logs every --warmup steps)")
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env(a))
    if result.returncode != 0:
        sys.exit(f"dist-train failed:\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if r["split"] == "train"][1:]
    per_record = a.warmup * a.batch * a.block  # tokens between two log records
    return len(timed) * per_record / sum(per_record / r["tokens_per_s"] for r in timed)


def bare_run(a) -> float:
    cmd = [sys.executable, __file__, "--bare", "--work", a.work, "--steps", str(a.steps), "--warmup", str(a.warmup),
           "--seed", str(a.seed), "--host-memory", a.host_memory] + (["--tiny"] if a.tiny else [])
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env(a))
    if result.returncode != 0:
        sys.exit(f"bare loop failed:\n{result.stderr[-3000:]}")
    return float(result.stdout.strip().splitlines()[-1])


def env(a) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(a.threads)}


def bare_loop(a) -> None:
    """The plain loop. Prints tokens/s over the timed steps (last line of stdout)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

    if a.host_memory == "reuse":
        from dist_train.run.host_memory import reuse_freed_memory

        reuse_freed_memory()  # what dist-train does at start (train.reuse_host_memory): the same heap in both
    cfg = yaml.safe_load(CONFIG.read_text())
    out = Path(a.work) / "dist-train"
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    model_cfg = dict(cfg["model"]["config"], **(TINY if a.tiny else {}))
    config = AutoConfig.for_model(model_cfg.pop("model_type"), **model_cfg, vocab_size=len(tokenizer),
                                  bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(a.seed)
    model = AutoModelForCausalLM.from_config(config)
    t = cfg["train"]
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=t["lr"], betas=t["adam_betas"],
                            fused=True)  # the same optimizer kernel as dist-train's default: the ratio is overhead
    total = a.warmup + a.steps
    sched = get_cosine_schedule_with_warmup(opt, int(total * t["warmup_ratio"]), total)
    stream = sorted((Path(a.work) / "cache" / "dist-train-tokens").glob("*.bin"), key=os.path.getmtime)[-1]
    meta = json.loads(stream.with_suffix(".json").read_text())
    tokens = np.memmap(stream, dtype=meta["dtype"], mode="r", shape=(meta["tokens"],))
    block, batch = a.block, a.batch
    n_blocks = len(tokens) // block
    rng = np.random.default_rng(a.seed)
    model.train()
    start = None
    for step in range(total):
        if step == a.warmup:
            start = time.perf_counter()
        idx = rng.integers(n_blocks, size=batch)
        x = torch.from_numpy(np.stack([tokens[i * block:(i + 1) * block] for i in idx]).astype(np.int64))
        logits = model(input_ids=x).logits
        targets = F.pad(x[:, 1:], (0, 1), value=-100)  # next token; the last position has none
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.get("max_grad_norm", 1.0))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    loss.item()
    print(a.steps * batch * block / (time.perf_counter() - start))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (also dist-train's log interval)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--tiny", action="store_true", help="a 2-layer width-64 model (smoke test)")
    p.add_argument("--host-memory", choices=["reuse", "default"], default="reuse",
                   help="both sides keep freed large blocks for reuse (dist-train's default, "
                        "train.reuse_host_memory) or both use glibc's defaults")
    p.add_argument("--work", default=str(ROOT / "output" / "bench-pretrain-overhead"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "pretrain_overhead.json"))
    p.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    cfg = yaml.safe_load(CONFIG.read_text())
    a.block, a.batch = cfg["data"]["max_length"], cfg["train"]["micro_batch_size"]
    if a.bare:
        return bare_loop(a)
    runs = {"dist_train": [], "bare": []}
    for r in range(a.rounds):
        runs["dist_train"].append(dist_train_run(a))
        runs["bare"].append(bare_run(a))
        print(f"round {r + 1}: dist-train {runs['dist_train'][-1]:,.0f} tokens/s, bare loop "
              f"{runs['bare'][-1]:,.0f} tokens/s", flush=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    ratio = med["dist_train"] / med["bare"]
    import torch

    result = {"model": "tiny" if a.tiny else cfg["model"]["config"], "block": a.block, "micro_batch": a.batch,
              "threads": a.threads, "host_memory": a.host_memory, "timed_steps": a.steps, "warmup_steps": a.warmup, "rounds": a.rounds,
              "tokens_per_s": runs, "median": med, "ratio_dist_train_over_bare": ratio, "torch": torch.__version__,
              "command": " ".join(["python bench/pretrain_overhead.py", *sys.argv[1:]])}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"median tokens/s: dist-train {med['dist_train']:,.0f}, bare loop {med['bare']:,.0f}; "
          f"ratio dist-train/bare {ratio:.3f}")


if __name__ == "__main__":
    main()
