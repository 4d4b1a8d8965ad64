"""Deployment export: a trained model as an ONNX folder (fp32, or int8 weights), and the model that runs it.

``dist-train export SOURCE OUT --onnx [--quantize int8]`` writes ``OUT/model.onnx`` beside copies of the
model folder's small files (config, tokenizer, ``labels.json``, ``dist_train.json``), so ``dist-train
predict`` / ``eval`` know the task and run it through onnxruntime (``OnnxModel``, use/onnx_model.py) instead of PyTorch.

The graph comes from ``torch.onnx.export(dynamo=True)``: the TorchScript exporter (``dynamo=False``) traces
one batch and, on transformers 5, bakes that batch's attention-mask path into the graph (measured: logits
off by 0.06 and 30% of argmaxes flipped on a padded batch of MiniLM); optimum's exporter (optimum-onnx)
needs transformers < 4.58. int8 is onnxruntime's dynamic quantization (weights int8, activations quantized
per batch at run time): no calibration data needed.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import warnings
from pathlib import Path

import torch

from dist_train.errors import UserError
from dist_train.use.onnx_model import ONNX_FILE, OnnxModel, require
from dist_train.paths import check_new_folder

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".onnx", ".data")
FP32_TOLERANCE = 1e-4
INT8_MIN_AGREEMENT = 0.9

# The export is checked on these (with every batch padded differently): ordinary sentences of many lengths,
# so the check covers short and long rows, padding, and text like what the models are trained on.
CHECK_TEXTS = [
    "Great.", "Not good at all.", "I really enjoyed this film.", "A tedious, joyless mess.",
    "The plot is thin but the acting carries it.", "Nothing about it works, from the script to the score.",
    "One of the best performances of the year, and a story that stays with you.",
    "It starts slowly, finds its feet in the second hour and ends on a note of real grace.",
    "The director seems to have confused length with depth.", "Funny, warm and surprisingly sad.",
    "I wanted to like it more than I did.", "A clever premise wasted on a lazy screenplay.",
    "The cast is uniformly excellent, but the editing is a disaster and the last act drags on forever.",
    "Visually stunning.", "Dull.", "A small, honest film about people you come to care for.",
    "Paris in the spring, two strangers, one long conversation.", "The sequel nobody asked for.",
    "Its heart is in the right place, even when its head is not.",
    "Every scene feels like it was written by a committee that never met.",
    "The report was filed on Tuesday by the committee in Geneva.", "Alice met Bob at the station.",
    "Prices rose by 3% in March, the third rise in a row.", "Well, that happened.",
]


def model_source(source: str) -> tuple[Path, bool]:
    """The model folder to convert from SOURCE (a run folder's ``final/``, a model folder), or a checkpoint
    (True: export it first): checked before any work."""
    from dist_train.run.checkpoint import HF_DIR, checkpoints

    path = Path(source)
    if not path.exists():
        raise UserError(f"export: '{source}' does not exist; give a run folder, its final/ model folder or a "
                        "checkpoint (output_dir/checkpoints/step-N)")
    if (path / HF_DIR).is_dir():
        return path, True
    if (path / ONNX_FILE).is_file():
        raise UserError(f"export: '{source}' is already an ONNX folder; give the PyTorch model it came from")
    if (path / "final" / "config.json").is_file():
        return path / "final", False
    if (path / "config.json").is_file():
        return path, False
    steps = checkpoints(path / "checkpoints")
    if steps:
        raise UserError(f"export: '{source}' is a run folder without final/ (the run did not finish); give one "
                        f"of its checkpoints, e.g. {steps[-1]}")
    raise UserError(f"export: '{source}' is no run, model folder or checkpoint (no config.json, final/ or "
                    f"{HF_DIR}/ inside)")


def export_onnx(source: str, out_dir: str, quantize: str | None = None) -> tuple[Path, dict]:
    """SOURCE as an ONNX folder ``out_dir`` (int8 weights with ``quantize="int8"``), checked against the
    PyTorch model before it is renamed into place; on any failure nothing is left behind. Returns the
    folder and the check's record (also in its ``dist_train.json`` under ``onnx``)."""
    require("export --onnx", ("onnx", "onnxscript", "onnxruntime"))
    out = Path(out_dir)
    folder, is_checkpoint = model_source(source)
    check_new_folder(out)
    tmp, pt_tmp = out.with_name(f".{out.name}.tmp"), out.with_name(f".{out.name}.pt")
    scratch = (tmp, pt_tmp, pt_tmp.with_name(f".{pt_tmp.name}.tmp"))  # the last: export_checkpoint's own
    for stale in scratch:
        shutil.rmtree(stale, ignore_errors=True)
    try:
        if is_checkpoint:
            from dist_train.use.export import export_checkpoint

            folder = export_checkpoint(folder, pt_tmp)
        record = _convert(folder, tmp, quantize)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    finally:
        for stale in scratch:
            shutil.rmtree(stale, ignore_errors=True)
    return out, record


def _convert(folder: Path, tmp: Path, quantize: str | None) -> dict:
    from dist_train.use.export import META_FILE, read_meta
    from dist_train.use.inference import ModelFolder, ModelInUse
    from dist_train.tasks import task_class

    model_folder = ModelFolder(str(folder))
    if model_folder.task is None or not task_class(model_folder.task).can_predict:
        what = f"a {model_folder.task} model" if model_folder.task else "a pretrained model without a task head"
        raise UserError(f"export --onnx: '{folder}' is {what}; ONNX export is for models that predict "
                        "(classification, regression, multi-label, token classification)")
    used = ModelInUse(model_folder, {"max_length": model_folder.max_length(None)})
    model, task = used.engine.unwrapped, used.task
    tmp.mkdir(parents=True)
    for path in folder.iterdir():  # config, tokenizer, labels.json, dist_train.json: all but the weights
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES) and path.name != "model.safetensors.index.json":
            shutil.copy2(path, tmp / path.name)
    batches = _check_batches(task)
    fp32 = tmp / (f"{ONNX_FILE}.fp32" if quantize else ONNX_FILE)
    names = _export_graph(model, batches[0], fp32)
    if quantize:
        _quantize(fp32, tmp / ONNX_FILE)
        fp32.unlink()
    record = _check(model, task, OnnxModel(tmp, "export"), batches, quantize)
    meta = read_meta(folder)
    meta["onnx"] = {"file": ONNX_FILE, "quantize": quantize, "inputs": names,
                    "exporter": f"torch.onnx (dynamo) {torch.__version__}", "check": record}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    return record


