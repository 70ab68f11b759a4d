"""Per-layer kernel diagnostics written at each evaluation."""

import numpy as np

from experiments.types import PyTree


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
