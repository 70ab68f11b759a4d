"""Sphinx configuration: API reference from the docstrings, pages in Markdown (MyST).

Build (offline, warnings are errors):

    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

import dataclasses
import inspect
import os
import sys

sys.path.insert(0, os.path.abspath(".."))  # The checkout's flax_relgrad, installed or not.

from sphinx.pycode import ModuleAnalyzer  # pylint: disable=g-import-not-at-top,wrong-import-position

import flax_relgrad  # pylint: disable=g-import-not-at-top,wrong-import-position

project = "flax_relgrad"
author = "flax_relgrad authors"
copyright = "flax_relgrad authors, Apache-2.0"  # pylint: disable=redefined-builtin
release = version = flax_relgrad.__version__

extensions = [
  "myst_parser",
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.mathjax",
  "sphinx.ext.napoleon",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
# docs/flowjax_benchmark, docs/flowjax_benchmark_60min, docs/scaling, docs/scaling_gpu,
# docs/scaling_splines and docs/toy hold benchmark outputs the README links to.
# pypi.md is the package page on PyPI (pyproject.toml `readme`), not a page of these docs.
exclude_patterns = [
  "_build",
  "flowjax_benchmark",
  "flowjax_benchmark_60min",
  "scaling",
  "scaling_gpu",
  "scaling_splines",
  "toy",
  "README.md",
  "pypi.md",
]

myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3

napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
# Every name in `flax_relgrad.__all__`, documented or not (`PREACTIVATION` has no docstring
# of its own); `setup` is Linen plumbing.
autodoc_default_options = {"members": True, "undoc-members": True, "exclude-members": "setup"}
autosummary_generate = False

html_theme = "sphinx_book_theme"
html_title = f"flax_relgrad {release}"


def _fields(obj) -> tuple[str, ...]:
  """The field names of a dataclass or a NamedTuple class; () for anything else."""
  if dataclasses.is_dataclass(obj):
    return tuple(field.name for field in dataclasses.fields(obj))
  if isinstance(obj, type) and issubclass(obj, tuple) and hasattr(obj, "_fields"):
    return obj._fields
  return ()


# Fields of the public dataclasses (Linen modules, activations) and NamedTuples are described
# in each class's `Attributes:` section; autodoc would list them a second time (a NamedTuple's
# as "Alias for field number N", a dataclass's with the docstring of its default value's type,
# e.g. `param_dtype` with numpy's float32 docstring), and Sphinx warns about the duplicates.
_FIELDS = {field for name in flax_relgrad.__all__ for field in _fields(getattr(flax_relgrad, name))}


def _skip_fields(app, what, name, obj, skip, options):
  del app, obj, options
  return True if what == "class" and name in _FIELDS else skip


def _constant_doc(name: str) -> str:
  """The attribute docstring of flax_relgrad's constant `name`, from the submodule defining it."""
  for module in sorted(m for m in sys.modules if m.startswith("flax_relgrad.")):
    docs = ModuleAnalyzer.for_module(module).find_attr_docs()
    if ("", name) in docs:
      return "\n   ".join(docs[("", name)]).strip()
  raise ValueError(f"flax_relgrad.{name} has no docstring in any flax_relgrad module")


def _public_names(app, docname, source):
  """Fills reference.md from `flax_relgrad.__all__`: a table of the classes and functions
  (documented by `automodule`), and the constants, which `automodule` leaves out when they are
  imported and whose docstrings sit after their definition in a submodule."""
  del app
  if docname != "reference":
    return
  is_constant = lambda obj: not (inspect.isclass(obj) or callable(obj))
  names = [n for n in flax_relgrad.__all__ if not is_constant(getattr(flax_relgrad, n))]
  constants = [n for n in flax_relgrad.__all__ if is_constant(getattr(flax_relgrad, n))]
  source[0] = source[0].replace("@PUBLIC_NAMES@", "\n   ".join(names))
  source[0] = source[0].replace(
    "@PUBLIC_CONSTANTS@",
    "\n".join(
      f".. data:: {name}\n   :value: {getattr(flax_relgrad, name)!r}\n\n   {_constant_doc(name)}\n"
      for name in constants
    ),
  )


def setup(app):
  app.connect("autodoc-skip-member", _skip_fields)
  app.connect("source-read", _public_names)
