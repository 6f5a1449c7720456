"""Figures for logit-lens / DLA results, their summaries and tuned lenses (`mechthink.lens`).

Plotting never recomputes: every function draws from a result object. Figures are built on an
Agg canvas without pyplot, so importing this module does not touch global matplotlib state.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.figure import FigureBase

from mechthink.plotting.base import new_figure
from mechthink.plotting.style import styled

if TYPE_CHECKING:
    from mechthink.lens import LensResult, LensSummary, TunedLens, TunedLensComparison

__all__ = [
    "new_figure",
    "plot_dla",
    "plot_lens_heatmap",
    "plot_lens_summary",
    "plot_logit_lens_overview",
    "plot_translator_norms",
    "plot_tuned_lens_kl",
]


def _axes(ax: Any, width: float, height: float) -> tuple[FigureBase, Any]:
    """The given axes and its figure, or a new figure with one axes."""
    if ax is None:
        fig = new_figure(width, height)
        return fig, fig.add_subplot(1, 1, 1)
    return ax.figure, ax


def _layer_of(comp: str) -> tuple[str, int]:
    m = re.match(r"(resid_pre|resid_post|attn|mlp|embed)_?(\d*)$", comp)
    if not m:
        return comp, -1
    return m.group(1), int(m.group(2)) if m.group(2) else -1


@styled
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
    fig, ax = _axes(ax, max(6.0, 0.55 * grid.shape[1] + 2), 1.2 + 0.7 * len(kinds))
    vmax = np.nanmax(np.abs(grid)) if np.isfinite(grid).any() else 1.0
    im = ax.imshow(grid, aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax)
    # horizontal cell labels, sized to the cell width (a cell is about fig_width / n_cols wide)
    cell_in = ax.figure.get_size_inches()[0] / max(1, grid.shape[1] + 1)
    size = float(min(9.0, max(5.0, 72 * cell_in / max(3, max_label) * 1.3)))
    for (r, col), text in np.ndenumerate(labels):
        if text:
            shown = repr(text)[1:-1].replace(" ", "␣")
            ax.text(col, r, shown, ha="center", va="center", fontsize=size)
    ax.set_yticks(range(len(kinds)), kinds)
    xt = list(range(grid.shape[1]))
    ax.set_xticks(xt, [str(i) if i < n_layers else "final" for i in xt])
    ax.set_xlabel("layer")
    ax.set_title(
        f"{result.mode} lens: logit of {result.targets[target]!r} at position {result.positions[row]} "
        f"(token {result.position_tokens[row]!r}); cells: top-1 token"
    )
    fig.colorbar(im, ax=ax, label="target logit")
    return fig


@styled
def plot_dla(result: Any, targets: list[int] | None = None, ax: Any = None) -> FigureBase:
    """Direct logit attribution to each target per component, averaged over rows (± s.e.m.)."""
    targets = targets if targets is not None else list(range(len(result.targets)))
    x = np.arange(len(result.components))
    fig, ax = _axes(ax, max(7.0, 0.18 * len(x) + 3), 3.5)
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


@styled
def plot_logit_lens_overview(accumulated: "LensResult", decomposed: "LensResult", title: str) -> FigureBase:
    """The logit-lens figure: the accumulated lens and the DLA of row 0, and the mean DLA."""
    fig = new_figure(13, 7.5)
    axes = fig.subplots(3, 1, height_ratios=[1.0, 1.6, 2.0])
    plot_lens_heatmap(accumulated, row=0, ax=axes[0])
    plot_lens_heatmap(decomposed, row=0, ax=axes[1])
    plot_dla(decomposed, ax=axes[2])
    fig.suptitle(title)
    return fig


@styled
def plot_lens_summary(summary: "LensSummary", ax: Any = None) -> FigureBase:
    """Bars of the mean direct logit contribution per component; the top components in red."""
    fig, ax = _axes(ax, max(7.0, 0.18 * len(summary.dla_components) + 3), 3.5)
    top = set(summary.top_dla_components)
    colors = ["#c44e52" if c in top else "#4c72b0" for c in summary.dla_components]
    x = np.arange(len(summary.dla_components))
    ax.bar(x, summary.mean_dla.float().cpu().numpy(), color=colors)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xticks(x, summary.dla_components, rotation=90, fontsize=6)
    ax.set_ylabel(f"mean DLA to {summary.target!r}")
    ax.set_title(f"direct logit attribution over {summary.n_positions} positions (identity error {summary.dla_sum_error:.1e})")
    return fig


@styled
def plot_tuned_lens_kl(result: "TunedLensComparison", ax: Any = None) -> FigureBase:
    """Held-out KL to the final distribution per layer, plain vs tuned lens."""
    fig, ax = _axes(ax, 6.0, 3.0)
    layers = np.arange(len(result.kl_plain))
    ax.plot(layers, result.kl_plain.float().cpu().numpy(), marker="o", label="logit lens")
    ax.plot(layers, result.kl_tuned.float().cpu().numpy(), marker="o", label="tuned lens")
    ax.set_xlabel("layer (resid_pre)")
    ax.set_ylabel("KL(final ‖ lens), nats")
    ax.set_title(f"held-out KL ({result.n_heldout} sequences; trained on {result.n_train})")
    ax.legend(fontsize=7)
    return fig


@styled
def plot_translator_norms(tuned: "TunedLens", ax: Any = None) -> FigureBase:
    """Weight (Frobenius) and bias norms of a tuned lens's translators per layer."""
    frame = tuned.to_frame()
    fig, ax = _axes(ax, 6.0, 3.0)
    ax.plot(frame["layer"], frame["weight_norm"], marker="o", label="‖weight‖")
    ax.plot(frame["layer"], frame["bias_norm"], marker="o", label="‖bias‖")
    ax.set_xlabel("layer")
    ax.set_title(f"tuned-lens translators ({tuned.model_name or 'model'})")
    ax.legend(fontsize=7)
    return fig
