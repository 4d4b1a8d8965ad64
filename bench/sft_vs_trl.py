"""LLM fine-tuning: dist-train against TRL's SFTTrainer and transformers' Trainer, the same LoRA job.

    python -m bench sft_vs_trl                          # Gemma 3 270M + LoRA, 16 steps x 3 rounds
    python -m bench sft_vs_trl --rounds 2 --steps 7 --profile   # the small run in bench/results
    python -m bench sft_vs_trl --profile                # + 2 more steps of every arm under torch.profiler
    python -m bench sft_vs_trl --tiny                   # a tiny random Gemma 3 and its own small tokenizer: a smoke run

The job: Gemma 3 270M (models/gemma-3-270m, `make gemma`), LoRA r=16, alpha=32, dropout 0 on the q, k, v, o,
gate, up and down projections, English -> French verse pairs (data/bible/en_fr/train.tsv, `make bible`), each
example `"English: {source}\\nFrench:"` + " " + target + EOS with the loss on the target tokens (and EOS) only;
micro-batch 8, AdamW lr 2e-4 constant (no warm-up, no weight decay), clipping 1.0, seed 42, fp32, one process.
The examples are the first --steps x 8 pairs of a seeded draw that fit --max-length tokens whole (so no framework
truncates anything and all of them train on the same tokens), one epoch of them. The arms:

    dist_train         python -m dist_train train configs/translate_en_fr.yaml + overrides (labelled-only,
                       chunked logits; length-grouped batches padded to their longest row)
    dist_train_packed  the same with data.packing=true (where the installed dist-train has it)
    trl                TRL SFTTrainer, prompt-completion data, completion_only_loss, packing off; fed
                       dist-train's batches in dist-train's order (sequential sampler)
    trl_packed         TRL SFTTrainer with packing=True (best-fit packing, padding-free rows)
    trl_gc             `trl` with TRL's own default gradient_checkpointing=True (the other TRL arms turn it
                       off, as no other arm recomputes activations)
    trainer            transformers Trainer, DataCollatorForSeq2Seq (labels -100 on prompt and padding), the
                       model's own loss over the full logits; fed dist-train's batches like `trl`

Every arm runs in a fresh process; rounds alternate the arms (A B C ... A B C ...); the results are medians.
Target tokens per second counts the tokens that carry the loss, from the end of the first optimizer step to
the end of the last timed one (model loading, data preparation and dist-train's export are outside it; a
packed epoch's short batch is not timed when it comes last). Peak memory is the process's peak resident set
(getrusage ru_maxrss) at the end of the last timed step (and of the whole process, export included), plus
torch.cuda.max_memory_allocated on a GPU. --profile adds 2 steps after the timed ones under torch.profiler;
their time and memory are not counted (the profiler's own records raise the resident set by up to 2 GB).
The final loss is the mean of the last --loss-steps timed step losses; `trl`, `trl_gc` and `trainer` train on
exactly dist_train's batches (their per-step target counts are checked to be equal), so their losses compare
step by step. The packed arms see the same examples in other batches: compare their epoch loss (the
target-weighted mean over the epoch). Results: printed and written
to bench/results/sft_vs_trl.json (--tiny: sft_vs_trl_tiny.json).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from paths import rel  # noqa: E402 - results hold no machine paths
STARTED = time.perf_counter()  # an arm's step times count from its process's start (after Python's own)
ARMS = ("dist_train", "dist_train_packed", "trl", "trl_packed", "trl_gc", "trainer")
TRL_ARMS = ("trl", "trl_packed", "trl_gc")
DIST_ARMS = ("dist_train", "dist_train_packed")
CONFIG = "configs/translate_en_fr.yaml"
DATA = "data/bible/en_fr/train.tsv"
TEMPLATE = "English: {source}\nFrench:"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HP = {"micro_batch": 8, "lr": 2e-4, "scheduler": "constant", "warmup_steps": 0, "weight_decay": 0.0,
      "max_grad_norm": 1.0, "adam_betas": [0.9, 0.999], "adam_eps": 1e-8, "seed": 42, "precision": "fp32",
      "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "lora_targets": TARGETS}
TINY = {"model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "sliding_window": 16,
        "layer_types": ["sliding_attention", "full_attention"], "max_position_embeddings": 512,
        "final_logit_softcapping": None}
DESCRIBE = {
    "dist_train": "dist-train train configs/translate_en_fr.yaml (labelled-only chunked logits, length-grouped "
                  "batches)",
    "dist_train_packed": "the same with data.packing=true",
    "trl": "TRL SFTTrainer, completion-only loss, packing off, dist-train's batches (sequential sampler)",
    "trl_packed": "TRL SFTTrainer, completion-only loss, packing=True (bfd, padding-free)",
    "trl_gc": "TRL SFTTrainer at its default gradient_checkpointing=True, otherwise as trl",
    "trainer": "transformers Trainer, DataCollatorForSeq2Seq, full logits, dist-train's batches",
}


# -- the parent: data, rounds, medians -----------------------------------------------------------------------
def read_pairs(path) -> list[tuple[str, str]]:
    with open(path, newline="") as f:
        return [(r["source"], r["target"]) for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


def write_pairs(path, pairs) -> None:
    Path(path).write_text("source\ttarget\n" + "".join(f"{s}\t{t}\n" for s, t in pairs))


def prompt_of(source: str) -> str:
    return TEMPLATE.replace("{source}", source)


def build_tiny(work: Path, pairs) -> Path:
    """A tiny random Gemma 3 and a byte-level BPE tokenizer trained on the pairs (as the tests build theirs)."""
    folder = work / "model"
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    sys.path.insert(0, str(ROOT))
    from dist_train.data.new_tokenizer import train_tokenizer

    tok = train_tokenizer([f"{prompt_of(s)} {t}" for s, t in pairs[:2000]], "bpe", 1000, folder)
    spec = dict(TINY)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                  eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def select_rows(a, model: Path, pairs, n: int):
    """The first ``n`` pairs of a seeded draw whose prompt + target + EOS fit --max-length whole (and hold no quote
    character, which table readers may read differently)."""
    import numpy as np
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    chosen = []
    for i in np.random.default_rng(HP["seed"]).permutation(len(pairs)):
        s, t = pairs[i]
        if '"' in s or '"' in t or not s.strip() or not t.strip():
            continue
        if len(tok(f"{prompt_of(s)} {t}")["input_ids"]) + 1 <= a.max_length:
            chosen.append((s, t))
            if len(chosen) == n:
                return chosen
    sys.exit(f"only {len(chosen)} pairs of {a.data} fit --max-length {a.max_length}; {n} are needed")


def dist_overrides(a, arm: str, work: Path, model: Path, steps: int) -> list[str]:
    out = work / arm
    overrides = [
        f"output_dir={out / 'run'}", "overwrite=true",
        f"model.pretrained={model}", f"model.lora.r={HP['lora_r']}", f"model.lora.alpha={HP['lora_alpha']}",
        f"model.lora.dropout={HP['lora_dropout']}", f"model.lora.target_modules=[{','.join(TARGETS)}]",
        f"data.train={work / 'train.tsv'}", "data.validation=null", "data.test=null", "data.train_rows=null",
        f"data.max_length={a.max_length}", f"data.cache_dir={out / 'cache'}",
        "task.validation_generations=0", "task.generation_metrics=[]",
        f"train.seed={HP['seed']}", "train.epochs=1", f"train.max_steps={steps}",
        f"train.micro_batch_size={HP['micro_batch']}", f"train.lr={HP['lr']}", f"train.scheduler={HP['scheduler']}",
        "train.warmup_steps=0", "train.warmup_ratio=0", f"train.weight_decay={HP['weight_decay']}",
        f"train.max_grad_norm={HP['max_grad_norm']}", f"train.precision={HP['precision']}", "train.eval_every=0",
        "checkpoint.every_steps=0", "checkpoint.every_epoch=false", "checkpoint.load_best_at_end=false",
        "checkpoint.metric=null", "logging.every_steps=1", "logging.tensorboard=false", "logging.progress_bar=false"]
    if arm == "dist_train_packed":
        overrides.append("data.packing=true")
    return overrides


def shown(overrides: list[str], work: Path) -> list[str]:
    """The overrides as the results show them (no absolute paths)."""
    out = []
    for o in overrides:
        key, value = o.split("=", 1)
        if "/" in value and Path(value).is_absolute():
            value = rel(value) if str(Path(value).resolve()).startswith(str(ROOT)) else \
                "<work>/" + str(Path(value).relative_to(work))
        out.append(f"{key}={value}")
    return out


def shown_arg(arg: str) -> str:
    """A command-line argument as the results show it: a path inside the repository relative to it, any other
    absolute path by its name alone."""
    if not os.path.isabs(arg):
        return arg
    shown = rel(arg)
    return shown if not shown.startswith("<") else f"<{Path(arg).name}>"


def dist_plan(overrides: list[str]) -> list[list[int]]:
    """dist-train's batches for these overrides, computed by dist-train's own code (as its run computes them)."""
    sys.path.insert(0, str(ROOT))
    from dist_train.config import load_config
    from dist_train.data.sampler import train_plan
    from dist_train.tasks import build_task

    cfg = load_config(ROOT / CONFIG, overrides)
    task = build_task(cfg)
    splits = task.prepare(task.load_tokenizer())
    train = task.train_subset(splits.train)
    return train_plan(task.lengths(train), cfg.train.micro_batch_size, cfg.train.seed, 0, cfg.data.group_by_length)


def has_packing() -> str | None:
    """None when the installed dist-train has data.packing, else why not."""
    sys.path.insert(0, str(ROOT))
    from dist_train.config import DataConfig

    return None if "packing" in DataConfig.__dataclass_fields__ else "this dist-train has no data.packing"


def trl_missing() -> str | None:
    try:
        import trl  # noqa: F401
    except ImportError:
        return "trl is not installed (pip install 'dist-train[bench]' or trl==1.16.0)"
    return None


def run_arm(a, arm: str, spec: dict, work: Path, round_: int) -> dict:
    spec_path = work / f"spec-{arm}.json"
    spec = {**spec, "arm": arm, "result": str(work / f"result-{arm}.json")}
    spec_path.write_text(json.dumps(spec))
    Path(spec["result"]).unlink(missing_ok=True)
    log = work / "logs" / f"{arm}-round{round_ + 1}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    if not spec["cuda"]:
        env.setdefault("DS_ACCELERATOR", "cpu")
    start = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, __file__, "--arm-spec", str(spec_path)], cwd=ROOT, env=env, stdout=f,
                             stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(p.pid, 0)  # this child's own rusage: its peak resident set
        p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if p.returncode != 0 or not Path(spec["result"]).exists():
        tail = log.read_text()[-4000:]
        sys.exit(f"{arm} failed (exit {p.returncode}); the end of its log ({log}):\n{tail}")
    x = json.loads(Path(spec["result"]).read_text())
    x["peak_rss_process_mb"] = usage.ru_maxrss / (1024 if sys.platform != "darwin" else 2**20)
    x["wall_s"] = wall
    return summarise(a, x)


def summarise(a, x: dict) -> dict:
    """Tokens/s over steps 2..T-P (P profiled steps at the end), final and epoch loss."""
    ends, counts, losses = x["step_end_s"], x["target_tokens"], x["losses"]
    steps, last = len(ends), x["timed_last"]  # the last timed step (1-based)
    if last < 2:
        sys.exit(f"{x['arm']}: {steps} steps leave no timed step after the first; give more --steps")
    timed = sum(counts[1:last])
    seconds = ends[last - 1] - ends[0]
    k = min(a.loss_steps, last)
    x.update(steps=steps, timed_steps=last - 1, target_tokens_timed=timed, seconds_timed=seconds,
             target_tokens_per_s=timed / seconds, final_loss=statistics.fmean(losses[last - k:last]),
             epoch_loss=sum(l * c for l, c in zip(losses, counts)) / sum(counts),
             positions_per_target_token=sum(x["input_positions"][:last]) / sum(counts[:last]),
             peak_rss_mb=x["rss_mb_by_step"][last - 1],
             peak_gpu_mb=x["gpu_mb_by_step"][last - 1] if x["gpu_mb_by_step"] else None)
    return x


def timed_last(batches: int, partial: bool, profiled: int) -> int:
    """The last timed step of an epoch of ``batches`` steps: before the profiled ones, and before a short last
    batch (which is then trained on, neither timed nor profiled)."""
    return batches - profiled - (1 if partial else 0)


def machine(cuda: bool) -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import psutil
    import torch

    out = {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
           "python": platform.python_version(), "os": platform.system(), "gpu": None}
    if cuda:
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "peft", "trl", "accelerate", "datasets"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=None, help="rounds of all arms (default 3; --tiny 1)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps of the unpacked arms (default 16; "
                   "--tiny 4); the packed arms train one epoch of the same steps x 8 examples")
    p.add_argument("--max-length", type=int, default=128, help="tokens per example (prompt + target + EOS)")
    p.add_argument("--loss-steps", type=int, default=3, help="final loss = mean of this many last step losses")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    p.add_argument("--profile", action="store_true",
                   help="2 more steps per arm under torch.profiler: CPU time by phase (untimed)")
    p.add_argument("--tiny", action="store_true", help="a tiny random Gemma 3 with a 1,000-token BPE (smoke test)")
    p.add_argument("--data", default=DATA, help="parallel text: a TSV with source and target columns "
                   f"(default {DATA}, from `make bible`)")
    p.add_argument("--work", default=None, help="working folder (default output/bench_sft/gemma or .../tiny)")
    p.add_argument("--out", default=None, help="results JSON (default bench/results/sft_vs_trl[_tiny].json)")
    p.add_argument("--arm-spec", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.arm_spec:
        return arm_main(json.loads(Path(a.arm_spec).read_text()))
    a.rounds = a.rounds or (1 if a.tiny else 3)
    a.steps = a.steps or (4 if a.tiny else 16)
    a.data = ROOT / DATA if a.data == DATA else Path(a.data).resolve()
    os.chdir(ROOT)
    arms = [x for x in a.arms.split(",") if x]
    if unknown := set(arms) - set(ARMS):
        sys.exit(f"--arms: unknown {', '.join(sorted(unknown))}; choose from {', '.join(ARMS)}")
    work = Path(a.work or ROOT / "output" / "bench_sft" / ("tiny" if a.tiny else "gemma")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if not Path(a.data).is_file():
        sys.exit(f"--data {a.data} is missing: run `make bible`, or name a TSV with source and target columns")
    pairs = read_pairs(a.data)
    model = build_tiny(work, pairs) if a.tiny else ROOT / "models" / "gemma-3-270m"
    if not (model / "config.json").exists():
        sys.exit(f"{rel(model)} is missing: run `make gemma`")
    extra = 2 if a.profile else 0
    steps = a.steps + extra
    rows = select_rows(a, model, pairs, steps * HP["micro_batch"])
    write_pairs(work / "train.tsv", rows)

    skipped = {}
    if reason := trl_missing():
        skipped.update({arm: reason for arm in TRL_ARMS if arm in arms})
    if "dist_train_packed" in arms and (reason := has_packing()):
        skipped["dist_train_packed"] = reason
    for arm, reason in skipped.items():
        print(f"skipping {arm}: {reason}", flush=True)
    arms = [arm for arm in arms if arm not in skipped]

    import torch

    cuda = torch.cuda.is_available()
    overrides = {arm: dist_overrides(a, arm, work, model, steps if arm == "dist_train" else 0)
                 for arm in DIST_ARMS}
    # dist-train's batches, from its own code: `trl` and `trainer` are fed them in order (sequential sampling).
    plan = dist_plan(overrides["dist_train"])
    write_pairs(work / "ordered.tsv", [rows[i] for b in plan for i in b])
    packed = dist_plan(overrides["dist_train_packed"]) if "dist_train_packed" in arms else [[0]]
    from transformers import AutoConfig

    mcfg = AutoConfig.from_pretrained(model)
    base = {"model": str(model), "work": str(work), "threads": a.threads, "max_length": a.max_length,
            "steps": steps, "timed_last": a.steps, "profiled_steps": extra, "cuda": cuda, "hp": HP,
            "config": CONFIG, "vocab": mcfg.vocab_size, "intermediate": mcfg.intermediate_size}
    specs = {"dist_train": {**base, "overrides": overrides["dist_train"]},
             "dist_train_packed": {**base, "overrides": overrides["dist_train_packed"], "steps": len(packed),
                                   "timed_last": timed_last(len(packed), len(packed[-1]) < HP["micro_batch"], extra)},
             **{arm: {**base, "data": str(work / "ordered.tsv")} for arm in ("trl", "trl_packed", "trl_gc", "trainer")}}

    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    for r in range(a.rounds):
        for arm in arms:
            x = run_arm(a, arm, specs[arm], work, r)
            runs[arm].append(x)
            gpu = f", GPU {x['peak_gpu_mb']:.0f} MB" if x.get("peak_gpu_mb") else ""
            print(f"round {r + 1} {arm:<18} {x['target_tokens_per_s']:8.1f} target tokens/s   peak RSS "
                  f"{x['peak_rss_mb']:7.0f} MB{gpu}   final loss {x['final_loss']:.4f}   epoch loss "
                  f"{x['epoch_loss']:.4f}   ({x['steps']} steps)", flush=True)

    keys = ("target_tokens_per_s", "peak_rss_mb", "peak_rss_process_mb", "peak_gpu_mb", "final_loss", "epoch_loss",
            "seconds_timed", "wall_s")
    median = {arm: {k: statistics.median(x[k] for x in rs) for k in keys if rs[0].get(k) is not None}
              for arm, rs in runs.items()}
    memory = "peak_gpu_mb" if cuda else "peak_rss_mb"
    checks = consistency(runs)
    trls = [arm for arm in TRL_ARMS if arm in median and not
            (arm == "trl_packed" and not runs[arm][0]["packing_check"]["keeps_examples_apart"])]
    ratios, best = {}, {}
    if trls:
        best = {"speed": max(trls, key=lambda k: median[k]["target_tokens_per_s"]),
                "memory": min(trls, key=lambda k: median[k][memory])}
    for mine in (arm for arm in DIST_ARMS if arm in median):
        for other in (arm for arm in median if arm not in DIST_ARMS):
            ratios[f"{mine}/{other}"] = {
                "target_tokens_per_s": median[mine]["target_tokens_per_s"] / median[other]["target_tokens_per_s"],
                "peak_memory": median[mine][memory] / median[other][memory]}
        if best:
            ratios[f"{mine}/trl_best"] = {
                "target_tokens_per_s": median[mine]["target_tokens_per_s"]
                / median[best["speed"]]["target_tokens_per_s"],
                "peak_memory": median[mine][memory] / median[best["speed"]][memory],
                "peak_memory_vs_leanest_trl": median[mine][memory] / median[best["memory"]][memory]}

    total_targets = sum(runs[arms[0]][0]["target_tokens"]) if arms else 0
    result = {
        "benchmark": "sft_vs_trl", "command": " ".join(["python -m bench sft_vs_trl", *map(shown_arg, sys.argv[1:])]),
        "model": "tiny random gemma3_text (2 x 64) with a 1,000-token BPE" if a.tiny else "models/gemma-3-270m",
        "machine": machine(cuda), "versions": versions(),
        "settings": {**HP, "max_length": a.max_length, "steps": a.steps, "profiled_steps": extra,
                     "rounds": a.rounds, "threads": a.threads, "examples": len(rows), "template": TEMPLATE,
                     "loss_steps": a.loss_steps, "gradient_checkpointing": "trl_gc only",
                     "timed": "end of optimizer step 1 to the end of the last (unprofiled) step",
                     "memory": "ru_maxrss at the last step" + (" (and CUDA max_memory_allocated)" if cuda else "")},
        "data": {"file": rel(a.data), "examples": len(rows), "target_tokens": total_targets,
                 "selection": f"the first {len(rows)} pairs of a seeded (42) permutation of the file whose prompt "
                              f"+ target + EOS fit {a.max_length} tokens"},
        "arms": {arm: DESCRIBE[arm] for arm in arms},
        "dist_train_command": "python -m dist_train train " + CONFIG + " " + " ".join(shown(overrides["dist_train"],
                                                                                             work)),
        "skipped": skipped, "checks": checks, "runs": runs, "median": median, "memory_measure": memory,
        "trl_best": best, "ratios": ratios}
    if "trl_packed" in runs:
        result["packing_check"] = runs["trl_packed"][0]["packing_check"]
    if a.profile:
        result["profile_median_ms_per_step"] = {
            arm: {k: statistics.median(x["profile"]["ms_per_step"][k] for x in rs)
                  for k in rs[0]["profile"]["ms_per_step"]} for arm, rs in runs.items()}
    out = Path(a.out or ROOT / "bench" / "results" / f"sft_vs_trl{'_tiny' if a.tiny else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    report(result, arms)


def consistency(runs: dict) -> dict:
    """Whether the arms fed dist-train's batches saw exactly its targets, and how close their losses are."""
    out = {}
    if "dist_train" not in runs:
        return out
    ref = runs["dist_train"][0]
    for arm in ("trl", "trl_gc", "trainer"):
        if arm in runs:
            x = runs[arm][0]
            out[arm] = {"same_target_tokens_per_step": x["target_tokens"] == ref["target_tokens"],
                        "step1_loss_diff": abs(x["losses"][0] - ref["losses"][0]),
                        "max_step_loss_diff": max(abs(u - v) for u, v in zip(x["losses"], ref["losses"]))}
    return out


