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
import math
import textwrap
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

import matplotlib as mpl
from matplotlib.axes import Axes
from matplotlib.ticker import MaxNLocator

__all__ = [
    "COLORS",
    "OKABE_ITO",
    "RC",
    "category_axis",
    "color_for",
    "finalize",
    "integer_axis",
    "styled",
    "token_axis",
    "value_labels",
]

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
    integer ticks; titles wider than their axes (the suptitle: than the figure) are wrapped onto
    more lines. Explicitly set ticks are left alone. Idempotent."""
    from matplotlib.ticker import AutoLocator

    _fit_titles(fig)
    for ax in fig.get_axes():
        heat = bool(ax.images)
        if heat:
            ax.grid(False)
        for axis in (ax.xaxis, ax.yaxis):
            label = axis.get_label().get_text().lower()
            integer = label.startswith(_INTEGER_START) or any(w in label for w in _INTEGER_ANYWHERE)
            if isinstance(axis.get_major_locator(), AutoLocator) and (heat or integer):
                axis.set_major_locator(MaxNLocator(integer=True))


def _renderer(fig: Any) -> Any:
    """The figure canvas's renderer (text sizes without drawing), or None on canvases without one."""
    get = getattr(getattr(fig, "canvas", None), "get_renderer", None)
    try:
        return get() if get is not None else None
    except (AttributeError, TypeError, RuntimeError):
        return None


def _wrap(text: str, width: int) -> str:
    """Each line of ``text`` wrapped at ``width`` characters (its own line breaks kept)."""
    return "\n".join(textwrap.fill(line, width) if line.strip() else line for line in text.split("\n"))


def _fit_text(artist: Any, width_px: float | int, renderer: Any) -> None:
    """Wrap a text artist onto more lines until its box is at most ``width_px`` wide."""
    original = artist.get_text()
    if not original.strip() or width_px <= 0:
        return
    longest = max(len(line) for line in original.split("\n"))
    chars = longest
    for _ in range(8):
        width = artist.get_window_extent(renderer).width
        if width <= width_px or chars <= 12:
            return
        chars = max(12, min(chars - 1, int(chars * width_px / width)))
        artist.set_text(_wrap(original, chars))


def _fit_titles(fig: Any) -> None:
    """Titles no wider than their axes, the suptitle no wider than the figure (wrapped)."""
    renderer = _renderer(fig)
    if renderer is None:
        return
    fig_px = fig.bbox.width
    for ax in fig.get_axes():
        if ax.axison and ax.title.get_visible():
            _fit_text(ax.title, ax.get_position().width * fig_px, renderer)
    sup = getattr(fig, "_suptitle", None)
    if sup is not None:
        _fit_text(sup, 0.96 * fig_px, renderer)


def _text_px(fig: Any, renderer: Any, text: str, size: float | int) -> tuple[float, float]:
    """Width and height in pixels of ``text`` at ``size`` points (an estimate without a renderer)."""
    from matplotlib.font_manager import FontProperties

    lines = text.split("\n")
    if renderer is None:
        return 0.6 * size * max(map(len, lines)) * fig.dpi / 72, 1.2 * size * len(lines) * fig.dpi / 72
    prop = FontProperties(size=size)
    sizes = [renderer.get_text_width_height_descent(line or " ", prop, ismath=False) for line in lines]
    return max(w for w, _, _ in sizes), 1.2 * size * len(lines) * fig.dpi / 72


def category_axis(ax: Axes, labels: Sequence[str], axis: str = "x", fontsize: float | int | None = None, max_lines: int = 2,
                  thin: bool | None = None, keep: Sequence[int] = (), max_labels: int | None = None) -> None:
    """One tick per category at 0, 1, …, its label fitted to the room a category has.

    On the x axis labels stay horizontal when they fit (wrapped onto up to ``max_lines`` lines),
    else turn vertical; numbers and other short labels (or all, with ``thin=True``) are thinned
    to every k-th instead, always keeping ``keep``. On the y axis labels are thinned. The room
    is measured on the axes as they are placed now (before the layout engine runs); at most
    ``max_labels`` labels are shown when given.
    """
    from matplotlib.font_manager import FontProperties

    n = len(labels)
    size = FontProperties(size=fontsize if fontsize is not None else mpl.rcParams[f"{axis}tick.labelsize"]).get_size_in_points()
    fig = ax.figure
    renderer = _renderer(fig)
    box = ax.get_position()
    span = box.width * fig.bbox.width if axis == "x" else box.height * fig.bbox.height
    slot = 0.9 * span / max(n, 1)
    line = 1.2 * size * fig.dpi / 72
    text = [str(t) for t in labels]
    widths = [_text_px(fig, renderer, t, size)[0] for t in text]
    rotation = 0
    if axis == "y":
        step = max(1, math.ceil(1.1 * line / slot))
    elif max(widths, default=0.0) <= slot:
        step = 1
    else:
        short = all(len(t) <= 3 or t.strip().lstrip("-").isdigit() for t in text)
        wrapped = [] if thin or short else _wrap_all(fig, renderer, text, widths, size, slot, max_lines)
        if wrapped:
            text, step = wrapped, 1
        elif thin or short:
            step = max(1, math.ceil(1.1 * max(widths) / slot))
        else:
            rotation, step = 90, max(1, math.ceil(1.1 * line / slot))
    if max_labels is not None:
        step = max(step, math.ceil(n / max(1, max_labels)))
    shown = _thinned(n, step, keep)
    setter = ax.set_xticks if axis == "x" else ax.set_yticks
    setter([float(i) for i in shown], [text[i] for i in shown], fontsize=size, rotation=rotation,
           **({"ha": "center"} if axis == "x" else {}))


def _wrap_all(fig: Any, renderer: Any, texts: Sequence[str], widths: Sequence[float], size: float | int,
              width_px: float, max_lines: int) -> list[str]:
    """Every text wrapped onto at most ``max_lines`` lines no wider than ``width_px``, or [] when
    one of them cannot be (a word wider than that, or more lines needed)."""
    out = []
    for text, width in zip(texts, widths):
        chars = min(len(text), int(len(text) * width_px / max(width, 1e-9)) + 1)
        while True:
            lines = textwrap.wrap(text, max(1, chars), break_long_words=False)
            if chars < 1 or len(lines) > max_lines:
                return []
            if width <= width_px or _text_px(fig, renderer, "\n".join(lines), size)[0] <= width_px:
                break
            chars -= 1
        out.append("\n".join(lines) if width > width_px else text)
    return out


def _thinned(n: int, step: int, keep: Sequence[int] = ()) -> list[int]:
    """Every ``step``-th of ``range(n)`` plus ``keep``; regular ticks closer than ``step`` to a
    kept one are dropped (their labels would collide)."""
    kept = {i for i in keep if 0 <= i < n}
    regular = [i for i in range(0, n, step) if all(abs(i - k) >= step for k in kept - {i})]
    return sorted(set(regular) | kept)


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
    shown = _thinned(n, step, keep)
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
