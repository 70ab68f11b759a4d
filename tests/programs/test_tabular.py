"""The MAF tabular benchmark loaders, on small synthetic files in the release's formats."""

import os

import numpy as np
import pytest

from experiments.tabular import input_pipeline
from experiments.training import data


def load(name, root):
  return input_pipeline.load(name, root)


def test_power_matches_the_release_procedure(maf_release_dir):
  train, validation, test = load("power", maf_release_dir)
  assert (train.shape, validation.shape, test.shape) == ((405, 6), (45, 6), (50, 6))
  # The release's steps, spelled out: shuffle, drop columns 3 and 1, noise, split, standardise.
  rng = np.random.RandomState(42)
  raw = np.load(os.path.join(maf_release_dir, "power", "data.npy"))
  rng.shuffle(raw)
  raw = raw[:, [0, 2, 4, 5, 6, 7]]
  voltage, gap = 0.01 * rng.rand(500, 1), 0.001 * rng.rand(500, 1)
  raw = raw + np.hstack([gap, voltage, rng.rand(500, 3), np.zeros((500, 1))])
  mean, std = raw[:450].mean(axis=0), raw[:450].std(axis=0)
  np.testing.assert_allclose(test, (raw[450:] - mean) / std, rtol=1e-12)
  np.testing.assert_allclose(validation, (raw[405:450] - mean) / std, rtol=1e-12)


def test_gas_drops_correlated_columns_and_standardises_all_rows(maf_release_dir):
  train, validation, test = load("gas", maf_release_dir)
  assert (train.shape, validation.shape, test.shape) == ((324, 8), (36, 8), (40, 8))
  everything = np.vstack([train, validation, test])
  np.testing.assert_allclose(everything.mean(axis=0), 0, atol=1e-12)
  np.testing.assert_allclose(everything.std(axis=0, ddof=1), 1, rtol=1e-12)
  correlation = np.corrcoef(everything, rowvar=False)
  assert np.all(correlation[~np.eye(8, dtype=bool)] <= 0.98)


def test_hepmass_keeps_signal_and_continuous_features(maf_release_dir):
  train, validation, test = load("hepmass", maf_release_dir)
  # 10 features + mass; the discrete f2 and the constant mass go.
  assert train.shape[1] == validation.shape[1] == test.shape[1] == 9
  assert validation.shape[0] == int(0.1 * (train.shape[0] + validation.shape[0]))
  both = np.vstack([train, validation])
  np.testing.assert_allclose(both.mean(axis=0), 0, atol=1e-12)
  np.testing.assert_allclose(both.std(axis=0, ddof=1), 1, rtol=1e-12)
  assert 60 < test.shape[0] < 140  # About half of the 200 test rows are signal.


def test_miniboone_and_bsds300_shapes_and_normalisation(maf_release_dir):
  train, validation, test = load("miniboone", maf_release_dir)
  assert (train.shape, validation.shape, test.shape) == ((324, 43), (36, 43), (40, 43))
  both = np.vstack([train, validation])
  np.testing.assert_allclose(both.mean(axis=0), 0, atol=1e-12)
  np.testing.assert_allclose(both.std(axis=0), 1, rtol=1e-12)
  train, validation, test = load("bsds300", maf_release_dir)
  assert (train.shape, validation.shape, test.shape) == ((300, 63), (50, 63), (60, 63))


def test_missing_files_name_the_path_and_the_release(tmp_path, maf_release_dir):
  with pytest.raises(
    data.DatasetNotFoundError, match=r"gas/ethylene_CO\.pickle does not exist.*1161203"
  ):
    load("gas", str(tmp_path))
  with pytest.raises(data.DatasetNotFoundError, match="config.data_dir is empty.*1161203"):
    load("power", "")
  with pytest.raises(ValueError, match="'powre' is not one of the tabular benchmarks"):
    load("powre", maf_release_dir)