def report(result: dict, arms: list[str]) -> None:
    median = result["median"]
    print("median target tokens/s: " + ", ".join(f"{k} {v['target_tokens_per_s']:.1f}" for k, v in median.items()))
    mem = result["memory_measure"]
    print(f"median peak memory ({mem}, MB): " + ", ".join(f"{k} {v[mem]:.0f}" for k, v in median.items()))
    print("median final loss: " + ", ".join(f"{k} {v['final_loss']:.4f}" for k, v in median.items())
          + "; epoch loss: " + ", ".join(f"{k} {v['epoch_loss']:.4f}" for k, v in median.items()))
    for name, r in result["ratios"].items():
        if name.endswith("/trl_best"):
            best = result["trl_best"]
            print(f"ratio {name} ({best['speed']}): target tokens/s {r['target_tokens_per_s']:.2f}, "
                  f"peak memory {r['peak_memory']:.2f}; peak memory against the leanest TRL arm "
                  f"({best['memory']}) {r['peak_memory_vs_leanest_trl']:.2f}")
    for arm, c in result["checks"].items():
        print(f"check {arm}: same target tokens per step as dist_train {c['same_target_tokens_per_step']}, step-1 "
              f"loss differs by {c['step1_loss_diff']:.2e}, at most {c['max_step_loss_diff']:.2e} over the steps")
    if "packing_check" in result:
        c = result["packing_check"]
        apart = "stay apart" if c["keeps_examples_apart"] else "ATTEND ACROSS THEIR BOUNDARIES"
        print(f"check trl_packed: {c['examples']} packed examples {apart}"
              f" (hidden states vs each alone: max diff {c['max_abs_diff']:.2e}; with a plain causal mask "
              f"{c['max_abs_diff_plain_causal']:.2e})")
    for arm, x in result["runs"].items():
        if x and "profile" in x[0]:
            prof = x[0]["profile"]
            print(f"profile {arm} (ms per step): " + ", ".join(f"{k} {v:.0f}" for k, v in prof["ms_per_step"].items()))


