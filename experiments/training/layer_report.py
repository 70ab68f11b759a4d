"""Where a trained flow's log-likelihood comes from, layer by layer (`--mode=layers`).

For the log-likelihood of docs/method.md, with an optional spline s_k before layer k,

    log p(x) = log N(z_L) + Σ_k [ Σ_i log s_k,i'(·) + log|det W_k| + Σ_i log σ'(y_k,i) ]

(no activation after the last layer). `layer_report` returns each bracket's three terms,
averaged over a set of examples, with the spread of the layer's pre-activations and its
kernel's condition number; the rows and the Gaussian term add up to the mean log-likelihood.

`elementwise_base_gain` asks whether a learned elementwise base (a density per coordinate of z
in place of N(0, 1)) could add to it. The most it could add is Σ_i KL(q_i ‖ N(0, 1)), for q_i
the marginal of z_i, which is estimated held-out: a Gaussian kernel density estimate of each
q_i on one half of the z's (bandwidth 1.06 σ̂ n^(−1/5), Silverman's rule), then the mean of
Σ_i [log q̂_i(z_i) − log N(z_i; 0, 1)] over the other half. Kernel estimates are biased low on
held-out points, so a value near zero or below says the marginals are already N(0, 1).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

import flax_relgrad as fr
from experiments.training import evaluation

PyTree = Any

BASE_GAIN_EXAMPLES = 4000
"""z's used by `elementwise_base_gain` (half to fit, half to score): 2000² kernel terms per
coordinate."""


@dataclasses.dataclass(frozen=True)
class LayerRow:
  """One layer's mean log-likelihood terms (nats) and its diagnostics."""

  spline_log_det: float  # mean Σ_i log s_k,i' (0 without splines)
  kernel_log_abs_det: float  # log|det W_k|
  activation_log_det: float  # mean Σ_i log σ'(y_k,i) (0 for the last layer)
  preactivation_std: float  # standard deviation of y_k over examples and coordinates
  condition: float  # condition number of W_k


def _terms(
  model: fr.FlowMLP, params: PyTree, x: jax.Array
) -> tuple[list[tuple[jax.Array, ...]], jax.Array, jax.Array]:
  """Per layer (mean spline log-det, log|det W|, mean activation log-det, std of y), from the
  flow's own `fr.LayerTerms` (`FlowMLP.forward_and_layer_terms`), the mean base log-density
  log N(z), and z (N, D)."""
  variables = {"params": params}
  z, terms = model.apply(variables, x, method=fr.FlowMLP.forward_and_layer_terms)
  rows = [
    (
      term.spline_log_det.mean(),
      term.kernel_log_abs_det,
      term.activation_log_det.mean(),
      term.preactivation.std(),
    )
    for term in terms
  ]
  return rows, model.apply(variables, z, method=fr.FlowMLP.base_log_prob).mean(), z


@jax.jit
def elementwise_base_gain(z: jax.Array) -> jax.Array:
  """The held-out estimate of Σ_i KL(q_i ‖ N(0, 1)) of the module docstring, in nats per
  example, from outputs z (N, D), N >= 4: kernel estimates fitted on the first half of the rows,
  scored on the second."""
  if z.shape[0] < 4:
    raise ValueError(
      f"The base gain needs at least 4 outputs z (2 to fit, 2 to score), got {z.shape}."
    )
  fit, held_out = jnp.split(z[: z.shape[0] // 2 * 2], 2)

  def coordinate_gain(column: tuple[jax.Array, jax.Array]) -> jax.Array:
    centres, points = column
    bandwidth = 1.06 * centres.std() * centres.shape[0] ** -0.2
    scaled = (points[:, None] - centres[None, :]) / bandwidth
    log_q = jax.nn.logsumexp(-0.5 * scaled**2, axis=1) - jnp.log(
      centres.shape[0] * bandwidth * jnp.sqrt(2 * jnp.pi)
    )
    log_normal = -0.5 * (points**2 + jnp.log(2 * jnp.pi))
    return (log_q - log_normal).mean()

  return jax.lax.map(coordinate_gain, (fit.T, held_out.T)).sum()


def layer_report(
  model: fr.FlowMLP, params: PyTree, x: jax.Array
) -> tuple[list[LayerRow], float, float]:
  """The per-layer terms of `model` (a FlowMLP) on examples x (N, D), the mean log N(z), and
  `elementwise_base_gain` on the first `BASE_GAIN_EXAMPLES` z's."""
  rows, base, z = jax.jit(functools.partial(_terms, model))(params, x)
  conditions = evaluation.kernel_diagnostics(params)
  report = [
    LayerRow(
      float(spline),
      float(kernel),
      float(activation),
      float(std),
      conditions[f"kernels/layers_{index}/condition"],
    )
    for index, (spline, kernel, activation, std) in enumerate(rows)
  ]
  return report, float(base), float(elementwise_base_gain(z[:BASE_GAIN_EXAMPLES]))


def describe(report: list[LayerRow], base: float, base_gain: float) -> str:
  """The report as a table (one row per layer, then the total)."""
  lines = ["layer  spline log-det  log|det W|  activation log-det  std(y)  condition"]
  for index, row in enumerate(report):
    lines.append(
      f"{index:5d}  {row.spline_log_det:14.1f}  {row.kernel_log_abs_det:10.1f}  "
      f"{row.activation_log_det:18.1f}  {row.preactivation_std:6.2f}  {row.condition:9.1f}"
    )
  total = base + sum(r.spline_log_det + r.kernel_log_abs_det + r.activation_log_det for r in report)
  lines.append(f"log N(z): {base:.1f}; mean log-likelihood (sum of all terms): {total:.1f} nats")
  lines.append(
    f"a learned elementwise base could add about {base_gain:.1f} nats "
    "(held-out kernel estimate of Σ_i KL(q_i ‖ N(0, 1)); ≤ 0: z's marginals are N(0, 1))"
  )
  return "\n".join(lines)
