"""Figures for forced-answer confidence (repeng PR #69 action confidence; ARBOR #22 early exit).

Draws what :mod:`mechthink.confidence` computed; nothing here recomputes. Figures are built on
the Agg canvas without pyplot, so they never touch the global backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from matplotlib.axes import Axes
from matplotlib.figure import FigureBase

from mechthink.plotting.base import new_figure
from mechthink.plotting.style import styled

if TYPE_CHECKING:
    from mechthink.confidence import (
        AnswerProbeResult,
        EarlyExitResult,
        EarlyExitSummary,
        GoldConfidenceCurves,
    )

__all__ = ["plot_confidence_curves", "plot_early_exit", "plot_early_exit_summary", "plot_gold_confidence", "plot_probe"]


def _axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[FigureBase, Axes]:
    """``ax`` and its figure, or a new constrained-layout figure of ``figsize`` with one Axes."""
    if ax is not None:
        return ax.figure, ax
    fig = new_figure(*figsize)
    return fig, fig.add_subplot(1, 1, 1)


@styled
def plot_probe(result: "AnswerProbeResult", ax: Axes | None = None, title: str | None = None, show_mass: bool = True) -> FigureBase:
    """Confidence against token position: log-ratio (two choices) or each choice's log-prob.

    The probability mass on all choices is drawn on a second axis (dashed) and the ``marks``
    (e.g. ``think_end``) as vertical lines.

    Args:
        result: The probe result.
        ax: Axes to draw on; a new figure when None.
        title: Axes title.
        show_mass: Draw the mass curve.

    Returns:
        The figure.
    """
    fig, ax = _axes(ax, (9.0, 3.5))
    x = result.positions
    order = sorted(range(len(x)), key=lambda i: x[i])
    xs = [x[i] for i in order]
    if len(result.choice_names) == 2:
        lr = result.log_ratio.tolist()
        ax.plot(xs, [lr[i] for i in order], marker="o", ms=3, color="#4c72b0",
                label=f"log p({result.choice_names[0]}) − log p({result.choice_names[1]})")
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_ylabel("log ratio")
    else:
        for j, name in enumerate(result.choice_names):
            lp = result.logprobs[:, j].tolist()
            ax.plot(xs, [lp[i] for i in order], marker="o", ms=3, label=f"log p({name})")
        ax.set_ylabel("log prob")
    for name, pos in result.marks.items():
        ax.axvline(pos, color="#c44e52", ls=":", lw=1.2)
        ax.annotate(name, (pos, 1.0), xycoords=("data", "axes fraction"), fontsize=8, color="#c44e52",
                    ha="left", va="top")
    ax.set_xlabel("token position")
    if show_mass:
        ax2 = ax.twinx()
        mass = result.mass.tolist()
        ax2.plot(xs, [mass[i] for i in order], ls="--", color="grey", lw=1, label="mass on choices")
        ax2.set_ylim(0, 1.05)
        ax2.set_ylabel("mass")
    ax.legend(loc="best", fontsize=8)  # "best" also keeps clear of the marks' names
    if title:
        ax.set_title(title)
    if not fig.get_constrained_layout():
        fig.tight_layout()
    return fig


@styled
def plot_early_exit(result: "EarlyExitResult", ax: Axes | None = None, title: str | None = None) -> FigureBase:
    """p(gold) at each answer-reaching instance of one trace; bars green when the forced answer
    was correct, red otherwise.

    Args:
        result: The early-exit result of one trace.
        ax: Axes to draw on; a new figure when None.
        title: Axes title (default: the trace id and gold).
    """
    fig, ax = _axes(ax, (6.0, 3.5))
    inst = [r.instance + 1 for r in result.rows]
    colors = ["#55a868" if r.correct else "#c44e52" for r in result.rows]
    ax.bar(inst, [r.prob for r in result.rows], color=colors)
    ax.set_xticks(inst)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("answer-reaching instance")
    ax.set_ylabel("p(gold) after the answer suffix")
    ax.set_title(title if title is not None else f"{result.trace_id}: gold {result.gold}")
    return fig


def _prefix(model_name: str) -> str:
    return f"{model_name}: " if model_name else ""


@styled
def plot_early_exit_summary(
    summary: "EarlyExitSummary", ax: Axes | None = None, title: str | None = None, model_name: str = ""
) -> FigureBase:
    """Accuracy and mean gold logit by answer-reaching instance (the ARBOR #22 early-exit plot).

    Args:
        summary: From :func:`mechthink.confidence.early_exit_summary`.
        ax: Axes to draw on; a new 7 x 4 figure when None.
        title: Axes title (default: the number of traces with instances, after ``model_name``).
        model_name: Named at the start of the default title.
    """
    fig, ax = _axes(ax, (7.0, 4.0))
    if title is None:
        title = f"{_prefix(model_name)}early exit at the k-th answer instance ({summary.n_traces_with_instances} traces)"
    inst = [r.instance for r in summary.by_instance]
    ax.bar(inst, [r.accuracy for r in summary.by_instance], color="#8da0cb", label="accuracy")
    ax.set_xticks(inst)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("answer-reaching instance")
    ax.set_ylabel("accuracy")
    ax2 = ax.twinx()
    ax2.plot(inst, [r.mean_logit for r in summary.by_instance], marker="o", color="#c44e52", label="mean gold logit")
    ax2.set_ylabel("mean gold logit")
    ax.set_title(title)
    return fig


@styled
def plot_confidence_curves(
    results: Sequence["AnswerProbeResult"],
    choice: Sequence[str],
    ax: Axes | None = None,
    title: str | None = None,
) -> FigureBase:
    """One line per trace: log p(choice) against the fraction of the thinking, ``</think>`` marked.

    Args:
        results: Probe results from :func:`mechthink.confidence.confidence_curve` (their
            ``marks`` must hold ``think_start``; ``think_end`` when the thinking closed).
        choice: For each result, the name of the choice to draw (e.g. the gold answer).
        ax: Axes to draw on; a new figure when None.
        title: Optional title.
    """
    fig, ax = _axes(ax, (9.0, 4.0))
    for res, name in zip(results, choice):
        start = res.marks.get("think_start", min(res.positions))
        end = res.marks.get("think_end")
        stop = end if end is not None else max(res.positions)
        span = max(1, stop - start)
        c = res.choice_names.index(name)
        order = sorted(range(len(res.positions)), key=lambda i: res.positions[i])
        xs = [(res.positions[i] - start) / span for i in order]
        ys = [float(res.logprobs[i, c]) for i in order]
        (line,) = ax.plot(xs, ys, lw=1, alpha=0.7)
        if end is not None and end in res.positions:
            i = res.positions.index(end)
            ax.plot([1.0], [float(res.logprobs[i, c])], marker="s", color=line.get_color(), ms=5)
    ax.axvline(1.0, color="grey", ls=":", lw=1)
    ax.annotate("</think>", (1.0, 1.0), xycoords=("data", "axes fraction"), fontsize=8, color="grey", ha="right", va="top")
    ax.set_xlabel("fraction of the thinking")
    ax.set_ylabel("log p(gold answer) after the answer suffix")
    if title:
        ax.set_title(title)
    return fig


@styled
def plot_gold_confidence(
    result: "GoldConfidenceCurves", ax: Axes | None = None, title: str | None = None, model_name: str = ""
) -> FigureBase:
    """log p(gold) through the thinking of each trace of ``result`` (from
    :func:`mechthink.confidence.gold_confidence_curves`), drawn by :func:`plot_confidence_curves`
    on ``ax`` or a new 10 x 4.5 figure. The default ``title`` gives ``model_name``, the number of
    traces and the mean probability mass on the candidates.
    """
    fig, ax = _axes(ax, (10.0, 4.5))
    if title is None:
        title = (f"{_prefix(model_name)}log p(gold) after forcing an answer, {len(result.rows)} traces "
                 f"(mean mass on candidates {result.mean_mass:.2f})")
    plot_confidence_curves(result.curves, result.golds, ax=ax, title=title)
    return fig
