"""Training runs: configs, data, tokenizers, the trainer, checkpoints and reports."""
