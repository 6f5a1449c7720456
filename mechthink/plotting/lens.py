"""Figures for logit-lens / DLA results (`mechthink.lens`) and value-vector probes.

Plotting never recomputes: every function draws from a result object. Figures are built on an
Agg canvas without pyplot, so importing this module does not touch global matplotlib state.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from matplotlib.figure import FigureBase

from mechthink.plotting.base import new_figure

__all__ = ["plot_lens_heatmap", "plot_dla", "plot_probe_accuracy", "new_figure"]




def _layer_of(comp: str) -> tuple[str, int]:
    m = re.match(r"(resid_pre|resid_post|attn|mlp|embed)_?(\d*)$", comp)
    if not m:
        return comp, -1
    return m.group(1), int(m.group(2)) if m.group(2) else -1


def plot_lens_heatmap(result: Any, row: int = 0, target: int = 0, max_label: int = 8, ax: Any = None) -> FigureBase:
    """Layers × {resid, attn, mlp} heatmap of the target's logit, cells annotated with top-1 tokens.

    For an ``accumulated`` result the single row is ``resid_pre_L``; for ``decomposed`` the rows
    are ``attn_L`` and ``mlp_L`` (embed shown at layer 0 of an extra row).
    """
    comps = result.components
    if result.mode == "accumulated":
        kinds = ["resid"]
        n_layers = len(comps) - 1
    else:
        kinds = ["embed", "attn", "mlp"]
        n_layers = (len(comps) - 1) // 2
    grid = np.full((len(kinds), n_layers + (1 if result.mode == "accumulated" else 0)), np.nan)
    labels = np.full(grid.shape, "", dtype=object)
    for c, comp in enumerate(comps):
        kind, layer = _layer_of(comp)
        if kind in ("resid_pre", "resid_post"):
            r, col = 0, layer if kind == "resid_pre" else n_layers
        elif kind == "embed":
            r, col = 0, 0
        else:
            r, col = kinds.index(kind), layer
        grid[r, col] = float(result.target_logits[row, c, target])
        labels[r, col] = result.top_tokens(row, c)[0][:max_label]
    if ax is None:
        fig = new_figure(max(6.0, 0.55 * grid.shape[1] + 2), 1.2 + 0.7 * len(kinds))
        ax = fig.add_subplot(1, 1, 1)
    else:
        fig = ax.figure
    vmax = np.nanmax(np.abs(grid)) if np.isfinite(grid).any() else 1.0
    im = ax.imshow(grid, aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax)
    for (r, col), text in np.ndenumerate(labels):
        if text:
            ax.text(col, r, repr(text)[1:-1], ha="center", va="center", fontsize=6, rotation=90)
    ax.set_yticks(range(len(kinds)), kinds)
    xt = list(range(grid.shape[1]))
    ax.set_xticks(xt, [str(i) if i < n_layers else "final" for i in xt], fontsize=7)
    ax.set_xlabel("layer")
    ax.set_title(
        f"{result.mode} lens: logit of {result.targets[target]!r} at position {result.positions[row]} "
        f"(token {result.position_tokens[row]!r}); cells: top-1 token"
    )
    fig.colorbar(im, ax=ax, label="target logit")
    return fig


def plot_dla(result: Any, targets: list[int] | None = None, ax: Any = None) -> FigureBase:
    """Direct logit attribution to each target per component, averaged over rows (± s.e.m.)."""
    targets = targets if targets is not None else list(range(len(result.targets)))
    x = np.arange(len(result.components))
    if ax is None:
        fig = new_figure(max(7.0, 0.18 * len(x) + 3), 3.5)
        ax = fig.add_subplot(1, 1, 1)
    else:
        fig = ax.figure
    data = result.target_logits.float().cpu().numpy()
    for t in targets:
        mean = data[:, :, t].mean(0)
        sem = data[:, :, t].std(0) / max(1, np.sqrt(data.shape[0]))
        ax.plot(x, mean, marker="o", ms=3, label=repr(result.targets[t]))
        ax.fill_between(x, mean - sem, mean + sem, alpha=0.2)
    ax.axhline(0, color="grey", lw=0.5)
    step = max(1, len(x) // 70)
    ax.set_xticks(x[::step], [result.components[i] for i in x[::step]], rotation=90, fontsize=6)
    ax.set_ylabel("direct logit contribution" if result.mode == "decomposed" else "lens logit")
    ax.set_title(f"{result.mode} ({result.norm} norm), mean over {data.shape[0]} positions")
    ax.legend(fontsize=7)
    return fig


def plot_probe_accuracy(result: Any, ax: Any = None) -> FigureBase:
    """Per-layer probe accuracy (cross-validated) for a value-vector probe result."""
    if ax is None:
        fig = new_figure(6.0, 3.0)
        ax = fig.add_subplot(1, 1, 1)
    else:
        fig = ax.figure
    acc = result.accuracy.float().cpu().numpy()
    ax.plot(result.layers, acc, marker="o")
    ax.axhline(0.5, color="grey", lw=0.5, ls="--")
    ax.set_ylim(0.4, 1.02)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"{result.folds}-fold accuracy")
    ax.set_title(f"linear probe on {result.hook}: {result.label_names[1]} vs {result.label_names[0]}")
    return fig
