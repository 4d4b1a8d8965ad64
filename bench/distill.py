"""Distillation on the shipped sentiment data: a 6-layer teacher, students of 3 and 2 of its layers, with and
without the teacher; test accuracy, parameters, prediction speed in PyTorch and after int8 ONNX export.

    python -m bench distill                         # teacher = configs/sentiment.yaml's run (trained if missing)
    python -m bench distill --teacher PATH --rounds 1

Arms (each a `dist-train train configs/sentiment.yaml` run with the same settings - data, epochs, lr,
schedule, seed - unless named):

    teacher        all-MiniLM-L6-v2 fine-tuned (the headline job; or --teacher, a model folder of it)
    s3_labels      model.pretrained = the teacher, model.keep_layers = 2 (its layers 0, 2, 4), labels only
    s3_distill     the same with distill.teacher = the teacher (distill.weight, distill.temperature below)
    s2_labels      model.keep_layers = 3 (layers 0 and 3), labels only
    s2_distill     the same with the teacher

Prediction speed: `dist-train predict --file` on the test set (bench/predict.py's dist_train arm: each run a
fresh process, the model loaded and warmed up first, tokenization included), and the same on each model's
`dist-train export --onnx --quantize int8` folder; rounds alternate the models, medians. Results: printed and
written to bench/results/distill.json (paths relative to the repository).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from paths import rel  # noqa: E402 - results hold no machine paths
from predict import export, run_arm  # noqa: E402 - bench/predict.py's measured arms

STUDENTS = {"s3_labels": (2, False), "s3_distill": (2, True), "s2_labels": (3, False), "s2_distill": (3, True)}
CONFIG = "configs/sentiment.yaml"


def train(name: str, out: Path, overrides: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "dist_train", "train", CONFIG, f"output_dir={out}", "overwrite=true",
           "logging.progress_bar=false", *overrides]
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{name} failed: {result.stderr[-3000:]}")
    report = json.loads((out / "eval_report.json").read_text())
    print(f"{name:<11} test accuracy {report['accuracy']:.4f}   {wall / 60:5.1f} min", flush=True)
    return {"test_accuracy": report["accuracy"], "test_f1": report.get("f1"), "wall_s": wall,
            "overrides": overrides}


def parameters(folder: Path) -> int:
    from safetensors.torch import load_file

    return sum(v.numel() for v in load_file(folder / "model.safetensors").values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", help="the fine-tuned teacher's model folder (default: train configs/sentiment.yaml "
                                     "into --work/teacher)")
    p.add_argument("--weight", type=float, default=0.5, help="distill.weight of the distilled students")
    p.add_argument("--temperature", type=float, default=2.0, help="distill.temperature")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the prediction timings")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--batch-size", type=int, default=64, help="dist-train predict's (its default)")
    p.add_argument("--work", default=str(ROOT / "output" / "bench_distill"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "distill.json"))
    a = p.parse_args()
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    runs = {}
    teacher = Path(a.teacher).resolve() if a.teacher else work / "teacher" / "final"
    if not a.teacher:
        runs["teacher"] = train("teacher", work / "teacher", [], a.threads)
    elif not (teacher / "config.json").is_file():
        sys.exit(f"--teacher '{a.teacher}' is no model folder")
    for name, (k, distill) in STUDENTS.items():
        overrides = [f"model.pretrained={teacher}", f"model.keep_layers={k}"]
        if distill:
            overrides += [f"distill.teacher={teacher}", f"distill.weight={a.weight}",
                          f"distill.temperature={a.temperature}"]
        runs[name] = train(name, work / name, overrides, a.threads)
        runs[name]["overrides"] = [o.replace(str(teacher), rel(teacher)) for o in overrides]
    folders = {"teacher": teacher, **{name: work / name / "final" for name in STUDENTS}}

    # prediction speed: PyTorch and int8 ONNX of every model, rounds alternating the models
    data = ROOT / "data" / "sentiment" / "test.tsv"
    with tempfile.TemporaryDirectory(prefix="bench-distill-") as scratch:
        scratch = Path(scratch)
        int8 = {name: export(str(f), scratch / f"{name}-int8", "int8")[0] for name, f in folders.items()}
        args = argparse.Namespace(data=str(data), threads=a.threads, batch_size=a.batch_size, work=str(scratch))
        speed = {name: {"pytorch": [], "int8": []} for name in folders}
        accuracy_int8 = {}
        names = list(folders)
        for r in range(a.rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                x = run_arm(args, "dist_train", str(folders[name]), scratch)
                y = run_arm(args, "onnx_int8", int8[name], scratch)
                speed[name]["pytorch"].append(x["examples_per_s"])
                speed[name]["int8"].append(y["examples_per_s"])
                accuracy_int8[name] = y["accuracy"]
                print(f"round {r + 1} {name:<11} {x['examples_per_s']:7.1f} examples/s, int8 {y['examples_per_s']:7.1f} "
                      f"(accuracy {y['accuracy']:.4f})", flush=True)

    table = {}
    teacher_report = json.loads((teacher.parent / "eval_report.json").read_text()) \
        if (teacher.parent / "eval_report.json").is_file() else None
    base_speed = statistics.median(speed["teacher"]["pytorch"])
    for name in folders:
        acc = runs[name]["test_accuracy"] if name in runs else (teacher_report or {}).get("accuracy")
        ps = statistics.median(speed[name]["pytorch"])
        table[name] = {"test_accuracy": acc, "parameters": parameters(folders[name]),
                       "layers": json.loads((folders[name] / "config.json").read_text())["num_hidden_layers"],
                       "predict_examples_per_s": ps, "speed_vs_teacher": ps / base_speed,
                       "int8_examples_per_s": statistics.median(speed[name]["int8"]),
                       "int8_test_accuracy": accuracy_int8[name]}
    t = table["teacher"]["test_accuracy"]
    checks = {"s3_distill_points_below_teacher": None if t is None else 100 * (t - table["s3_distill"]["test_accuracy"]),
              "s3_distill_speed_vs_teacher": table["s3_distill"]["speed_vs_teacher"],
              "distill_beats_labels_3_layers": table["s3_distill"]["test_accuracy"] > table["s3_labels"]["test_accuracy"],
              "distill_beats_labels_2_layers": table["s2_distill"]["test_accuracy"] > table["s2_labels"]["test_accuracy"]}
    import torch
    import transformers

    result = {"config": CONFIG, "teacher": rel(teacher), "weight": a.weight, "temperature": a.temperature,
              "rounds": a.rounds, "threads": a.threads, "data": rel(data), "table": table, "checks": checks,
              "runs": runs, "speed_runs": speed,
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
              "command": " ".join(["python -m bench distill", *sys.argv[1:]]).replace(str(ROOT) + "/", "")}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'model':<11} {'layers':>6} {'params':>11} {'accuracy':>8} {'ex/s':>7} {'x teacher':>9} {'int8 ex/s':>9} "
          f"{'int8 acc':>8}")
    for name, x in table.items():
        acc = f"{x['test_accuracy']:.4f}" if x["test_accuracy"] is not None else "-"
        print(f"{name:<11} {x['layers']:>6} {x['parameters']:>11,} {acc:>8} {x['predict_examples_per_s']:7.1f} "
              f"{x['speed_vs_teacher']:9.2f} {x['int8_examples_per_s']:9.1f} {x['int8_test_accuracy']:8.4f}")
    print("checks: " + json.dumps(checks))


if __name__ == "__main__":
    main()
