"""The documentation's Python examples run as written (docs/*.md)."""

import pathlib
import re

import pytest

DOCS = pathlib.Path(__file__).parent.parent / "docs"
EXAMPLES = [
    pytest.param(code, id=f"{path.name}:{index}")
    for path in sorted(DOCS.glob("*.md"))
    for index, code in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(), re.DOTALL))
]


@pytest.mark.parametrize("code", EXAMPLES)
def test_docs_example_runs(code):
  exec(compile(code, "docs", "exec"), {})  # pylint: disable=exec-used
