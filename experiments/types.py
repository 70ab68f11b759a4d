"""Type aliases shared by the experiments."""

from typing import Any

PyTree = Any
"""A JAX pytree (nested dicts, lists, tuples and dataclasses of arrays)."""
