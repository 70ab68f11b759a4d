"""Shared fixtures: float64 for brute-force references, and small random flows.

The tests here need the library only (jax, flax, optax); those of the experiment programs,
which need the `experiments` extra, are in `programs/` (`python -m pytest --ignore=tests/programs`
runs the library's alone).
"""

import functools
import os

# The suite's time is mostly XLA compiling hundreds of small programs. LLVM's optimisation
# passes are most of that on the CPU, and at level 0 the suite runs in about three quarters
# of the time; the HLO the tests check is the same, only its machine code is less optimised.
# Set before jax starts its backend (at its first computation), added to the caller's flags.
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
).strip()

import flax
import jax
import jax.numpy as jnp
import pytest

import flax_relgrad as fr

HAS_NNX = tuple(int(part) for part in flax.__version__.split(".")[:2]) >= (0, 12)
"""Whether this flax has the NNX API that `flax_relgrad.nnx` needs (flax >= 0.12)."""

if hasattr(jax, "enable_x64"):
  enable_x64 = jax.enable_x64
else:  # jax < 0.8 (CI also runs the oldest supported releases, ci/min-constraints.txt)
  from jax.experimental import enable_x64  # pylint: disable=g-import-not-at-top

if tuple(int(part) for part in jax.__version__.split(".")[:2]) < (0, 5):
  # jax 0.5 made the partitionable threefry stream the default; older jax draws other
  # numbers from the same keys. Seeded tests use the same data on every supported jax
  # (test_learning's Adam case does not converge in its step budget on the old stream).
  jax.config.update("jax_threefry_partitionable", True)


@pytest.fixture
def float64():
  """Runs the test with 64-bit JAX types (restored afterwards for the rest of the suite)."""
  with enable_x64(True):
    yield


def perturbed_init(model, *args, seed: int, method=None, scale: float = 0.3):
  """Params of `model.init` on `args` (key `seed`, under jit), every leaf then moved by
  `perturb_params(…, seed + 1, scale)` away from the init so that no term vanishes."""
  init = jax.jit(functools.partial(model.init, method=method))
  return perturb_params(init(jax.random.PRNGKey(seed), *args)["params"], seed + 1, scale)


def random_flow_params(model: fr.FlowMLP, width: int, seed: int, scale: float = 0.3):
  """Params of `model` for width D, moved away from the orthogonal init so no term vanishes."""
  return perturbed_init(model, jnp.zeros((2, width), model.param_dtype), seed=seed, scale=scale)


def brute_force_relative_gradient(kernel, bias, kernel_grad, bias_grad):
  """Ŵ Ŵᵀ Ĝ restricted to the trainable block, Ŵ = [[W, 0], [b, 1]], Ĝ = [[G_W, 0], [g_b, 0]]."""
  width = kernel.shape[0]
  if bias is None:
    bias, bias_grad = jnp.zeros(width), jnp.zeros(width)
  augmented = jnp.block([[kernel, jnp.zeros((width, 1))], [bias[None], jnp.ones((1, 1))]])
  augmented_grad = jnp.block(
    [[kernel_grad, jnp.zeros((width, 1))], [bias_grad[None], jnp.zeros((1, 1))]]
  )
  relative = augmented @ augmented.T @ augmented_grad
  return relative[:width, :width], relative[width, :width]


def perturb_params(params, seed: int, scale: float = 0.3):
  """Every leaf moved by scale·N(0, 1), so that no term of a gradient vanishes."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  noisy = [
    leaf + scale * jax.random.normal(k, leaf.shape, leaf.dtype)
    for leaf, k in zip(leaves, keys, strict=True)
  ]
  return jax.tree_util.tree_unflatten(treedef, noisy)


def jitted(model, params):
  """`apply(method, *args)`: `model.apply({"params": params}, *args, method=method)` compiled as
  one program (run eagerly, a flow dispatches hundreds of small operations, each compiled on
  first use: several times slower in these tests); non-array args (sample counts) stay static."""

  def apply(method, *args):
    arrays = [a for a in args if isinstance(a, jax.Array)]

    def run(params, arrays):
      given = iter(arrays)
      full = [next(given) if isinstance(a, jax.Array) else a for a in args]
      return model.apply({"params": params}, *full, method=method)

    return jax.jit(run)(params, arrays)

  return apply


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
  """A persistent XLA compilation cache for the session: the many short training runs of the
  suite compile the same programs again (each run jits fresh closures)."""
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  yield


@pytest.fixture(scope="session")
def maf_release_dir(tmp_path_factory):
  """A folder laid out like the MAF benchmark release, with small synthetic files.

  For the tests in programs/ (importing them puts programs/ on sys.path). It stays here: a
  second conftest.py would shadow this one for `from conftest import ...`.
  """
  from maf_release import write_release  # pylint: disable=g-import-not-at-top

  return write_release(str(tmp_path_factory.mktemp("maf_release")))
