"""flax_relgrad: exact maximum-likelihood training of dense flows with relative gradients."""

from flax_relgrad.activations import Activation
from flax_relgrad.activations import SmoothLeakyReLU
from flax_relgrad.conditional import ConditionalFlowMLP
from flax_relgrad.conditional import ModulationHead
from flax_relgrad.core.dense import LOG_ABS_DET
from flax_relgrad.core.dense import PREACTIVATION
from flax_relgrad.core.dense import kernel_log_abs_det
from flax_relgrad.core.dense import near_identity
from flax_relgrad.core.stack import BASES
from flax_relgrad.core.stack import SPLINE_PLACEMENTS
from flax_relgrad.core.stack import LayerTerms
from flax_relgrad.core.stack import standard_normal_log_prob
from flax_relgrad.fit import FitResult
from flax_relgrad.fit import fit
from flax_relgrad.fit import relative_update
from flax_relgrad.flow import DiagonalGaussian
from flax_relgrad.flow import FlowDense
from flax_relgrad.flow import FlowMLP
from flax_relgrad.objectives import nll
from flax_relgrad.objectives import value_and_exact_grad
from flax_relgrad.objectives import value_and_relative_grad
from flax_relgrad.objectives import value_grad_and_relative_args
from flax_relgrad.relative import RelativeArgs
from flax_relgrad.relative import relative_layer_update
from flax_relgrad.splines import RationalQuadraticSpline
from flax_relgrad.transform import relative_jacobian

__all__ = [
  "Activation",
  "BASES",
  "ConditionalFlowMLP",
  "DiagonalGaussian",
  "FitResult",
  "FlowDense",
  "FlowMLP",
  "LayerTerms",
  "LOG_ABS_DET",
  "ModulationHead",
  "PREACTIVATION",
  "RationalQuadraticSpline",
  "RelativeArgs",
  "SmoothLeakyReLU",
  "SPLINE_PLACEMENTS",
  "fit",
  "kernel_log_abs_det",
  "near_identity",
  "nll",
  "relative_jacobian",
  "relative_layer_update",
  "relative_update",
  "standard_normal_log_prob",
  "value_and_exact_grad",
  "value_and_relative_grad",
  "value_grad_and_relative_args",
]

__version__ = "0.2.0"
