"""An ONNX model folder run by onnxruntime in the PyTorch model's place: ``dist-train predict`` and ``eval`` take
the folders ``dist-train export --onnx`` writes (use/deploy.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from dist_train.errors import UserError

ONNX_FILE = "model.onnx"
# Not on a package index: the optional packages themselves, or the clone's extra.
INSTALL = "pip install onnx onnxscript onnxruntime (in a dist-train clone: pip install -e '.[deploy]')"


def require(command: str, modules: tuple[str, ...] = ("onnxruntime",)) -> None:
    """The optional deploy packages are installed, else one line saying how to get them."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"{command} needs {', '.join(missing)}, which is not installed; run: {INSTALL}")


class OnnxModel(torch.nn.Module):
    """An onnxruntime session that looks like the PyTorch model to a task: called with the tokenizer's
    tensors, it returns an output with ``.logits`` (float32, CPU). Threads: torch's (``OMP_NUM_THREADS``),
    so an ONNX and a PyTorch run of the same command use the same cores."""

    def __init__(self, folder: str | Path, name: str = "MODEL_DIR"):
        super().__init__()
        require(f"{name} '{folder}' is an ONNX folder: running it")
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        path = Path(folder, ONNX_FILE)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidProtobuf/...: one line
            raise UserError(f"{name} '{folder}': cannot load {ONNX_FILE} ({str(exc).splitlines()[0][:200]}); the "
                            "folder is damaged: export it again") from None
        self.input_names = [i.name for i in self.session.get_inputs()]

    def forward(self, **inputs):
        from transformers.utils import ModelOutput

        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise UserError(f"the ONNX model needs inputs {missing} that this task does not give; export the model "
                            "folder again with this dist-train")
        # Inputs the graph does not take were unused by the exported model (torch.onnx drops them).
        feed = {n: inputs[n].detach().cpu().numpy() for n in self.input_names}
        # Back on the inputs' device: the task's evaluator meets them there with its labels (a GPU machine).
        device = inputs[self.input_names[0]].device
        return ModelOutput(logits=torch.from_numpy(self.session.run(None, feed)[0]).to(device))
