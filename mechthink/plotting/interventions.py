"""Figures for generation-time interventions: thinking-token suppression and budget forcing.

Draws :class:`~mechthink.interventions.SuppressionSweep`,
:class:`~mechthink.interventions.SampledSuppression` and
:class:`~mechthink.interventions.ForcingSweep`; nothing here recomputes. Agg canvas, no pyplot.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from mechthink.plotting.steering import axes_or_new, new_figure, plot_bars, plot_curves
from mechthink.plotting.style import styled

if TYPE_CHECKING:
    from mechthink.interventions import (
        ForcingSweep,
        SampledSuppression,
        SuppressionSweep,
    )

__all__ = [
    "forcing_figure",
    "plot_forcing_sweep",
    "plot_sampled_suppression",
    "plot_suppression_curve",
    "plot_suppression_singles",
    "suppression_figure",
]

_CONTROL_COLORS = {"random": "tab:blue", "random unused": "tab:green"}


@styled
def plot_suppression_curve(sweep: "SuppressionSweep", ax: Axes | None = None) -> Figure:
    """Accuracy against the number of kinds suppressed (cumulatively), with the same-size controls."""
    ax = axes_or_new(ax, (7, 4.8))
    none = sweep.outcomes["none"].accuracy
    series = {"thinking tokens": [none] + [sweep.outcomes[c].accuracy for c in sweep.cumulative]}
    for cname in sweep.pools:
        series[f"{cname} (same size)"] = [none] + [sweep.outcomes[f"{cname}({c})"].accuracy for c in sweep.cumulative]
    plot_curves(
        ax, list(range(len(sweep.cumulative) + 1)), series, "thinking-token kinds suppressed", "final accuracy",
        f"{sweep.model}: accuracy after a prefilled wrong step ({sweep.n_problems} problems)",
        xticklabels=["none"] + [c.replace(" + ", "+").replace(" ", "") for c in sweep.cumulative],
    )
    return ax.figure


@styled
def plot_suppression_singles(sweep: "SuppressionSweep", ax: Axes | None = None) -> Figure:
    """One bar per single word and per its controls (mean ± sd over draws)."""
    ax = axes_or_new(ax, (7, 4.8))
    labels = ["none"] + [k for w in sweep.words for k in (w, *(f"{c}({w})" for c in sweep.pools))]
    outcomes = [sweep.outcomes[k] for k in labels]
    colors = ["grey"] + [_CONTROL_COLORS.get(k.split("(")[0], "tab:red") for k in labels[1:]]
    plot_bars(
        ax, labels, [o.accuracy for o in outcomes], "final accuracy",
        "one word at a time vs random controls of the same size (mean ± sd over draws)",
        errors=[getattr(o, "accuracy_sd", 0.0) for o in outcomes], colors=colors,
    )
    ax.tick_params(axis="x", labelrotation=35, labelsize=7)
    for lbl in ax.get_xticklabels():
        lbl.set_horizontalalignment("right")
    return ax.figure


@styled
def plot_sampled_suppression(sampled: "SampledSuppression", ax: Axes | None = None) -> Figure:
    """Accuracy per sampled condition; black: the 95% interval of the change vs none, drawn
    around the unsuppressed bar's value."""
    ax = axes_or_new(ax, (6, 4.8))
    labels = ["none", *sampled.conditions]
    values = [sampled.baseline_accuracy] + [c.accuracy for c in sampled.conditions.values()]
    plot_bars(
        ax, [k.replace("random unused", "never-produced random") for k in labels], values, "final accuracy",
        f"sampled, T={sampled.temperature:g}, {sampled.n_problems} problems × {sampled.n_seeds} seeds "
        f"(controls {sampled.n_seeds_control}), paired\n(bars: accuracy; black: 95% CI of the change vs none)",
        colors=["grey", "tab:red", "tab:blue", "tab:green"][: len(labels)],
    )
    for x, cond in enumerate(sampled.conditions.values(), start=1):
        lo, hi = cond.change.ci95
        ax.plot([x, x], [values[0] + lo, values[0] + hi], color="black", lw=1.5)
    ax.tick_params(axis="x", labelrotation=20, labelsize=7)
    return ax.figure


@styled
def suppression_figure(sweep: "SuppressionSweep", sampled: "SampledSuppression") -> Figure:
    """The three panels: cumulative curve, single words vs controls, the sampled comparison."""
    fig = new_figure(20, 4.8)
    plot_suppression_curve(sweep, fig.add_subplot(1, 3, 1))
    plot_suppression_singles(sweep, fig.add_subplot(1, 3, 2))
    plot_sampled_suppression(sampled, fig.add_subplot(1, 3, 3))
    fig.subplots_adjust(bottom=0.3, wspace=0.25)
    return fig


@styled
def plot_forcing_sweep(sweep: "ForcingSweep", ax: Axes | None = None) -> Figure:
    """Accuracy and the forcing statistics against the budget or the number of extensions."""
    ax = axes_or_new(ax, (5.5, 4))
    acc = [s.accuracy for s in sweep.scores]
    if sweep.parameter == "budget":
        plot_curves(ax, sweep.values, {"accuracy": acc, "answer forced": sweep.forced}, "thinking budget (tokens)",
                    "rate", f"{sweep.model}: cap thinking, force the answer "
                    f"(unconstrained acc {sweep.baseline.accuracy:.2f})")
    else:
        plot_curves(ax, sweep.values, {"accuracy": acc, "closed": [s.closed_rate for s in sweep.scores],
                                       "repetition": [s.mean_repetition for s in sweep.scores]},
                    f"forced '{sweep.extend_with.strip()}' extensions", "rate",
                    f"{sweep.model}: extend thinking when it tries to close")
    return ax.figure


@styled
def forcing_figure(*sweeps: "ForcingSweep") -> Figure:
    """One panel per sweep, side by side."""
    fig = new_figure(5.5 * len(sweeps), 4)
    for j, sweep in enumerate(sweeps):
        plot_forcing_sweep(sweep, fig.add_subplot(1, len(sweeps), j + 1))
    return fig
