"""Where a trained flow's log-likelihood comes from, layer by layer (`--mode=layers`).

For the log-likelihood of docs/method.md, with an optional spline s_k before layer k,

    log p(x) = log N(z_L) + Σ_k [ Σ_i log s_k,i'(·) + log|det W_k| + Σ_i log σ'(y_k,i) ]

(no activation after the last layer). `layer_report` returns each bracket's three terms,
averaged over a set of examples, with the spread of the layer's pre-activations and its
kernel's condition number; the rows and the Gaussian term add up to the mean log-likelihood.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax

import flax_relgrad as fr
from experiments.training import evaluation

PyTree = Any


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
) -> tuple[list[tuple[jax.Array, ...]], jax.Array]:
  """Per layer (mean spline log-det, log|det W|, mean activation log-det, std of y), from the
  flow's own `fr.LayerTerms` (`FlowMLP.forward_and_layer_terms`), and the mean base
  log-density log N(z)."""
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
  return rows, model.apply(variables, z, method=fr.FlowMLP.base_log_prob).mean()


def layer_report(model: fr.FlowMLP, params: PyTree, x: jax.Array) -> tuple[list[LayerRow], float]:
  """The per-layer terms of `model` (a FlowMLP) on examples x (N, D), and the mean log N(z)."""
  rows, base = jax.jit(functools.partial(_terms, model))(params, x)
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
  return report, float(base)


def describe(report: list[LayerRow], base: float) -> str:
  """The report as a table (one row per layer, then the total)."""
  lines = ["layer  spline log-det  log|det W|  activation log-det  std(y)  condition"]
  for index, row in enumerate(report):
    lines.append(
      f"{index:5d}  {row.spline_log_det:14.1f}  {row.kernel_log_abs_det:10.1f}  "
      f"{row.activation_log_det:18.1f}  {row.preactivation_std:6.2f}  {row.condition:9.1f}"
    )
  total = base + sum(r.spline_log_det + r.kernel_log_abs_det + r.activation_log_det for r in report)
  lines.append(f"log N(z): {base:.1f}; mean log-likelihood (sum of all terms): {total:.1f} nats")
  return "\n".join(lines)
