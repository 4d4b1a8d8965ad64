"""Speed switches change speed only: fused AdamW, torch.compile and the GPU smoke script (CPU-checkable parts)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters
from conftest import NO_DROPOUT, ROOT, tiny_config
from test_train import run, weights

from dist_train.run.optim import build_optimizer


def test_fused_adamw_matches_the_per_parameter_loop():
    """train.fused_optimizer (the default) is torch's fused kernel; the same steps as the plain loop."""
    cfg = SimpleNamespace(weight_decay=0.01, lr=1e-2, adam_betas=[0.9, 0.999], adam_eps=1e-8)
    models = {}
    for fused in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 2))
        opt = build_optimizer(model, SimpleNamespace(**vars(cfg), fused_optimizer=fused))
        assert opt.defaults["fused"] is (True if fused else None)
        data = torch.Generator().manual_seed(1)
        for _ in range(5):
            model(torch.randn(4, 8, generator=data)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        models[fused] = model.state_dict()
    diff = max((models[True][k] - models[False][k]).abs().max().item() for k in models[True])
    assert 0 < max(v.abs().max().item() for v in models[True].values()) and diff < 1e-6, diff


@pytest.mark.slow
def test_compiled_model_trains_like_the_eager_one_and_exports_plain(tmp_path, sentiment_slice):
    """train.compile captures forward and backward (aot_eager: the graphs without code generation); the
    weights match eager training and the export has the plain model's keys."""
    data = {"train": sentiment_slice["train"]}
    finals = {}
    for name, compiled in (("eager", False), ("compiled", True)):
        torch._dynamo.reset()
        counters.clear()
        cfg = tiny_config(tmp_path, data, output_dir=str(tmp_path / name),
                          model={"config": NO_DROPOUT, "tokenizer": "all-MiniLM-L6-v2"},
                          train={"max_steps": 4, "compile": compiled, "compile_backend": "aot_eager"})
        run(cfg)
        # Dynamo really captured graphs in the compiled run (and none in the eager one).
        assert (counters["stats"]["unique_graphs"] > 0) == compiled, dict(counters["stats"])
        finals[name] = weights(tmp_path / name / "final")
    assert finals["eager"].keys() == finals["compiled"].keys()
    assert not any("_orig_mod" in k for k in finals["compiled"])
    diff = max((finals["eager"][k] - finals["compiled"][k]).abs().max().item() for k in finals["eager"])
    assert diff < 1e-5, diff


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="checks the script's CPU path (device: cpu); on a CUDA machine run bench/gpu_smoke.sh itself")
def test_gpu_smoke_script_runs_tiny_on_cpu(tmp_path):
    """bench/gpu_smoke.sh end to end with SMOKE_TINY=1: every line of its report carries a number."""
    env = {**os.environ, "SMOKE_TINY": "1", "OUT_DIR": str(tmp_path / "smoke"), "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "2"}
    result = subprocess.run(["bash", "bench/gpu_smoke.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "device: cpu" in out
    for line in ("causal LM, compile=false: ", "causal LM, compile=true: "):
        assert re.search(re.escape(line) + r"[\d,]+\.\d+ tokens/s, MFU n/a", out), out
    assert re.search(r"MiniLM fine-tuning: [\d,]+\.\d+ examples/s", out), out


FAULTS_AFTER_TRAINING = """
import resource, sys, torch
from dist_train.config import load_config
from dist_train.run.trainer import train
train(load_config(sys.argv[1], sys.argv[2:]))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):  # what a step does with a large tensor: allocate, write, free
    torch.empty(16 * 2**20).fill_(1.0)  # 64 MiB: above glibc's largest mmap threshold
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tunables")
def test_training_reuses_freed_host_memory_instead_of_faulting_it_in_again(tmp_path, sentiment_slice):
    """train.reuse_host_memory (the default): a large block freed is reused with no new page faults; with it off,
    every allocation of it faults in all its pages again (16,384 per 64 MiB)."""
    faults = {}
    for reuse in (True, False):
        (tmp_path / str(reuse)).mkdir()
        config = tiny_config(tmp_path / str(reuse), {"train": sentiment_slice["train"]}, train={"max_steps": 2})
        result = subprocess.run([sys.executable, "-c", FAULTS_AFTER_TRAINING, str(config),
                                 f"train.reuse_host_memory={reuse}"], capture_output=True, text=True, cwd=ROOT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-2000:]
        faults[reuse] = int(result.stdout.split()[-1])
    pages = 16 * 2**20 * 4 // 4096
    assert faults[False] >= 7 * pages, faults  # off: each of the 8 allocations faults in (nearly) every page
    assert faults[True] <= 2 * pages, faults  # on: at most the first one (if the heap had no room for it yet)
