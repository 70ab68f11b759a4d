"""`python -m experiments.flowjax_benchmark`: flax_relgrad against flowjax on MNIST at equal
wall-clock (see `__main__`)."""
