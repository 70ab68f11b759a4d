"""The wheel holds the library only, typed and licensed, with the version of `__version__`.

Builds from a copy of the checkout with the setuptools already installed (the `test`
extra), so no network is needed.
"""

import email
import importlib.metadata
import pathlib
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

import flax_relgrad

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv*", "runs", "build", "dist", "_build", "*.egg-info", "__pycache__", ".pytest_cache"
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
  source = tmp_path_factory.mktemp("checkout") / "flax_relgrad"
  shutil.copytree(ROOT, source, ignore=NOT_SOURCES)
  out = tmp_path_factory.mktemp("wheel")
  subprocess.run(
      [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
       "--quiet", "--wheel-dir", str(out), str(source)],
      check=True,
  )
  (path,) = out.glob("*.whl")
  with zipfile.ZipFile(path) as archive:
    yield archive


def test_wheel_installs_the_library_only(wheel):
  top_level = {name.split("/")[0] for name in wheel.namelist()}
  version = flax_relgrad.__version__
  assert top_level == {"flax_relgrad", f"flax_relgrad-{version}.dist-info"}
  assert "flax_relgrad/py.typed" in wheel.namelist()
  assert f"flax_relgrad-{version}.dist-info/licenses/LICENSE" in wheel.namelist()


def test_wheel_metadata(wheel):
  version = flax_relgrad.__version__
  metadata = email.message_from_bytes(wheel.read(f"flax_relgrad-{version}.dist-info/METADATA"))
  assert metadata["Name"] == "flax-relgrad"
  assert metadata["Version"] == version
  assert metadata["License-Expression"] == "Apache-2.0"
  assert metadata["Requires-Python"] == ">=3.10"
  assert "Typing :: Typed" in metadata.get_all("Classifier")
  runtime = {re.split(r"[<>=!~ ;\[]", r)[0] for r in metadata.get_all("Requires-Dist") if "extra ==" not in r}
  assert runtime == {"jax", "jaxlib", "flax", "optax"}


def test_installed_version_matches_dunder_version():
  try:
    installed = importlib.metadata.version("flax-relgrad")
  except importlib.metadata.PackageNotFoundError:
    pytest.skip("flax-relgrad is not installed (tests run from a bare checkout)")
  assert installed == flax_relgrad.__version__


def test_ci_pins_the_declared_lower_bounds(wheel):
  """ci/min-constraints.txt pins exactly the lower bounds the metadata declares."""
  version = flax_relgrad.__version__
  metadata = email.message_from_bytes(wheel.read(f"flax_relgrad-{version}.dist-info/METADATA"))
  declared = {r.split(">=")[0]: r.split(">=")[1] for r in metadata.get_all("Requires-Dist") if "extra ==" not in r}
  lines = (ROOT / "ci" / "min-constraints.txt").read_text().splitlines()
  pinned = dict(line.split("==") for line in lines if line and not line.startswith("#"))
  assert pinned == declared
