"""`python -m experiments.toy --workdir=runs/toy_moons [--config.dataset=moons ...]`.

Trains a dense flow on a 2-D density (input_pipeline.py here: sine, moons, 2spirals,
checkerboard, rings, 8gaussians, trimodal) and writes `density.png` (data, learned density,
model samples) to the workdir and TensorBoard at every evaluation.
"""

import os

from experiments.training import main

main.run(os.path.join(os.path.dirname(__file__), "configs", "default.py"))
