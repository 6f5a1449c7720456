"""The ``>>>`` examples in the library's docstrings run and give what they show.

To cover another module, add its dotted name to ``MODULES``. Examples that need a loaded model
carry ``# doctest: +SKIP``.
"""

from __future__ import annotations

import doctest
import importlib

import pytest

#: Modules whose docstring examples are run.
MODULES: list[str] = [
    "mechthink.stats",
    "mechthink.mi",
    "mechthink.confidence",
    "mechthink.models.organism.events",
    "mechthink.models.organism.scoring",
    "mechthink.hooks",
    "mechthink.plotting.style",
    "mechthink.shard",
]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    # testmod prints each failing example (pytest shows the captured output on failure)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no docstring examples"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (output above)"
