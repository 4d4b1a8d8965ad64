"""Gemma 3 270M on real data: English-to-French translation (zero-shot, 3-shot, LoRA) and sentiment (zero-shot by prompting, LoRA classifier).

    make gemma bible              # models/gemma-3-270m and data/bible/en_fr (fetched once, never committed)
    python -m bench llm_tasks     # every arm below, one after another; results in bench/results/llm_tasks.json
    python -m bench llm_tasks --arms translate_zero_shot translate_lora_1000

Each arm is one real dist-train command (printed, with its wall time from start to exit): the untrained
baselines through ``dist-train zero-shot`` and the fine-tuning runs through ``dist-train train``, with the
shipped configs (configs/translate_en_fr.yaml, configs/sentiment_gemma.yaml). ``--arms`` runs some of them; the
JSON keeps the other arms' results. It holds each arm's command, wall
time and test report, and a few test verses side by side (source, reference, each arm's translation).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = Path("output/bench_llm")  # relative to the repository: no machine path in the results
TRANSLATE, SENTIMENT = "configs/translate_en_fr.yaml", "configs/sentiment_gemma.yaml"

# name -> (dist-train arguments, where the report lands, where the generated texts land)
ARMS = {
    "translate_zero_shot": (["zero-shot", TRANSLATE, "--output", f"{WORK}/translate_zero_shot.json"],
                            "translate_zero_shot.json", "translate_zero_shot.outputs.jsonl"),
    "translate_3_shot": (["zero-shot", TRANSLATE, "task.few_shot=3", "--output", f"{WORK}/translate_3_shot.json"],
                         "translate_3_shot.json", "translate_3_shot.outputs.jsonl"),
    "translate_lora_1000": (["train", TRANSLATE, f"output_dir={WORK}/translate_lora_1000", "overwrite=true",
                             "logging.progress_bar=false"],
                            "translate_lora_1000/eval_report.json", "translate_lora_1000/test_outputs.jsonl"),
    "sentiment_zero_shot": (["zero-shot", SENTIMENT, "--output", f"{WORK}/sentiment_zero_shot.json"],
                            "sentiment_zero_shot.json", None),
    "sentiment_lora": (["train", SENTIMENT, f"output_dir={WORK}/sentiment_lora", "overwrite=true",
                        "logging.progress_bar=false"], "sentiment_lora/eval_report.json", None),
}
KEEP = ("n", "generated", "loss", "chrf", "bleu", "accuracy", "f1_macro", "calibrated", "content_free_probabilities",
        "predicted_share")


def run_arm(name: str, threads: int) -> dict:
    args, report, _ = ARMS[name]
    (ROOT / WORK).mkdir(parents=True, exist_ok=True)
    log = ROOT / WORK / f"{name}.log"
    print(f"$ OMP_NUM_THREADS={threads} dist-train {' '.join(args)}", flush=True)
    start = time.perf_counter()
    with open(log, "w") as fh:
        code = subprocess.run([sys.executable, "-m", "launcher", *args], cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                              env=dict(os.environ, OMP_NUM_THREADS=str(threads))).returncode
    wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"{name} failed (exit {code}); see {log}")
    full = json.loads((ROOT / WORK / report).read_text())
    print(f"  {wall / 60:.1f} min: " + json.dumps({k: full[k] for k in ("chrf", "bleu", "accuracy") if k in full}))
    return {"command": "dist-train " + " ".join(args), "threads": threads, "wall_s": round(wall, 1),
            "report": {k: full[k] for k in KEEP if k in full}}


def side_by_side(done: dict, rows: int = 4) -> list[dict]:
    """The first test verses with each translation arm's output."""
    table: list[dict] = []
    for name, (_, _, outputs) in ARMS.items():
        path = ROOT / WORK / outputs if outputs else None
        if name not in done or path is None or not path.is_file():
            continue
        for i, line in enumerate(path.read_text().splitlines()[:rows]):
            row = json.loads(line)
            if i == len(table):
                table.append({"source": row["source"], "reference": row["reference"]})
            table[i][name] = row["hypothesis"]
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--out", default="bench/results/llm_tasks.json")
    a = parser.parse_args()
    out = ROOT / a.out
    results = json.loads(out.read_text()) if out.is_file() else {}
    import torch
    import transformers

    results["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "torch": torch.__version__, "transformers": transformers.__version__, "precision": "fp32"}
    arms = results.setdefault("arms", {})
    for name in a.arms:
        arms[name] = run_arm(name, a.threads)
        results["examples"] = side_by_side(arms)
        out.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