# -- the arms (each in its own process) ----------------------------------------------------------------------
class Clock:
    """Every optimizer step's end time, peak memory and trainable parameters, through torch's global optimizer
    hook (the same for every framework); optionally a torch.profiler window over the last steps."""

    def __init__(self, spec: dict, timed_last: int | None):
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.spec, self.ends, self.rss, self.gpu, self.params = spec, [], [], [], None
        self.prof, self.profile, self.timed_last = None, None, timed_last
        register_optimizer_step_post_hook(self.hook)
        if spec["profiled_steps"] and timed_last:
            self.start_profiler(timed_last)

    def start_profiler(self, timed_last: int) -> None:
        """Record the ``profiled_steps`` steps after ``timed_last``: the timed steps' time and memory are taken
        before the profiler records anything."""
        import torch

        active = self.spec["profiled_steps"]
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                       if self.spec["cuda"] else [])
        self.prof = torch.profiler.profile(
            activities=acts, record_shapes=True, on_trace_ready=self.ready,
            schedule=torch.profiler.schedule(wait=timed_last, warmup=0, active=active, repeat=1))
        self.prof.start()

    def hook(self, optimizer, *_):
        import torch

        self.ends.append(time.perf_counter() - STARTED)
        self.rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        if self.spec["cuda"]:
            self.gpu.append(torch.cuda.max_memory_allocated() / 2**20)
        if self.params is None:
            self.params = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
        if self.prof is not None:
            self.prof.step()

    def ready(self, prof) -> None:
        self.profile = phases(prof, self.spec)

    def finish(self) -> dict:
        if self.prof is not None:
            self.prof.stop()
        out = {"step_end_s": self.ends, "rss_mb_by_step": self.rss, "gpu_mb_by_step": self.gpu,
               "trainable_params": self.params, "profiled_steps": self.spec["profiled_steps"],
               "timed_last": self.timed_last}
        if self.profile is not None:
            n, last = self.spec["profiled_steps"], self.timed_last
            self.profile["wall_ms_per_step"] = 1000 * (self.ends[last + n - 1] - self.ends[last - 1]) / n
            out["profile"] = self.profile
        return out


