"""The model side: model and tokenizer folders, building a task's model (pretrained or from a config), LoRA,
pooling, the [CLS]-only last layer, labelled-only logits, GGUF conversion. Nothing here knows of engines,
ranks or the training loop."""
