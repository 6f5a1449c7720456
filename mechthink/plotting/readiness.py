"""Figures for answer readiness: probe AUROC by layer, early-exit Pareto curves, the confidence
trajectory heatmap (layer x step), labels of one trace, first firing vs ground truth.

Draws what :mod:`mechthink.readiness` computed; nothing here recomputes. Figures live on their
own Agg canvas (no pyplot, no global state) and are drawn under :func:`styled`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure, FigureBase

from mechthink.plotting.base import new_figure
from mechthink.plotting.style import category_axis, color_for, integer_axis, styled, value_labels

if TYPE_CHECKING:
    from mechthink.readiness import (
        FiringAgreement,
        ParetoResult,
        ProbeCV,
        ReadinessDataset,
        ReadinessLabels,
        ReadinessProbe,
        ReadinessStudy,
        TrajectoryMap,
    )

__all__ = [
    "plot_auroc",
    "plot_firing",
    "plot_labels",
    "plot_pareto",
    "plot_probe_weights",
    "plot_readiness",
    "plot_ready_by_step",
    "plot_trajectory_map",
]

#: Display names of the policy families.
POLICY_NAMES = {"probe": "probe ≥ t", "confidence": "forced-answer p ≥ t", "answer_k": "answer written k×",
                "backtrack": "backtrack after answer", "budget": "token budget"}


def _axes(ax: Axes | None, size: tuple[float, float]) -> tuple[FigureBase, Axes]:
    if ax is None:
        fig = new_figure(*size)
        return fig, fig.add_subplot()
    return ax.figure, ax


def _layer_ticks(ax: Axes, layers: Sequence[str], axis: str = "x", max_labels: int = 12) -> None:
    """Layer labels (``pre_3``, ``post_29``) on ``axis``, thinned to at most ``max_labels`` and to
    the room the axes have, the last layer always shown."""
    category_axis(ax, [name.replace("resid_", "") for name in layers], axis=axis, thin=True, keep=[len(layers) - 1],
                  max_labels=max_labels)


def _bars(ax: Axes, xs: Sequence[int], heights: Sequence[float | int], colors: Sequence[str], xlabel: str,
          ylabel: str) -> None:
    ax.bar(list(xs), list(heights), color=list(colors))
    integer_axis(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


@styled
def plot_auroc(cvs: Sequence["ProbeCV"], ax: Axes | None = None, title: str | None = None) -> FigureBase:
    """AUROC of the readiness probes by layer, one line per pooling, with bootstrap intervals."""
    fig, ax = _axes(ax, (6.5, 4.0))
    for i, cv in enumerate(cvs):
        x = list(range(len(cv.layers)))
        c = color_for(cv.pool, i)
        ax.fill_between(x, cv.ci[:, 0].tolist(), cv.ci[:, 1].tolist(), color=c, alpha=0.2, lw=0)
        ax.plot(x, cv.auroc.tolist(), marker="o", color=c, label=f"{cv.pool} (best {float(cv.auroc.max()):.3f})")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    _layer_ticks(ax, cvs[0].layers)
    ax.set_xlabel("residual stream")
    ax.set_ylabel("AUROC (held-out folds)")
    low = min([0.4] + [float(v) for cv in cvs for v in cv.ci[:, 0].nan_to_num(1.0)])
    ax.set_ylim(max(0.0, low - 0.03), 1.02)
    ax.legend(loc="best")
    ax.set_title(title or "readiness probe by layer")
    return fig


@styled
def plot_pareto(
    pareto: "ParetoResult", ax: Axes | None = None, title: str | None = None, max_loss: float = 0.01,
    chosen: dict[str, Any] | None = None,
) -> FigureBase:
    """Accuracy against the share of thinking tokens saved, one line per policy family.

    The baseline (finish the thinking) is the point at 0 % saved; the dashed line is the
    baseline minus ``max_loss``; ``chosen`` rows (settings picked elsewhere) are ringed.
    """
    fig, ax = _axes(ax, (6.5, 4.0))
    families = list(dict.fromkeys(r["policy"] for r in pareto.rows))
    for i, fam in enumerate(families):
        pts = sorted((100 * r["saved"], 100 * r["accuracy"]) for r in pareto.rows if r["policy"] == fam)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3.5, color=color_for(fam, i),
                label=POLICY_NAMES.get(fam, fam))
        row = (chosen or {}).get(fam)
        if row is not None:
            ax.plot([100 * row["saved"]], [100 * row["accuracy"]], marker="o", ms=10, mfc="none",
                    color=color_for(fam, i))
    base = 100 * pareto.baseline_accuracy
    ax.plot([0], [base], marker="*", ms=12, color="black", label="finish thinking", ls="none")
    ax.axhline(base - 100 * max_loss, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("thinking tokens saved (%)")
    ax.set_ylabel("accuracy (%)")
    ax.set_xlim(-3, 100)
    ax.legend(loc="best", fontsize=8.5)
    ax.set_title(title or f"early exit on {pareto.n_episodes} held-out problems")
    return fig


@styled
def plot_trajectory_map(tmap: "TrajectoryMap", ax: Axes | None = None, title: str | None = None) -> FigureBase:
    """Mean log p(final answer) as a layer x step heatmap; the probe's first firing marked."""
    fig, ax = _axes(ax, (6.5, 4.0))
    im = ax.imshow(tmap.mean.numpy(), aspect="auto", origin="lower", cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="log p(final answer)")
    step = max(1, -(-len(tmap.offsets) // 12))
    shown = list(range(0, len(tmap.offsets), step))
    ax.set_xticks(shown, [str(tmap.offsets[k]) for k in shown])
    _layer_ticks(ax, tmap.layers, axis="y")
    if tmap.mark is not None and tmap.offsets[0] <= tmap.mark <= tmap.offsets[-1]:
        col = round(tmap.mark)
        if col in tmap.offsets:
            ax.axvline(tmap.offsets.index(col), color="white", lw=1.5, ls="--")
    ax.set_xlabel("step − probe's first firing" if tmap.align == "first_fire" else "step")
    ax.set_ylabel("layer (lens)")
    ax.grid(False)
    ax.set_title(title or f"{tmap.lens} lens: log p(final answer)")
    return fig


@styled
def plot_labels(labels: "ReadinessLabels", ax: Axes | None = None, title: str | None = None) -> FigureBase:
    """One trace: forced-answer confidence by step, ready boundaries filled, correct ones ringed."""
    fig, ax = _axes(ax, (6.5, 3.5))
    x = list(range(labels.n_steps))
    conf = labels.confidence.tolist()
    ax.plot(x, conf, color="grey", lw=1.2)
    ready = labels.ready.tolist()
    ax.scatter([i for i in x if ready[i]], [conf[i] for i in x if ready[i]], color=color_for("correct"), label="ready",
               zorder=3)
    ax.scatter([i for i in x if not ready[i]], [conf[i] for i in x if not ready[i]], color=color_for("wrong"),
               label="not ready", zorder=3)
    if labels.correct is not None:
        ok = labels.correct.tolist()
        ax.scatter([i for i in x if ok[i]], [conf[i] for i in x if ok[i]], s=120, facecolors="none",
                   edgecolors="black", label="= gold", zorder=4)
    integer_axis(ax)
    ax.set_ylim(-0.05, 1.1)
    ax.set_xlabel("step boundary")
    ax.set_ylabel("forced-answer probability")
    ax.legend(loc="lower right")
    ax.set_title(title or f"{labels.trace_id}: final answer {labels.final_answer}")
    return fig


@styled
def plot_ready_by_step(dataset: "ReadinessDataset", ax: Axes | None = None, title: str | None = None) -> FigureBase:
    """Fraction of boundaries labelled ready, by step index."""
    fig, ax = _axes(ax, (6.5, 3.5))
    n: Counter[int] = Counter(dataset.steps)
    k: Counter[int] = Counter(s for s, r in zip(dataset.steps, dataset.ready.tolist()) if r)
    steps = sorted(n)
    frac = [k[s] / n[s] for s in steps]
    _bars(ax, steps, frac, [color_for("thinking")] * len(steps), "step boundary", "fraction ready")
    value_labels(ax, [float(s) for s in steps], frac)
    ax.set_title(title or f"readiness by step ({len(set(dataset.problems))} problems)")
    return fig


@styled
def plot_probe_weights(probe: "ReadinessProbe", ax: Axes | None = None, title: str | None = None) -> FigureBase:
    """Norm of each layer's probe weight; the layer :meth:`predict` uses is highlighted."""
    fig, ax = _axes(ax, (6.5, 3.5))
    norms = probe.weight.norm(dim=-1).tolist()
    colors = [color_for("answer") if i == probe.layer else color_for("none") for i in range(len(norms))]
    _bars(ax, list(range(len(norms))), norms, colors, "residual stream", "‖weight‖")
    _layer_ticks(ax, probe.layers)
    ax.set_title(title or f"readiness probe weights ({probe.pool})")
    return fig


@styled
def plot_firing(agreement: "FiringAgreement", ax: Axes | None = None, title: str | None = None) -> FigureBase:
    """Histogram of the probe's first firing minus the ground-truth step."""
    fig, ax = _axes(ax, (6.5, 3.5))
    offs = Counter(f - t for f, t in zip(agreement.first_fire, agreement.truth) if f is not None and t is not None)
    never = sum(f is None and t is not None for f, t in zip(agreement.first_fire, agreement.truth))
    xs = sorted(offs)
    colors = [color_for("correct") if abs(x) <= agreement.tolerance else color_for("wrong") for x in xs]
    _bars(ax, xs, [offs[x] for x in xs], colors, "first firing − ground-truth step", "traces")
    ax.set_title(title or f"within {agreement.tolerance} step: {agreement.fraction:.0%} (never fired: {never})")
    return fig


@styled
def plot_readiness(study: "ReadinessStudy", title: str | None = None) -> Figure:
    """The analysis figure: AUROC by layer, Pareto curves, and the logit / tuned lens heatmaps."""
    fig = new_figure(13, 8.5)
    axes = fig.subplots(2, 2)
    plot_auroc(list(study.cv.values()), ax=axes[0, 0])
    plot_pareto(study.evaluation, ax=axes[0, 1], max_loss=study.max_loss, chosen=study.chosen)
    for ax, name in zip(axes[1], ("logit", "tuned")):
        if name in study.maps:
            plot_trajectory_map(study.maps[name], ax=ax)
        elif study.agreement is not None:
            plot_firing(study.agreement, ax=ax)
        else:
            ax.set_axis_off()
    if title:
        fig.suptitle(title)
    return fig
