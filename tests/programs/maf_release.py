"""Small synthetic files in each on-disk format of the MAF benchmark release (Zenodo 1161203)."""

import os

import h5py
import numpy as np
import pandas as pd

HEPMASS_COLUMNS = ["# label"] + [f"f{i}" for i in range(10)] + ["mass"]


def write_release(root: str, seed: int = 0) -> str:
  """Writes power/, gas/, hepmass/, miniboone/ and BSDS300/ under `root`; returns root."""
  rng = np.random.default_rng(seed)
  for folder in ("power", "gas", "hepmass", "miniboone", "BSDS300"):
    os.makedirs(os.path.join(root, folder), exist_ok=True)
  # power: 8 columns (the release drops columns 3 and 1).
  np.save(os.path.join(root, "power", "data.npy"), rng.normal(size=(500, 8)) * np.arange(1, 9))
  # gas: Time, Meth, Eth and 10 sensors, of which two copy others (correlation > 0.98).
  sensors = rng.normal(size=(400, 10))
  sensors[:, 4] = 2 * sensors[:, 1] + 0.01 * rng.normal(size=400)
  sensors[:, 8] = sensors[:, 6] - 0.01 * rng.normal(size=400)
  frame = pd.DataFrame(sensors, columns=[f"sensor{i}" for i in range(10)])
  frame.insert(0, "Eth", rng.random(400))
  frame.insert(0, "Meth", rng.random(400))
  frame.insert(0, "Time", np.arange(400.0))
  frame.to_pickle(os.path.join(root, "gas", "ethylene_CO.pickle"))
  # hepmass: label, 10 features (f2 discrete), constant mass of the signal rows.
  for name, rows in (("1000_train.csv", 600), ("1000_test.csv", 200)):
    table = rng.normal(size=(rows, len(HEPMASS_COLUMNS)))
    table[:, 0] = rng.integers(0, 2, rows)
    table[:, 3] = rng.integers(0, 3, rows)
    table[:, -1] = 1000.0
    pd.DataFrame(table, columns=HEPMASS_COLUMNS).to_csv(
      os.path.join(root, "hepmass", name), index=False
    )
  np.save(os.path.join(root, "miniboone", "data.npy"), rng.normal(size=(400, 43)) * 3 + 1)
  with h5py.File(os.path.join(root, "BSDS300", "BSDS300.hdf5"), "w") as file:
    for split, rows in (("train", 300), ("validation", 50), ("test", 60)):
      file.create_dataset(split, data=rng.normal(size=(rows, 63)))
  return root
