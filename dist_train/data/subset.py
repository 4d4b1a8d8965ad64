"""Training on fewer rows: a stratified, nested subset of the training set (``data.train_rows``).

One seed fixes one order of all rows; a subset of n rows is the first n of that order. So for one seed the
100-row subset is part of the 300-row one (a learning curve adds examples, it does not redraw them), and each
label keeps its share of the rows at every size: the order interleaves the labels by quantile, row i of a label
with c rows placed at (i + u) / c with u uniform in [0, 1), then all rows sorted by that position.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np


def nested_order(strata: list | None, n_rows: int, seed: int) -> list[int]:
    """Row indices in the order subsets take them: stratified by ``strata`` (one hashable value per row, e.g. the
    label), or a plain random order when ``strata`` is None."""
    rng = np.random.default_rng(seed)
    if strata is None:
        return rng.permutation(n_rows).tolist()
    groups: dict = defaultdict(list)
    for row, value in enumerate(strata):
        groups[value].append(row)
    position = np.empty(n_rows)
    # Sorted group keys: the same seed gives the same order whatever the file's row order of first appearance.
    for value in sorted(groups, key=repr):
        rows = np.array(groups[value])[rng.permutation(len(groups[value]))]
        position[rows] = (np.arange(len(rows)) + rng.random(len(rows))) / len(rows)
    return np.argsort(position, kind="stable").tolist()


def take_rows(ds, n: int, strata: list | None, seed: int):
    """The first ``n`` rows of ``nested_order`` (kept in their file order)."""
    return ds.select(sorted(nested_order(strata, len(ds), seed)[:n]))
