"""Figures for generation-time interventions: thinking-token suppression and budget forcing.

Draws :class:`~mechthink.interventions.SuppressionSweep`,
:class:`~mechthink.interventions.SampledSuppression` and
:class:`~mechthink.interventions.ForcingSweep`; nothing here recomputes. Agg canvas, no pyplot.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from mechthink.plotting.steering import axes_or_new, new_figure, plot_curves
from mechthink.plotting.style import color_for, integer_axis, styled, value_labels

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

_LABELS = {"random": "uniform random tokens", "random unused": "never-produced random tokens"}


@styled
def plot_suppression_curve(sweep: "SuppressionSweep", ax: Axes | None = None) -> Figure:
    """Accuracy against the number of kinds suppressed (cumulatively), with the same-size controls."""
    ax = axes_or_new(ax, (6, 4.6))
    none = sweep.outcomes["none"].accuracy
    series = {"backtracking words": [none] + [sweep.outcomes[c].accuracy for c in sweep.cumulative]}
    for cname in sweep.pools:
        series[_LABELS.get(cname, cname)] = [none] + [sweep.outcomes[f"{cname}({c})"].accuracy for c in sweep.cumulative]
    plot_curves(
        ax, list(range(len(sweep.cumulative) + 1)), series, "kinds of backtracking word suppressed", "final accuracy",
        "cumulative suppression vs same-size controls",
    )
    integer_axis(ax, "x")
    ax.set_ylim(-0.02, 1.08)
    return ax.figure


@styled
def plot_suppression_singles(sweep: "SuppressionSweep", ax: Axes | None = None) -> Figure:
    """Grouped bars: each word suppressed alone next to its same-size controls (mean ± sd over
    draws); the unsuppressed accuracy is the dashed line."""
    import numpy as np

    ax = axes_or_new(ax, (6, 4.6))
    groups = list(sweep.words)
    kinds = [("", "suppressed word", color_for("Wait"))] + [
        (c, _LABELS.get(c, c), color_for(c, i + 1)) for i, c in enumerate(sweep.pools)
    ]
    width = 0.8 / len(kinds)
    x = np.arange(len(groups))
    for j, (pool, label, color) in enumerate(kinds):
        keys = [w if not pool else f"{pool}({w})" for w in groups]
        vals = [sweep.outcomes[k].accuracy for k in keys]
        errs = [getattr(sweep.outcomes[k], "accuracy_sd", 0.0) for k in keys]
        xs = x + (j - (len(kinds) - 1) / 2) * width
        ax.bar(xs, vals, width * 0.95, yerr=errs, color=color, label=label, capsize=2, error_kw={"lw": 1})
        value_labels(ax, xs.tolist(), vals, errs)
    ax.axhline(sweep.outcomes["none"].accuracy, color=color_for("none"), ls="--", lw=1.2, label="nothing suppressed")
    ax.set_xticks(x, groups)
    ax.set_ylabel("final accuracy")
    ax.set_ylim(0, 1.42)  # the legend sits above the bars and their value labels
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_title("one word at a time vs controls")
    ax.legend(loc="upper center", ncols=2, fontsize=8.5)
    return ax.figure


@styled
def plot_sampled_suppression(sampled: "SampledSuppression", ax: Axes | None = None) -> Figure:
    """The change of accuracy vs no suppression per sampled condition, with its 95% bootstrap
    interval over problems (paired seeds)."""
    ax = axes_or_new(ax, (5.5, 4.6))
    names = list(sampled.conditions)
    short = {"random": "uniform\nrandom", "random unused": "never-\nproduced"}
    labels = [short.get(n.split("(")[0], n) if "(" in n else f"'{n}'" for n in names]
    changes = [100 * c.change.mean for c in sampled.conditions.values()]
    lo = [100 * (c.change.mean - c.change.ci95[0]) for c in sampled.conditions.values()]
    hi = [100 * (c.change.ci95[1] - c.change.mean) for c in sampled.conditions.values()]
    colors = [color_for(n.split("(")[0] if "(" in n else "Wait", i) for i, n in enumerate(names)]
    ax.bar(range(len(names)), changes, color=colors, yerr=[lo, hi], capsize=4)
    ax.axhline(0, color="black", lw=0.8)
    top = max([max(0.0, v) + h for v, h in zip(changes, hi)] + [1.0])
    bottom = min([min(0.0, v) - e for v, e in zip(changes, lo)] + [-1.0])
    pad = 0.06 * (top - bottom)
    for i, v in enumerate(changes):
        ax.text(i, max(0.0, v) + hi[i] + pad / 3, f"{v:+.1f}", ha="center", va="bottom", fontsize=9)
    ax.set_ylim(bottom - pad, top + 2.5 * pad)
    ax.set_xticks(range(len(names)), labels)
    ax.set_ylabel("accuracy change vs none (points)")
    ax.set_title(f"sampled (T={sampled.temperature:g}, {sampled.n_seeds} paired seeds): 95% CI")
    return ax.figure


@styled
def suppression_figure(sweep: "SuppressionSweep", sampled: "SampledSuppression") -> Figure:
    """The claim in the title; cumulative curve, single words vs controls, the sampled change."""
    fig = new_figure(16, 5.2)
    plot_suppression_curve(sweep, fig.add_subplot(1, 3, 1))
    plot_suppression_singles(sweep, fig.add_subplot(1, 3, 2))
    plot_sampled_suppression(sampled, fig.add_subplot(1, 3, 3))
    all_words = sweep.cumulative[-1] if sweep.cumulative else ""
    final = sweep.outcomes[all_words].accuracy if all_words else float("nan")
    fig.suptitle(f"{sweep.model}, {sweep.n_problems} prefilled wrong steps: suppressing one backtracking word "
                 f"barely matters,\nsuppressing all of them drops accuracy to {final:.2f}")
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
