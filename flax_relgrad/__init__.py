"""flax_relgrad: exact maximum-likelihood training of dense flows with relative gradients."""

from flax_relgrad.activations import Activation, SmoothLeakyReLU
from flax_relgrad.conditional import ConditionalFlowMLP, ModulationHead
from flax_relgrad.fit import FitResult, fit, relative_update
from flax_relgrad.flow import (
    BASES,
    LOG_ABS_DET,
    PREACTIVATION,
    DiagonalGaussian,
    FlowDense,
    FlowMLP,
    kernel_log_abs_det,
    near_identity,
    standard_normal_log_prob,
)
from flax_relgrad.objectives import nll, value_and_exact_grad, value_and_relative_grad
from flax_relgrad.relative import relative_layer_update

__all__ = [
    "Activation",
    "BASES",
    "ConditionalFlowMLP",
    "DiagonalGaussian",
    "FitResult",
    "FlowDense",
    "FlowMLP",
    "LOG_ABS_DET",
    "ModulationHead",
    "PREACTIVATION",
    "SmoothLeakyReLU",
    "fit",
    "kernel_log_abs_det",
    "near_identity",
    "nll",
    "relative_layer_update",
    "relative_update",
    "standard_normal_log_prob",
    "value_and_exact_grad",
    "value_and_relative_grad",
]

__version__ = "0.1.0"
