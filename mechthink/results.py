"""The base of every result dataclass: ``.to_json()``, ``.to_frame()`` and ``.plot()``.

A technique returns a dataclass of tensors (jaxtyping-annotated) plus the labels that index
them. :class:`Result` gives every one of them the same three views: ``to_json()`` (generic:
tensors become nested lists), ``to_frame()`` (a tidy pandas frame, one row per indexed item)
and ``plot(ax=None)`` (delegating to :mod:`mechthink.plotting`; plotting never recomputes).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

__all__ = ["FlatResult", "Result", "jsonable"]


def jsonable(obj: Any, array: Callable[[Any], Any] | None = None) -> Any:
    """``obj`` as JSON-friendly values: dataclasses and dicts recursively, tensors and arrays
    as lists (or as ``array(value)`` when given), paths as strings, tuples as lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name), array) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): jsonable(v, array) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v, array) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist() if array is None else array(obj)
    return obj


class Result:
    """Mixin for result dataclasses (see the module docstring)."""

    def to_json(self, path: str | Path | None = None) -> str:
        """The result as a JSON string (also written to ``path`` when given)."""
        text = json.dumps(jsonable(self), indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    def to_frame(self) -> Any:
        """A tidy ``pandas.DataFrame`` of the result (implemented by each result type)."""
        raise NotImplementedError(f"{type(self).__name__}.to_frame is not implemented")

    def plot(self, ax: Any = None) -> Any:
        """A matplotlib figure of the result (implemented by each result type)."""
        raise NotImplementedError(f"{type(self).__name__}.plot is not implemented")


class FlatResult(Result):
    """A result with no figure of its own: one condition's numbers, or a state object.

    ``to_frame`` is one row of its fields (subclasses with per-row fields override it);
    ``plot`` raises ``NotImplementedError`` naming what shows it instead (``plotted_by``).
    """

    plotted_by: ClassVar[str] = "the sweep that holds it"

    def to_frame(self) -> Any:
        """One row of the fields."""
        import pandas as pd

        return pd.DataFrame([jsonable(self)])

    def plot(self, ax: Any = None) -> Any:
        """Not meaningful here (raises ``NotImplementedError``)."""
        raise NotImplementedError(f"{type(self).__name__}.plot: this result has no figure of its own; "
                                  f"see {self.plotted_by}")
