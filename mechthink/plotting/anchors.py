"""Figures for thought anchors: per-sentence importances, the suppression dependency matrix,
receiver-head kurtosis and the agreement between methods (Bogdan et al. 2025, Thought Anchors).

Draws what :mod:`mechthink.anchors` computed; nothing here recomputes. Agg canvas, no pyplot.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure, FigureBase
from matplotlib.patches import Rectangle
from torch import Tensor

from mechthink.plotting.base import new_axes, new_figure
from mechthink.plotting.style import OKABE_ITO, category_axis, styled

if TYPE_CHECKING:
    from mechthink.anchors import EveryMethod, MethodAgreement, ReceiverHeads, ResamplingImportance, Sentence, SuppressionMatrix

__all__ = [
    "anchors_figure",
    "plot_agreement",
    "plot_dependency_matrix",
    "plot_receiver_heads",
    "plot_resampling",
    "plot_sentence_bars",
]


def _axes(ax: Axes | None, size: tuple[float, float]) -> Axes:
    return new_axes(size)[1] if ax is None else ax


def _label(s: "Sentence", width: int = 22) -> str:
    text = s.text if len(s.text) <= width else s.text[: width - 1] + "…"
    return f"{s.index}: {text}"


def _unit(v: Tensor) -> Tensor:
    """``v`` scaled to [0, 1] by its finite min and max (NaN stays NaN, constant -> 0)."""
    v = v.double()
    ok = ~v.isnan()
    if not bool(ok.any()):
        return v
    lo, hi = v[ok].min(), v[ok].max()
    return (v - lo) / (hi - lo) if hi > lo else torch.where(ok, torch.zeros_like(v), v)


@styled
def plot_sentence_bars(
    scores: Mapping[str, Tensor], sentences: Sequence["Sentence"], ax: Axes | None = None, title: str | None = None
) -> FigureBase:
    """Grouped bars: one group per sentence, one bar per method, each method min-max scaled."""
    ax = _axes(ax, (12.0, 4.0))
    names = list(scores)
    width = 0.8 / max(1, len(names))
    for m, name in enumerate(names):
        v = _unit(scores[name]).nan_to_num(nan=0.0).tolist()
        xs = [i - 0.4 + width * (m + 0.5) for i in range(len(sentences))]
        ax.bar(xs, v, width=width, label=name, color=OKABE_ITO[m % len(OKABE_ITO)])
    category_axis(ax, [_label(s) for s in sentences], fontsize=8)
    ax.set_ylabel("importance\n(min-max per method)")
    ax.set_ylim(0.0, 1.22)  # headroom: the legend sits above the tallest bars, not on them
    ax.set_yticks([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.legend(ncols=min(6, len(names)), loc="upper right")
    ax.set_title(title or "sentence importance by method")
    return ax.figure


@styled
def plot_resampling(result: "ResamplingImportance", ax: Axes | None = None) -> FigureBase:
    """Bars of the four resampling importances of one trace (each min-max scaled)."""
    return plot_sentence_bars({m: result.metric(m) for m in result.METRICS}, result.sentences, ax=ax,
                              title=f"resampling importance ({int(result.n_rollouts.max())} rollouts per prefix)")


@styled
def plot_dependency_matrix(matrix: "SuppressionMatrix", ax: Axes | None = None) -> FigureBase:
    """The suppression matrix: row = affected sentence, column = suppressed sentence."""
    n = len(matrix.sentences)
    ax = _axes(ax, (6.0, max(5.0, 1.5 + 0.2 * n)))  # room for one label per sentence
    m = matrix.matrix.double()
    shown = m if matrix.log else m.clamp(min=1e-9).log10()  # KLs span orders of magnitude
    img = ax.imshow(shown.numpy(), cmap="viridis", aspect="auto")
    category_axis(ax, [str(i) for i in range(n)])
    category_axis(ax, [_label(s, 18) for s in matrix.sentences], axis="y", fontsize=8)
    ax.set_xlabel("suppressed sentence")
    ax.set_ylabel("affected sentence")
    ax.grid(False)
    ax.figure.colorbar(img, ax=ax, label="mean log KL" if matrix.log else "log10 mean KL (nats)")
    ax.set_title("attention suppression: sentence dependencies")
    return ax.figure


@styled
def plot_receiver_heads(heads: "ReceiverHeads", ax: Axes | None = None) -> FigureBase:
    """Kurtosis of each head's vertical attention scores; the top heads are outlined."""
    ax = _axes(ax, (6.0, 4.0))
    k = heads.kurtosis.double()
    img = ax.imshow(k.numpy(), cmap="magma", aspect="auto")
    for L, h in heads.top_heads:
        ax.add_patch(_box(h, L))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.grid(False)
    ax.figure.colorbar(img, ax=ax, label="kurtosis of vertical scores")
    ax.set_title(f"receiver heads (top {len(heads.top_heads)} outlined)")
    return ax.figure


def _box(x: int, y: int) -> Rectangle:
    return Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="#56B4E9", linewidth=2)


@styled
def plot_agreement(agreement: "MethodAgreement", ax: Axes | None = None) -> FigureBase:
    """The Spearman matrix across methods with its values written in."""
    ax = _axes(ax, (6.0, 5.0))
    r = agreement.spearman.double()
    img = ax.imshow(r.numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
    n = len(agreement.methods)
    for i in range(n):
        for j in range(n):
            v = float(r[i, j])
            ax.text(j, i, "–" if v != v else f"{v:.2f}", ha="center", va="center", fontsize=9)
    # numbered columns, named rows: long method names never collide
    ax.set_xticks(range(n), [f"({i + 1})" for i in range(n)])
    ax.set_yticks(range(n), [f"({i + 1}) {m}" for i, m in enumerate(agreement.methods)])
    ax.grid(False)
    ax.figure.colorbar(img, ax=ax, label="Spearman rho (mean over traces)")
    ax.set_title(f"agreement of methods ({agreement.n_traces} traces)")
    return ax.figure


@styled
def anchors_figure(report: "EveryMethod", example: int = 0) -> Figure:
    """One trace seen by every method (bars), its dependency matrix, and the agreement matrix."""
    item = report.traces[example]
    fig = new_figure(14, 9)
    grid = fig.add_gridspec(2, 2, height_ratios=[1.0, 1.15])
    plot_sentence_bars({m: report.scores[m][example] for m in report.scores}, item.sentences, ax=fig.add_subplot(grid[0, :]),
                       title=f"trace {item.trace.id}: every method per sentence")
    plot_dependency_matrix(report.suppression[example], ax=fig.add_subplot(grid[1, 0]))
    plot_agreement(report.agreement, ax=fig.add_subplot(grid[1, 1]))
    return fig
