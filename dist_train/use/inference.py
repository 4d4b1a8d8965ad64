"""Use a trained model folder: evaluate it on a labelled file, or predict labels for new text."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from dist_train.engine import SingleEngine
from dist_train.errors import UserError
from dist_train.evaluation.loop import evaluate
from dist_train.use.export import read_meta
from dist_train.model.files import check_weights, first_line, resolve_model_path
from dist_train.use.onnx_model import ONNX_FILE, OnnxModel
from dist_train.tasks import TASKS, task_class, task_of_architectures


class ModelFolder:
    """What a MODEL_DIR holds, read from its small files before anything heavy is loaded: the task it was
    trained for, the columns and length it was trained with, its positions; its weights are checked whole."""

    def __init__(self, name: str):
        self.name = name
        self.folder = resolve_model_path(name, "MODEL_DIR")
        path = Path(self.folder)
        if not (path / "config.json").is_file():
            raise UserError(_not_a_model(name, path))
        try:
            self.config = json.loads((path / "config.json").read_text())
            self.meta = read_meta(path)
        except (ValueError, OSError) as exc:
            raise UserError(f"MODEL_DIR '{name}': cannot read its config ({first_line(exc)}); the folder is "
                            "damaged: copy or export the model again") from None
        architectures = self.config.get("architectures") or []
        self.task = self.meta.get("task") or task_of_architectures(architectures)
        if self.task is not None and self.task not in TASKS:
            raise UserError(f"MODEL_DIR '{name}' was trained for task '{self.task}', which this dist-train does not "
                            f"know ({', '.join(TASKS)}); use the version of dist-train that trained it")
        self.model_type = self.config.get("model_type", "transformer")
        self.onnx = (path / ONNX_FILE).is_file()  # dist-train export --onnx: onnxruntime runs it
        check_weights(path, "MODEL_DIR")

    @property
    def positions(self) -> int | None:
        return self.config.get("max_position_embeddings") or self.config.get("n_positions")

    def require(self, command: str) -> None:
        """``command`` (predict or eval) can use this folder; else say what the folder is and what to do."""
        if self.task is None:
            raise UserError(f"MODEL_DIR '{self.name}' is a pretrained {self.model_type} model without a trained task "
                            f"head; fine-tune it first (dist-train train with model.pretrained={self.name}) and "
                            f"{command} with that run's final/ folder")
        task = task_class(self.task)
        if command == "predict" and not task.can_predict:
            raise UserError(f"MODEL_DIR '{self.name}' is a {self.task} model: predict needs a model that predicts "
                            f"labels; {task.predict_hint}")

    def max_length(self, given: int | None) -> int:
        """Tokens per example: ``--max-length``, else as trained, else the model's positions."""
        from dist_train.config import check_number

        positions = self.positions
        if given is not None:
            check_number("--max-length", given, 2, None, "[", where="")
            if positions is not None and given > positions:
                raise UserError(f"--max-length {given} exceeds the model's {positions} positions; use "
                                f"--max-length {positions} or less")
            return given
        return min(self.meta.get("max_length") or positions or 512, positions or 512)


def _not_a_model(name: str, path: Path) -> str:
    if (path / "hf").is_dir():
        return (f"MODEL_DIR '{name}' is a training checkpoint, not a model folder; export it first: "
                f"dist-train export {name} OUT_DIR")
    if (path / "final").is_dir():
        return f"MODEL_DIR '{name}' is a run folder; give its model: {path / 'final'}"
    if (path / "checkpoints").is_dir():
        return (f"MODEL_DIR '{name}' is a run folder without a final model (the run did not finish); export one of "
                f"its checkpoints: dist-train export {path / 'checkpoints'}/step-N OUT_DIR")
    return (f"MODEL_DIR '{name}' has no config.json, so it is no model folder; give a folder written by dist-train "
            "train (output_dir/final) or dist-train export")


class ModelInUse:
    """An exported model folder ready to evaluate or predict: the task named in its ``dist_train.json``,
    rebuilt with what training saved (labels, columns, length) and the command's options on top."""

    def __init__(self, folder: ModelFolder, options: dict, precision: str = "fp32"):
        self.folder = folder
        self.task = task_class(folder.task).for_folder(folder.folder, folder.meta,
                                                      {k: v for k, v in options.items() if v is not None})
        self.task.load_tokenizer()
        self.task.restore(folder.folder)
        if folder.onnx and precision != "fp32":
            raise UserError(f"--precision {precision}: MODEL_DIR '{folder.name}' is an ONNX folder, which runs as "
                            "exported (fp32 or int8 weights); drop --precision")
        try:
            # An ONNX folder's session stands in for the PyTorch model: the task's predict and evaluator see logits.
            model = OnnxModel(folder.folder) if folder.onnx else self.task.build_model()
        except UserError as exc:
            raise UserError(f"MODEL_DIR '{folder.name}': {str(exc).split(': ', 1)[-1]}") from None
        self.engine = SingleEngine(precision=precision)
        self.engine.prepare(model)
        self.engine.train(False)

    def evaluate(self, path: str, batch_size: int) -> dict:
        return evaluate(self.engine, self.task, self.task.split(path, "--data"), batch_size, "--data")

    def predict(self, texts: list[str], pairs: list[str] | None, batch_size: int) -> list[dict]:
        # Shortest first, so each batch pads to a length near its own rows' (measured on the sentiment
        # test set: 1.6x the examples/s of the file's order); results go back in the input's order.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]) + (len(pairs[i]) if pairs else 0))
        results = self.task.predict(self.engine, [texts[i] for i in order],
                                    [pairs[i] for i in order] if pairs is not None else None, batch_size)
        back = [None] * len(texts)
        for i, result in zip(order, results):
            back[i] = result
        return back

    def predict_file(self, path: str, out_path: str, batch_size: int) -> int:
        texts, pairs, columns = self.task.read_texts(path)
        results = self.predict(texts, pairs, batch_size)
        # A pair model's rows show both texts, under the input's column names.
        inputs = [[columns[0], texts]] + ([[columns[1], pairs]] if pairs is not None else [])
        if out_path == "-":  # standard output
            fh = contextlib.nullcontext(sys.stdout)
        else:
            Path(out_path).parent.mkdir(parents=True, exist_ok=True)  # (checked writable before: check_output_file)
            fh = open(out_path, "w")
        with fh as fh:  # plain TSV like the input: no quoting, tabs/newlines in text become spaces
            for i, prediction in enumerate(results):
                columns = self.task.prediction_columns(prediction)
                if i == 0:
                    fh.write("\t".join([name for name, _ in inputs] + [*columns]) + "\n")
                fh.write("\t".join([" ".join(given[i].split()) for _, given in inputs] + [*columns.values()]) + "\n")
        return len(results)
