"""`fit`: maximum-likelihood training of a flow on in-memory arrays, and the step it shares.

`relative_update` is the one relative-gradient training step of the project: `fit` scans it
over each epoch, and the experiments' training loop runs it inside its own `lax.scan`.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
import dataclasses
import functools
import math
import operator
from typing import Any

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from flax_relgrad.objectives import nll
from flax_relgrad.objectives import value_and_relative_grad
from flax_relgrad.relative import PyTree

ArrayLike = jax.typing.ArrayLike


def relative_update(
  model: nn.Module,
  tx: optax.GradientTransformation,
  params: PyTree,
  opt_state: optax.OptState,
  x: jax.Array,
  *context: jax.Array,
) -> tuple[PyTree, optax.OptState, jax.Array]:
  """One exact maximum-likelihood step of a flow with a `log_prob` method.

  Args:
    model: `FlowMLP`, `ConditionalFlowMLP` or any module with `log_prob(x, *context)`.
    tx: any optax optimizer (it receives the relative gradient).
    params, opt_state: the current parameters and optimizer state.
    x: the batch (B, D); `context`: the conditional flow's context (B, C), if any.

  Returns:
    (params, opt_state, loss): the updated parameters and state, and the batch-mean loss
    without the log|det W| terms (see `value_and_relative_grad`): not the NLL.
  """
  loss, grads = value_and_relative_grad(model, nll)(params, x, *context)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


@dataclasses.dataclass(frozen=True)
class FitResult:
  """What `fit` returns.

  Attributes:
    params: the parameters of the epoch with the best validation NLL.
    best_epoch: that epoch (1-based).
    history: per epoch, `train_nll` (the epoch's mean training loss plus −Σ log|det W| at the
      epoch's end, nats per example) and `validation_nll` (exact, nats per example).
  """

  params: PyTree
  best_epoch: int
  history: dict[str, list[float]]


def fit(
  model: nn.Module,
  params: PyTree,
  train: ArrayLike | Sequence[ArrayLike],
  validation: ArrayLike | Sequence[ArrayLike],
  *,
  optimizer: optax.GradientTransformation | None = None,
  batch_size: int = 100,
  max_epochs: int = 100,
  patience: int = 5,
  seed: int = 0,
  progress: bool = True,
) -> FitResult:
  """Fits a flow to arrays by the relative gradient, with early stopping on validation NLL.

  Args:
    model: a flow with `log_prob(x, *context)` (`FlowMLP`, `ConditionalFlowMLP`, ...).
    params: initial parameters (`model.init(...)["params"]`).
    train: x (N, D), or a tuple (x, context (N, C), ...) for a conditional flow: JAX or
      NumPy arrays, or anything `np.asarray` takes (integers become float32); all finite.
      A tuple is always (x, context, ...); a list is x itself when it holds rows (lists or
      1-D arrays), and (x, context, ...) when it holds 2-D arrays.
    validation: the same for the validation set.
    optimizer: any optax optimizer; default `optax.adam(1e-3)`.
    batch_size: examples per step (each epoch drops the last N mod batch_size of a fresh
      permutation).
    max_epochs: the most epochs to train.
    patience: stop after this many epochs without a better validation NLL.
    seed: seed of the shuffling.
    progress: show a progress bar (tqdm, if installed) or print one line per epoch.

  Returns:
    A `FitResult` with the best parameters and the per-epoch history.

  Raises:
    TypeError: for a model that is not a Linen module (an NNX flow: see the README's NNX
      loop) or data that are not numbers.
    ValueError: for arrays of mismatched or empty shapes, non-finite values (naming the
      first such row; float64 beyond float32's range counts, when JAX computes in float32),
      batch_size > N, or batch_size, max_epochs or patience not an integer >= 1; for a model
      with variables besides params or that needs rngs (BatchNorm, dropout), and for an
      optimizer with `relative_jacobian()` (fit computes the relative gradient itself).
    FloatingPointError: when training diverges (a non-finite loss), naming the epoch.
  """
  if not isinstance(model, nn.Module):
    raise TypeError(
      f"fit trains Linen modules (fr.FlowMLP, fr.ConditionalFlowMLP, ...), got "
      f"{type(model).__module__}.{type(model).__name__}. For a flax_relgrad.nnx model, write the "
      "loop with flax_relgrad.nnx.value_and_relative_grad and an nnx.Optimizer (README, "
      "'Flax NNX')."
    )
  batch_size, max_epochs, patience = (
    _positive_int(name, value)
    for name, value in (
      ("batch_size", batch_size),
      ("max_epochs", max_epochs),
      ("patience", patience),
    )
  )
  train_arrays, validation_arrays = _as_arrays(train, "train"), _as_arrays(validation, "validation")
  _check_arrays(train_arrays, validation_arrays, batch_size)
  # Checked after the conversion to JAX: float64 values beyond float32's range become inf there.
  train, validation = (
    _check_finite(train_arrays, "train"),
    _check_finite(validation_arrays, "validation"),
  )
  tx = optimizer or optax.adam(1e-3)
  opt_state = tx.init(params)
  num_batches = train[0].shape[0] // batch_size
  _check_trainable(model, tx, params, opt_state, tuple(a[:batch_size] for a in train))

  @jax.jit
  def run_epoch(params, opt_state, order):
    def body(carry, rows):
      params, opt_state = carry
      params, opt_state, loss = relative_update(
        model, tx, params, opt_state, *(a[rows] for a in train)
      )
      return (params, opt_state), loss

    batches = order[: num_batches * batch_size].reshape(num_batches, batch_size)
    (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), batches)
    return (
      params,
      opt_state,
      losses.mean() + _log_det_terms(model, params, *(a[:batch_size] for a in train)),
    )

  validation_nll = jax.jit(lambda params: model.apply({"params": params}, *validation, method=nll))
  history: dict[str, list[float]] = {"train_nll": [], "validation_nll": []}
  best_params, best_epoch, best_nll = params, 0, math.inf
  rng = np.random.default_rng(seed)
  report = _progress_reporter(max_epochs, progress)
  for epoch in range(1, max_epochs + 1):
    params, opt_state, train_nll = run_epoch(params, opt_state, rng.permutation(train[0].shape[0]))
    epoch_nll = float(validation_nll(params))
    if not (math.isfinite(float(train_nll)) and math.isfinite(epoch_nll)):
      raise FloatingPointError(
        f"fit diverged in epoch {epoch} (training NLL {float(train_nll)}, validation NLL {epoch_nll}); "
        "lower the learning rate or clip (optax.clip_by_global_norm)."
      )
    history["train_nll"].append(float(train_nll))
    history["validation_nll"].append(epoch_nll)
    if epoch_nll < best_nll:
      best_params, best_epoch, best_nll = params, epoch, epoch_nll
    report(epoch, float(train_nll), epoch_nll)
    if epoch - best_epoch >= patience:
      break
  report(None, 0.0, 0.0)
  return FitResult(best_params, best_epoch, history)


def _check_trainable(
  model: nn.Module,
  tx: optax.GradientTransformation,
  params: PyTree,
  opt_state: optax.OptState,
  batch: tuple[jax.Array, ...],
) -> None:
  """Traces one step (shapes only) and says what `fit` supports when that fails."""
  try:
    jax.eval_shape(functools.partial(relative_update, model, tx), params, opt_state, *batch)
  except (ValueError, flax.errors.FlaxError) as error:
    raise ValueError(
      f"fit cannot take a step of this model with this optimizer: {error}\n"
      "fit trains a flow whose variables are its params only, applied without rngs (no "
      "BatchNorm statistics, no dropout), with a plain optax optimizer: it computes the "
      "relative gradient itself, so the optimizer holds no relative_jacobian(). For anything "
      "else write the step with value_and_relative_grad (its model_state, mutable and rngs) "
      "as in the README's 'Use it in your own model'."
    ) from error


def _log_det_terms(model: nn.Module, params: PyTree, *batch: jax.Array) -> jax.Array:
  """The part of the batch-mean NLL that the training loss leaves out: −Σ_k log|det W_k| for a
  plain flow (one `slogdet` per flow layer, once per epoch): the exact NLL of a plain apply
  minus the training loss on the same batch."""
  exact = model.apply({"params": params}, *batch, method=nll)
  return exact - value_and_relative_grad(model, nll)(params, *batch)[0]


def _positive_int(name: str, value: Any) -> int:
  """`value` as an int >= 1 (Python, NumPy or JAX integers; not bools or floats)."""
  try:
    number = operator.index(value)
  except TypeError:
    number = 0
  if isinstance(value, (bool, np.bool_)) or number < 1:
    raise ValueError(f"fit: {name} must be an integer >= 1, got {value!r}.")
  return number


def _as_arrays(arrays: ArrayLike | Sequence[ArrayLike], name: str) -> tuple[np.ndarray, ...]:
  """x, or (x, context, ...), as NumPy arrays (from JAX or NumPy arrays, lists or anything
  array-like); integers become float32."""
  if isinstance(arrays, tuple) or (isinstance(arrays, list) and not _is_list_of_rows(arrays)):
    parts: tuple[Any, ...] = tuple(arrays)
  else:
    parts = (arrays,)
  converted = []
  for part in parts:
    array = np.asarray(part)
    if not jnp.issubdtype(array.dtype, jnp.number):  # jnp's knows bfloat16
      raise TypeError(f"fit: {name} must hold numbers, got dtype {array.dtype}.")
    converted.append(array.astype(np.float32) if np.issubdtype(array.dtype, np.integer) else array)
  return tuple(converted)


def _check_finite(arrays: tuple[np.ndarray, ...], name: str) -> tuple[jax.Array, ...]:
  """The arrays as JAX arrays, refusing NaN or inf in them (naming the first offending row)."""
  with np.errstate(over="ignore"):  # float64 beyond float32's range: refused below, by row
    converted = tuple(map(jnp.asarray, arrays))
  for position, (array, original) in enumerate(zip(converted, arrays, strict=True)):
    finite = np.asarray(jnp.isfinite(array).reshape(array.shape[0], -1).all(-1))
    if not finite.all():
      row = int(np.argmin(finite))
      what = name if len(arrays) == 1 else f"{name}[{position}]"
      raise ValueError(
        f"fit: {what} holds non-finite values (NaN or inf, or values beyond the range of "
        f"{array.dtype}, which JAX computes in), first in row {row}: {original[row]}. Clean, "
        "rescale or drop those rows before training."
      )
  return converted


def _is_list_of_rows(arrays: Sequence[Any]) -> bool:
  """Whether a list is itself x (numbers, or rows of them: nested lists or 1-D arrays), not
  (x, context, ...) (2-D arrays)."""
  return len(arrays) > 0 and not isinstance(arrays[0], bool) and np.ndim(arrays[0]) <= 1


def _check_arrays(
  train: tuple[np.ndarray, ...], validation: tuple[np.ndarray, ...], batch_size: int
) -> None:
  for name, arrays in (("train", train), ("validation", validation)):
    if (
      any(a.ndim != 2 for a in arrays)
      or len({a.shape[0] for a in arrays}) != 1
      or arrays[0].shape[0] == 0
    ):
      raise ValueError(
        f"fit: {name} must be x (N, D) or (x, context, ...) with N >= 1 rows each, got shapes "
        f"{[a.shape for a in arrays]}."
      )
  if [a.shape[1:] for a in train] != [a.shape[1:] for a in validation]:
    raise ValueError(
      f"fit: train and validation differ in their feature shapes: {[a.shape for a in train]} vs "
      f"{[a.shape for a in validation]}."
    )
  if not 1 <= batch_size <= train[0].shape[0]:
    raise ValueError(
      f"fit: batch_size must lie in [1, {train[0].shape[0]}] (the training rows), got {batch_size}."
    )


def _progress_reporter(
  max_epochs: int, enabled: bool
) -> Callable[[int | None, float, float], None]:
  """report(epoch, train_nll, validation_nll); report(None, ...) closes the bar."""
  if not enabled:
    return lambda *args: None
  try:
    import tqdm  # pylint: disable=g-import-not-at-top
  except ImportError:
    tqdm = None
  if tqdm is None:

    def print_line(epoch, train_nll, validation_nll):
      if epoch is not None:
        print(
          f"epoch {epoch}/{max_epochs}: train NLL {train_nll:.4f}, validation NLL {validation_nll:.4f}"
        )

    return print_line
  bar = tqdm.tqdm(total=max_epochs, unit="epoch")

  def update_bar(epoch, train_nll, validation_nll):
    if epoch is None:
      bar.close()
      return
    bar.set_postfix(train_nll=f"{train_nll:.4f}", validation_nll=f"{validation_nll:.4f}")
    bar.update(1)

  return update_bar