def _check_batches(task) -> list[dict]:
    """Batches of ``CHECK_TEXTS`` as the task's model takes them (sizes 8, 16 and 1: each padded to its own
    longest row)."""
    return [task.check_batch(CHECK_TEXTS[lo:hi]) for lo, hi in ((0, 8), (8, 24), (2, 3))]


class _Logits(torch.nn.Module):
    """The model as a function of its input tensors in a fixed order, returning only the logits."""

    def __init__(self, model, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *tensors):
        return self.model(**dict(zip(self.names, tensors))).logits


def _export_graph(model, example: dict, path: Path) -> list[str]:
    names = list(example)
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    quiet = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        # The exporter narrates each stage on stdout; the command's output stays its one result line.
        with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(_Logits(model.eval(), names), tuple(example[n] for n in names),
                                        dynamo=True, input_names=names, output_names=["logits"], verbose=False,
                                        dynamic_shapes=(({0: batch, 1: sequence},) * len(names),))
            # One self-contained file up to protobuf's 2 GB; larger models keep their weights beside it.
            large = sum(p.numel() * p.element_size() for p in model.parameters()) > 1.8e9
            program.save(str(path), external_data=large)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch.export fails in many ways on unusual models: one line
        cause = exc.__cause__ or exc  # torch.onnx's own message only names the stage that failed
        raise UserError(f"export --onnx: torch.onnx could not export this model ({type(cause).__name__}: "
                        f"{(str(cause).strip().splitlines() or [''])[0][:300]})") from None
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    return names


def _quantize(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process is printed for every model (measured: no gain here)
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)


@torch.no_grad()
def _check(model, task, onnx: OnnxModel, batches: list[dict], quantize: str | None) -> dict:
    """ONNX against PyTorch on the check batches: fp32 logits within ``FP32_TOLERANCE``; int8 the same
    prediction (as the task decides it: ``Task.same_predictions``) on ``INT8_MIN_AGREEMENT`` of them."""
    diff, agree, total = 0.0, 0, 0
    for batch in batches:
        want = model(**batch).logits.float()
        got = onnx(**batch).logits.float()
        if got.shape != want.shape:
            raise UserError(f"export --onnx: the ONNX model's logits have shape {tuple(got.shape)}, PyTorch's "
                            f"{tuple(want.shape)}; nothing was written")
        diff = max(diff, float((got - want).abs().max()))
        same = task.same_predictions(want, got, batch)
        agree, total = agree + int(same.sum()), total + same.numel()
    record = {"inputs": sum(len(b["input_ids"]) for b in batches), "max_abs_diff": diff,
              "agreement": agree / max(total, 1)}
    if not quantize and diff > FP32_TOLERANCE:
        raise UserError(f"export --onnx: the ONNX model's logits differ from PyTorch's by up to {diff:.2g} (more "
                        f"than {FP32_TOLERANCE:g}); nothing was written")
    if quantize and record["agreement"] < INT8_MIN_AGREEMENT:
        raise UserError(f"export --onnx --quantize {quantize}: the int8 model agrees with PyTorch on only "
                        f"{record['agreement']:.0%} of {total} check predictions (needed "
                        f"{INT8_MIN_AGREEMENT:.0%}); nothing was written; use the fp32 export (no --quantize)")
    return record
