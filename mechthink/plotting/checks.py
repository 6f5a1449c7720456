"""Layout checks of a drawn figure: overlapping tick labels and text outside the canvas.

Matplotlib reports every text's bounding box once the figure is drawn
(``Artist.get_window_extent``); a figure passes when no two visible tick labels of one axis
overlap and no visible text leaves the canvas. Used by the tests on every plot function.
"""

from __future__ import annotations

from typing import Any

__all__ = ["layout_problems"]


def _boxes_overlap(a: Any, b: Any, tol: float) -> bool:
    return bool(min(a.x1, b.x1) - max(a.x0, b.x0) > tol and min(a.y1, b.y1) - max(a.y0, b.y0) > tol)


def _overlapping_labels(fig: Any, renderer: Any, tol: float) -> list[str]:
    """Titles, the suptitle and axis labels that run into each other, and legends that cover
    text written in their axes (value labels)."""
    labels = []
    if getattr(fig, "_suptitle", None) is not None and fig._suptitle.get_text().strip():
        labels.append(("suptitle", fig._suptitle))
    for i, ax in enumerate(fig.get_axes()):
        if not ax.axison:
            continue
        for t in (ax.title, ax._left_title, ax._right_title):
            if t.get_visible() and t.get_text().strip():
                labels.append((f"axes {i} title", t))
        for name, lab in (("xlabel", ax.xaxis.label), ("ylabel", ax.yaxis.label)):
            if lab.get_visible() and lab.get_text().strip():
                labels.append((f"axes {i} {name}", lab))
    boxes = [(n, t, t.get_window_extent(renderer)) for n, t in labels]
    out = []
    for k, (n1, t1, b1) in enumerate(boxes):
        for n2, t2, b2 in boxes[k + 1 :]:
            if _boxes_overlap(b1, b2, tol):
                out.append(f"{n1} {t1.get_text()[:30]!r} and {n2} {t2.get_text()[:30]!r} overlap")
    for i, ax in enumerate(fig.get_axes()):
        legend = ax.get_legend()
        if legend is None or not legend.get_visible():
            continue
        lb = legend.get_window_extent(renderer)
        for t in ax.texts:
            if t.get_visible() and t.get_text().strip() and _boxes_overlap(lb, t.get_window_extent(renderer), tol):
                out.append(f"axes {i}: the legend covers the text {t.get_text()[:30]!r}")
    return out


def _visible_texts(artists: Any) -> list[Any]:
    return [t for t in artists if t.get_visible() and t.get_text().strip()]


def layout_problems(fig: Any, tolerance_px: float = 1.0) -> list[str]:
    """Every layout problem of ``fig`` as one line each (an empty list when it is clean).

    Checks, after drawing with the figure's own canvas: (1) tick labels of the same axis that
    overlap one another; (2) any visible text (titles, labels, tick labels, legends, annotations)
    whose box leaves the figure canvas.
    """
    canvas = fig.canvas
    canvas.draw()
    renderer = canvas.get_renderer()
    width, height = canvas.get_width_height()
    problems: list[str] = []
    tick_texts: set[int] = set()
    in_view: list[Any] = []
    for i, ax in enumerate(fig.get_axes()):
        for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            lo, hi = sorted(axis.get_view_interval())
            labels = []
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                for lab in (tick.label1, tick.label2):
                    tick_texts.add(id(lab))
                    shown = ax.axison and axis.get_visible() and lab.get_visible()
                    if shown and lab.get_text().strip() and lo - 1e-9 <= tick.get_loc() <= hi + 1e-9:
                        labels.append(lab)
            in_view += labels
            boxes = sorted(((t, t.get_window_extent(renderer)) for t in labels),
                           key=lambda tb: tb[1].x0 if name == "x" else tb[1].y0)
            for (t1, b1), (t2, b2) in zip(boxes, boxes[1:]):
                ox = min(b1.x1, b2.x1) - max(b1.x0, b2.x0)
                oy = min(b1.y1, b2.y1) - max(b1.y0, b2.y0)
                if ox > tolerance_px and oy > tolerance_px:
                    problems.append(f"axes {i} ({ax.get_title()[:40]!r}): {name} tick labels {t1.get_text()!r} and "
                                    f"{t2.get_text()!r} overlap")
    from matplotlib.text import Text

    others = [t for t in _visible_texts(fig.findobj(Text)) if id(t) not in tick_texts]
    problems += _overlapping_labels(fig, renderer, tolerance_px)
    for t in in_view + others:
        try:
            b = t.get_window_extent(renderer)
        except (RuntimeError, ValueError):
            continue
        if b.width == 0 and b.height == 0:
            continue
        if b.x0 < -tolerance_px or b.y0 < -tolerance_px or b.x1 > width + tolerance_px or b.y1 > height + tolerance_px:
            problems.append(f"text {t.get_text()[:40]!r} leaves the canvas ({b.x0:.0f},{b.y0:.0f})-({b.x1:.0f},{b.y1:.0f}) "
                            f"of {width}x{height}")
    return problems
