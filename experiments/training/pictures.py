"""Writing the data source's picture (sample grid, 2-D density) as a PNG."""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np


def save_png(path: str, picture: np.ndarray) -> None:
  """Writes a (H, W, C) picture in [0, 1] (grey, RGB or RGBA) as a PNG, atomically."""
  temporary = path + ".tmp.png"
  image = picture[..., 0] if picture.shape[-1] == 1 else picture
  plt.imsave(temporary, image, cmap="gray", vmin=0.0, vmax=1.0)
  os.replace(temporary, path)
