"""The input pipeline of `experiments.tabular`: the five tabular benchmarks of the MAF paper
(Papamakarios et al., 2017) as a `DataSource` (`config.data_source = "tabular"`).

Each loader reads the preprocessed files of the MAF authors' data release (Zenodo record
1161203, `data.tar.gz`) from `config.data_dir` and applies that release's standard cleaning,
splits and normalisation, so test log-likelihoods (nats, mean ± 2 SE) are comparable with the
published tables:

- power (power/data.npy, D = 6): shuffle (RandomState 42), drop columns 3 and 1, add uniform
  noise (0.001, 0.01, 1, 1, 1, 0 per column); last 10 % test, last 10 % of the rest
  validation; standardise by train+validation (ddof 0).
- gas (gas/ethylene_CO.pickle, a pandas DataFrame, D = 8): drop Meth, Eth, Time; drop the first
  column correlated > 0.98 with another until none is; standardise by all rows (ddof 1);
  split as power.
- hepmass (hepmass/1000_train.csv, 1000_test.csv, D = 21): keep signal rows (label 1), drop
  the label (and the test file's last column); standardise by train (ddof 1), by position;
  drop features whose smallest value occurs > 5 times in train; last 10 % of train validation.
- miniboone (miniboone/data.npy, D = 43): split as power (no shuffle); standardise by
  train+validation (ddof 0).
- bsds300 (BSDS300/BSDS300.hdf5 with train, validation and test, D = 63): as stored.
"""

from __future__ import annotations

from collections.abc import Callable
import os

import ml_collections
import numpy as np

from experiments.training import data

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray]  # train, validation, test


def _split_tail(array: np.ndarray) -> Arrays:
  """The MAF split: the last 10 % is test, the last 10 % of the rest validation."""
  num_test = int(0.1 * array.shape[0])
  test, rest = array[-num_test:], array[:-num_test]
  num_validation = int(0.1 * rest.shape[0])
  return rest[:-num_validation], rest[-num_validation:], test


def _standardise_by_train_and_validation(train, validation, test) -> Arrays:
  both = np.vstack([train, validation])
  mean, std = both.mean(axis=0), both.std(axis=0)
  return tuple((split - mean) / std for split in (train, validation, test))


def _power(root: str) -> Arrays:
  rng = np.random.RandomState(42)  # pylint: disable=no-member
  array = np.load(_path(root, "power/data.npy"))
  rng.shuffle(array)
  array = np.delete(np.delete(array, 3, axis=1), 1, axis=1)
  num_rows = array.shape[0]
  voltage_noise = 0.01 * rng.rand(num_rows, 1)  # Drawn in the release's order.
  gap_noise = 0.001 * rng.rand(num_rows, 1)
  noise = np.hstack([gap_noise, voltage_noise, rng.rand(num_rows, 3), np.zeros((num_rows, 1))])
  return _standardise_by_train_and_validation(*_split_tail(array + noise))


def _gas(root: str) -> Arrays:
  import pandas as pd  # pylint: disable=g-import-not-at-top

  frame = pd.read_pickle(_path(root, "gas/ethylene_CO.pickle")).drop(
    columns=["Meth", "Eth", "Time"]
  )
  while True:
    correlated = ((frame.corr() > 0.98).to_numpy().sum(axis=1) > 1).nonzero()[0]
    if not correlated.size:
      break
    frame = frame.drop(columns=frame.columns[correlated[0]])
  frame = (frame - frame.mean()) / frame.std()
  return _split_tail(frame.to_numpy(np.float64))


def _hepmass(root: str) -> Arrays:
  import pandas as pd  # pylint: disable=g-import-not-at-top

  signal = lambda frame: (
    frame[frame[frame.columns[0]] == 1].drop(columns=frame.columns[0]).to_numpy(np.float64)
  )
  train = signal(pd.read_csv(_path(root, "hepmass/1000_train.csv"), index_col=False))
  test = signal(pd.read_csv(_path(root, "hepmass/1000_test.csv"), index_col=False))[:, :-1]
  # The release's test file lacks a column the train file has (its last, the discrete mass,
  # which the repeated-value rule below removes from train): columns match by position.
  width = test.shape[1]
  mean, std = train.mean(axis=0), train.std(axis=0, ddof=1)
  with np.errstate(
    invalid="ignore", divide="ignore"
  ):  # The constant mass column: 0/0, removed below.
    train, test = (train - mean) / std, (test - mean[:width]) / std[:width]
  removed = {
    column
    for column in range(train.shape[1])
    if np.unique(train[:, column], return_counts=True)[1][0] > 5
  }
  train = train[:, [column for column in range(train.shape[1]) if column not in removed]]
  test = test[:, [column for column in range(width) if column not in removed]]
  if test.shape[1] != train.shape[1]:
    raise ValueError(
      f"hepmass: after cleaning, the test file has {test.shape[1]} features and the "
      f"train file {train.shape[1]}; are these the release's 1000_train.csv and 1000_test.csv?"
    )
  num_validation = int(0.1 * train.shape[0])
  return train[:-num_validation], train[-num_validation:], test


def _miniboone(root: str) -> Arrays:
  return _standardise_by_train_and_validation(
    *_split_tail(np.load(_path(root, "miniboone/data.npy")))
  )


def _bsds300(root: str) -> Arrays:
  import h5py  # pylint: disable=g-import-not-at-top

  with h5py.File(_path(root, "BSDS300/BSDS300.hdf5"), "r") as file:
    return tuple(np.asarray(file[split], np.float64) for split in ("train", "validation", "test"))


LOADERS: dict[str, Callable[[str], Arrays]] = {
  "power": _power,
  "gas": _gas,
  "hepmass": _hepmass,
  "miniboone": _miniboone,
  "bsds300": _bsds300,
}


def _path(root: str, relative: str) -> str:
  path = os.path.join(root, relative)
  if not os.path.isfile(path):
    raise data.DatasetNotFoundError(
      f"{path} does not exist. config.data_dir must be the folder that holds the MAF benchmark "
      "release's power/, gas/, hepmass/, miniboone/ and BSDS300/ folders: download data.tar.gz "
      "from Zenodo record 1161203 (https://zenodo.org/records/1161203), unpack it, and pass "
      "--config.data_dir=<unpacked>/data."
    )
  return path


def load(name: str, root: str) -> Arrays:
  """Standard train, validation and test arrays (N_split, D) float64 of benchmark `name`."""
  if name not in LOADERS:
    raise ValueError(
      f"config.dataset={name!r} is not one of the tabular benchmarks {sorted(LOADERS)}."
    )
  if not root:
    raise data.DatasetNotFoundError(
      "config.data_dir is empty: set it to the unpacked MAF benchmark release (Zenodo record "
      "1161203, data.tar.gz), the folder that holds power/, gas/, hepmass/, miniboone/, BSDS300/."
    )
  splits = LOADERS[name](root)
  for split_name, split in zip(("train", "validation", "test"), splits, strict=True):
    if not np.all(np.isfinite(split)):
      raise ValueError(
        f"{name}: the {split_name} split has non-finite values after preprocessing; "
        f"the files under {root} are not the release's."
      )
  return splits


class TabularSource(data.ArraySource):
  """Benchmark `config.dataset` from `config.data_dir`, modelled as it is (nats of R^D)."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.splits = data.arrays_to_splits(*load(config.dataset, config.data_dir))
