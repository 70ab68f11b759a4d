"""What every training program shares: the loop, steps, checkpoints, data parallelism, evaluation,
config plumbing and the `DataSource` interface; each program's own data live in its folder."""
