"""The wheel holds the library only, typed and licensed, with the version of `__version__`.

In a source tree (a checkout or the unpacked sdist) the wheel is built from a copy of it with
the setuptools already installed (the `test` extra), so no network is needed. Where
FLAX_RELGRAD_TEST_WHEEL names a built wheel (.ci/test-wheel, which runs the tests from
outside any source tree against that wheel, installed), the tests check that wheel instead.
"""

import email
import email.message
import importlib.metadata
import os
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
TEST_WHEEL = os.environ.get("FLAX_RELGRAD_TEST_WHEEL")
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]*)")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
  if TEST_WHEEL:
    path = pathlib.Path(TEST_WHEEL)
  elif not (ROOT / "pyproject.toml").exists():
    pytest.skip(f"{ROOT} is not a source tree and FLAX_RELGRAD_TEST_WHEEL names no wheel")
  else:
    source = tmp_path_factory.mktemp("checkout") / "flax_relgrad"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCES)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
      [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "--quiet",
        "--wheel-dir",
        str(out),
        str(source),
      ],
      check=True,
    )
    (path,) = out.glob("*.whl")
  with zipfile.ZipFile(path) as archive:
    yield archive


def wheel_metadata(wheel: zipfile.ZipFile) -> email.message.Message:
  return email.message_from_bytes(
    wheel.read(f"flax_relgrad-{flax_relgrad.__version__}.dist-info/METADATA")
  )


def test_wheel_installs_the_library_only(wheel):
  top_level = {name.split("/")[0] for name in wheel.namelist()}
  version = flax_relgrad.__version__
  assert top_level == {"flax_relgrad", f"flax_relgrad-{version}.dist-info"}
  assert "flax_relgrad/py.typed" in wheel.namelist()
  assert f"flax_relgrad-{version}.dist-info/licenses/LICENSE" in wheel.namelist()


def test_wheel_holds_every_library_module(wheel):
  """Every module of the imported library (subpackages included) is in the wheel."""
  package = pathlib.Path(flax_relgrad.__file__).parent
  modules = {f"flax_relgrad/{p.relative_to(package).as_posix()}" for p in package.rglob("*.py")}
  assert modules <= set(wheel.namelist())


def test_wheel_metadata(wheel):
  metadata = wheel_metadata(wheel)
  assert metadata["Name"] == "flax-relgrad"
  assert metadata["Version"] == flax_relgrad.__version__
  assert metadata["License-Expression"] == "Apache-2.0"
  assert metadata["Requires-Python"] == ">=3.11"
  classifiers = metadata.get_all("Classifier")
  assert "Typing :: Typed" in classifiers
  pythons = [
    c.rsplit(" ", 1)[1]
    for c in classifiers
    if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
  ]
  assert pythons == ["3.11", "3.12", "3.13"]
  runtime = {
    re.split(r"[<>=!~ ;\[]", r)[0] for r in metadata.get_all("Requires-Dist") if "extra ==" not in r
  }
  assert runtime == {"jax", "jaxlib", "flax", "optax"}
  assert set(metadata.get_all("Provides-Extra")) == {
    "progress",
    "experiments",
    "benchmark",
    "docs",
    "test",
  }


def test_package_page_is_self_contained(wheel):
  """The long description (PyPI's page) links only to absolute URLs, and its example is the
  README's first one (which tests/test_readme.py runs)."""
  metadata = wheel_metadata(wheel)
  assert metadata["Description-Content-Type"] == "text/markdown"
  page = metadata.get_payload(decode=True).decode("utf-8")  # (get_payload() garbles non-ASCII)
  links = MARKDOWN_LINK.findall(page) + re.findall(r"""(?:src|href)=["']([^"']*)""", page)
  assert links and all(link.startswith("https://") for link in links), links
  python_blocks = lambda markdown: re.findall(r"```python\n(.*?)```", markdown, re.DOTALL)
  assert python_blocks(page) == python_blocks((ROOT / "README.md").read_text())[:1]


def test_installed_version_matches_dunder_version():
  try:
    installed = importlib.metadata.version("flax-relgrad")
  except importlib.metadata.PackageNotFoundError:
    pytest.skip("flax-relgrad is not installed (tests run from a bare checkout)")
  assert installed == flax_relgrad.__version__


@pytest.mark.skipif(not TEST_WHEEL, reason="tests the installed wheel (FLAX_RELGRAD_TEST_WHEEL)")
def test_the_installed_wheel_is_imported(wheel):
  """The tests run against the wheel installed in site-packages, not against a source tree."""
  distribution = importlib.metadata.distribution("flax-relgrad")
  assert distribution.read_text("INSTALLER") is not None
  installed = pathlib.Path(distribution.locate_file("flax_relgrad/__init__.py")).resolve()
  assert pathlib.Path(flax_relgrad.__file__).resolve() == installed
  assert "site-packages" in installed.parts
  assert {str(f) for f in distribution.files or []} >= {
    n for n in wheel.namelist() if n.startswith("flax_relgrad/")
  }


def test_release_files_agree_on_the_version():
  """CITATION.cff cites this version, and CHANGELOG.md has a section for it."""
  version = flax_relgrad.__version__
  citation = (ROOT / "CITATION.cff").read_text()
  assert re.search(r"^version: (\S+)$", citation, re.MULTILINE)[1] == version
  assert f"\n## {version}\n" in (ROOT / "CHANGELOG.md").read_text()


def test_ci_pins_the_declared_lower_bounds(wheel):
  """ci/min-constraints.txt pins exactly the lower bounds the metadata declares."""
  metadata = wheel_metadata(wheel)
  declared = {
    r.split(">=")[0]: r.split(">=")[1]
    for r in metadata.get_all("Requires-Dist")
    if "extra ==" not in r
  }
  lines = (ROOT / "ci" / "min-constraints.txt").read_text().splitlines()
  pinned = dict(line.split("==") for line in lines if line and not line.startswith("#"))
  assert pinned == declared