TRL_VOCAB_TILE = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE in TRL 1.16
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul"}


def phases(prof, spec: dict) -> dict:
    """CPU (or GPU) self time of the profiled steps by phase, from each op's name and input shapes: anything with
    a vocabulary-sized dimension is the output layer and its loss; scaled_dot_product ops are attention; other
    matmuls with the MLP's width are the MLP, with the LoRA rank the adapters, the rest the attention projections;
    AdamW and clipping are the optimizer; the rest (norms, activations, rotary, copies, the framework) is other."""
    vocab, inter, rank = spec["vocab"], spec["intermediate"], spec["hp"]["lora_r"]
    # TRL's fused head projects onto the vocabulary in tiles of 32,768 columns: those are output-layer ops too.
    vocab_like = {vocab, min(vocab, TRL_VOCAB_TILE)}
    totals: dict[str, float] = {}
    for evt in prof.key_averages(group_by_input_shape=True):
        us = evt.self_device_time_total if spec["cuda"] and evt.self_device_time_total else evt.self_cpu_time_total
        if not us:
            continue
        dims = {d for shape in (evt.input_shapes or []) if isinstance(shape, (list, tuple)) for d in shape
                if isinstance(d, int)}
        name = evt.key
        if dims & vocab_like and "embedding" not in name:
            phase = "output layer + loss"
        elif "scaled_dot_product" in name or "attention" in name:
            phase = "attention (SDPA)"
        elif name in MATMULS:
            phase = "LoRA adapters" if rank in dims else "MLP matmuls" if inter in dims else "attention projections"
        elif "adam" in name or "_foreach" in name or "norm" in name and "vector" in name or "clip" in name:
            phase = "optimizer + clipping"
        else:
            phase = "other"
        totals[phase] = totals.get(phase, 0.0) + us
    n = spec["profiled_steps"]
    order = ("attention projections", "attention (SDPA)", "MLP matmuls", "LoRA adapters", "output layer + loss",
             "optimizer + clipping", "other")
    ms = {k: totals.get(k, 0.0) / 1000 / n for k in order}
    whole = sum(ms.values()) or 1.0
    return {"ms_per_step": ms, "share": {k: v / whole for k, v in ms.items()}}


