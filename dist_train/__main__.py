"""Worker entry point: ``python -m dist_train train CONFIG [overrides]`` (e.g. under torchrun)."""

import os
import sys

from launcher.cli import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # One of several ranks, its run finished and torn down (files closed, process group destroyed): leave
    # without the interpreter's shutdown, where gloo's and DeepSpeed's C++ threads can abort the process
    # ("terminate called without an active exception", seen now and then with DeepSpeed on CPU) and turn a
    # finished run into a failed job.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
