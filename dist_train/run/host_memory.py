"""Host memory: keep the large blocks a training step frees for the next step (glibc malloc tunables).

glibc serves every block above its mmap threshold (dynamic, at most 32 MiB) with a fresh ``mmap`` and hands it
back to the kernel on ``free``. A step on the CPU allocates and frees the same large tensors every time: a
causal LM's logits and their gradient (micro-batch x block x vocabulary x 4 bytes: 131 MB each for
configs/clm_pretrain.yaml), an embedding matrix's gradient (47 MB for MiniLM). Each comes back as new pages, and
the kernel faults in and zeroes every 4 KiB of them again: about 3 million page faults and 7 s of system time in
15 pretraining steps of configs/clm_pretrain.yaml here (docs/performance.md, "Pretraining"). Served from the heap
and never trimmed, the same memory is reused from the second step on, with no page fault.

The cost: the process keeps its peak heap until it exits (freed memory is not returned to the kernel), which is
how a training process uses memory anyway. CUDA memory has its own caching allocator and is not affected.
"""

from __future__ import annotations

import ctypes
import sys

# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1


def reuse_freed_memory() -> bool:
    """Serve large blocks from the heap and never trim it; True where it took effect (Linux with glibc).

    Affects later allocations only, so call it before the model is built. Elsewhere (macOS, musl) a no-op."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):  # a libc without mallopt (musl)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # No mmap for large blocks: they come from the heap (brk), where a freed block is reused as it is.
    # A trim threshold this high keeps free heap memory in the process instead of giving it back each step.
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
