"""Scaling benchmark: time per training step against the width D (`python -m experiments.scaling`).

`models` holds the four flows and their training steps, `timing` measures them, `report` writes
scaling.csv and scaling.md and `plot` scaling.png; `nnx_vs_linen` times the NNX step against
the Linen one.
"""
