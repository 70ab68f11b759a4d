"""Scaling benchmark: time per training step against the width D (`python -m experiments.scaling`)."""
