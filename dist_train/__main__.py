"""Worker entry point: ``python -m dist_train train CONFIG [overrides]`` (e.g. under torchrun)."""

import sys

from launcher.cli import main

sys.exit(main())
