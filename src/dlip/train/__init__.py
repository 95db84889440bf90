"""Training: the step, distributed helpers, checkpoints and run entry points."""
