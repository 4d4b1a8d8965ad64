"""Output-layer cost of a large vocabulary: full logits vs model.labelled_logits (gather, chunked), memory and time per step.

    python -m bench labelled_logits                      # Gemma-3-style, vocab 262,144, widths 64 and 640
    python -m bench labelled_logits --width 640 --rounds 3

One forward + backward of a 2-layer Gemma 3 text model (random init; the vocabulary and width of Gemma 3
270M, so the output layer is the real one's size) on a batch of 8 x 128 tokens whose second half carries
labels (a prompt and its answer), with each mode in a fresh process, modes alternating, R rounds: peak
resident memory above the process's start (the logits and their gradient are the point) and the median step
time. Every mode's loss is printed and stored: they agree (the modes compute the same function). Results in
bench/results/labelled_logits.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = {"full": False, "gather": "gather", "chunked": "auto"}


def child(a) -> None:
    """One mode, one process: a few steps, then one JSON line (loss, seconds per step, peak RSS growth)."""
    import resource
    import time

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    sys.path.insert(0, str(ROOT))
    torch.manual_seed(0)
    config = AutoConfig.for_model("gemma3_text", vocab_size=a.vocab, hidden_size=a.width, intermediate_size=4 * a.width,
                                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=64)
    model = AutoModelForCausalLM.from_config(config)
    ids = torch.randint(0, a.vocab, (a.batch, a.length))
    labels = ids.clone()
    labels[:, : a.length // 2] = -100
    from dist_train.model.causal_loss import CausalLMLoss

    setting = MODES[a.child]
    if setting == "gather":  # what models that post-process their logits get: the rows, then full-vocab logits
        import dist_train.model.causal_loss as causal_loss

        causal_loss.chunkable = lambda model, head: False
    loss_fn = CausalLMLoss(model, True if setting == "gather" else setting)
    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, loss = [], None
    for _ in range(a.steps):
        t0 = time.perf_counter()
        loss_fn.arm(labels)
        out = model(input_ids=ids, use_cache=False)
        loss = loss_fn(out, labels)
        loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start_rss
    print(json.dumps({"mode": a.child, "actual_mode": loss_fn.mode, "loss": float(loss), "step_s": times[1:],
                      "peak_mib": peak / 1024}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, nargs="+", default=[64, 640])
    p.add_argument("--vocab", type=int, default=262_144)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="per process; the first is not timed")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default="bench/results/labelled_logits.json")
    p.add_argument("--child", choices=list(MODES))
    a = p.parse_args()
    if a.child:
        a.width = a.width[0]
        return child(a)
    import torch

    results = {"settings": {"model": "gemma3_text, 2 layers", "vocab": a.vocab, "batch": a.batch, "length": a.length,
                            "labelled": "second half of each row", "steps_timed": a.steps - 1, "rounds": a.rounds,
                            "threads": os.environ.get("OMP_NUM_THREADS", "torch default"), "torch": torch.__version__},
               "widths": {}}
    for width in a.width:
        runs = {m: [] for m in MODES}
        for r in range(a.rounds):
            for mode in MODES:
                cmd = [sys.executable, __file__, "--child", mode, "--width", str(width), "--vocab", str(a.vocab),
                       "--batch", str(a.batch), "--length", str(a.length), "--steps", str(a.steps)]
                line = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
                runs[mode].append(json.loads(line))
        table = {}
        for mode, rs in runs.items():
            table[mode] = {"actual_mode": rs[0]["actual_mode"], "loss": rs[0]["loss"],
                           "step_s_median": statistics.median(t for r in rs for t in r["step_s"]),
                           "peak_mib_median": statistics.median(r["peak_mib"] for r in rs), "rounds": rs}
            print(f"width {width:4d} {mode:8s} loss {rs[0]['loss']:.4f}  {table[mode]['step_s_median']:.2f} s/step  "
                  f"peak +{table[mode]['peak_mib_median']:.0f} MiB", flush=True)
        full = table["full"]
        for mode in ("gather", "chunked"):
            table[mode]["speedup_vs_full"] = full["step_s_median"] / table[mode]["step_s_median"]
            table[mode]["memory_vs_full"] = table[mode]["peak_mib_median"] / full["peak_mib_median"]
        results["widths"][str(width)] = table
    Path(ROOT / a.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