def arm_main(spec: dict) -> None:
    arm = spec["arm"]
    result = (dist_train_arm if arm in DIST_ARMS else hf_arm)(spec)
    result["arm"] = arm
    Path(spec["result"]).write_text(json.dumps(result))


def dist_train_arm(spec: dict) -> dict:
    """``python -m dist_train train CONFIG overrides`` in this process, observed from outside: the clock hook, and
    the task's per-step target counts (a wrapper around its count; nothing it computes changes)."""
    import runpy

    import torch

    from dist_train.tasks.text_to_text import TextToTextTask

    clock = Clock(spec, spec["timed_last"])
    counts, positions = [], []
    count = TextToTextTask.count

    def counting(self, batch):
        n = count(self, batch)
        counts.append(n.detach().clone())
        positions.append(batch["input_ids"].numel())
        return n

    TextToTextTask.count = counting
    attention = []
    build = TextToTextTask.build_model

    def building(self):
        model = build(self)
        attention.append(getattr(model.config, "_attn_implementation", None))
        return model

    TextToTextTask.build_model = building
    sys.argv = ["dist_train", "train", spec["config"], *spec["overrides"]]
    try:
        runpy.run_module("dist_train", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
    out = clock.finish()
    run = Path(next(o.split("=", 1)[1] for o in spec["overrides"] if o.startswith("output_dir=")))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["split"] == "train"]
    model = None
    for r in records:
        if r["split"] == "ranks":
            model = r
    out.update(losses=losses, target_tokens=[int(torch.as_tensor(c).item()) for c in counts],
               input_positions=positions, attn_implementation=attention[0] if attention else None,
               framework_peak_memory_mb=model["peak_memory_mb"][0] if model else None)
    return out


