"""The Python API: what ``dist-train train``, ``eval`` and ``predict`` do, as functions.

    from dist_train import load_config, train, evaluate, predict

    cfg = load_config("configs/sentiment.yaml", ["train.epochs=1"])   # or a dict of sections
    result = train(cfg)                           # result.reports: {"test": {...}, "validation": {...}}
    evaluate("output/sentiment/final", "data/sentiment/test.tsv")    # the report `dist-train eval` prints
    predict("output/sentiment/final", ["What a film!"])              # [{"label": "positive", "score": ...}]

The same checks run in the same order as on the command line, and a mistake in the input raises
``dist_train.UserError`` with the one line the CLI would print. ``train`` runs in this process (the single
engine, or one worker of a torchrun / SLURM job); ``dist-train launch`` starts several.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from dist_train.config import Config, load_config, to_dict
from dist_train.errors import UserError

if TYPE_CHECKING:  # the loop imports torch: only when train() runs
    from dist_train.run.trainer import RunResult

__all__ = ["Config", "UserError", "evaluate", "load_config", "predict", "train"]


def train(config: Config | str | Path | dict, overrides: list[str] = ()) -> RunResult:
    """Train as ``config`` (a Config, a YAML path or a dict of sections, with dotted ``overrides``) says; the
    files it names are checked before any work. Returns a ``RunResult`` (``reports``: the final report of each
    split, ``test`` and ``validation``; ``stopped_at``; ``exit_code``); everything else goes to ``output_dir``
    as with ``dist-train train``."""
    from dist_train.tasks import task_class
    from dist_train.run.trainer import train as run

    if not isinstance(config, Config) or overrides:  # overrides on a Config: through its dict, validated again
        config = load_config(to_dict(config) if isinstance(config, Config) else config, list(overrides))
    task_class(config.task.name).check_files(config.data)
    return run(config)


def model_in_use(model_dir: str | Path, command: str, max_length: int | None = None, precision: str = "fp32",
                 **columns):
    """An exported model folder loaded for ``command`` (``eval`` or ``predict``), as the CLI loads it:
    ``columns`` (``text_column``, ``text_pair_column``, ``label_column``, ``target_column``) override what it
    was trained with."""
    from dist_train.use.inference import ModelFolder, ModelInUse

    folder = ModelFolder(str(model_dir))
    folder.require(command)
    return ModelInUse(folder, {**columns, "max_length": folder.max_length(max_length)}, precision)


def evaluate(model_dir: str | Path, data: str | Path, batch_size: int = 64, **options) -> dict:
    """The report of ``dist-train eval MODEL_DIR --data DATA`` (metrics over every example of ``data``)."""
    return model_in_use(model_dir, "eval", **options).evaluate(str(data), batch_size)


def predict(model_dir: str | Path, texts: list[str], pairs: list[str] | None = None, batch_size: int = 64,
            **options) -> list[dict]:
    """One prediction per text, as ``dist-train predict`` makes them (a model of text pairs, or question
    answering: ``pairs`` holds each text's second text, or each question's context)."""
    if isinstance(texts, str):
        raise UserError("predict: texts must be a list of strings, not one string")
    if pairs is not None and len(pairs) != len(texts):
        raise UserError(f"predict: {len(texts)} texts but {len(pairs)} pairs; give one pair per text")
    return model_in_use(model_dir, "predict", **options).predict(list(texts), pairs, batch_size)
