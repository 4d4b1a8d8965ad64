"""Per-rank memory of DDP, DeepSpeed ZeRO 1/2/3 and FSDP2 at world 2: parameter, gradient and optimizer-state bytes.

    python bench/zero_memory.py                 # runs every engine under torchrun --nproc-per-node 2, prints a table
    python bench/zero_memory.py --layers 4 --width 256

Each engine runs in its own torchrun job (this file is also the worker). After the backward pass of one
step (gradients held, before the optimizer step) and again after the step (optimizer state allocated),
the worker walks every live torch tensor, dedupes shared storage, and sorts the bytes into: model
parameters, gradients, optimizer state (Adam moments) and fp32 master partitions. Results go to
bench/results/zero_memory.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINES = {"ddp": ["engine.kind=ddp"], "zero1": ["engine.kind=deepspeed", "engine.deepspeed.zero_stage=1"],
           "zero2": ["engine.kind=deepspeed", "engine.deepspeed.zero_stage=2"],
           "zero3": ["engine.kind=deepspeed", "engine.deepspeed.zero_stage=3"], "fsdp": ["engine.kind=fsdp"]}


def _storages(tensors) -> dict[int, int]:
    """data_ptr -> bytes of the distinct storages behind ``tensors`` (a DTensor's: those of its local shard)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for t in tensors:
        t = t.to_local() if isinstance(t, DTensor) else t
        if t is None or t.device.type == "meta":
            continue
        s = t.untyped_storage()
        if s.nbytes():
            out[s.data_ptr()] = s.nbytes()
    return out


def measure(engine) -> dict[str, int]:
    import torch

    model_params = list(engine.unwrapped.parameters())
    params = _storages([getattr(p, "ds_tensor", p) for p in model_params])
    opt = engine.torch_optimizer()
    state = _storages(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    master = {k: v for k, v in _storages(p for g in opt.param_groups for p in g["params"]).items()
              if k not in params}
    grads = [p.grad for p in model_params] + [p.grad for g in opt.param_groups for p in g["params"]]
    zero = getattr(engine, "ds", None) and engine.ds.optimizer  # DeepSpeed keeps reduced gradients here
    averaged = getattr(zero, "averaged_gradients", None) or {}
    grads += [t for ts in averaged.values() for t in (ts if isinstance(ts, (list, tuple)) else [ts])]
    grads.append(getattr(zero, "grad_partitions_flat_buffer", None))
    grads = _storages(grads)
    # Gradient buffers DeepSpeed keeps outside .grad (partitioned, flattened) and DDP's reducer buckets are
    # not reachable from .grad; count every other live float tensor that is none of the above as "other".
    known = set(params) | set(state) | set(master) | set(grads)
    gc.collect()
    other = _storages(o for o in gc.get_objects() if torch.is_tensor(o) and o.is_floating_point())
    other = {k: v for k, v in other.items() if k not in known}
    return {"params": sum(params.values()), "grads": sum(grads.values()), "optim_state": sum(state.values()),
            "fp32_master": sum(master.values()), "other_tensors": sum(other.values())}


def worker(config: str, overrides: list[str], out_path: str) -> None:
    import torch

    from dist_train.config import load_config
    from dist_train.engine import build_engine
    from dist_train.run.optim import build_optimizer, build_scheduler
    from dist_train.run.seeding import seed_everything

    cfg = load_config(config, overrides)
    engine = build_engine(cfg)
    seed_everything(0)
    from transformers import AutoConfig, AutoModelForSequenceClassification

    kwargs = dict(cfg.model.config)
    model = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(kwargs.pop("model_type"), **kwargs))
    engine.prepare(model, lambda m: build_optimizer(m, cfg.train), lambda opt: build_scheduler(opt, cfg.train, 10))
    engine.train()
    ids = torch.randint(1000, 2000, (cfg.train.micro_batch_size, 64), device=engine.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    labels = torch.randint(0, 2, (cfg.train.micro_batch_size,), device=engine.device)
    loss = torch.nn.functional.cross_entropy(engine.forward(**batch).logits.float(), labels)
    engine.backward(loss, sync=True)
    after_backward = measure(engine)
    engine.step()
    after_step = measure(engine)
    row = {"after_backward": after_backward, "after_step": after_step,
           "param_elements": engine.num_parameters()}
    table = [None] * engine.world_size
    torch.distributed.all_gather_object(table, row)
    if engine.is_main:
        Path(out_path).write_text(json.dumps(table))
    engine.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--worker", nargs=2, metavar=("NAME", "OUT"), help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    tmp = Path(tempfile.mkdtemp())
    config = tmp / "bench.yaml"
    config.write_text(json.dumps({
        "model": {"config": {"model_type": "bert", "hidden_size": args.width, "num_hidden_layers": args.layers,
                             "num_attention_heads": max(1, args.width // 64), "intermediate_size": 4 * args.width,
                             "vocab_size": 30522}, "tokenizer": "all-MiniLM-L6-v2"},
        "data": {"train": "unused.tsv"}, "train": {"micro_batch_size": 4}}))
    if args.worker:
        name, out = args.worker
        worker(str(config), ENGINES[name], out)
        return
    results = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}
    for name in args.engines.split(","):
        out = tmp / f"{name}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone", __file__,
               "--worker", name, str(out), "--layers", str(args.layers), "--width", str(args.width)]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode and not out.is_file():
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        if proc.returncode:
            # Seen with DeepSpeed on CPU, about one run in five: a rank aborts at exit ("terminate called
            # without an active exception") after rank 0 wrote the gathered table; the numbers are complete.
            print(f"note: {name}: a worker exited with status {proc.returncode} after the results were written",
                  file=sys.stderr)
        results[name] = json.loads(out.read_text())
    mb = 2**20
    params = results[next(iter(results))][0]["param_elements"]
    print(f"BERT {args.layers} layers x width {args.width}: {params / 1e6:.2f}M parameters, fp32, world 2, "
          "per-rank MiB (rank 0)")
    print(f"{'engine':8} {'params':>8} {'grads':>8} {'optim state':>12} {'fp32 master':>12} {'other':>8}")
    for name, ranks in results.items():
        b, s = ranks[0]["after_backward"], ranks[0]["after_step"]
        print(f"{name:8} {s['params'] / mb:8.1f} {b['grads'] / mb:8.1f} {s['optim_state'] / mb:12.1f} "
              f"{s['fp32_master'] / mb:12.1f} {s['other_tensors'] / mb:8.1f}")
    dest = ROOT / "bench" / "results"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "zero_memory.json").write_text(json.dumps({"layers": args.layers, "width": args.width,
                                                      "results": results}, indent=2))


if __name__ == "__main__":
    main()
