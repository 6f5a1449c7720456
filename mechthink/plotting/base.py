"""Figures on their own Agg canvas, created without pyplot (no global matplotlib state)."""

from __future__ import annotations

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["new_figure", "new_axes"]


def new_figure(width: float | int, height: float | int, constrained: bool = True) -> Figure:
    """A Figure attached to an Agg canvas (constrained layout by default)."""
    fig = Figure(figsize=(width, height), constrained_layout=constrained)
    FigureCanvasAgg(fig)
    return fig


def new_axes(figsize: tuple[float | int, float | int]) -> tuple[Figure, Axes]:
    """A Figure (constrained layout, like :func:`new_figure`) with one Axes."""
    fig = new_figure(*figsize)
    return fig, fig.add_subplot()
