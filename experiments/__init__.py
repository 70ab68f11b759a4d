"""Training programs and benchmarks built on `flax_relgrad`.

Importing this package limits OpenBLAS, which JAX's CPU LAPACK kernels (`slogdet` in exact
evaluation and in the scaling benchmark's naive method) call into, to one thread unless
OPENBLAS_NUM_THREADS is set: its spinning worker threads otherwise fight XLA's own thread pool
for the cores (on a 2-core CPU the naive step's `slogdet` was up to ~100× slower at small D,
26 ms instead of 0.2 ms at D = 64, and never faster at D ≤ 2048). It must happen before JAX
loads LAPACK; every `python -m experiments.<program>` imports this package first.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
