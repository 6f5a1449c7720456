"""Figures for MLP value vectors, layer probes and neuron ablations (`mechthink.value_vectors`).

Plotting never recomputes: every function draws from a result object (or the records of its
frame). Figures are built on an Agg canvas without pyplot.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.figure import FigureBase

from mechthink.plotting.base import new_figure
from mechthink.plotting.style import category_axis, styled

if TYPE_CHECKING:
    from mechthink.value_vectors import (
        AblationComparison,
        AblationEffect,
        LayerProbeResult,
        NeuronHits,
    )

__all__ = [
    "plot_ablation_bars",
    "plot_ablation_scatter",
    "plot_neuron_hits",
    "plot_probe_accuracy",
    "plot_value_vector_overview",
    "plot_value_vector_table",
]

_PLAN_COLORS = ["tab:red", "tab:orange", "tab:blue", "tab:green", "tab:purple"]


def _axes(ax: Any, width: float, height: float) -> tuple[FigureBase, Any]:
    if ax is None:
        fig = new_figure(width, height)
        return fig, fig.add_subplot(1, 1, 1)
    return ax.figure, ax


@styled
def plot_probe_accuracy(result: "LayerProbeResult", ax: Any = None) -> FigureBase:
    """Per-layer probe accuracy (cross-validated) of a :class:`LayerProbeResult`."""
    fig, ax = _axes(ax, 6.0, 3.0)
    acc = result.accuracy.float().cpu().numpy()
    ax.plot(result.layers, acc, marker="o")
    ax.axhline(0.5, color="grey", lw=0.5, ls="--")
    ax.set_ylim(0.4, 1.02)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"{result.folds}-fold accuracy")
    ax.set_title(f"linear probe on {result.hook}: {result.label_names[1]} vs {result.label_names[0]}")
    return fig


@styled
def plot_ablation_bars(
    result: "AblationComparison", labels: Mapping[str, str] | None = None, ax: Any = None, ylabel: str | None = None
) -> FigureBase:
    """Bars of the mean target probability: clean (grey), then one bar per ablation plan.

    Args:
        result: What :func:`mechthink.value_vectors.compare_ablations` returned.
        labels: Bar name per plan (default the plan names).
        ax: Axes to draw on (None: a new figure).
        ylabel: Axis label (default names the targets).
    """
    fig, ax = _axes(ax, 5.0, 3.5)
    means = result.mean_prob()
    names = ["clean"] + [(labels or {}).get(k, k) for k in result.plans]
    colors = ["grey"] + [_PLAN_COLORS[i % len(_PLAN_COLORS)] for i in range(len(result.plans))]
    ax.bar(range(len(names)), list(means.values()), color=colors)
    category_axis(ax, names)
    ax.set_ylabel(ylabel or f"P({', '.join(repr(t) for t in result.targets[:3])}…)")
    ax.set_title("ablating value vectors")
    return fig


@styled
def plot_ablation_scatter(result: "AblationEffect", ax: Any = None) -> FigureBase:
    """Clean vs ablated target probability per example, with the no-effect diagonal."""
    fig, ax = _axes(ax, 4.0, 4.0)
    ax.scatter(result.prob_clean.numpy(), result.prob_ablated.numpy(), s=10)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.5, ls="--")
    ax.set_xlabel("P(targets), clean")
    ax.set_ylabel("P(targets), ablated")
    ax.set_title(f"ablating {sum(len(v) for v in result.neurons.values())} neurons (mean drop {result.mean_drop:.3f})")
    return fig


@styled
def plot_neuron_hits(hits: "NeuronHits", ax: Any = None) -> FigureBase:
    """Bars of the hits' ranking scores, labelled ``L{layer}N{neuron}``."""
    fig, ax = _axes(ax, max(5.0, 0.35 * len(hits.neurons) + 2), 3.0)
    labels = [f"L{int(L)}N{int(n)}" for L, n in zip(hits.layers, hits.neurons)]
    ax.bar(np.arange(len(labels)), hits.scores.float().numpy())
    ax.set_xticks(np.arange(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_ylabel(hits.score)
    ax.set_title(f"value vectors promoting {', '.join(repr(t) for t in hits.targets[:3])}")
    return fig


@styled
def plot_value_vector_table(records: Sequence[Mapping[str, Any]], ax: Any = None, title: str | None = None) -> FigureBase:
    """A table of value vectors (``NeuronHits.to_frame(model)`` records): layer, neuron,
    z-score and top tokens."""
    fig, ax = _axes(ax, 13.0, 0.3 * len(records) + 1.0)
    ax.axis("off")
    rows = [[int(r["layer"]), int(r["neuron"]), f"{r['score']:.1f}", " ".join(repr(t) for t in r["top_tokens"])] for r in records]
    # the table fills its axes (sized to the rows by the caller): no blank band above or below it
    table = ax.table(cellText=rows, colLabels=["layer", "neuron", "z-score", "top tokens of the value vector"],
                     bbox=[0.0, 0.0, 1.0, 1.0], cellLoc="left", colWidths=[0.07, 0.08, 0.08, 0.77])  # = widths
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    widths = [0.07, 0.08, 0.08, 0.77]
    for (_, col), cell in table.get_celld().items():
        cell.PAD = 0.006 / widths[col]  # matplotlib pads by 10% of the cell's width: the same inset in every column
    if title:
        ax.set_title(title)
    return fig


@styled
def plot_value_vector_overview(
    probe: "LayerProbeResult",
    ablations: "AblationComparison",
    records: Sequence[Mapping[str, Any]],
    target: str,
    model_name: str,
    labels: Mapping[str, str] | None = None,
) -> FigureBase:
    """The value-vector figure: probe accuracy per layer, the ablation bars and the table of the
    top value vectors."""
    table_h = 0.28 * (len(records) + 1) + 0.5  # header + rows, and the title above them
    fig = new_figure(13, 4.4 + table_h)
    grid = fig.add_gridspec(2, 2, height_ratios=[4.4, table_h], width_ratios=[1.4, 1])
    plot_probe_accuracy(probe, ax=fig.add_subplot(grid[0, 0]))
    plot_ablation_bars(ablations, labels=labels, ax=fig.add_subplot(grid[0, 1]),
                       ylabel=f"P({target!r} variants) after a wrong step")
    plot_value_vector_table(
        records, ax=fig.add_subplot(grid[1, :]),
        title=f"value vectors promoting {target!r} (all variants), by z-score over the vocabulary",
    )
    fig.suptitle(f"{model_name}: MLP value vectors and the backtracking decision")
    return fig
