"""Small statistics shared by the techniques: rank correlation, bootstrap intervals, paired
comparisons over seeds, monotonicity.

Spearman's rho comes from scipy (``scipy.stats.spearmanr``); bootstrap intervals resample the
units given (problems, traces), never the seeds inside them (Efron & Tibshirani 1993).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["PairedChange", "bootstrap_ci", "is_monotonic", "mean", "paired_change", "spearman"]


def mean(values: Sequence[float]) -> float:
    """The mean of ``values`` (0.0 for an empty sequence, as the analyses report it)."""
    return sum(values) / max(1, len(values))


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation of two tensors of the same shape (flattened).

    >>> spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 40.0]))
    1.0
    """
    from scipy.stats import spearmanr

    if a.shape != b.shape:
        raise ValueError(f"spearman: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    return float(spearmanr(a.flatten().numpy(), b.flatten().numpy()).statistic)


def bootstrap_ci(
    per_unit: Float[Tensor, " unit"], n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``per_unit`` (one value per resampled unit).

    Resamples ``n_boot`` times with replacement from a generator seeded with ``seed``; the
    interval is the ``(1 - level) / 2`` and ``(1 + level) / 2`` order statistics.
    """
    if per_unit.ndim != 1 or len(per_unit) == 0:
        raise ValueError(f"bootstrap_ci: need a non-empty 1-d tensor, got shape {tuple(per_unit.shape)}")
    if not 0 < level < 1:
        raise ValueError(f"bootstrap_ci: level={level} must be in (0, 1)")
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(len(per_unit), (n_boot, len(per_unit)), generator=g)
    boots = per_unit[idx].mean(1).sort().values
    lo = int(round((1 - level) / 2 * n_boot)) - 1
    hi = int(round((1 + level) / 2 * n_boot)) - 1
    return float(boots[max(lo, 0)]), float(boots[min(hi, n_boot - 1)])


@dataclass(frozen=True)
class PairedChange:
    """The change of a per-(seed, unit) outcome between a condition and a baseline.

    Attributes:
        mean: Mean change over seeds and units.
        ci95: Bootstrap interval over units of the mean change.
        lost: Pairs where the condition is lower.
        gained: Pairs where it is higher.
        n_seeds: Seeds compared.
    """

    mean: float
    ci95: tuple[float, float]
    lost: int
    gained: int
    n_seeds: int


def paired_change(
    condition: Float[Tensor, "seed unit"], baseline: Float[Tensor, "seed2 unit"], seed: int = 0, n_boot: int = 2000
) -> PairedChange:
    """Compare ``condition`` with ``baseline`` on the same (seed, unit) pairs.

    ``baseline`` may hold more seeds than ``condition``; its first ``len(condition)`` rows are
    the pairs (the same seeds). The interval resamples units (problems), averaging over seeds.
    """
    if condition.shape[1] != baseline.shape[1] or condition.shape[0] > baseline.shape[0]:
        raise ValueError(
            f"paired_change: condition {tuple(condition.shape)} and baseline {tuple(baseline.shape)} "
            "need the same units and at least as many baseline seeds"
        )
    d = condition - baseline[: len(condition)]
    return PairedChange(float(d.mean()), bootstrap_ci(d.mean(0), n_boot=n_boot, seed=seed),
                        int((d < 0).sum()), int((d > 0).sum()), int(len(condition)))


def is_monotonic(values: Sequence[float], increasing: bool = True) -> bool:
    """Whether ``values`` never decrease (or never increase).

    >>> is_monotonic([0.1, 0.1, 0.5]), is_monotonic([0.3, 0.2])
    (True, False)
    """
    pairs = list(zip(values, values[1:]))
    return all(a <= b for a, b in pairs) if increasing else all(a >= b for a, b in pairs)
