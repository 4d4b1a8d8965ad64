#!/usr/bin/env bash
# GPU smoke benchmark, under 5 minutes on one GPU (after `make setup`):
#   1. a GPT-2 124M-shaped causal LM (12 layers, width 768, 1024-token blocks, random init, bf16) on
#      data/corpus: tokens/s and MFU, eager and with train.compile=true;
#   2. all-MiniLM-L6-v2 fine-tuning on data/sentiment (bf16, batch 32, one epoch): examples/s.
# Every figure comes from dist-train's own metrics.jsonl (log records after the first, i.e. after warm-up
# and compilation). MFU = tokens/s x 6 x parameters / the GPU's peak bf16 FLOP/s (logging.peak_tflops
# overrides the built-in table).
#
#   bash bench/gpu_smoke.sh                   # on a GPU machine
#   SMOKE_TINY=1 bash bench/gpu_smoke.sh      # CPU: tiny shapes and a few steps (what the tests run)
# Environment: PYTHON (default .venv/bin/python), OUT_DIR (default output/gpu-smoke).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT_DIR:-output/gpu-smoke}
mkdir -p "$OUT"

common=(overwrite=true data.validation_split=0 data.test=null train.eval_every=0 checkpoint.every_epoch=false
        checkpoint.load_best_at_end=false logging.progress_bar=false logging.tensorboard=false)
if [[ -n "${SMOKE_TINY:-}" ]]; then
  gpt=(model.config.n_layer=2 model.config.n_head=2 model.config.n_embd=64 model.config.n_positions=128
       data.max_length=128 train.micro_batch_size=4 train.max_steps=6 logging.every_steps=2 train.precision=fp32
       train.compile_backend=aot_eager model.train_tokenizer.vocab_size=2000)
  minilm=(train.max_steps=6 logging.every_steps=2 train.precision=fp32)
else
  gpt=(model.config.n_layer=12 model.config.n_head=12 model.config.n_embd=768 model.config.n_positions=1024
       model.config.vocab_size=50304 data.max_length=1024 train.micro_batch_size=16 train.max_steps=60
       logging.every_steps=10 train.precision=bf16 data.num_proc=8)
  minilm=(train.epochs=1 logging.every_steps=20 train.precision=bf16 data.num_workers=2)
fi

# Mean of a metrics.jsonl field over the train records after the first (warm-up, compilation).
summary() {
  "$PY" - "$1" "$2" <<'EOF'
import json, sys
path, field = sys.argv[1], sys.argv[2]
records = [json.loads(line) for line in open(path)]
timed = [r for r in records if r["split"] == "train"][1:]
values = [r[field] for r in timed if field in r]
print(f"{sum(values) / len(values):,.3f}" if values else "n/a")
EOF
}

report=()
for compiled in false true; do
  run="$OUT/gpt2-compile-$compiled"
  echo "== causal LM, GPT-2 124M shape, train.compile=$compiled" >&2
  "$PY" -m dist_train train configs/clm_pretrain.yaml output_dir="$run" "${common[@]}" "${gpt[@]}" \
    train.compile="$compiled" >&2
  tps=$(summary "$run/metrics.jsonl" tokens_per_s)
  report+=("causal LM, compile=$compiled: $tps tokens/s, MFU $(summary "$run/metrics.jsonl" mfu)")
done

run="$OUT/minilm"
echo "== MiniLM fine-tuning (data/sentiment)" >&2
"$PY" -m dist_train train configs/sentiment.yaml output_dir="$run" "${common[@]}" "${minilm[@]}" >&2
report+=("MiniLM fine-tuning: $(summary "$run/metrics.jsonl" examples_per_s) examples/s")

"$PY" -c "import torch; print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu',
  '| torch', torch.__version__)"
printf '%s\n' "${report[@]}"
