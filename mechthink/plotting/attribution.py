"""Figures for attribution patching, context bins and organism ground-truth hits.

Draws what :mod:`mechthink.attribution`, :mod:`mechthink.context` and
:mod:`mechthink.models.organism.scoring` computed: a circuitsvis colored-tokens view written as a
self-contained HTML file (the JS bundle inlined through ``RenderedHTML.local_src``, so it opens
offline), layer × position heatmaps, bar charts of the question / thinking bins, ρ tables, head
rankings, word bars, and the attribution analysis figure. Matplotlib figures use the Agg canvas
without pyplot; nothing here recomputes.
"""

from __future__ import annotations

import html as _html
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from matplotlib.axes import Axes
from matplotlib.figure import FigureBase
from torch import Tensor

from mechthink.plotting.base import new_axes as _new_axes
from mechthink.plotting.base import new_figure
from mechthink.plotting.style import category_axis, styled, token_axis

if TYPE_CHECKING:
    from mechthink.attribution import (
        AttributionResult,
        EstimatorComparison,
        HeadRanking,
        MeanActivations,
        SpearmanTable,
    )
    from mechthink.context import BinnedAttention, BinnedImportance, FutureWordOverlap
    from mechthink.models.organism.scoring import GroundTruthHits

__all__ = [
    "METHOD_NAMES",
    "colored_tokens_html",
    "plot_attribution_heatmap",
    "plot_attribution_overview",
    "plot_binned",
    "plot_estimator_heatmaps",
    "plot_head_heatmap",
    "plot_head_ranking",
    "plot_hit_fractions",
    "plot_mean_norms",
    "plot_overlap_histogram",
    "plot_spearman_table",
    "plot_word_bars",
    "save_colored_tokens",
]

#: Display names of the attribution methods.
METHOD_NAMES: dict[str, str] = {"atp": "AtP", "ig": "integrated gradients", "qkfix": "AtP* QK-fix", "exact": "exact patching"}


def _axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[FigureBase, Axes]:
    """The given axes and its figure, or a new figure with one axes."""
    if ax is None:
        return _new_axes(figsize)
    return ax.figure, ax


def _finish(fig: FigureBase) -> FigureBase:
    if not fig.get_constrained_layout():
        fig.tight_layout()
    return fig


def _script_safe_props(page: str, props: dict[str, Any]) -> str:
    """The page with its inline props JSON made safe inside ``<script>``: ``<``, ``>`` and ``&``
    as JSON escapes, so a token such as ``</script><script>…`` cannot end the script early, and
    special tokens such as ``<think>`` reach the view as text (shown, not parsed as markup)."""
    import json

    raw = json.dumps(props)
    if page.count(raw) != 1:
        raise RuntimeError("circuitsvis changed how it embeds its props; cannot make the token view script-safe")
    safe = raw.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
    return page.replace(raw, safe)


@styled
def colored_tokens_html(
    str_tokens: Sequence[str],
    values: Float[Tensor, "pos"] | Sequence[float | int],
    title: str | None = None,
    **kwargs: Any,
) -> str:
    """A complete, self-contained HTML page with circuitsvis colored tokens (no network needed).

    Args:
        str_tokens: Token strings.
        values: One value per token (colour intensity).
        title: Optional heading.
        kwargs: Passed to ``circuitsvis.tokens.colored_tokens`` (e.g. ``min_value``).
    """
    from circuitsvis.tokens import colored_tokens

    vals = values.detach().float().cpu().tolist() if isinstance(values, Tensor) else [float(v) for v in values]
    if len(vals) != len(str_tokens):
        raise ValueError(f"{len(str_tokens)} tokens but {len(vals)} values")
    # circuitsvis writes each token as HTML: escaped, "<think>" shows as text and no token is markup
    shown = [_html.escape(str(t), quote=False) for t in str_tokens]
    view = colored_tokens(tokens=shown, values=vals, **kwargs)
    body = _script_safe_props(view.local_src, {"tokens": shown, "values": vals, **kwargs})
    head = f"<h3>{_html.escape(title)}</h3>\n" if title else ""
    return f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{_html.escape(title or "token importance")}</title></head>\n<body>\n{head}{body}\n</body></html>\n'


