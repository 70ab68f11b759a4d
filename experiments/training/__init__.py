"""The training loop, data sources, checkpoints and data parallelism shared by every experiment.

Importing this package first limits OpenBLAS, which JAX's CPU `slogdet` (exact evaluation)
calls into, to one thread unless OPENBLAS_NUM_THREADS is set: its spinning threads otherwise
fight XLA's thread pool (see experiments/scaling/__main__.py). It must happen before JAX loads
LAPACK, so every program imports `experiments.training` before JAX.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
