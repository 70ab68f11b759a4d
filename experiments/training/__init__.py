"""The training loop, data sources, checkpoints and data parallelism shared by every experiment."""
