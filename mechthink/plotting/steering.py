"""Figures for steering: vector norms, coefficient sweeps; the line and bar charts they share
with :mod:`mechthink.plotting.interventions`.

Draws numbers computed by :mod:`mechthink.steering`; nothing here recomputes. Agg canvas, no
pyplot.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from mechthink.plotting.base import new_figure as _base_figure
from mechthink.plotting.style import category_axis, styled

if TYPE_CHECKING:
    from mechthink.steering import CoefficientSweep, SteeringVector

__all__ = [
    "axes_or_new",
    "coefficient_sweep_figure",
    "new_figure",
    "plot_bars",
    "plot_coefficient_sweep",
    "plot_curves",
    "plot_sweep_outcomes",
    "plot_vector_norms",
]


def new_figure(width: float | int, height: float | int) -> Figure:
    """A figure on its own Agg canvas with constrained layout (the figure style's)."""
    return _base_figure(width, height)


@styled
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


@styled
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
    category_axis(ax, list(labels), fontsize=8)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    return ax


def axes_or_new(ax: Axes | None, figsize: tuple[float | int, float | int]) -> Axes:
    """``ax``, or the one Axes of a new figure of ``figsize``."""
    if ax is not None:
        return ax
    return new_figure(*figsize).add_subplot()


@styled
def plot_vector_norms(vector: "SteeringVector", ax: Axes | None = None) -> Figure:
    """Bar chart of a steering vector's norm per layer."""
    ax = axes_or_new(ax, (6, 3.5))
    plot_bars(ax, [str(L) for L in vector.layers], vector.norms.tolist(), "norm",
              f"{vector.method} vector ({vector.hook}) per layer")
    ax.set_xlabel("layer")
    return ax.figure


def _sweep_title(sweep: "CoefficientSweep") -> str:
    counts = " + ".join(f"{sweep.n_per_group[g]} {g}-step" for g in sweep.groups)
    return f"{sweep.model}: backtracking vector at layers {sweep.layers}\n({counts} prefixes)"


@styled
def plot_coefficient_sweep(sweep: "CoefficientSweep", ax: Axes | None = None) -> Figure:
    """P(backtracking word next) per group (mix first) and the mix's greedy backtrack rate."""
    ax = axes_or_new(ax, (6, 4))
    series = {f"P(backtrack word next), {g}": sweep.series(g, "p_backtrack_next") for g in ["mix", *sweep.groups]}
    series["greedy backtrack rate, mix"] = sweep.series("mix", "backtrack_rate")
    plot_curves(ax, sweep.coeffs, series, "steering coefficient", "rate / probability", _sweep_title(sweep))
    return ax.figure


@styled
def plot_sweep_outcomes(sweep: "CoefficientSweep", ax: Axes | None = None) -> Figure:
    """Final accuracy and ``think_close`` rate of the greedy continuations per group."""
    ax = axes_or_new(ax, (6, 4))
    series = {f"{k}, {g}": sweep.series(g, k) for k in ("accuracy", "closed_rate") for g in sweep.groups}
    plot_curves(ax, sweep.coeffs, series, "steering coefficient", "rate",
                "greedy continuation: final accuracy and </think> produced")
    return ax.figure


@styled
def coefficient_sweep_figure(sweeps: Mapping[str, "CoefficientSweep"]) -> Figure:
    """One column per sweep (e.g. per layer set): the probabilities on top, the outcomes below."""
    n = len(sweeps)
    fig = new_figure(6 * n, 8)
    for j, sweep in enumerate(sweeps.values()):
        plot_coefficient_sweep(sweep, fig.add_subplot(2, n, j + 1))
        plot_sweep_outcomes(sweep, fig.add_subplot(2, n, n + j + 1))
    return fig
