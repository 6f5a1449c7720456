"""Figures for attribution patching and context bins (ARBOR #22, seed ``shared/seeds/003``).

Draws what :mod:`mechthink.attribution` and :mod:`mechthink.context` computed: a circuitsvis
colored-tokens view written as a self-contained HTML file (the JS bundle inlined through
``RenderedHTML.local_src``, so it opens offline), a layer × position heatmap, and bar charts of
the question / thinking bins. Matplotlib figures use the Agg canvas without pyplot.
"""

from __future__ import annotations

import html as _html
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from matplotlib.axes import Axes

from mechthink.plotting.base import new_axes as _new_axes
from matplotlib.figure import FigureBase
from torch import Tensor

if TYPE_CHECKING:
    from mechthink.attribution import AttributionResult

__all__ = ["colored_tokens_html", "plot_attribution_heatmap", "plot_binned", "save_colored_tokens"]




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
    view = colored_tokens(tokens=list(str_tokens), values=vals, **kwargs)
    body = view.local_src
    head = f"<h3>{_html.escape(title)}</h3>\n" if title else ""
    return f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{_html.escape(title or "token importance")}</title></head>\n<body>\n{head}{body}\n</body></html>\n'


def save_colored_tokens(path: str | Path, str_tokens: Sequence[str], values: Any, title: str | None = None, **kwargs: Any) -> Path:
    """Write :func:`colored_tokens_html` to ``path`` (UTF-8)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(colored_tokens_html(str_tokens, values, title=title, **kwargs), encoding="utf-8")
    return path


def plot_attribution_heatmap(
    result: "AttributionResult", node: str = "resid_pre", ax: Axes | None = None, max_xticks: int = 60
) -> FigureBase:
    """Layer × position heatmap of one node type's scores (heads summed for ``z``), centred at 0."""
    if ax is None:
        fig, ax = _new_axes((max(6.0, 0.18 * len(result.str_tokens)), 4.0))
    else:
        fig = ax.figure
    s = result[node].float()
    if s.dim() == 3:
        s = s.sum(-1)
    s = torch.nan_to_num(s).cpu().numpy()
    lim = float(abs(s).max()) or 1.0
    im = ax.imshow(s, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    T = s.shape[1]
    step = max(1, T // max_xticks)
    ax.set_xticks(range(0, T, step))
    ax.set_xticklabels([repr(t)[1:-1] for t in result.str_tokens[::step]], rotation=90, fontsize=6)
    ax.set_ylabel("layer")
    ax.set_title(f"{result.method} {node} (baseline={result.baseline}, metric={result.metric_clean:.3g})")
    fig.colorbar(im, ax=ax, fraction=0.03)
    if not fig.get_constrained_layout():
        fig.tight_layout()
    return fig


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

    if ax is None:
        fig, ax = _new_axes((6.5, 3.5))
    else:
        fig = ax.figure
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
    ax.set_xticks(x)
    ax.set_xticklabels(labels)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if not fig.get_constrained_layout():
        fig.tight_layout()
    return fig
