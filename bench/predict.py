"""Prediction speed and accuracy: transformers' pipeline, dist-train predict in PyTorch, ONNX fp32 and int8.

    python -m bench predict                        # output/sentiment/final on data/sentiment/test.tsv, 3 rounds
    python -m bench predict --model PATH --rows 200 --rounds 1      # any classification model folder

One model (--model: a dist-train classification folder, by default the fine-tuned all-MiniLM-L6-v2 of
configs/sentiment.yaml; train it with `dist-train train configs/sentiment.yaml`), one file (the first --rows
rows of --data), the same thread count for torch and onnxruntime (--threads), five arms:

    pipeline         transformers.pipeline("text-classification") with its default batch size (1)
    pipeline_b32     the same with batch_size=32
    dist_train       dist-train predict --file in PyTorch (batches of 64, shortest texts first, each batch
                     padded to its own longest row)
    onnx_fp32        the same command on the folder of dist-train export --onnx
    onnx_int8        the same on dist-train export --onnx --quantize int8

Both ONNX folders are exported first (or taken from --onnx-fp32 / --onnx-int8). Each run is a fresh process
that loads its model, warms up on a few texts, then times the whole file: texts in, predictions out
(tokenization included; process start and model loading are not, for any arm). Rounds alternate the arms,
each round starting one arm later; the ratios use the medians. Every run also reports its accuracy against
the file's labels. Results: printed and written to bench/results/predict.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("pipeline", "pipeline_b32", "dist_train", "onnx_fp32", "onnx_int8")


# -- the parent: exports, rounds, medians -----------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "output" / "sentiment" / "final"),
                   help="a classification model folder (default: configs/sentiment.yaml's final/)")
    p.add_argument("--data", default=str(ROOT / "data" / "sentiment" / "test.tsv"), help="labelled TSV")
    p.add_argument("--rows", type=int, default=0, help="first rows of --data (default all)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch and onnxruntime threads")
    p.add_argument("--batch-size", type=int, default=64, help="dist-train predict's (its default)")
    p.add_argument("--onnx-fp32", help="an existing export --onnx folder of --model (else exported here)")
    p.add_argument("--onnx-int8", help="an existing export --onnx --quantize int8 folder (else exported here)")
    p.add_argument("--work", help="folder for the exports and predictions (default: a temporary one)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "predict.json"))
    p.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.arm:
        return print(json.dumps(run_here(a)))
    if not Path(a.model, "config.json").is_file():
        sys.exit(f"--model '{a.model}' is no model folder; train one (flock /tmp/dist-train-heavy.lock "
                 "dist-train train configs/sentiment.yaml) or give --model PATH")
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as scratch:
        work = Path(a.work or scratch)
        work.mkdir(parents=True, exist_ok=True)
        lines = Path(a.data).read_text().splitlines(keepends=True)
        data = work / "data.tsv"
        data.write_text("".join(lines[: a.rows + 1] if a.rows else lines))
        a.data, rows = str(data), (a.rows or len(lines) - 1)
        folders, exports = {"pipeline": a.model, "pipeline_b32": a.model, "dist_train": a.model}, {}
        for arm, given, quantize in (("onnx_fp32", a.onnx_fp32, None), ("onnx_int8", a.onnx_int8, "int8")):
            if given:
                folders[arm] = given
            else:
                folders[arm], exports[arm] = export(a.model, work / arm, quantize)
        runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
        for r in range(a.rounds):
            for arm in ARMS[r % len(ARMS):] + ARMS[: r % len(ARMS)]:
                runs[arm].append(run_arm(a, arm, folders[arm], work))
                x = runs[arm][-1]
                print(f"round {r + 1} {arm:<13} {x['examples_per_s']:7.1f} examples/s   accuracy {x['accuracy']:.4f}",
                      flush=True)
    report(a, rows, runs, exports)


def export(model: str, out: Path, quantize: str | None) -> tuple[str, dict]:
    from dist_train.use.deploy import export_onnx

    start = time.perf_counter()
    _, check = export_onnx(model, str(out), quantize)
    return str(out), {"seconds": time.perf_counter() - start, "check": check}


def run_arm(a, arm: str, folder: str, work: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    cmd = [sys.executable, __file__, "--arm", arm, "--folder", folder, "--data", a.data, "--threads", str(a.threads),
           "--batch-size", str(a.batch_size), "--work", str(work)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.exit(f"arm {arm} failed: {result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def report(a, rows: int, runs: dict, exports: dict) -> None:
    import onnxruntime
    import torch
    import transformers

    median = {arm: statistics.median(x["examples_per_s"] for x in rs) for arm, rs in runs.items()}
    accuracy = {arm: rs[0]["accuracy"] for arm, rs in runs.items()}
    ratios = {f"{x}/{y}": median[x] / median[y] for x, y in (
        ("pipeline_b32", "pipeline"), ("dist_train", "pipeline"), ("onnx_fp32", "dist_train"),
        ("onnx_int8", "dist_train"), ("onnx_int8", "pipeline"))}
    drop = 100 * (accuracy["dist_train"] - accuracy["onnx_int8"])
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    result = {"model": a.model, "data": a.data, "rows": rows, "threads": a.threads, "batch_size": a.batch_size,
              "rounds": a.rounds, "runs": runs, "median_examples_per_s": median, "accuracy": accuracy,
              "ratios": ratios, "int8_accuracy_drop_points": drop, "exports": exports,
              "cpu": {"processor": platform.processor() or platform.machine(),
                      "flags": [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
                                if f" {f}" in flags]},
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "onnxruntime": onnxruntime.__version__},
              "command": " ".join(["python -m bench predict", *sys.argv[1:]])}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'arm':<13} {'examples/s':>10} {'accuracy':>9}")
    for arm in ARMS:
        print(f"{arm:<13} {median[arm]:10.1f} {accuracy[arm]:9.4f}")
    print("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    print(f"int8 accuracy drop vs dist_train: {drop:+.2f} points")


# -- one arm (its own process) ----------------------------------------------------------------------------
def run_here(a) -> dict:
    import torch

    from dist_train.data.labels import LabelMap
    from dist_train.data.sources import read_table
    from dist_train.use.inference import ModelFolder

    torch.set_num_threads(a.threads)
    folder = ModelFolder(a.folder)
    column = {k: folder.meta.get(k) for k in ("text_column", "label_column")}
    table = read_table(a.data)
    texts = list(table[column["text_column"]])
    labels = LabelMap.load(a.folder)  # both dist-train's folders and pipeline's model: its labels.json
    gold = [labels.names[i] for i in labels.encode(list(table[column["label_column"]]), a.data)]
    max_length = folder.max_length(None)
    if a.arm.startswith("pipeline"):
        predicted, seconds = pipeline_arm(a, texts, max_length)
    else:
        predicted, seconds = dist_train_arm(a, folder, max_length)
    right = sum(p == g for p, g in zip(predicted, gold))
    return {"examples_per_s": len(texts) / seconds, "seconds": seconds, "accuracy": right / len(texts),
            "n": len(texts)}


def pipeline_arm(a, texts: list[str], max_length: int) -> tuple[list[str], float]:
    from transformers import pipeline

    pipe = pipeline("text-classification", model=a.folder, tokenizer=a.folder, device="cpu")
    options = {"truncation": True, "max_length": max_length}  # the same inputs as dist-train's
    if a.arm == "pipeline_b32":
        options["batch_size"] = 32
    pipe(texts[:8], **options)
    start = time.perf_counter()
    out = pipe(texts, **options)
    return [x["label"] for x in out], time.perf_counter() - start


def dist_train_arm(a, folder, max_length: int) -> tuple[list[str], float]:
    """What `dist-train predict FOLDER --file DATA --output OUT` does once its model is loaded."""
    from dist_train.use.inference import ModelInUse

    model = ModelInUse(folder, {"max_length": max_length})
    model.predict(["A warm-up text.", "Another, somewhat longer, warm-up text."], None, a.batch_size)
    out = Path(a.work, f"predictions-{a.arm}.tsv")
    start = time.perf_counter()
    model.predict_file(a.data, str(out), a.batch_size)
    seconds = time.perf_counter() - start
    rows = out.read_text().splitlines()
    column = rows[0].split("\t").index("prediction")
    return [row.split("\t")[column] for row in rows[1:]], seconds


if __name__ == "__main__":
    main()