def hf_arm(spec: dict) -> dict:
    """TRL's SFTTrainer (packing off / on) or transformers' Trainer with a plain collator, as a user writes them."""
    import torch
    import transformers
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer

    arm, hp, cuda = spec["arm"], spec["hp"], spec["cuda"]
    pairs = read_pairs(spec["data"])
    tok = AutoTokenizer.from_pretrained(spec["model"])
    lora = LoraConfig(r=hp["lora_r"], lora_alpha=hp["lora_alpha"], lora_dropout=hp["lora_dropout"],
                      target_modules=hp["lora_targets"], task_type="CAUSAL_LM")
    common = dict(output_dir=str(Path(spec["work"]) / arm / "run"), per_device_train_batch_size=hp["micro_batch"],
                  learning_rate=hp["lr"], lr_scheduler_type=hp["scheduler"], warmup_steps=hp["warmup_steps"],
                  weight_decay=hp["weight_decay"], max_grad_norm=hp["max_grad_norm"], adam_beta1=hp["adam_betas"][0],
                  adam_beta2=hp["adam_betas"][1], adam_epsilon=hp["adam_eps"], seed=hp["seed"], data_seed=hp["seed"],
                  num_train_epochs=1, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
                  dataloader_num_workers=0, use_cpu=not cuda, bf16=False, fp16=False)
    packed = arm == "trl_packed"
    if not packed:  # dist-train's batches in its order
        common.update(max_steps=spec["steps"], train_sampling_strategy="sequential")
    transformers.set_seed(hp["seed"])
    if arm in TRL_ARMS:
        from trl import SFTConfig, SFTTrainer

        data = Dataset.from_dict({"prompt": [prompt_of(s) for s, _ in pairs],
                                  "completion": [f" {t}" for _, t in pairs]})
        args = SFTConfig(**common, max_length=spec["max_length"], packing=packed, completion_only_loss=True,
                         gradient_checkpointing=arm == "trl_gc",
                         model_init_kwargs={"dtype": torch.float32})
        trainer = SFTTrainer(model=spec["model"], args=args, train_dataset=data, processing_class=tok, peft_config=lora)
    else:
        from peft import get_peft_model
        from transformers import (AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments)

        tok.padding_side = "right"
        features = {"input_ids": [], "labels": []}
        for s, t in pairs:
            prompt = tok(prompt_of(s))["input_ids"]
            full = tok(f"{prompt_of(s)} {t}")["input_ids"]
            if full[:len(prompt)] == prompt:
                target = full[len(prompt):]
            else:  # the tokenizer merged across the boundary: the target on its own, as dist-train does
                target = tok(t, add_special_tokens=False)["input_ids"]
            features["input_ids"].append(prompt + target + [tok.eos_token_id])
            features["labels"].append([-100] * len(prompt) + target + [tok.eos_token_id])
        model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
        model = get_peft_model(model, lora)
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=Dataset.from_dict(features),
                          data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    last = spec["timed_last"]
    if packed:  # the packed rows' count is known once TRL has packed them
        rows = len(trainer.train_dataset)
        last = timed_last(math.ceil(rows / hp["micro_batch"]), rows % hp["micro_batch"] != 0, spec["profiled_steps"])
    clock = Clock(spec, last)
    losses, counts, positions = [], [], []
    step = trainer.training_step

    def training_step(model, inputs, num_items_in_batch=None):
        counts.append(int((inputs["labels"][:, 1:] != -100).sum()))
        positions.append(inputs["input_ids"].numel())
        loss = step(model, inputs, num_items_in_batch)
        losses.append(float(loss))
        return loss

    trainer.training_step = training_step
    trainer.train()
    out = clock.finish()
    out.update(losses=losses, target_tokens=counts, input_positions=positions,
               attn_implementation=trainer.model.config._attn_implementation)
    if packed:
        out["packing_check"] = packing_check(trainer)
        out["packed_rows"] = len(trainer.train_dataset)
    return out


