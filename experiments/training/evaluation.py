"""Evaluation: means and 2 standard errors of a whole split's per-example metrics, and the
per-layer kernel diagnostics written with them."""

from __future__ import annotations

from collections.abc import Callable
import math
from typing import Any

import jax
import numpy as np

from experiments.training import steps

PyTree = Any

EvalStep = Callable[[PyTree, jax.Array], dict[str, jax.Array]]
"""(params, y (N, D)) → per-example metrics (N,), see `steps.make_eval_step`."""


def mean_and_two_standard_errors(values: np.ndarray) -> tuple[float, float]:
  """The mean of `values` (n,) and 2 standard errors of it (sample std, ddof 1; NaN if n < 2)."""
  two_se = 2 * values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else math.nan
  return float(values.mean()), float(two_se)


def evaluate(
  eval_step: EvalStep,
  params: PyTree,
  y: np.ndarray,
  batch_size: int,
  put: Callable[[np.ndarray], jax.Array] = jax.device_put,
) -> dict[str, float]:
  """Means over y (N, D) of `eval_step`'s outputs, and 2 standard errors (`<key>_2se`) of all
  but the likelihood parts.

  Each batch of y (host memory) is placed on the devices by `put`.
  """
  if y.shape[0] == 0:
    raise ValueError("The evaluation split is empty.")
  batches = [
    eval_step(params, put(y[start : start + batch_size]))
    for start in range(0, y.shape[0], batch_size)
  ]
  values = {
    key: np.concatenate([np.asarray(batch[key]) for batch in batches]) for key in batches[0]
  }
  metrics = {key: float(value.mean()) for key, value in values.items()}
  metrics.update(
    {
      f"{key}_2se": mean_and_two_standard_errors(value)[1]
      for key, value in values.items()
      if key not in steps.LIKELIHOOD_PARTS
    }
  )
  return metrics


def describe(metrics: dict[str, float]) -> str:
  """ "LL −3.34 ± 0.02 nats", or for images (which report bits/dim, and whose LL is of the
  logit-transformed pixels) "LL −1375.78 ± 1.39 logit nats, 2.0303 ± 0.0056 bits/dim"."""
  if "bpd" not in metrics:
    return f"LL {metrics['ll']:.2f} ± {metrics['ll_2se']:.2f} nats"
  return (
    f"LL {metrics['ll']:.2f} ± {metrics['ll_2se']:.2f} logit nats, "
    f"{metrics['bpd']:.4f} ± {metrics['bpd_2se']:.4f} bits/dim"
  )


def kernel_diagnostics(params: PyTree) -> dict[str, float]:
  """Per dense layer, log|det W| and the condition number, from the eigenvalues of WᵀW in float64.

  O(D³) each: for evaluations only. (Squaring the singular values is accurate enough in
  float64 for the condition numbers a trainable flow has; eigenvalues that round below 0 are
  read as 0, i.e. a singular kernel.)
  """
  diagnostics = {}
  for name, layer in params.items():
    if "kernel" not in layer:  # splines, a learned base: no kernel
      continue
    kernel = np.asarray(layer["kernel"], np.float64)
    singular_values = np.sqrt(np.maximum(np.linalg.eigvalsh(kernel.T @ kernel), 0.0))
    with np.errstate(divide="ignore"):
      diagnostics[f"kernels/{name}/log_abs_det"] = float(np.log(singular_values).sum())
      diagnostics[f"kernels/{name}/condition"] = float(singular_values[-1] / singular_values[0])
  return diagnostics
