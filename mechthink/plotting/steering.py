"""Figures for steering sweeps and generation-time interventions (line and bar charts).

Draws numbers computed by :mod:`mechthink.steering` / :mod:`mechthink.interventions` and the
analyses 06-08; nothing here recomputes. Agg canvas, no pyplot.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from mechthink.plotting.base import new_figure as _base_figure

__all__ = ["new_figure", "plot_bars", "plot_curves"]


def new_figure(width: float | int, height: float | int) -> Figure:
    """A figure on its own Agg canvas (no layout engine)."""
    return _base_figure(width, height, constrained=False)


def plot_curves(
    ax: Axes,
    x: Sequence[float | int],
    series: Mapping[str, Sequence[float | int]],
    xlabel: str,
    ylabel: str,
    title: str = "",
    xticklabels: Sequence[str] | None = None,
) -> Axes:
    """One line with markers per series against ``x``."""
    for name, ys in series.items():
        ax.plot(list(x), list(ys), marker="o", label=name)
    if xticklabels is not None:
        ax.set_xticks(list(x))
        ax.set_xticklabels(list(xticklabels))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return ax


def plot_bars(
    ax: Axes,
    labels: Sequence[str],
    values: Sequence[float | int],
    ylabel: str,
    title: str = "",
    errors: Sequence[float | int] | None = None,
    colors: Sequence[str] | None = None,
) -> Axes:
    """A bar per label (optional error bars), values written above the bars."""
    xs = list(range(len(labels)))
    bars = ax.bar(xs, list(values), yerr=None if errors is None else list(errors), color=colors, capsize=3)
    for b, v in zip(bars, values):
        ax.text(b.get_x() + b.get_width() / 2, b.get_height(), f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(xs)
    ax.set_xticklabels(list(labels), rotation=20, fontsize=8)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    return ax
