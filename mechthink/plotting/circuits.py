"""Figures for edge attribution circuits: faithfulness curves and a static drawing of the graph.

Draws what :mod:`mechthink.circuits` computed (never recomputes): the faithfulness of top-k
circuits against their number of edges, one line per scoring method, and the graph with layers
as rows (embeddings at the bottom, logits at the top; heads, then the MLP, in each row), nodes by
type, and edges by score (width ∝ ``|score|``, colour by sign).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from matplotlib.axes import Axes
from matplotlib.figure import FigureBase
from matplotlib.lines import Line2D

from mechthink.plotting.base import new_figure
from mechthink.plotting.style import COLORS, color_for, styled

if TYPE_CHECKING:
    from mechthink.circuits import Circuit, EdgeGraph, EdgeScores, FaithfulnessCurve

__all__ = ["METHOD_NAMES", "plot_ablation_bars", "plot_circuit_graph", "plot_circuits_overview", "plot_faithfulness"]

#: Display names of the edge scoring methods.
METHOD_NAMES: dict[str, str] = {"eap": "EAP", "eap-ig": "EAP-IG", "exact": "exact edge patching"}
_METHOD_COLORS = {"eap": COLORS["atp"], "eap-ig": COLORS["ig"], "exact": COLORS["exact"]}
_NODE_COLORS = {"embed": "#999999", "head": "#0072B2", "mlp": "#009E73", "logits": "#000000"}
_POS, _NEG = "#D55E00", "#56B4E9"


def _axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[FigureBase, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig = new_figure(*figsize)
    return fig, fig.add_subplot()


@styled
def plot_faithfulness(curve: "FaithfulnessCurve", ax: Axes | None = None) -> FigureBase:
    """Faithfulness (0 = every edge ablated, 1 = clean) against the circuit's number of edges."""
    fig, ax = _axes(ax, (7.0, 4.2))
    for m, vals in curve.faithfulness.items():
        ax.plot(curve.n_edges[m], vals, marker="o", markersize=3, color=_METHOD_COLORS.get(m, color_for(m)),
                label=METHOD_NAMES.get(m, m))
        best = curve.smallest(m)
        if best is not None:
            ax.axvline(best, color=_METHOD_COLORS.get(m, color_for(m)), lw=0.8, ls=":")
    ax.axhline(curve.target, color="#777777", lw=1.0, ls="--", label=f"{curve.target:.0%} target")
    ax.set_xscale("log")
    ax.set_xlabel(f"edges in the circuit (of {curve.n_total_edges})")
    ax.set_ylabel("faithfulness")
    ax.set_title("faithfulness of top-k circuits")
    ax.legend(loc="lower right")
    return fig


def _layout(graph: "EdgeGraph") -> dict[int, tuple[float, float]]:
    """Sender index -> (x, y); the logits at key -1."""
    H = graph.n_heads
    pos: dict[int, tuple[float, float]] = {0: ((H - 1) / 2 + 0.5, 0.0), -1: ((H - 1) / 2 + 0.5, graph.n_layers + 1.0)}
    for L in range(graph.n_layers):
        for h in range(H):
            pos[graph.head_sender(L, h)] = (float(h), L + 1.0)
        pos[graph.mlp_sender(L)] = (H + 0.6, L + 1.45)
    return pos


