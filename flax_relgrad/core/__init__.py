"""The framework-free core of `flax_relgrad`: the maths every binding shares.

Nothing here knows Flax. The Linen modules (`flax_relgrad.flow`, `flax_relgrad.conditional`,
`flax_relgrad.splines`) and the NNX modules (`flax_relgrad.nnx`) are thin bindings: they own
the parameters and the relative-gradient bookkeeping, and hand the core the objects it needs
(layers with `__call__`, `inverse` and `log_abs_det`, an activation, splines, a base).

- `dense`: a square dense layer's inverse and log|det W|, the initializer `near_identity`,
  and the names of the relative-gradient bookkeeping.
- `splines`: the rational-quadratic spline maths (knots, value and log-derivative, inverse).
- `stack`: the base densities, input checks, and a dense stack's forward and inverse with its
  per-layer log-det terms (`LayerTerms`).
- `distribution`: the distribution methods (`log_prob`, `sample`, `sample_and_log_prob`,
  `forward_and_log_det`, `inverse_and_log_det`, ...) derived once from a few hooks.

The relative gradient itself (`flax_relgrad.relative`) depends on this core only.
"""
