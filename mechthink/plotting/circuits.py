"""Figures for edge attribution circuits: faithfulness curves, a static drawing of the graph and
a self-contained interactive HTML view of a circuit.

Draws what :mod:`mechthink.circuits` computed (never recomputes): the faithfulness of top-k
circuits against their number of edges, one line per scoring method, and the graph with layers
as rows (embeddings at the bottom, logits at the top; heads, then the MLP, in each row), nodes by
type, and edges by score (width ∝ ``|score|``, colour by sign). The HTML view draws the same
graph as inline SVG and shows a head's attention from the query position over the tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from matplotlib.axes import Axes
from matplotlib.figure import FigureBase
from matplotlib.lines import Line2D

from mechthink.plotting.base import new_figure
from mechthink.plotting.style import COLORS, category_axis, color_for, styled, value_labels

if TYPE_CHECKING:
    from mechthink.circuits import Circuit, EdgeGraph, EdgeScores, FaithfulnessCurve

__all__ = ["METHOD_NAMES", "circuit_html", "plot_ablation_bars", "plot_circuit_graph", "plot_circuits_overview", "plot_faithfulness",
           "save_circuit_html"]

#: Display names of the edge scoring methods.
METHOD_NAMES: dict[str, str] = {"eap": "EAP", "eap-ig": "EAP-IG (embeddings)", "eap-ig-inputs": "EAP-IG (receiver inputs)",
                                 "eap-ig-outputs": "EAP-IG (sender outputs)", "eap-qkfix": "EAP + QK-fix (AtP*)",
                                 "exact": "exact edge patching"}
_METHOD_COLORS = {"eap": COLORS["atp"], "eap-ig": COLORS["ig"], "eap-ig-inputs": "#0072B2", "eap-ig-outputs": "#009E73",
                  "eap-qkfix": "#D55E00", "exact": COLORS["exact"]}
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
    from matplotlib.collections import LineCollection

    n_rows = graph.n_layers + 2
    fig, ax = _axes(ax, (7.5, min(1.3 * graph.n_layers + 2.4, 13.0)))
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
    idx = shown.nonzero()
    s = scores.scores[idx[:, 0], idx[:, 1]].float() if scores is not None else torch.zeros(len(idx))
    order = s.abs().argsort().tolist()  # the strongest edges drawn last (on top)
    idx, s = idx[order].tolist(), s[order]
    segments = []
    for u, v in idx:
        nodes = graph.receiver_nodes(v)
        segments.append([pos[u], pos[nodes[0] if nodes else -1]])
    if scores is None:
        ax.add_collection(LineCollection(segments, colors="#BBBBBB", linewidths=0.4, zorder=1))
    else:
        vmax = float(s.abs().max()) if len(idx) and float(s.abs().max()) > 0 else 1.0
        ax.add_collection(LineCollection(segments, colors=[_POS if x > 0 else _NEG for x in s.tolist()],
                                         linewidths=(0.5 + 4.5 * s.abs() / vmax).tolist(), alpha=0.8, zorder=1))
    used = {u for u, _ in idx}
    for v in {v for _, v in idx}:
        used |= set(graph.receiver_nodes(v)) or {-1}
    ax.set_xlim(-0.7, graph.n_heads + 1.3)
    ax.set_ylim(-0.6, graph.n_layers + 1.6)
    # markers no larger than the room a node has (rows and head columns, in points)
    box = ax.get_position()
    room = min(box.height * fig.get_figheight() / (n_rows + 0.2), box.width * fig.get_figwidth() / (graph.n_heads + 2.0)) * 72
    size = min(260.0, (0.75 * room) ** 2)
    groups: dict[tuple[str, bool], list[tuple[float, float]]] = {}
    for key, xy in pos.items():
        kind = "embed" if key == 0 else "logits" if key == -1 else "mlp" if graph.senders[key].startswith("MLP") else "head"
        groups.setdefault((kind, key in used), []).append(xy)
    for (kind, on), xys in groups.items():
        ax.scatter([x for x, _ in xys], [y for _, y in xys], s=size, color=_NODE_COLORS[kind], alpha=1.0 if on else 0.25,
                   zorder=2, marker="o" if kind == "head" else "s")
    category_axis(ax, ["embed"] + [f"layer {L}" for L in range(graph.n_layers)] + ["logits"], axis="y", keep=[0, n_rows - 1])
    ax.set_xticks(list(range(graph.n_heads)) + [graph.n_heads + 0.6], [f"H{h}" for h in range(graph.n_heads)] + ["MLP"])
    ax.grid(False)
    handles = [Line2D([], [], color=_POS, lw=3, label="score > 0"), Line2D([], [], color=_NEG, lw=3, label="score < 0")]
    if scores is not None:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    method = f"{METHOD_NAMES.get(scores.method, scores.method)} " if scores is not None else ""
    what = f"{method}circuit ({circuit.n_edges} edges)" if circuit is not None else (
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
    errs = [errors.get(n, 0.0) for n in names] if errors else None
    ax.bar(range(len(names)), [values[n] for n in names], color=colors, yerr=errs, capsize=3)
    category_axis(ax, names)
    ax.set_ylim(0, 1.0)
    value_labels(ax, range(len(names)), [values[n] for n in names], errs)
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


# ------------------------------------------------------------------------- interactive HTML view
_HTML_STYLE = """body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em;color:#222}
svg text{font-size:10px;pointer-events:none}.node{cursor:pointer}.node.off{opacity:.25}
.edge{fill:none;stroke-linecap:round}.edge:hover{stroke:#000 !important}.node.sel>*:first-child{stroke:#000;stroke-width:3}
#tokens span{display:inline-block;white-space:pre;margin:1px;padding:1px 2px;border-radius:2px;font-family:monospace}
#tokens span.query{outline:2px solid #D55E00}.legend span{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px}"""

_HTML_SCRIPT = """(function(){
var data=JSON.parse(document.getElementById('circuit-data').textContent);
var box=document.getElementById('tokens'),head=document.getElementById('head');
function show(name){
  var att=data.attention[name];document.querySelectorAll('.node').forEach(function(n){n.classList.toggle('sel',n.getAttribute('data-node')===name);});
  box.textContent='';if(!att){head.textContent=name+': no attention pattern (not a head, or none given)';return;}
  var mx=Math.max.apply(null,att)||1;head.textContent=name+': attention from the query position (token '+data.query+'), max '+mx.toFixed(3);
  data.tokens.forEach(function(t,i){var s=document.createElement('span');s.textContent=t;
    s.style.background='rgba(0,114,178,'+(att[i]/mx).toFixed(3)+')';if(att[i]/mx>0.6)s.style.color='#fff';s.title='position '+i+': '+att[i].toFixed(4);
    if(i===data.query)s.className='query';box.appendChild(s);});
}
document.querySelectorAll('.node').forEach(function(n){var k=n.getAttribute('data-node');
  n.addEventListener('click',function(){show(k);});n.addEventListener('mouseenter',function(){show(k);});});
if(data.first)show(data.first);document.body.setAttribute('data-ready','1');
})();"""


def _json_for_script(obj: Any) -> str:
    """JSON that cannot end an inline ``<script>`` (``<``, ``>``, ``&`` as JSON escapes)."""
    import json

    return json.dumps(obj).replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def circuit_html(
    circuit: "Circuit",
    str_tokens: Sequence[str] | None = None,
    attention: Any = None,
    title: str | None = None,
) -> str:
    """A self-contained HTML page of a circuit: inline SVG (layers as rows, nodes coloured by type,
    edges by score, a tooltip on every node and edge) and, with ``str_tokens`` and ``attention``
    (``[layer, head, pos]``, each head's attention from the query position), the attention of
    the head under the pointer or clicked, over the tokens. No network: nothing is loaded.

    Every token and label reaches the page as escaped text (tokens as script-safe JSON, shown
    through ``textContent``), so a token such as ``</script>`` stays text.
    """
    import html as _html

    import torch

    g = circuit.graph
    if (str_tokens is None) != (attention is None):
        raise ValueError("pass both str_tokens and attention ([layer, head, pos]) or neither")
    att: dict[str, list[float]] = {}
    if attention is not None:
        a = torch.as_tensor(attention).detach().float().cpu()
        want = (g.n_layers, g.n_heads, len(str_tokens or []))
        if tuple(a.shape) != want:
            raise ValueError(f"attention has shape {tuple(a.shape)}; use [layer, head, pos] = {list(want)}")
        att = {f"L{L}H{h}": [round(float(x), 5) for x in a[L, h]] for L in range(g.n_layers) for h in range(g.n_heads)}
    pos = _layout(g)
    W, H, pad = 90.0, 80.0, 50.0
    width, height = pad * 2 + W * (g.n_heads + 2.2), pad * 2 + H * (g.n_layers + 1)

    def xy(key: int) -> tuple[float, float]:
        x, y = pos[key]
        return pad + W * (x + 0.5), height - pad - H * y

    scores = circuit.scores
    idx = circuit.edges.nonzero().tolist()
    vmax = max((abs(float(scores.scores[u, v])) for u, v in idx), default=1.0) if scores is not None else 1.0
    offset = {"q": -7.0, "k": 0.0, "v": 7.0}
    lines = []
    for u, v in sorted(idx, key=lambda e: abs(float(scores.scores[e[0], e[1]])) if scores is not None else 0.0):
        nodes = g.receiver_nodes(v)
        (x0, y0), (x1, y1) = xy(u), xy(nodes[0] if nodes else -1)
        x1 += offset.get(g.receivers[v].rsplit(".", 1)[-1], 0.0) if "." in g.receivers[v] else 0.0
        s = float(scores.scores[u, v]) if scores is not None else float("nan")
        colour = "#BBBBBB" if scores is None else (_POS if s > 0 else _NEG)
        w = 1.0 if scores is None else 0.8 + 7.0 * abs(s) / (vmax or 1.0)
        label = _html.escape(f"{g.senders[u]} -> {g.receivers[v]}" + (f": score {s:+.4g}" if scores is not None else ""))
        bend = 0.35 * abs(y0 - y1) if abs(x0 - x1) < 1.0 else 0.0  # same column (MLP -> MLP): arc to the right
        lines.append(f'<path class="edge" d="M{x0:.1f},{y0:.1f} C{x0 + bend:.1f},{(y0 + y1) / 2:.1f} {x1 + bend:.1f},'
                     f'{(y0 + y1) / 2:.1f} {x1:.1f},{y1:.1f}" stroke="{colour}" stroke-width="{w:.2f}" stroke-opacity="0.8">'
                     f"<title>{label}</title></path>")
    used = {u for u, _ in idx}
    for _, v in idx:
        used |= set(g.receiver_nodes(v)) or {-1}
    nodes_svg = []
    for key in pos:
        name = "logits" if key == -1 else g.senders[key]
        kind = "embed" if key == 0 else "logits" if key == -1 else "mlp" if name.startswith("MLP") else "head"
        x, y = xy(key)
        shape = (f'<circle cx="{x:.1f}" cy="{y:.1f}" r="17" fill="{_NODE_COLORS[kind]}"/>' if kind == "head" else
                 f'<rect x="{x - 24:.1f}" y="{y - 13:.1f}" width="48" height="26" rx="4" fill="{_NODE_COLORS[kind]}"/>')
        tip = _html.escape(f"{name} ({kind}" + (", in the circuit)" if key in used else ", not in the circuit)"))
        nodes_svg.append(f'<g class="node{"" if key in used else " off"}" data-node="{_html.escape(name)}">{shape}'
                         f'<title>{tip}</title><text x="{x:.1f}" y="{y + 3.5:.1f}" text-anchor="middle" fill="#fff">'
                         f'{_html.escape(name)}</text></g>')
    rows = [f'<text x="6" y="{xy(0)[1] + 3:.1f}" fill="#555">embed</text>',
            f'<text x="6" y="{xy(-1)[1] + 3:.1f}" fill="#555">logits</text>']
    rows += [f'<text x="6" y="{height - pad - H * (L + 1) + 3:.1f}" fill="#555">layer {L}</text>' for L in range(g.n_layers)]
    heads = [f"L{L}H{h}" for L, h in circuit.heads]
    data = {"tokens": [str(t) for t in str_tokens or []], "attention": att, "query": len(str_tokens or []) - 1,
            "first": heads[0] if heads and att else None}
    what = _html.escape(title or f"{g.model_name}: circuit")
    method = _html.escape(METHOD_NAMES.get(scores.method, scores.method) if scores is not None else "unscored")
    size = f"k={circuit.k}" if circuit.k is not None else f"|score| ≥ {circuit.threshold}"
    legend = (f'<p class="legend"><span style="background:{_NODE_COLORS["head"]}"></span>head'
              f'<span style="background:{_NODE_COLORS["mlp"]}"></span>MLP<span style="background:{_NODE_COLORS["embed"]}">'
              f'</span>embeddings<span style="background:{_POS}"></span>score &gt; 0<span style="background:{_NEG}"></span>'
              "score &lt; 0 (width ∝ |score|; q/k/v inputs enter a head left/centre/right)</p>")
    panel = ('<h3 id="head"></h3><div id="tokens"></div>' if att else
             "<p>No attention patterns were given (pass str_tokens and attention).</p>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{what}</title>'
            f"<style>{_HTML_STYLE}</style></head>\n<body>\n<h2>{what}</h2>\n"
            f"<p>{circuit.n_edges} of {g.n_edges} edges ({circuit.fraction:.1%}), scored by {method}, {_html.escape(size)}; "
            f"heads: {_html.escape(', '.join(heads) or 'none')}. Hover over or click a node.</p>\n{legend}\n"
            f'<svg width="{width:.0f}" height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" role="img">'
            f"{''.join(rows)}{''.join(lines)}{''.join(nodes_svg)}</svg>\n{panel}\n"
            f'<script type="application/json" id="circuit-data">{_json_for_script(data)}</script>\n'
            f"<script>{_HTML_SCRIPT}</script>\n</body></html>\n")


def save_circuit_html(path: Any, circuit: "Circuit", str_tokens: Sequence[str] | None = None, attention: Any = None,
                      title: str | None = None) -> Any:
    """Write :func:`circuit_html` to ``path`` (UTF-8); returns the path."""
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(circuit_html(circuit, str_tokens, attention, title), encoding="utf-8")
    return path
