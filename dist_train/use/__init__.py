"""What a run leaves and what uses it: Hugging Face and ONNX exports, eval and predict on a model folder, the
zero-shot baseline, the training report."""
