"""The run: the training loop and what it owns (its state, optimizer and schedule, checkpoints, resume, the
output folder, seeds, stop signals, distillation's teacher)."""
