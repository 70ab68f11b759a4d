"""`python -m experiments.cifar10 --workdir=runs/cifar10 [--config.flip_horizontal=False ...]`.

CIFAR-10 from tfds (D = 3072) through the same input pipeline (experiments/images.py) and loop
as MNIST: logit λ = 0.05, random horizontal flips of the training images. Log-likelihoods are
logit-space nats; bits/dim of the pixels are reported too.
"""

import os

from experiments.training import main

main.run(os.path.join(os.path.dirname(__file__), "configs", "default.py"))
