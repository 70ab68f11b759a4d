"""A square dense flow layer's maths: inverse, log|det W|, initializer, bookkeeping names.

Row-vector convention: a layer maps every D-vector z (the last axis) to y = z W + b with
W (D, D) and b (D,). Factorisations (LU, `slogdet`) run in at least float32, because LAPACK
has no bfloat16 or float16 kernels.
"""

from __future__ import annotations

from collections.abc import Callable
import math
from typing import Any, Protocol

import jax
import jax.numpy as jnp

PREACTIVATION = "preactivation"
"""Name under which a flow layer sows y (`intermediates`) and keeps its δ (`perturbations`)."""

LOG_ABS_DET = "log_abs_det"
"""Name of a flow layer's log|det W| placeholder in the `perturbations` collection."""

Initializer = Callable[..., jax.Array]
Dtype = Any


class DenseLayer(Protocol):
  """What the core needs from a binding's dense flow layer."""

  def __call__(self, z: jax.Array) -> jax.Array:
    """y = z W + b, (..., D)."""
    ...

  def inverse(self, y: jax.Array) -> jax.Array:
    """z = (y − b) W⁻¹, (..., D)."""
    ...

  def log_abs_det(self) -> jax.Array:
    """log|det W| (or the placeholder that stands for it in the relative-gradient pass)."""
    ...


class DenseMethods:
  """A dense flow layer's `forward_and_log_det` and `inverse`, derived from the binding's
  `_kernel_and_bias()` and `_refuse_inverse_in_relative_pass()`."""

  def __call__(self, z: jax.Array) -> jax.Array:
    raise NotImplementedError

  def log_abs_det(self) -> jax.Array:
    raise NotImplementedError

  def _kernel_and_bias(self) -> tuple[jax.Array, jax.Array | None]:
    raise NotImplementedError

  def _refuse_inverse_in_relative_pass(self) -> None:
    raise NotImplementedError

  def forward_and_log_det(self, z: jax.Array, event_ndims: int = 1) -> tuple[jax.Array, jax.Array]:
    """y = z W + b and the log-det per example.

    Args:
      z: input (..., D).
      event_ndims: how many trailing axes of z form one example: 1 for vectors, 2 for a
        (T, D) sequence, 3 for an (H, W, C) image.

    Returns:
      y (same shape as z) and log|det ∂y/∂z| = n·log|det W| of shape z.shape[:-event_ndims],
      n = the number of D-vectors per example (T, H·W, ...).
    """
    return dense_forward_and_log_det(self, z, event_ndims)

  def inverse(self, y: jax.Array) -> jax.Array:
    """z = (y − b) W⁻¹ for y (..., D), with one LU factorisation of W per call."""
    self._refuse_inverse_in_relative_pass()
    kernel, bias = self._kernel_and_bias()
    return dense_inverse(kernel, bias, y)


INVERSE_IN_RELATIVE_PASS = (
  "the loss runs a flow layer backwards (inverse or sample). The relative gradient covers a "
  "loss that depends on a layer through its output and its log|det W| only; for "
  "sampling-based losses (reverse KL, variational inference) take the ordinary gradient "
  "(jax.value_and_grad, nnx.value_and_grad); draw a frozen model's samples outside the loss "
  "and pass them in."
)
"""The end of the error a binding raises when a relative-gradient loss calls `inverse`."""


def near_identity(scale: float = 0.01) -> Initializer:
  """Kernel initializer I + scale·N(0, 1/D): a flow that starts close to the identity."""

  def init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
    if len(shape) != 2 or shape[0] != shape[1]:
      raise ValueError(f"near_identity initializes square kernels only, got shape {shape}.")
    noise = jax.random.normal(key, shape, dtype) / math.sqrt(shape[0])
    return jnp.eye(shape[0], dtype=dtype) + scale * noise

  return init


def factorisation_dtype(dtype: Dtype) -> Dtype:
  """The dtype LU/QR factorisations run in: at least float32 (LAPACK has no bfloat16/float16)."""
  return jnp.promote_types(dtype, jnp.float32)


def init_kernel(
  kernel_init: Initializer, key: jax.Array, width: int, param_dtype: Dtype
) -> jax.Array:
  """A (D, D) kernel drawn by `kernel_init` in at least float32, then cast to `param_dtype`
  (orthogonal initializers factorise)."""
  if width < 1:
    raise ValueError(f"A flow layer needs width D >= 1, got {width}.")
  return kernel_init(key, (width, width), factorisation_dtype(param_dtype)).astype(param_dtype)


def dense_forward_and_log_det(
  layer: DenseLayer, z: jax.Array, event_ndims: int
) -> tuple[jax.Array, jax.Array]:
  """`layer(z)` and n·`layer.log_abs_det()` per example, shape z.shape[:-event_ndims], where
  n = the number of D-vectors per example (1 for vectors, T for a (T, D) sequence, H·W for an
  (H, W, C) image, where the layer is an invertible 1×1 convolution)."""
  if not 1 <= event_ndims <= z.ndim:
    raise ValueError(f"event_ndims must be in [1, {z.ndim}] for an input of shape {z.shape}.")
  vectors_per_example = math.prod(z.shape[z.ndim - event_ndims : -1])
  y = layer(z)
  log_det = vectors_per_example * layer.log_abs_det()
  return y, jnp.broadcast_to(log_det, z.shape[: z.ndim - event_ndims])


def dense_inverse(kernel: jax.Array, bias: jax.Array | None, y: jax.Array) -> jax.Array:
  """z = (y − b) W⁻¹ for y (..., D): one LU factorisation of the (D, D) kernel, in at least
  float32; differentiable (reverse mode through the LU solve)."""
  if y.ndim < 1 or y.shape[-1] != kernel.shape[-1]:
    raise ValueError(
      f"The layer has D = {kernel.shape[-1]} ({kernel.shape} kernel) but got outputs y of "
      f"shape {y.shape} to invert; they must be (..., {kernel.shape[-1]})."
    )
  if bias is not None:
    y = y - bias
  dtype = factorisation_dtype(y.dtype)
  lu_and_pivots = jax.scipy.linalg.lu_factor(kernel.astype(dtype))
  flat = y.reshape(-1, y.shape[-1]).astype(dtype)
  # z W = y  ⇔  Wᵀ zᵀ = yᵀ, hence trans=1.
  z = jax.scipy.linalg.lu_solve(lu_and_pivots, flat.T, trans=1).T
  return z.reshape(y.shape).astype(y.dtype)


def relative_pass_params(
  kernel: jax.Array, bias: jax.Array | None, stand_ins: dict[str, jax.Array]
) -> tuple[jax.Array, jax.Array | None]:
  """W and b as a relative-gradient pass applies them: `stop_gradient`, so that the params'
  gradient holds only what the loss does with them besides the layer, plus the zero
  stand-ins given ({"kernel": ..., "bias": ...}, possibly empty), whose gradient is then the
  layer's own (zᵀ δ, Σ δ)."""
  kernel, bias = jax.lax.stop_gradient((kernel, bias))
  if "kernel" in stand_ins:
    kernel = kernel + stand_ins["kernel"]
  if bias is not None and "bias" in stand_ins:
    bias = bias + stand_ins["bias"]
  return kernel, bias


def kernel_log_abs_det(kernel: jax.Array) -> jax.Array:
  """log|det W| of a (..., D, D) kernel through `slogdet`, in at least float32."""
  return jnp.linalg.slogdet(kernel.astype(factorisation_dtype(kernel.dtype)))[1]
