"""Sphinx configuration: API reference from the docstrings, pages in Markdown (MyST).

Build (offline, warnings are errors):

    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

import dataclasses
import glob
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
# docs/scaling, docs/scaling_gpu and docs/toy hold benchmark outputs the README links to.
exclude_patterns = ["_build", "scaling", "scaling_gpu", "toy", "README.md"]

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

# Fields of the public dataclasses (Linen modules, activations) are described in each class's
# `Attributes:` section; autodoc would also list some of them, with the docstring of their
# default value's type (e.g. `param_dtype` with numpy's float32 docstring).
_FIELDS = {
    field.name
    for name in flax_relgrad.__all__
    if dataclasses.is_dataclass(obj := getattr(flax_relgrad, name))
    for field in dataclasses.fields(obj)
}


def _skip_dataclass_fields(app, what, name, obj, skip, options):
  del app, obj, options
  return True if what == "class" and name in _FIELDS else skip


def _drop_missing_method_page(app, docname, source):
  """index.md's toctree takes the maths page (docs/method.md) through the glob `method*`.

  Until that page exists the glob matches nothing, and Sphinx warns about that in a way
  `suppress_warnings` cannot silence, so the entry is dropped then.
  """
  if docname == "index" and not glob.glob(os.path.join(app.srcdir, "method*.md")):
    source[0] = source[0].replace("\nmethod*\n", "\n")


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
  source[0] = source[0].replace("@PUBLIC_CONSTANTS@", "\n".join(
      f".. data:: {name}\n   :value: {getattr(flax_relgrad, name)!r}\n\n"
      f"   {_constant_doc(name)}\n"
      for name in constants
  ))


def setup(app):
  app.connect("autodoc-skip-member", _skip_dataclass_fields)
  app.connect("source-read", _drop_missing_method_page)
  app.connect("source-read", _public_names)
