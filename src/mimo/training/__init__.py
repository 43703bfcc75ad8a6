"""Training: the step and its schedule, loss normalization, optimizers and clipping, checkpoints, metrics."""
