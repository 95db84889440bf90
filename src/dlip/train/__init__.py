"""Training: run configs, the distillation task, the generic loop, the pretraining and finetuning
jobs, checkpoints, optimizer and logging."""
