"""flax_relgrad: exact maximum-likelihood training of dense flows with relative gradients."""

from flax_relgrad.activations import Activation, SmoothLeakyReLU
from flax_relgrad.flow import (
    PREACTIVATION,
    FlowDense,
    FlowMLP,
    near_identity,
    standard_normal_log_prob,
)
from flax_relgrad.objectives import (
    value_and_exact_grad,
    value_and_relative_grad_args,
    zero_perturbations,
)
from flax_relgrad.transform import relative_jacobian, relative_layer_update

__all__ = [
    "Activation",
    "FlowDense",
    "FlowMLP",
    "PREACTIVATION",
    "SmoothLeakyReLU",
    "near_identity",
    "relative_jacobian",
    "relative_layer_update",
    "standard_normal_log_prob",
    "value_and_exact_grad",
    "value_and_relative_grad_args",
    "zero_perturbations",
]

__version__ = "0.1.0"
