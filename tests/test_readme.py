"""Every Python block of the README runs as written, and warns about nothing.

Blocks run one per test, each in a fresh namespace. The optimizer blocks use a ``model`` and a
``loss``: the README defines them in a block of its own (the one that makes ``model = ...`` and
``loss = ...`` and imports nothing from kexue), which runs before every block that uses them.
Any warning fails the test (e.g. ``torch.amp.GradScaler()`` on a machine without CUDA warns and
disables itself: an example that does that is wrong for CPU users).
"""

from __future__ import annotations

import importlib.util
import re
import warnings
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _is_preamble(block: str) -> bool:
    return "kexue" not in block and re.search(r"^model = ", block, re.M) and re.search(r"^loss = ", block, re.M)


PREAMBLES = [b for b in BLOCKS if _is_preamble(b)]


def _uses_preamble(block: str) -> bool:
    """Names ``model`` or ``loss`` outside comments and strings, without defining ``model`` itself."""
    code = re.sub(r"#.*", "", re.sub(r"(\"[^\"\n]*\"|'[^'\n]*')", "", block))
    return bool(re.search(r"(?<![.\w])(model|loss)\b(?!\s*=[^=])", code)) and not re.search(r"^model = ", block, re.M)


def test_readme_has_examples_and_one_preamble():
    assert len(BLOCKS) >= 5
    assert len(PREAMBLES) == 1, "the README should define the optimizer examples' model and loss once"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    block = BLOCKS[index]
    if "import kexue, transformers" in block and importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed (pip install '.[transformers]')")
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if _uses_preamble(block):
            exec(compile(PREAMBLES[0], "README.md preamble", "exec"), namespace)
        exec(compile(block, f"README.md block {index}", "exec"), namespace)


def test_preamble_is_needed_where_it_is_used():
    """The blocks given the preamble really use it (so the rule above is not hiding a bug)."""
    users = [b for b in BLOCKS if _uses_preamble(b) and not _is_preamble(b)]
    assert len(users) >= 2
    for block in users:
        with pytest.raises(NameError, match="model|loss"):
            exec(compile(block, "README.md block", "exec"), {})