@styled
def plot_circuit_graph(
    graph: "EdgeGraph",
    scores: "EdgeScores | None" = None,
    ax: Axes | None = None,
    circuit: "Circuit | None" = None,
    top_fraction: float = 0.05,
) -> FigureBase:
    """The graph: layers as rows, nodes by type, edges by score.

    Shows the circuit's edges (``circuit``), else the top ``top_fraction`` of edges by
    ``|score|`` (``scores``), else every edge in grey. Edges into a key/value input of a shared
    key-value head end at the first head of its group.
    """
    import torch

    fig, ax = _axes(ax, (7.5, 1.3 * graph.n_layers + 2.4))
    pos = _layout(graph)
    if circuit is not None:
        shown = circuit.edges
    elif scores is not None:
        vals = scores.scores.abs().masked_fill(~scores.mask, -1.0)
        k = max(1, round(top_fraction * graph.n_edges))
        thr = vals.flatten().sort(descending=True).values[k - 1]
        shown = (vals >= thr) & scores.mask
    else:
        shown = graph.edges
    idx = shown.nonzero().tolist()
    vmax = max((abs(float(scores.scores[u, v])) for u, v in idx), default=1.0) if scores is not None else 1.0
    for u, v in idx:
        nodes = graph.receiver_nodes(v)
        x0, y0 = pos[u]
        x1, y1 = pos[nodes[0] if nodes else -1]
        if scores is None:
            ax.plot([x0, x1], [y0, y1], color="#BBBBBB", lw=0.4, zorder=1)
            continue
        s = float(scores.scores[u, v])
        ax.plot([x0, x1], [y0, y1], color=_POS if s > 0 else _NEG, lw=0.5 + 4.5 * abs(s) / (vmax or 1.0), alpha=0.8, zorder=1)
    used = set(torch.tensor(idx)[:, 0].tolist()) if idx else set()
    for v in {v for _, v in idx}:
        used |= set(graph.receiver_nodes(v)) or {-1}
    for key, (x, y) in pos.items():
        kind = "embed" if key == 0 else "logits" if key == -1 else "mlp" if graph.senders[key].startswith("MLP") else "head"
        ax.scatter([x], [y], s=260, color=_NODE_COLORS[kind], alpha=1.0 if key in used else 0.25, zorder=2,
                   marker="s" if kind in ("mlp", "embed", "logits") else "o")
    ax.set_yticks([0] + [L + 1 for L in range(graph.n_layers)] + [graph.n_layers + 1],
                  ["embed"] + [f"layer {L}" for L in range(graph.n_layers)] + ["logits"])
    ax.set_xticks(list(range(graph.n_heads)) + [graph.n_heads + 0.6], [f"H{h}" for h in range(graph.n_heads)] + ["MLP"])
    ax.set_xlim(-0.7, graph.n_heads + 1.3)
    ax.set_ylim(-0.6, graph.n_layers + 1.6)
    ax.grid(False)
    handles = [Line2D([], [], color=_POS, lw=3, label="score > 0"), Line2D([], [], color=_NEG, lw=3, label="score < 0")]
    if scores is not None:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    what = f"circuit ({circuit.n_edges} edges)" if circuit is not None else (
        f"top {top_fraction:.0%} edges" if scores is not None else f"all {graph.n_edges} edges")
    ax.set_title(f"{graph.model_name}: {what}")
    return fig


@styled
def plot_ablation_bars(values: Mapping[str, float], errors: Mapping[str, float] | None = None, ax: Axes | None = None,
                       ylabel: str = "P(backtracking word)") -> FigureBase:
    """Bars of one number per condition (e.g. P(backtracking) clean / circuit ablated / random)."""
    fig, ax = _axes(ax, (5.5, 3.6))
    names = list(values)
    colors = [color_for(n, i) for i, n in enumerate(names)]
    ax.bar(range(len(names)), [values[n] for n in names], color=colors,
           yerr=[errors.get(n, 0.0) for n in names] if errors else None, capsize=3)
    ax.set_xticks(range(len(names)), names)
    for i, n in enumerate(names):
        ax.text(i, values[n] + 0.02, f"{values[n]:.2f}", ha="center", va="bottom", fontsize=9)
    ax.set_ylim(0, 1.15)
    ax.set_ylabel(ylabel)
    ax.grid(axis="x", visible=False)
    return fig


@styled
def plot_circuits_overview(
    curve: "FaithfulnessCurve",
    circuit: "Circuit",
    ablation: Mapping[str, float],
    model_name: str,
    ablation_errors: Mapping[str, float] | None = None,
    methods: Sequence[str] | None = None,
) -> FigureBase:
    """The circuits figure: faithfulness curves, P(backtracking) with the circuit ablated vs
    random edge sets, and the circuit drawn on the graph."""
    fig = new_figure(14, 7.5)
    grid = fig.add_gridspec(2, 2, width_ratios=[1.0, 1.1])
    plot_faithfulness(curve, ax=fig.add_subplot(grid[0, 0]))
    bars = fig.add_subplot(grid[1, 0])
    plot_ablation_bars(ablation, ablation_errors, ax=bars)
    bars.set_title("after a wrong step: edges ablated to the corrected step")
    plot_circuit_graph(circuit.graph, circuit.scores, ax=fig.add_subplot(grid[:, 1]), circuit=circuit)
    fig.suptitle(f"{model_name}: the circuit behind backtracking (edge attribution patching, minimal pairs)")
    return fig