def packing_check(trainer) -> dict:
    """Does a packed row compute what its examples compute alone? The first packed row of more than one example,
    collated by TRL's own collator and run through the model's body as training runs it (no cache, TRL's keyword
    arguments), against each example alone; and the same row under a plain causal mask, for scale."""
    import torch

    ds = trainer.train_dataset
    row = next((ds[i] for i in range(len(ds)) if len(ds[i]["seq_lengths"]) > 1), None)
    if row is None:
        return {"examples": 1, "keeps_examples_apart": True, "max_abs_diff": 0.0, "max_abs_diff_plain_causal": 0.0,
                "note": "no packed row holds two examples"}
    batch = trainer.data_collator([{k: row[k] for k in ("input_ids", "seq_lengths") if k in row}])
    body = trainer.model.get_base_model().model
    keep = {k: v for k, v in batch.items() if k != "labels"}
    was = body.training
    body.eval()
    with torch.no_grad():
        together = body(**keep, use_cache=False).last_hidden_state[0]
        plain = body(input_ids=batch["input_ids"], attention_mask=torch.ones_like(batch["input_ids"]),
                     use_cache=False).last_hidden_state[0]
        worst = worst_plain = 0.0
        start = 0
        for n in row["seq_lengths"]:
            alone = body(input_ids=batch["input_ids"][:, start:start + n], use_cache=False).last_hidden_state[0]
            worst = max(worst, float((together[start:start + n] - alone).abs().max()))
            worst_plain = max(worst_plain, float((plain[start:start + n] - alone).abs().max()))
            start += n
    body.train(was)
    return {"examples": len(row["seq_lengths"]), "max_abs_diff": worst, "max_abs_diff_plain_causal": worst_plain,
            "keeps_examples_apart": worst < 1e-3 * max(worst_plain, 1e-6) or worst < 1e-4}


if __name__ == "__main__":
    main()
