"""One figure style for every mechthink plot: sizes, a colour-blind-safe palette, axis helpers.

Every public plot function runs under :func:`styled` (a ``matplotlib.rc_context`` with
:data:`RC`), so figures share font sizes that stay legible when a figure is shown about 900 px
wide (the README), constrained layout, and the palette below; nothing changes the user's global
matplotlib settings. The palette is Okabe & Ito's (2008, "Color Universal Design"), safe for the
common colour-vision deficiencies; roles map to fixed colours so a method, a region or a
backtracking word has the same colour in every figure.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

import matplotlib as mpl
from matplotlib.axes import Axes
from matplotlib.ticker import MaxNLocator

__all__ = ["COLORS", "OKABE_ITO", "RC", "color_for", "finalize", "integer_axis", "styled", "token_axis", "value_labels"]

F = TypeVar("F", bound=Callable[..., Any])

#: Okabe & Ito's eight colours (black last).
OKABE_ITO: tuple[str, ...] = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000")

#: Fixed colours for the roles that recur across figures.
COLORS: dict[str, str] = {
    # estimators
    "atp": "#E69F00", "qkfix": "#0072B2", "exact": "#000000", "ig": "#CC79A7",
    # regions of a trace
    "question": "#999999", "thinking": "#0072B2", "answer": "#009E73",
    # backtracking / wrap-up words and controls
    "Wait": "#D55E00", "Hmm": "#CC79A7", "Alternatively": "#009E73", "But wait": "#E69F00",
    "So": "#56B4E9", "Therefore": "#0072B2",
    "none": "#999999", "random": "#56B4E9", "random unused": "#009E73",
    # groups
    "wrong": "#D55E00", "correct": "#009E73", "mix": "#000000",
}

#: rcParams of every mechthink figure (sizes in points for figures about 10-13 in wide, shown
#: ~900 px wide: 11 pt text stays >= ~8 px high).
RC: dict[str, Any] = {
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.titleweight": "bold",
    "axes.labelsize": 11,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "legend.fontsize": 9.5,
    "legend.frameon": False,
    "figure.titlesize": 14,
    "figure.titleweight": "bold",
    "figure.constrained_layout.use": True,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.25,
    "grid.linewidth": 0.6,
    "lines.linewidth": 2.0,
    "lines.markersize": 5,
    "axes.prop_cycle": mpl.cycler(color=list(OKABE_ITO)),
    "image.cmap": "viridis",
    "savefig.dpi": 130,
    "svg.fonttype": "none",
}


def styled(fn: F) -> F:
    """Run a plot function under :data:`RC` (artists take their sizes when they are made), then
    apply the rules every figure follows (:func:`finalize`)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with mpl.rc_context(RC):
            out = fn(*args, **kwargs)
            fig = out if hasattr(out, "get_axes") else getattr(out, "figure", None)
            if fig is not None and hasattr(fig, "get_axes"):
                finalize(fig)
            return out

    return cast(F, wrapper)


#: Axis labels that name integer quantities (their ticks never show half steps): labels that
#: start with one of these words, or mention a budget or extensions.
_INTEGER_START = ("layer", "instance", "step", "head", "number of", "kinds", "k-th", "sentence", "position", "token index")
_INTEGER_ANYWHERE = ("budget", "extensions")


def finalize(fig: Any) -> None:
    """Rules for every axes of a figure: heatmaps (axes with images) get no grid and integer
    ticks; axes whose label names an integer quantity (layer, instance, step, budget, …) get
    integer ticks. Explicitly set ticks are left alone. Idempotent."""
    from matplotlib.ticker import AutoLocator

    for ax in fig.get_axes():
        heat = bool(ax.images)
        if heat:
            ax.grid(False)
        for axis in (ax.xaxis, ax.yaxis):
            label = axis.get_label().get_text().lower()
            integer = label.startswith(_INTEGER_START) or any(w in label for w in _INTEGER_ANYWHERE)
            if isinstance(axis.get_major_locator(), AutoLocator) and (heat or integer):
                axis.set_major_locator(MaxNLocator(integer=True))


def color_for(role: str, index: int = 0) -> str:
    """The fixed colour of a role (method, region, word, group), else the palette's ``index``-th.

    >>> color_for("qkfix"), color_for("random(Wait)"), color_for("something else", 1)
    ('#0072B2', '#56B4E9', '#56B4E9')
    """
    key = role.strip()
    return COLORS.get(key, COLORS.get(key.split("(")[0].strip(), OKABE_ITO[index % len(OKABE_ITO)]))


def integer_axis(ax: Axes, axis: str = "x") -> None:
    """Integer ticks only (layers, instance indices, counts): no half steps."""
    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_locator(MaxNLocator(integer=True))


def token_axis(ax: Axes, labels: Sequence[str], max_labels: int = 40, axis: str = "x", keep: Sequence[int] = ()) -> None:
    """Horizontal token labels, thinned to at most ``max_labels`` (always keeping ``keep``).

    Labels are shown with their whitespace visible (``␣`` for a leading space, ``⏎`` for a
    newline) and clipped to 10 characters.
    """
    n = len(labels)
    step = max(1, -(-n // max_labels))
    shown = sorted(set(range(0, n, step)) | {i for i in keep if 0 <= i < n})
    text = [_visible(labels[i]) for i in shown]
    if axis == "x":
        ax.set_xticks(shown, text, rotation=0, fontsize=8 if len(shown) > 20 else 9)
    else:
        ax.set_yticks(shown, text, fontsize=8 if len(shown) > 20 else 9)


def _visible(tok: str) -> str:
    tok = tok.replace("\n", "⏎").replace("\t", "⇥")
    if tok.startswith(" "):
        tok = "␣" + tok[1:]
    return tok if len(tok) <= 10 else tok[:9] + "…"


def value_labels(ax: Axes, xs: Sequence[float | int], values: Sequence[float | int], errors: Sequence[float | int] | None = None,
                 fmt: str = "{:.2f}") -> None:
    """Write each bar's value above the bar and its error bar (never under the error bar)."""
    errs = list(errors) if errors is not None else [0.0] * len(values)
    top = max((v + e for v, e in zip(values, errs)), default=1.0)
    pad = 0.02 * (top if top > 0 else 1.0)
    for x, v, e in zip(xs, values, errs):
        ax.text(x, v + e + pad, fmt.format(v), ha="center", va="bottom", fontsize=9)
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, max(hi, top + 8 * pad))
