"""Figures for MI trajectories and thinking-token counts (Qian et al. 2025, MI peaks; Fig. 2 / 4).

Draws what :mod:`mechthink.mi` computed; nothing here recomputes MI or peaks.  Figures are
built on the Agg canvas without pyplot, so they never touch the global backend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from matplotlib.axes import Axes
from matplotlib.figure import FigureBase

from mechthink.plotting.base import new_axes as _new_axes
from mechthink.plotting.base import new_figure
from mechthink.plotting.style import category_axis, styled

if TYPE_CHECKING:
    import pandas as pd

    from mechthink.mi import MITrajectory, PeakSummary

__all__ = ["plot_mi_peaks", "plot_mi_trajectory", "plot_peak_summary", "plot_peak_token_counts"]


@styled
def plot_mi_trajectory(
    traj: "MITrajectory",
    ax: Axes | None = None,
    label_peaks: bool = True,
    max_labels: int = 30,
    title: str | None = None,
    color: str = "#4c72b0",
    peak_color: str = "#c44e52",
) -> FigureBase:
    """Line plot of MI per reasoning step with the peaks marked and labelled by token.

    Args:
        traj: The trajectory (``mi``, ``tokens``, ``peaks``).
        ax: Axes to draw on; a new figure is created when None.
        label_peaks: Annotate each peak with its generated token.
        max_labels: Annotate at most this many peaks (the highest ones).
        title: Axes title; defaults to the hook name.
        color: Line colour.
        peak_color: Marker and label colour for peaks.

    Returns:
        The figure containing the axes.
    """
    if ax is None:
        fig, ax = _new_axes((10.0, 3.5))
    else:
        fig = ax.figure
    mi = traj.mi.detach().float().cpu().numpy()
    peaks = traj.peaks.cpu().numpy()
    ax.plot(range(len(mi)), mi, color=color, linewidth=1.2, alpha=0.9)
    if len(peaks):
        ax.scatter(peaks, mi[peaks], s=28, color=peak_color, edgecolor="white", linewidth=0.6, zorder=3)
    if label_peaks and len(peaks):
        order = sorted(peaks.tolist(), key=lambda i: -mi[i])[:max_labels]
        for i in order:
            ax.annotate(
                repr(traj.tokens[i].strip() or traj.tokens[i]),
                (i, mi[i]),
                xytext=(0, 4),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=7,
                color=peak_color,
                rotation=45,
            )
    ax.set_xlabel("Reasoning step")
    ax.set_ylabel("MI (HSIC)")
    ax.set_title(title if title is not None else (traj.hook or "MI trajectory"))
    ax.grid(axis="y", linestyle="--", alpha=0.4)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if not fig.get_constrained_layout():
        fig.tight_layout()
    return fig


@styled
def plot_peak_token_counts(
    counts: "pd.Series",
    top: int = 15,
    ax: Axes | None = None,
    title: str = "Tokens at MI peaks",
    ylabel: str = "Frequency",
    **bar_kwargs: Any,
) -> FigureBase:
    """Bar chart of token frequency at MI peaks (output of :func:`mechthink.mi.peak_token_counts`).

    Args:
        counts: Counts indexed by token, most common first.
        top: Number of tokens to show.
        ax: Axes to draw on; a new figure is created when None.
        title: Axes title.
        ylabel: Y-axis label.
        **bar_kwargs: Passed to ``ax.bar``.

    Returns:
        The figure.
    """
    if ax is None:
        fig, ax = _new_axes((8.0, 4.0))
    else:
        fig = ax.figure
    head = counts.head(top)
    labels = [repr(str(t)) for t in head.index]
    ax.bar(range(len(head)), head.to_numpy(), color=bar_kwargs.pop("color", "#6a7fc1"), **bar_kwargs)
    category_axis(ax, labels)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if not fig.get_constrained_layout():
        fig.tight_layout()
    return fig


@styled
def plot_peak_summary(
    summary: "PeakSummary", ax: Axes | None = None, top: int = 15, title: str | None = None
) -> FigureBase:
    """Bar chart of the ``top`` tokens at MI peaks of a :class:`~mechthink.mi.PeakSummary`.

    Args:
        summary: From :func:`mechthink.mi.peak_summary`.
        ax: Axes to draw on; a new figure is created when None.
        top: Number of tokens to show.
        title: Axes title (default: the number of traces, the peak rule and the peak ratio).

    Returns:
        The figure.
    """
    if title is None:
        title = (f"tokens at MI peaks over {summary.n_traces} traces ({summary.peak_method} rule); "
                 f"peak ratio {summary.peak_ratio:.3f}")
    return plot_peak_token_counts(summary.top_tokens(top), top=top, ax=ax, title=title, ylabel="count at MI peaks")


@styled
def plot_mi_peaks(
    example: "MITrajectory", summary: "PeakSummary", top: int = 15, model_name: str = ""
) -> FigureBase:
    """The MI-peaks figure: one trajectory with labelled peaks above the tokens at peaks overall.

    Args:
        example: The trajectory drawn in the upper panel.
        summary: The summary whose peak tokens the lower panel shows.
        top: Number of tokens in the lower panel.
        model_name: Named at the start of the figure title.

    Returns:
        The figure.
    """
    fig = new_figure(13, 7)
    upper, lower = fig.subplots(2, 1, height_ratios=[1.3, 1])
    plot_mi_trajectory(example, ax=upper)
    plot_peak_summary(summary, ax=lower, top=top)
    prefix = f"{model_name}: " if model_name else ""
    sigma = example.config.get("sigma")
    width = f", sigma={sigma:g}" if isinstance(sigma, (int, float)) else ""
    fig.suptitle(f"{prefix}MI(h_t, h_solution) along the thinking (paper's HSIC estimator{width})")
    return fig
