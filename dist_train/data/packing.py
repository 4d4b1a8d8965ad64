"""Packing: several short examples in one row of at most ``max_length`` tokens, each attending only to itself.

Rows are filled best-fit over the examples sorted longest first (deterministic: the same data gives the same
rows). Each example keeps its own position ids, restarting at 0, and the rows carry no attention mask:
transformers then reads the position ids as sequence boundaries and builds a block-diagonal causal mask (its
``find_packed_sequence_indices``; on GPUs with flash-attention the same ids select its varlen kernel), so no
token attends across examples. At a boundary the next example's first label is -100 (a prompt token), so no
loss crosses it either.
"""

from __future__ import annotations

import bisect


def pack_rows(lengths: list[int], limit: int) -> list[list[int]]:
    """Example indices per row: best fit (the fullest row that still has room), longest examples first."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted
    for i in order:
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k == len(free):
            rows.append([i])
            room, row = limit - lengths[i], len(rows) - 1
        else:
            room, row = free.pop(k)
            rows[row].append(i)
            room -= lengths[i]
        bisect.insort(free, (room, row))
    return rows


def pack(ds, limit: int):
    """``ds`` (input_ids, labels, length, ...) as packed rows with ``position_ids``; (packed, fill) where fill
    is the share of the rows' ``limit`` tokens that hold data."""
    import datasets

    rows = pack_rows(ds["length"], limit)
    ids, labels = ds["input_ids"], ds["labels"]
    out = {"input_ids": [], "labels": [], "position_ids": [], "length": []}
    for row in rows:
        out["input_ids"].append([t for i in row for t in ids[i]])
        out["labels"].append([t for i in row for t in labels[i]])
        out["position_ids"].append([p for i in row for p in range(len(ids[i]))])
        out["length"].append(len(out["input_ids"][-1]))
    fill = sum(out["length"]) / max(len(rows) * limit, 1)
    return datasets.Dataset.from_dict(out), fill
