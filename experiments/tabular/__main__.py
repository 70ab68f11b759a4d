"""`python -m experiments.tabular --workdir=runs/power --config.dataset=power --config.data_dir=<MAF data>`.

The MAF tabular benchmarks (input_pipeline.py here): power, gas, hepmass, miniboone, bsds300,
read from the unpacked MAF data release (Zenodo record 1161203, data.tar.gz).
Log-likelihoods are nats of the standardised data, as in the published tables.
"""

import os

from experiments.training import main

main.run(os.path.join(os.path.dirname(__file__), "configs", "default.py"))
