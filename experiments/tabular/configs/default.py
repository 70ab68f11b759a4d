"""MAF tabular benchmarks (experiments/tabular/input_pipeline.py); `--config.dataset` picks one and
`--config.data_dir` must point at the unpacked MAF data release. Not tuned: the release is
not on the machines this project was developed on."""

import ml_collections

from experiments.training import config as base


def get_config() -> ml_collections.ConfigDict:
  config = base.base_config()
  config.data_source = "tabular"
  config.dataset = "power"  # power, gas, hepmass, miniboone, bsds300
  config.data_dir = (
    ""  # The release's data/ folder (holds power/, gas/, hepmass/, miniboone/, BSDS300/).
  )
  config.num_layers = 4
  config.alpha = 0.1
  config.kernel_init = "near_identity"
  config.batch_size = 100
  config.learning_rate = 1e-3
  config.lr_schedule = "cosine"
  config.warmup_steps = 500
  config.num_epochs = 20
  config.eval_every_epochs = 1
  config.on_divergence = "restore"
  return config
