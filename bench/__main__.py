"""One entry point for the benchmarks: ``python -m bench NAME [ARGS...]`` runs ``bench/NAME.py`` with ARGS.

    python -m bench                          # list them
    python -m bench pretrain_overhead --rounds 3
    python -m bench transfer pretrain --steps 2400
    python -m bench transfer curve           # few-label learning curves of every arm, with their picture
    python -m bench anchor_sts               # configs/sts_b.yaml as a plain transformers loop
    python -m bench predict                  # predict: pipeline, dist-train in PyTorch, ONNX fp32 and int8
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def benchmarks() -> dict[str, str]:
    """name -> first line of its docstring."""
    out = {}
    for path in sorted(HERE.glob("*.py")):
        if path.name.startswith("_"):
            continue
        text = path.read_text()
        doc = text.split('"""')[1].strip().splitlines()[0] if text.startswith('"""') else ""
        out[path.stem] = doc
    return out


def main() -> int:
    known = benchmarks()
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print("usage: python -m bench NAME [ARGS...]   (NAME --help for its options)\n")
        for name, doc in known.items():
            print(f"  {name:<18} {doc}")
        return 0
    name = sys.argv[1]
    if name not in known:
        print(f"bench: unknown benchmark '{name}'; choose one of: {', '.join(known)}", file=sys.stderr)
        return 2
    sys.argv = [str(HERE / f"{name}.py"), *sys.argv[2:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
