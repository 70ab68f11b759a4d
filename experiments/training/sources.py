"""Picks the `DataSource` named by `config.data_source`.

Its own module so that `data` (the interface and the streaming) imports none of the sources,
which all import `data`.
"""

import ml_collections

from experiments.training import data


def load_source(config: ml_collections.ConfigDict) -> data.DataSource:
  """The data source named by `config.data_source` ("images", "toy" or "tabular")."""
  # Imported here: each source module pulls in only what its data needs (tfds, matplotlib, ...).
  # pylint: disable=g-import-not-at-top
  if config.data_source == "images":
    from experiments.training import images
    return images.ImageSource(config)
  if config.data_source == "toy":
    from experiments.training import toy
    return toy.ToySource(config)
  if config.data_source == "tabular":
    from experiments.training import tabular
    return tabular.TabularSource(config)
  raise ValueError(
      f"config.data_source={config.data_source!r} is not one of ['images', 'tabular', 'toy'].")