@styled
def save_colored_tokens(path: str | Path, str_tokens: Sequence[str], values: Any, title: str | None = None, **kwargs: Any) -> Path:
    """Write :func:`colored_tokens_html` to ``path`` (UTF-8)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(colored_tokens_html(str_tokens, values, title=title, **kwargs), encoding="utf-8")
    return path


@styled
def plot_attribution_heatmap(
    result: "AttributionResult", node: str = "resid_pre", ax: Axes | None = None, max_xticks: int = 60
) -> FigureBase:
    """Layer × position heatmap of one node type's scores (heads summed for ``z``), centred at 0."""
    fig, ax = _axes(ax, (max(6.0, 0.18 * len(result.str_tokens)), 4.0))
    s = result[node].float()
    if s.dim() == 3:
        s = s.sum(-1)
    s = torch.nan_to_num(s).cpu().numpy()
    lim = float(abs(s).max()) or 1.0
    im = ax.imshow(s, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    width_in = ax.get_position().width * ax.figure.get_size_inches()[0]
    token_axis(ax, list(result.str_tokens), max_labels=min(max_xticks, max(4, int(width_in * 1.6))),
               keep=[len(result.str_tokens) - 1])
    ax.set_ylabel("layer")
    ax.set_title(f"{result.method} {node} (baseline={result.baseline}, metric={result.metric_clean:.3g})")
    fig.colorbar(im, ax=ax, fraction=0.03)
    return _finish(fig)


@styled
def plot_binned(
    labels: Sequence[str],
    values: Float[Tensor, "row bin"],
    ylabel: str = "importance",
    row_labels: Sequence[str] | None = None,
    ax: Axes | None = None,
    title: str | None = None,
) -> FigureBase:
    """Bars per bin: with ``row_labels`` one group per row (e.g. heads), else mean ± s.e.m. over rows (samples)."""
    import numpy as np

    fig, ax = _axes(ax, (6.5, 3.5))
    v = values.detach().float().cpu().numpy()
    x = np.arange(len(labels))
    if row_labels is None:
        mean = v.mean(0)
        sem = v.std(0, ddof=1) / np.sqrt(v.shape[0]) if v.shape[0] > 1 else np.zeros_like(mean)
        ax.bar(x, mean, yerr=sem, color=["#c44e52"] + ["#4c72b0"] * (len(labels) - 1), capsize=3)
    else:
        w = 0.8 / max(len(row_labels), 1)
        for i, lab in enumerate(row_labels):
            ax.bar(x - 0.4 + w * (i + 0.5), v[i], width=w, label=lab)
        ax.legend(fontsize=7, ncol=2)
    category_axis(ax, labels)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    return _finish(fig)


@styled
def plot_estimator_heatmaps(
    comparison: "EstimatorComparison", sample: int = 0, node: str = "resid_pre", axes: Sequence[Axes] | None = None,
    what: str = "metric",
) -> FigureBase:
    """One :func:`plot_attribution_heatmap` per method that scored sequence ``sample``.

    Args:
        comparison: What :func:`mechthink.attribution.compare_estimators` returned.
        sample: Which sequence.
        node: Node type drawn.
        axes: One axes per method shown (None: a new figure).
        what: How the metric is named in the titles (e.g. ``"' Wait' logit"``).
    """
    methods = [m for m in comparison.methods if len(comparison.results[m]) > sample]
    if axes is None:
        fig = new_figure(13, 3.2 * len(methods))
        axes = list(fig.subplots(len(methods), 1, squeeze=False)[:, 0])
    if len(axes) != len(methods):
        raise ValueError(f"axes: {len(axes)} given for {len(methods)} methods ({methods})")
    for m, ax in zip(methods, axes):
        plot_attribution_heatmap(comparison.results[m][sample], node=node, ax=ax)
        ax.set_title(f"{METHOD_NAMES.get(m, m)}: patched − clean {what} per layer × position, example {sample}")
    return axes[0].figure


@styled
def plot_attribution_overview(
    comparison: "EstimatorComparison",
    bins: "BinnedImportance",
    attention: "BinnedAttention",
    target: str,
    model_name: str,
    sample: int = 0,
) -> FigureBase:
    """The attribution figure: a heatmap per method of one sequence, the importance by region,
    and the attention of the top heads by region."""
    n = sum(len(comparison.results[m]) > sample for m in comparison.methods)
    fig = new_figure(13, 3.2 * n + 4.0)
    grid = fig.add_gridspec(n + 1, 2, height_ratios=[1.0] * n + [1.2])
    plot_estimator_heatmaps(comparison, sample, axes=[fig.add_subplot(grid[i, :]) for i in range(n)], what=f"{target!r} logit")
    plot_binned(
        bins.labels, bins.values, ax=fig.add_subplot(grid[-1, 0]),
        title=f"AtP importance by region\n(min-max per sample, mean over {bins.values.shape[0]})",
    )
    labels = [f"L{L}H{h}" for L, h in attention.heads]
    plot_binned(
        attention.labels, attention.values, ylabel="attention", row_labels=labels, ax=fig.add_subplot(grid[-1, 1]),
        title=f"attention of the top-{len(labels)} heads (by AtP)\nfrom the query position",
    )
    fig.suptitle(f"{model_name}: attribution patching with mean ablation at planted errors")
    return fig


@styled
def plot_spearman_table(table: "SpearmanTable", ax: Axes | None = None) -> FigureBase:
    """Grouped bars: mean Spearman ρ against exact patching per node type, one bar per estimator."""
    import numpy as np

    fig, ax = _axes(ax, (6.5, 3.5))
    x = np.arange(len(table.nodes))
    w = 0.8 / max(len(table.estimators), 1)
    for i, e in enumerate(table.estimators):
        mean = table.mean()
        means = [mean[f"{e}/{n}"] for n in table.nodes]
        ax.bar(x - 0.4 + w * (i + 0.5), means, width=w, label=METHOD_NAMES.get(e, e))
    ax.set_xticks(x)
    ax.set_xticklabels(table.nodes)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_ylabel("Spearman ρ vs exact")
    ax.set_title(f"rank agreement with exact patching ({table.n_samples} sequences)")
    ax.legend(fontsize=7)
    return _finish(fig)


@styled
def plot_head_heatmap(
    values: Float[Tensor, "layer head"],
    marked: Sequence[tuple[int, int]] = (),
    label: str = "score",
    title: str | None = None,
    ax: Axes | None = None,
) -> FigureBase:
    """Layer × head heatmap of a per-head score, with ``marked`` heads outlined."""
    from matplotlib.patches import Rectangle

    fig, ax = _axes(ax, (5.0, 3.5))
    v = torch.nan_to_num(values.detach().float().cpu()).numpy()
    im = ax.imshow(v, aspect="auto", cmap="viridis", interpolation="nearest")
    for L, h in marked:
        ax.add_patch(Rectangle((h - 0.5, L - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.5))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    if title:
        ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.05, label=label)
    return _finish(fig)


@styled
def plot_head_ranking(ranking: "HeadRanking", ax: Axes | None = None) -> FigureBase:
    """:func:`plot_head_heatmap` of a head ranking's support, the top heads outlined."""
    return plot_head_heatmap(
        ranking.support, marked=ranking.heads, label="support", title=f"top heads: {', '.join(ranking.labels)}", ax=ax
    )


@styled
def plot_word_bars(
    words: Sequence[tuple[str, float]], hits: Sequence[bool] | None = None, ax: Axes | None = None, title: str | None = None
) -> FigureBase:
    """Horizontal bars of ``(word, score)`` pairs, best on top; with ``hits``, hits in red."""
    fig, ax = _axes(ax, (5.0, 0.3 * len(words) + 1.0))
    colors = ["#4c72b0"] * len(words) if hits is None else ["#c44e52" if h else "#8c8c8c" for h in hits]
    ax.barh(range(len(words))[::-1], [s for _, s in words], color=colors)
    ax.set_yticks(range(len(words))[::-1])
    ax.set_yticklabels([w for w, _ in words])
    ax.set_xlabel("score")
    if title:
        ax.set_title(title)
    return _finish(fig)


@styled
def plot_overlap_histogram(result: "FutureWordOverlap", ax: Axes | None = None) -> FigureBase:
    """Histogram of per-sample top-word overlaps, the mean as a vertical line."""
    fig, ax = _axes(ax, (5.0, 3.0))
    vals = [o.overlap for o in result.overlaps if o.overlap == o.overlap]
    ax.hist(vals, bins=10, range=(0.0, 1.0), color="#4c72b0")
    ax.axvline(result.mean, color="#c44e52", label=f"mean {result.mean:.2f}")
    ax.set_xlabel("fraction of top words in the continuation")
    ax.set_ylabel("samples")
    ax.legend(fontsize=7)
    return _finish(fig)


@styled
def plot_hit_fractions(hits: "dict[str, GroundTruthHits]", ax: Axes | None = None) -> FigureBase:
    """Grouped bars of :meth:`GroundTruthHits.fractions`, one bar per method (the keys)."""
    import numpy as np

    fig, ax = _axes(ax, (7.0, 3.5))
    names = list(next(iter(hits.values())).fractions()) if hits else []
    x = np.arange(len(names))
    w = 0.8 / max(len(hits), 1)
    for i, (method, h) in enumerate(hits.items()):
        ax.bar(x - 0.4 + w * (i + 0.5), list(h.fractions().values()), width=w, label=METHOD_NAMES.get(method, method) or None)
    category_axis(ax, [n.replace("_", " ") for n in names], fontsize=8, max_lines=3)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fraction of examples")
    if len(hits) > 1:
        ax.legend(fontsize=7)
    return _finish(fig)


@styled
def plot_mean_norms(means: "MeanActivations", ax: Axes | None = None) -> FigureBase:
    """Bars of the L2 norm of each hook's mean activation."""
    frame = means.to_frame()
    fig, ax = _axes(ax, (max(5.0, 0.25 * len(frame) + 2), 3.0))
    ax.bar(range(len(frame)), frame["mean_norm"])
    ax.set_xticks(range(len(frame)))
    ax.set_xticklabels(frame["hook"], rotation=90, fontsize=6)
    ax.set_ylabel("‖mean‖")
    ax.set_title(f"mean activations over {means.count} positions ({means.n_samples} samples)")
    return _finish(fig)
