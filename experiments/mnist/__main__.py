"""`python -m experiments.mnist --workdir=runs/mnist [--config.learning_rate=3e-4 ...]`.

Default config: the paper's (configs/default.py); log-likelihoods are logit-space nats. The
input pipeline (tfds images, dequantised and logit-transformed) is experiments/images.py,
shared with CIFAR-10; the loop is experiments/training/.
"""

import os

from experiments.training import main

main.run(os.path.join(os.path.dirname(__file__), "configs", "default.py"))
