"""Paths as benchmark results show them: relative to the repository, never absolute (no machine paths)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rel(path) -> str:
    """``path`` relative to the repository; outside it, ``<work>/NAME``."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return f"<work>/{path.name}"
