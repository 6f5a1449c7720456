"""HSIC mutual-information trajectories and MI-peak detection for reasoning traces.

Method: per generation step t, an HSIC-based proxy of the mutual information between the model's
representation h_t and the representation h_y of the gold solution; steps whose MI is an outlier
are "MI peaks", and the tokens generated there are "thinking tokens".
Source: Qian et al. 2025, "Demystifying Reasoning Dynamics with Mutual Information: Thinking
Tokens are Information Peaks in LLM Reasoning" (arXiv 2506.02867; code github.com/ChnQ/MI-Peaks,
``src/mi_estimators.py``, ``src/cal_mi.py``, ``src/generate_*activation.py``,
``src/plot_mi_peaks.ipynb``).

What the reference code does (read from ChnQ/MI-Peaks at HEAD):

* **Estimator** (``hsic_normalized_cca`` with ``sigma=50``, Gaussian kernel): the two d-dimensional
  vectors are reshaped to ``(d, 1)``, i.e. the *d hidden coordinates are treated as d scalar
  samples*.  With ``m = d``, ``K_ij = exp(-(x_i - x_j)^2 / (2 sigma^2))`` (the code's
  ``variance = 2 sigma^2 * X.size(1)`` with ``X.size(1) == 1``), kernels are cast to float32,
  then centred **on one side only**: ``Kc = K @ H`` with ``H = I - 11^T/m`` (not ``H K H``).
  With ``eps = 1e-5``::

      R_x = Kc_x @ inv(Kc_x + eps * m * I)
      R_y = Kc_y @ inv(Kc_y + eps * m * I)
      MI  = sum(R_x * R_y.T) = trace(R_x @ R_y)

  No further normalisation is applied (the "normalised" in the name refers to the regularised
  inverses, i.e. the nHSIC / kernel-CCA form of Fukumizu et al.).
* **h_t**: a forward hook on ``model.model.layers[L]`` (``--layers 31``, the last decoder layer of
  R1-Distill-Llama-8B, i.e. ``blocks.{n_layers-1}.hook_resid_post`` before the final norm) keeps
  ``hidden[0, -1]`` on every forward call of greedy ``generate`` (512 new tokens, raw
  ``tokenizer.encode(problem)`` prompt, no chat template).  Call 0 is the prefill (last prompt
  position); call i is the KV-cached step fed with generated token i-1.  So step i's
  representation sits at position ``P - 1 + i`` and the step *produces* generated token i.
* **h_y**: a separate forward over the reference *solution text alone* (``tokenizer.encode(
  solution)``, no question, no chat template), same layer, **last token** (``hidden[0, -1]``).
* **Peaks**: the notebook takes the top-20 steps by MI ("approximately take top-20"); the paper
  text defines peaks as outliers ``m_t > Q3 + 1.5 * IQR``.  The token attached to a peak at step
  i is ``token_ids[i]``, the token generated at that step (the notebook then keeps tokens
  matching ``^[a-zA-Z]+$`` after stripping before counting).
* **AOM**: not defined anywhere in the released code; see :class:`PeakStats` for the definition
  used here.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from collections import Counter
from dataclasses import asdict, dataclass, field
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from einops import rearrange, reduce
from jaxtyping import Float, Int
from torch import Tensor

from mechthink.progress import track
from mechthink.results import Result
from mechthink.stats import mean

__all__ = [
    "EventEnrichment",
    "MIExample",
    "PeakStats",
    "PeakSummary",
    "event_enrichment",
    "mi_trajectories",
    "peak_summary",
    "hsic_mi_paper",
    "hsic_mi_paper_batch",
    "hsic",
    "nhsic",
    "median_sigma",
    "detect_peaks",
    "peak_stats",
    "MITrajectory",
    "mi_trajectory",
    "mi_trajectory_from_acts",
    "peak_token_counts",
]

PAPER_SIGMA = 50.0
PAPER_EPS = 1e-5
PAPER_TOPK = 20

# ---------------------------------------------------------------------------------------------
# The paper's per-vector estimator
# ---------------------------------------------------------------------------------------------


def _gaussian_1d_kernel(
    v: Float[Tensor, "*batch d"], sigma: float
) -> Float[Tensor, "*batch d d"]:
    """Gaussian kernel over the coordinates of ``v`` treated as scalar samples."""
    diff = rearrange(v, "... i -> ... i 1") - rearrange(v, "... j -> ... 1 j")
    return torch.exp(-(diff * diff) / (2.0 * sigma * sigma))


def _require_finite(where: str, *tensors: Tensor) -> None:
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise ValueError(f"{where}: inputs must be finite (NaN/inf found); drop or impute those samples first")


def hsic_mi_paper(
    x: Float[Tensor, "d"],
    y: Float[Tensor, "d"],
    sigma: float = PAPER_SIGMA,
    eps: float = PAPER_EPS,
    dtype: torch.dtype = torch.float64,
) -> float:
    """The paper's per-vector MI proxy, a literal transcription of ``hsic_normalized_cca``.

    Treats the ``d`` coordinates of ``x`` and ``y`` as ``d`` paired scalar samples, exactly as the
    paper's code does (it reshapes each representation to ``(d, 1)``).  With ``m = d``,
    ``K = exp(-(v_i - v_j)^2 / (2 sigma^2))``, right-centred ``Kc = K H``, it returns
    ``sum((Kc_x inv(Kc_x + eps m I)) * (Kc_y inv(Kc_y + eps m I)).T)``.

    The reference code casts the kernels to float32; ``dtype=torch.float32`` matches that
    precision.  The ridge-regularised inverse is ill-conditioned, so float32 values carry errors of
    ~1% (d = 1024, LLM-like activations) up to ~5% (d = 64, large coordinates) against float64,
    which is the default here.

    Args:
        x: Step representation ``h_t``.
        y: Answer representation ``h_y`` (same length as ``x``).
        sigma: Gaussian kernel width (the paper uses 50).
        eps: Ridge; enters as ``eps * d * I`` (the paper uses 1e-5).
        dtype: Computation dtype.

    Returns:
        The MI estimate (a Python float).

    Examples:
        >>> x = torch.tensor([0.0, 1.0, 2.0, 3.0])
        >>> round(hsic_mi_paper(x, x, sigma=1.0), 4), round(hsic_mi_paper(x, torch.tensor([3.0, -1.0, 0.5, 0.5]), sigma=1.0), 4)
        (2.9992, 1.9997)
    """
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D of equal length, got {tuple(x.shape)}, {tuple(y.shape)}")
    if not (sigma > 0):
        raise ValueError(f"sigma={sigma!r} must be a positive number")
    _require_finite("hsic_mi_paper", x, y)
    m = x.shape[0]
    x = x.detach().to(dtype)
    y = y.detach().to(dtype=dtype, device=x.device)
    eye = torch.eye(m, dtype=dtype, device=x.device)
    h = eye - torch.full((m, m), 1.0 / m, dtype=dtype, device=x.device)
    kxc = _gaussian_1d_kernel(x, sigma) @ h
    kyc = _gaussian_1d_kernel(y, sigma) @ h
    rx = kxc @ torch.linalg.inv(kxc + eps * m * eye)
    ry = kyc @ torch.linalg.inv(kyc + eps * m * eye)
    return float((rx * ry.T).sum().item())


def _paper_r_transposed(
    v: Float[Tensor, "*batch d"], sigma: float, eps: float
) -> Float[Tensor, "*batch d d"]:
    """``R^T`` for a batch of vectors, with ``R = K H inv(K H + eps m I)``.

    Uses ``R^T = inv(H K + c I) H K`` (``K`` symmetric, ``c = eps m``), one batched solve, no
    explicit inverse and no ``H`` matmul (``H K`` is ``K`` minus its column means).
    """
    m = v.shape[-1]
    k = _gaussian_1d_kernel(v, sigma)
    hk = k - reduce(k, "... i j -> ... 1 j", "mean")
    del k
    a = hk + (eps * m) * torch.eye(m, dtype=v.dtype, device=v.device)
    return torch.linalg.solve(a, hk)


def hsic_mi_paper_batch(
    xs: Float[Tensor, "n d"],
    y: Float[Tensor, "d"],
    sigma: float = PAPER_SIGMA,
    eps: float = PAPER_EPS,
    dtype: torch.dtype = torch.float64,
    chunk_size: int | None = None,
    max_chunk_bytes: int = 2**30,
) -> Float[Tensor, "n"]:
    """Vectorised :func:`hsic_mi_paper` of many step representations against one answer.

    Same formula as :func:`hsic_mi_paper` (coordinates treated as samples, exactly as the paper's
    code), evaluated for every row of ``xs``: ``R_y`` is built once, and each chunk of rows costs one
    batched ``d x d`` linear solve, ``MI_i = sum(R_{x_i}^T * R_y)``.  Runs on the device of ``xs``;
    rows are processed in chunks because each row needs a few ``d x d`` matrices (for d = 4096 in
    float64 that is ~0.5 GiB per row).

    Args:
        xs: Step representations, one per row.
        y: Answer representation.
        sigma: Gaussian kernel width (paper: 50).
        eps: Ridge, entering as ``eps * d * I`` (paper: 1e-5).
        dtype: Computation dtype (float64 default; the paper computes in float32).
        chunk_size: Rows per batched solve; default from ``max_chunk_bytes``.
        max_chunk_bytes: Memory budget per chunk used when ``chunk_size`` is None.

    Returns:
        MI estimates in ``dtype`` on the device of ``xs``.

    Examples:
        >>> x = torch.tensor([0.0, 1.0, 2.0, 3.0])
        >>> hsic_mi_paper_batch(torch.stack([x, torch.tensor([3.0, -1.0, 0.5, 0.5])]), x, sigma=1.0).round(decimals=4)
        tensor([2.9992, 1.9997], dtype=torch.float64)
    """
    if xs.ndim != 2 or y.ndim != 1 or xs.shape[1] != y.shape[0]:
        raise ValueError(f"expected xs [n, d] and y [d], got {tuple(xs.shape)}, {tuple(y.shape)}")
    if not (sigma > 0):
        raise ValueError(f"sigma={sigma!r} must be a positive number")
    _require_finite("hsic_mi_paper_batch", xs, y)
    n, m = xs.shape
    device = xs.device
    itemsize = torch.empty((), dtype=dtype).element_size()
    if chunk_size is None:
        chunk_size = max(1, int(max_chunk_bytes // (4 * m * m * itemsize)))
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    xs = xs.detach()
    y = y.detach().to(dtype=dtype, device=device)
    ry = _paper_r_transposed(y, sigma, eps).T  # R_y
    out = torch.empty(n, dtype=dtype, device=device)
    for lo in range(0, n, chunk_size):
        chunk = xs[lo : lo + chunk_size].to(dtype)
        rxt = _paper_r_transposed(chunk, sigma, eps)
        out[lo : lo + chunk.shape[0]] = (rxt * ry).sum(dim=(-2, -1))
    return out


# ---------------------------------------------------------------------------------------------
# Population HSIC across samples
# ---------------------------------------------------------------------------------------------


def _sq_dists(z: Float[Tensor, "n d"]) -> Float[Tensor, "n n"]:
    """Pairwise squared Euclidean distances (clamped at 0)."""
    sq = (z * z).sum(-1)
    d2 = rearrange(sq, "i -> i 1") + rearrange(sq, "j -> 1 j") - 2.0 * z @ z.T
    return d2.clamp_min(0.0)


def _median_from_sq_dists(d2: Float[Tensor, "n n"]) -> float:
    n = d2.shape[0]
    if n < 2:
        return 1.0
    iu = torch.triu_indices(n, n, offset=1, device=d2.device)
    vals = d2[iu[0], iu[1]].sqrt()
    med = float(vals.median().item())
    if med <= 0:
        med = float(vals.mean().item())
    return med if med > 0 else 1.0


def median_sigma(z: Float[Tensor, "n d"]) -> float:
    """Median heuristic bandwidth: median pairwise Euclidean distance over distinct pairs.

    Falls back to the mean distance when the median is 0, and to 1.0 when all points coincide.

    Args:
        z: Samples, one per row.

    Returns:
        The bandwidth ``sigma`` for ``exp(-||a - b||^2 / (2 sigma^2))``.

    Examples:
        >>> median_sigma(torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]]))  # distances 5, 5, 10
        5.0
    """
    return _median_from_sq_dists(_sq_dists(z.detach().to(torch.float64)))


def _kernel_matrix(
    z: Float[Tensor, "n d"], kernel: str, sigma: float | None
) -> Float[Tensor, "n n"]:
    if kernel == "linear":
        return z @ z.T
    if kernel == "gaussian":
        d2 = _sq_dists(z)
        s = _median_from_sq_dists(d2) if sigma is None else float(sigma)
        if s <= 0:
            raise ValueError("sigma must be positive")
        return torch.exp(-d2 / (2.0 * s * s))
    raise ValueError(f"unknown kernel {kernel!r}; use 'gaussian' or 'linear'")


def _hsic_from_kernels(k: Float[Tensor, "n n"], l: Float[Tensor, "n n"], unbiased: bool) -> Tensor:
    n = k.shape[0]
    if not unbiased:
        # Gretton et al. 2005: tr(K H L H) / (n - 1)^2, with H K H computed by double centring.
        kc = k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()
        lc = l - l.mean(0, keepdim=True) - l.mean(1, keepdim=True) + l.mean()
        return (kc * lc).sum() / (n - 1) ** 2
    if n < 4:
        raise ValueError("the unbiased estimator needs at least 4 samples")
    # Song et al. 2012, Eq. 5: kernels with zeroed diagonals.
    kt = k - torch.diag_embed(torch.diagonal(k))
    lt = l - torch.diag_embed(torch.diagonal(l))
    term1 = (kt * lt).sum()  # tr(K~ L~), both symmetric
    term2 = kt.sum() * lt.sum() / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (kt.sum(0) * lt.sum(0)).sum()  # 1^T K~ L~ 1
    return (term1 + term2 - term3) / (n * (n - 3))


def _as_2d(z: Tensor) -> Tensor:
    return rearrange(z, "n -> n 1") if z.ndim == 1 else z


def _sigma_pair(sigma: float | tuple[float, float] | None) -> tuple[float | None, float | None]:
    if isinstance(sigma, tuple):
        return sigma[0], sigma[1]
    return sigma, sigma


def hsic(
    x: Float[Tensor, "n *dx"],
    y: Float[Tensor, "n *dy"],
    kernel: Literal["gaussian", "linear"] = "gaussian",
    sigma: float | tuple[float, float] | None = None,
    unbiased: bool = False,
    dtype: torch.dtype = torch.float64,
) -> float:
    """HSIC between two variables observed on ``n`` paired samples (rows).

    Biased estimator (Gretton et al. 2005): ``tr(K H L H) / (n - 1)^2``.  Unbiased estimator
    (Song et al. 2012): ``[tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))``
    with zero-diagonal kernels.  This is the textbook population estimator (samples are rows),
    unlike :func:`hsic_mi_paper`, which treats the coordinates of one vector as samples.

    Args:
        x: Samples of X, shape ``[n, dx]`` (1-D is read as ``dx = 1``).
        y: Paired samples of Y, shape ``[n, dy]``.
        kernel: ``"gaussian"`` (``exp(-||a-b||^2 / (2 sigma^2))``) or ``"linear"``.
        sigma: Gaussian width; a pair gives separate widths for x and y; None uses the median
            heuristic (:func:`median_sigma`) separately for each variable.
        unbiased: Use Song et al.'s unbiased estimator (needs n >= 4).
        dtype: Computation dtype.

    Returns:
        The HSIC estimate.

    Examples:
        >>> a = torch.arange(8.0)
        >>> round(hsic(a, a**2), 4), round(hsic(a, a**2, unbiased=True), 4), hsic(a, a, kernel="linear")
        (0.1031, 0.0842, 36.0)
    """
    x = _as_2d(x.detach()).to(dtype)
    y = _as_2d(y.detach()).to(dtype=dtype, device=x.device)
    _require_finite("hsic", x, y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y need the same number of samples, got {x.shape[0]} and {y.shape[0]}")
    if x.shape[0] < 2:
        raise ValueError("need at least 2 samples")
    sx, sy = _sigma_pair(sigma)
    k = _kernel_matrix(x, kernel, sx)
    l = _kernel_matrix(y, kernel, sy)
    return float(_hsic_from_kernels(k, l, unbiased).item())


def nhsic(
    x: Float[Tensor, "n *dx"],
    y: Float[Tensor, "n *dy"],
    kernel: Literal["gaussian", "linear"] = "gaussian",
    sigma: float | tuple[float, float] | None = None,
    unbiased: bool = False,
    dtype: torch.dtype = torch.float64,
) -> float:
    """Normalised HSIC (kernel CKA): ``HSIC(X, Y) / sqrt(HSIC(X, X) HSIC(Y, Y))``.

    In [0, 1] for the biased estimator (Kornblith et al. 2019, CKA); the unbiased variant can be
    slightly negative under independence.  Returns 0.0 when either self-HSIC is not positive.

    Args:
        x: Samples of X, ``[n, dx]``.
        y: Paired samples of Y, ``[n, dy]``.
        kernel: ``"gaussian"`` or ``"linear"``.
        sigma: As in :func:`hsic`.
        unbiased: Use the unbiased HSIC in numerator and denominator.
        dtype: Computation dtype.

    Returns:
        The normalised HSIC.

    Examples:
        >>> a = torch.arange(8.0)
        >>> round(nhsic(a, a**2), 4), round(nhsic(a, 3 * a + 1, kernel="linear"), 6)
        (0.9283, 1.0)
    """
    x = _as_2d(x.detach()).to(dtype)
    y = _as_2d(y.detach()).to(dtype=dtype, device=x.device)
    _require_finite("hsic", x, y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y need the same number of samples, got {x.shape[0]} and {y.shape[0]}")
    sx, sy = _sigma_pair(sigma)
    k = _kernel_matrix(x, kernel, sx)
    l = _kernel_matrix(y, kernel, sy)
    kl = _hsic_from_kernels(k, l, unbiased)
    kk = _hsic_from_kernels(k, k, unbiased)
    ll = _hsic_from_kernels(l, l, unbiased)
    if kk <= 0 or ll <= 0:
        return 0.0
    return float((kl / torch.sqrt(kk * ll)).item())


# ---------------------------------------------------------------------------------------------
# Peaks
# ---------------------------------------------------------------------------------------------


def detect_peaks(
    mi: Float[Tensor, "step"],
    method: Literal["iqr", "topk"] = "iqr",
    k: int | None = None,
    whis: float = 1.5,
) -> Int[Tensor, "peak"]:
    """Indices of MI peaks, sorted by step.

    ``"iqr"`` (the paper): steps with ``mi > Q3 + whis * (Q3 - Q1)`` (quartiles with linear
    interpolation, as numpy/torch default).  ``"topk"`` (the released notebook): the ``k`` steps
    with the largest MI (``k`` defaults to 20, as in ``plot_mi_peaks.ipynb``; capped at the
    trajectory length).

    Args:
        mi: MI trajectory.
        method: ``"iqr"`` or ``"topk"``.
        k: Number of peaks for ``"topk"``.
        whis: Whisker multiplier for ``"iqr"``.

    Returns:
        Step indices (int64) of the peaks, ascending.

    Examples:
        >>> detect_peaks(torch.tensor([1.0, 1.1, 0.9, 6.0, 1.0, 1.2, 0.8, 1.0]))
        tensor([3])
        >>> detect_peaks(torch.tensor([1.0, 3.0, 2.0, 5.0]), method="topk", k=2)
        tensor([1, 3])
    """
    if mi.ndim != 1:
        raise ValueError("mi must be 1-D")
    n = mi.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=mi.device)
    vals = mi.detach().to(torch.float64)
    if method == "iqr":
        if k is not None:
            raise ValueError("k is only used with method='topk'")
        q = torch.quantile(vals, torch.tensor([0.25, 0.75], dtype=torch.float64, device=vals.device))
        thresh = q[1] + whis * (q[1] - q[0])
        idx = torch.nonzero(vals > thresh).flatten()
    elif method == "topk":
        kk = PAPER_TOPK if k is None else k
        if kk < 0:
            raise ValueError("k must be non-negative")
        idx = torch.topk(vals, min(kk, n)).indices
    else:
        raise ValueError(f"unknown method {method!r}; use 'iqr' or 'topk'")
    return torch.sort(idx).values.to(torch.long)


@dataclass(frozen=True)
class PeakStats:
    """Summary statistics of the peaks of one trajectory (:func:`peak_stats`).

    Attributes:
        count: Number of peaks.
        length: Number of steps.
        ratio: ``count / length`` (the paper reports peaks are 0.5-5% of steps; NaN without steps).
        mean_interval: Mean gap in steps between consecutive peaks (NaN with < 2 peaks).
        mean_mi: Mean MI over all steps (NaN without steps).
        mean_peak_mi: Mean MI at the peaks (NaN without peaks).
        aom: ``mean_peak_mi - mean_mi``, the average amount by which peak MI exceeds the
            trajectory mean.  The released code defines no "AOM" and the paper's text could not
            be consulted here, so this is this library's working definition, not a verified
            reproduction; ``mean_mi`` and ``mean_peak_mi`` are kept so either reading (average
            MI, average MI at peaks) is available.
    """

    count: int
    length: int
    ratio: float
    mean_interval: float
    mean_mi: float
    mean_peak_mi: float
    aom: float


def peak_stats(mi: Float[Tensor, "step"], peaks: Int[Tensor, "peak"]) -> PeakStats:
    """Summary statistics of the peaks of one trajectory.

    Args:
        mi: MI trajectory.
        peaks: Peak step indices (e.g. from :func:`detect_peaks`).

    Returns:
        The :class:`PeakStats`.

    Examples:
        >>> s = peak_stats(torch.tensor([1.0, 5.0, 1.0, 1.0, 7.0, 1.0]), torch.tensor([4, 1]))
        >>> s.count, s.ratio, s.mean_interval, s.mean_mi, s.mean_peak_mi, s.aom
        (2, 0.3333333333333333, 3.0, 2.6666666666666665, 6.0, 3.3333333333333335)
    """
    vals = mi.detach().to(torch.float64).cpu()
    p = torch.sort(peaks.detach().cpu().to(torch.long)).values
    n = int(vals.shape[0])
    count = int(p.shape[0])
    mean_mi = float(vals.mean().item()) if n else math.nan
    mean_peak = float(vals[p].mean().item()) if count else math.nan
    mean_interval = float(torch.diff(p).to(torch.float64).mean().item()) if count >= 2 else math.nan
    return PeakStats(
        count=count,
        length=n,
        ratio=count / n if n else math.nan,
        mean_interval=mean_interval,
        mean_mi=mean_mi,
        mean_peak_mi=mean_peak,
        aom=mean_peak - mean_mi,
    )


# ---------------------------------------------------------------------------------------------
# Trajectories
# ---------------------------------------------------------------------------------------------


def _nan_to_none(v: float | int) -> float | int | None:
    return None if isinstance(v, float) and math.isnan(v) else v


@dataclass
class MITrajectory(Result):
    """MI between each generation step's representation and the gold-answer representation.

    Attributes:
        mi: MI per step.
        positions: Sequence position of the token generated at each step (the representation
            used is resid at ``positions - 1``).
        tokens: The generated token (string) at each step.
        peaks: Step indices of the MI peaks.
        hook: Hook whose activations were used.
        peak_method: How ``peaks`` were found (``"iqr"``, ``"topk"``).
        config: Estimator settings (sigma, eps, answer_repr, ...).
    """

    mi: Float[Tensor, "step"]
    positions: Int[Tensor, "step"]
    tokens: list[str]
    peaks: Int[Tensor, "peak"]
    hook: str = ""
    peak_method: str = "iqr"
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.mi.shape[0]
        if self.positions.shape[0] != n or len(self.tokens) != n:
            raise ValueError("mi, positions and tokens must have the same length")

    def __len__(self) -> int:
        return int(self.mi.shape[0])

    @property
    def peak_tokens(self) -> list[str]:
        """Generated tokens at the peaks, in step order."""
        return [self.tokens[i] for i in self.peaks.tolist()]

    def stats(self) -> PeakStats:
        """:func:`peak_stats` of this trajectory."""
        return peak_stats(self.mi, self.peaks)

    def with_peaks(
        self, method: Literal["iqr", "topk"] = "iqr", k: int | None = None, whis: float = 1.5
    ) -> "MITrajectory":
        """A copy with peaks re-detected by :func:`detect_peaks`."""
        return MITrajectory(
            mi=self.mi,
            positions=self.positions,
            tokens=list(self.tokens),
            peaks=detect_peaks(self.mi, method=method, k=k, whis=whis),
            hook=self.hook,
            peak_method=method,
            config={**self.config, "peak_k": k, "peak_whis": whis},
        )

    def to_frame(self) -> pd.DataFrame:
        """One row per step: ``step, position, token, mi, is_peak``."""
        is_peak = np.zeros(len(self), dtype=bool)
        is_peak[self.peaks.cpu().numpy()] = True
        return pd.DataFrame(
            {
                "step": np.arange(len(self)),
                "position": self.positions.cpu().numpy(),
                "token": list(self.tokens),
                "mi": self.mi.detach().to(torch.float64).cpu().numpy(),
                "is_peak": is_peak,
            }
        )

    def to_json(self, path: str | Path | None = None) -> str:
        """JSON with the trajectory, peaks, statistics and config; also written to ``path``."""
        payload = {
            "hook": self.hook,
            "peak_method": self.peak_method,
            "config": self.config,
            "mi": self.mi.detach().to(torch.float64).cpu().tolist(),
            "positions": self.positions.cpu().tolist(),
            "tokens": list(self.tokens),
            "peaks": self.peaks.cpu().tolist(),
            "peak_tokens": self.peak_tokens,
            "stats": {k: _nan_to_none(v) for k, v in asdict(self.stats()).items()},
        }
        text = json.dumps(payload, default=str)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        return text

    def plot(self, ax: Any = None, **kwargs: Any) -> Any:
        """Plot the trajectory with labelled peaks; see :func:`mechthink.plotting.mi.plot_mi_trajectory`."""
        from mechthink.plotting.mi import plot_mi_trajectory

        return plot_mi_trajectory(self, ax=ax, **kwargs)


def _default_hook(bridge: Any) -> str:
    from mechthink.hooks import hook_name

    return hook_name(int(bridge.cfg.n_layers) - 1, "resid_post")


def _resid(model: Any, tokens: Int[Tensor, "pos"], hook: str, positions: Any = None) -> Float[Tensor, "kept d_model"]:
    from mechthink.hooks import gather

    return gather(model, tokens, [hook], positions=positions, device=tokens.device)[hook][0]


def _token_strings(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    return [tokenizer.decode([int(i)]) for i in ids]


def mi_trajectory_from_acts(
    step_acts: Float[Tensor, "step d_model"],
    answer_act: Float[Tensor, "d_model"],
    positions: Int[Tensor, "step"],
    tokens: list[str],
    *,
    sigma: float = PAPER_SIGMA,
    eps: float = PAPER_EPS,
    dtype: torch.dtype = torch.float64,
    peak_method: Literal["iqr", "topk"] = "iqr",
    k: int | None = None,
    whis: float = 1.5,
    chunk_size: int | None = None,
    hook: str = "",
    config: dict[str, Any] | None = None,
) -> MITrajectory:
    """Build an :class:`MITrajectory` from already-collected activations.

    Args:
        step_acts: Representation used at each generation step.
        answer_act: Gold-answer representation ``h_y``.
        positions: Position of the token generated at each step.
        tokens: Generated token string at each step.
        sigma: Kernel width of :func:`hsic_mi_paper_batch`.
        eps: Ridge of :func:`hsic_mi_paper_batch`.
        dtype: Estimator dtype.
        peak_method: Peak rule for :func:`detect_peaks`.
        k: ``k`` for top-k peaks.
        whis: Whisker for IQR peaks.
        chunk_size: Rows per batched solve.
        hook: Hook name recorded in the result.
        config: Extra settings recorded in the result.

    Returns:
        The trajectory, with MI on CPU as float64.

    Examples:
        >>> acts = torch.tensor([[0.0, 1.0, 2.0, 3.0], [3.0, -1.0, 0.5, 0.5], [0.0, 1.0, 2.0, 2.9]])
        >>> traj = mi_trajectory_from_acts(acts, acts[0], torch.arange(5, 8), [" So", " 2", " Wait"],
        ...                                sigma=1.0, peak_method="topk", k=1)
        >>> traj.peak_tokens, len(traj.to_frame())
        ([' So'], 3)
    """
    mi = hsic_mi_paper_batch(step_acts, answer_act, sigma=sigma, eps=eps, dtype=dtype, chunk_size=chunk_size)
    mi = mi.to(torch.float64).cpu()
    cfg = {"estimator": "paper", "sigma": sigma, "eps": eps, "dtype": str(dtype), "peak_k": k, "peak_whis": whis}
    cfg.update(config or {})
    return MITrajectory(
        mi=mi,
        positions=positions.detach().cpu().to(torch.long),
        tokens=list(tokens),
        peaks=detect_peaks(mi, method=peak_method, k=k, whis=whis),
        hook=hook,
        peak_method=peak_method,
        config=cfg,
    )


def mi_trajectory(
    model: Any,
    tokens: Int[Tensor, "pos"],
    answer_tokens: Int[Tensor, "ans"],
    start: int,
    hook: str | None = None,
    estimator: Literal["paper"] = "paper",
    answer_repr: Literal["last", "mean"] = "last",
    *,
    sigma: float = PAPER_SIGMA,
    eps: float = PAPER_EPS,
    dtype: torch.dtype = torch.float64,
    peak_method: Literal["iqr", "topk"] = "iqr",
    k: int | None = None,
    whis: float = 1.5,
    chunk_size: int | None = None,
) -> MITrajectory:
    """MI trajectory of one reasoning trace against its gold solution (Qian et al. 2025).

    ``tokens`` is the full trace (prompt followed by generated tokens) and ``start`` the index of
    the first generated token.  The generation steps are the positions ``t = start .. end-1``:
    step ``t`` produced token ``t`` from the representation at the last input position, ``t - 1``.
    Because the model is causal, the representation at position ``t - 1`` of one teacher-forced
    forward over the whole trace equals the last-position representation of greedy generation
    at that step (what the paper's hook records on each ``generate`` call), so one
    forward (:func:`mechthink.hooks.gather`) replaces the step-by-step capture. Each step is
    labelled by the token it generated, as in the paper's notebook.

    ``h_y`` comes from a separate forward over ``answer_tokens`` alone (the paper forwards the
    reference solution text without the question); ``answer_repr="last"`` takes its last
    token (the paper), ``"mean"`` the mean over its tokens.

    The trace is run once, gathering only ``hook`` at the step positions; for very long traces
    on big models, collect the activations with a chunked prefill and call
    :func:`mi_trajectory_from_acts` instead.

    Args:
        model: Object with ``.bridge`` (TransformerBridge in compatibility mode) and ``.tokenizer``.
        tokens: Prompt + generated token ids.
        answer_tokens: Token ids of the gold solution (include BOS if the model expects one; the
            paper used ``tokenizer.encode(solution)``).
        start: Index in ``tokens`` of the first generated token (the prompt length), >= 1.
        hook: Activation to use; default ``blocks.{n_layers-1}.hook_resid_post`` (the paper's
            last decoder layer output).
        estimator: Only ``"paper"`` (:func:`hsic_mi_paper_batch`).
        answer_repr: ``"last"`` (paper) or ``"mean"``.
        sigma: Kernel width (paper: 50).
        eps: Ridge (paper: 1e-5).
        dtype: Estimator dtype.
        peak_method: ``"iqr"`` (paper text) or ``"topk"`` (paper notebook, k = 20).
        k: ``k`` for top-k.
        whis: Whisker for IQR.
        chunk_size: Rows per batched solve (memory control for large d_model).

    Returns:
        The :class:`MITrajectory`.

    Examples:
        >>> model = mt.load_model("tiny-thinker")  # doctest: +SKIP
        >>> ids = torch.tensor(trace.ids)  # doctest: +SKIP
        >>> answer = torch.tensor(model.tokenizer("So the answer is 7.")["input_ids"])  # doctest: +SKIP
        >>> mi_trajectory(model, ids, answer, start=trace.n_prompt).plot()  # doctest: +SKIP
    """
    if estimator != "paper":
        raise ValueError(f"unknown estimator {estimator!r}; only 'paper' is available")
    if answer_repr not in ("last", "mean"):
        raise ValueError(f"unknown answer_repr {answer_repr!r}; use 'last' or 'mean'")
    if tokens.ndim != 1 or answer_tokens.ndim != 1:
        raise ValueError("tokens and answer_tokens must be 1-D")
    end = tokens.shape[0]
    if not 1 <= start < end:
        raise ValueError(f"start must satisfy 1 <= start < len(tokens) = {end}, got {start}")
    if answer_tokens.shape[0] == 0:
        raise ValueError("answer_tokens is empty")
    bridge = model.bridge
    hook = hook or _default_hook(bridge)

    step_acts = _resid(model, tokens, hook, positions=list(range(start - 1, end - 1)))
    ans = _resid(model, answer_tokens, hook)
    answer_act = ans[-1] if answer_repr == "last" else reduce(ans, "pos d -> d", "mean")

    positions = torch.arange(start, end, dtype=torch.long)
    gen_ids = tokens[start:end].tolist()
    return mi_trajectory_from_acts(
        step_acts,
        answer_act,
        positions,
        _token_strings(model.tokenizer, gen_ids),
        sigma=sigma,
        eps=eps,
        dtype=dtype,
        peak_method=peak_method,
        k=k,
        whis=whis,
        chunk_size=chunk_size,
        hook=hook,
        config={"answer_repr": answer_repr, "start": start},
    )


def peak_token_counts(
    trajs: Sequence[MITrajectory],
    strip: bool = True,
    pattern: str | None = None,
) -> pd.Series:
    """Frequency of generated tokens at MI peaks across trajectories, most common first.

    Args:
        trajs: Trajectories (their ``peaks`` are used as they are).
        strip: Strip whitespace from token strings before counting.
        pattern: Keep only tokens fully matching this regex (after stripping).  The paper's
            notebook uses ``r"[a-zA-Z]+"``; None keeps every token.

    Returns:
        Counts indexed by token string, named ``"count"``.

    Examples:
        >>> traj = MITrajectory(mi=torch.zeros(4), positions=torch.arange(4), tokens=[" So", " 2", " So", "."],
        ...                     peaks=torch.tensor([0, 2, 3]))
        >>> peak_token_counts([traj]).to_dict(), peak_token_counts([traj], pattern=r"[a-zA-Z]+").to_dict()
        ({'So': 2, '.': 1}, {'So': 2})
    """
    rx = re.compile(pattern) if pattern is not None else None
    counter: Counter[str] = Counter()
    for tr in trajs:
        for tok in tr.peak_tokens:
            key = tok.strip() if strip else tok
            if rx is not None and not rx.fullmatch(tok.strip()):
                continue
            counter[key] += 1
    items = counter.most_common()
    series = pd.Series(
        [c for _, c in items], index=pd.Index([t for t, _ in items], name="token"), name="count", dtype="int64"
    )
    return series


# ---------------------------------------------------------------------------------------------
# Many traces: trajectories, peak/event enrichment, summary
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MIExample:
    """One trace to follow with :func:`mi_trajectories`.

    Attributes:
        tokens: Prompt + generated token ids.
        start: Index of the first generated (thinking) token.
        solution: Text whose representation is ``h_y`` (the gold solution).
        events: Ground-truth label of token positions (e.g. ``{57: "backtrack word"}``); the
            positions not listed count as ``"other"`` in :func:`event_enrichment`.
    """

    tokens: list[int]
    start: int
    solution: str
    events: dict[int, str] = field(default_factory=dict)


def mi_trajectories(
    model: Any,
    examples: Sequence[MIExample],
    peak_method: Literal["iqr", "topk"] = "iqr",
    **kwargs: Any,
) -> list[MITrajectory]:
    """:func:`mi_trajectory` of each example, with ``h_y`` from its solution text.

    The solution is tokenized without special tokens (the text alone, as the paper's
    ``tokenizer.encode(solution)`` of a model without BOS).

    Args:
        model: As in :func:`mi_trajectory`.
        examples: The traces.
        peak_method: Peak rule (see :func:`detect_peaks`).
        **kwargs: Passed to :func:`mi_trajectory` (``hook``, ``sigma``, ``k``, ...).

    Returns:
        One trajectory per example, in order.

    Examples:
        >>> ex = MIExample(trace.ids, trace.n_prompt, "So the answer is 7.")  # doctest: +SKIP
        >>> mi_trajectories(model, [ex])[0].peak_tokens  # doctest: +SKIP
    """
    out = []
    for ex in track(examples, desc="MI trajectories"):
        answer = model.tokenizer(ex.solution, add_special_tokens=False)["input_ids"]
        out.append(mi_trajectory(model, torch.tensor(ex.tokens, dtype=torch.long),
                                 torch.tensor(answer, dtype=torch.long), start=ex.start, peak_method=peak_method,
                                 **kwargs))
    return out


@dataclass(frozen=True)
class EventEnrichment:
    """How often the steps of one event kind are MI peaks.

    Attributes:
        kind: The event label (``"other"`` for unlabelled steps).
        n_steps: Steps of this kind.
        n_peaks: Of them, peaks.
        share_of_peaks: ``n_peaks`` over all peaks.
        share_of_steps: ``n_steps`` over all steps (the base rate).
        peak_rate: ``n_peaks / n_steps``.
    """

    kind: str
    n_steps: int
    n_peaks: int
    share_of_peaks: float
    share_of_steps: float
    peak_rate: float


def event_enrichment(
    trajs: Sequence[MITrajectory], events: Sequence[Mapping[int, str]], default: str = "other"
) -> list[EventEnrichment]:
    """Which labelled events the MI peaks fall on, against their base rate among all steps.

    A step is labelled by the event at the position of the token it generated
    (``traj.positions``); steps without a label are ``default``. Shares divide by at least 1,
    so empty inputs give zeros.

    Args:
        trajs: The trajectories.
        events: For each trajectory, ``position -> label``.
        default: The label of unlabelled steps.

    Returns:
        One :class:`EventEnrichment` per kind seen among the steps, sorted by kind.

    Examples:
        >>> traj = MITrajectory(mi=torch.tensor([0.0, 5.0, 0.0, 0.0]), positions=torch.arange(10, 14),
        ...                     tokens=["a", " Wait", "b", "c"], peaks=torch.tensor([1]))
        >>> [(e.kind, e.n_steps, e.n_peaks, e.peak_rate) for e in event_enrichment([traj], [{11: "backtrack"}])]
        [('backtrack', 1, 1, 1.0), ('other', 3, 0, 0.0)]
    """
    if len(events) != len(trajs):
        raise ValueError(f"event_enrichment: {len(events)} event maps for {len(trajs)} trajectories; pass one each")
    at_peaks: Counter[str] = Counter()
    at_steps: Counter[str] = Counter()
    for traj, labels in zip(trajs, events):
        pos = traj.positions.tolist()
        peak_pos = {pos[i] for i in traj.peaks.tolist()}
        for p in pos:
            kind = labels.get(p, default)
            at_steps[kind] += 1
            if p in peak_pos:
                at_peaks[kind] += 1
    n_steps, n_peaks = sum(at_steps.values()), sum(at_peaks.values())
    return [
        EventEnrichment(k, at_steps[k], at_peaks[k], at_peaks[k] / max(1, n_peaks), at_steps[k] / max(1, n_steps),
                        at_peaks[k] / max(1, at_steps[k]))
        for k in sorted(at_steps)
    ]


@dataclass
class PeakSummary(Result):
    """MI peaks over many trajectories: how many, where (events), on which tokens.

    Attributes:
        n_traces: Trajectories.
        n_steps: Steps over all of them.
        n_peaks: Peaks over all of them.
        mean_mi: Mean over trajectories of the mean MI (``PeakStats.mean_mi``).
        events: Peak/event enrichment (:func:`event_enrichment`).
        token_counts: Generated token -> count at peaks, most common first.
        peak_method: The trajectories' peak rule(s).
    """

    n_traces: int
    n_steps: int
    n_peaks: int
    mean_mi: float
    events: list[EventEnrichment]
    token_counts: dict[str, int]
    peak_method: str

    @property
    def peak_ratio(self) -> float:
        """Peaks per step over all trajectories (0.0 without steps)."""
        return self.n_peaks / max(1, self.n_steps)

    @property
    def mean_peaks_per_trace(self) -> float:
        """Peaks per trajectory (0.0 without trajectories)."""
        return self.n_peaks / max(1, self.n_traces)

    def top_tokens(self, top: int = 15) -> "pd.Series":
        """The ``top`` most common tokens at peaks, as counts indexed by token."""
        items = list(self.token_counts.items())[:top]
        return pd.Series([c for _, c in items], index=pd.Index([t for t, _ in items], name="token"), name="count",
                         dtype="int64")

    def to_frame(self) -> pd.DataFrame:
        """One row per event kind: the :class:`EventEnrichment` fields."""
        return pd.DataFrame([asdict(e) for e in self.events], columns=list(EventEnrichment.__dataclass_fields__))

    def numbers(self, top: int = 15) -> dict[str, Any]:
        """The summary as JSON-friendly numbers (what the MI-peaks analysis writes)."""
        return {
            "n_traces": self.n_traces,
            "n_steps": self.n_steps,
            "n_peaks": self.n_peaks,
            "peak_ratio": self.peak_ratio,
            "mean_peaks_per_trace": self.mean_peaks_per_trace,
            "mean_mi": self.mean_mi,
            "events_at_peaks": {
                e.kind: {"share_of_peaks": e.share_of_peaks, "share_of_steps": e.share_of_steps, "peak_rate": e.peak_rate}
                for e in self.events
            },
            "top_peak_tokens": dict(list(self.token_counts.items())[:top]),
        }

    def plot(self, ax: Any = None, **kwargs: Any) -> Any:
        """Bar chart of the tokens at peaks; see :func:`mechthink.plotting.mi.plot_peak_summary`."""
        from mechthink.plotting.mi import plot_peak_summary

        return plot_peak_summary(self, ax=ax, **kwargs)


def peak_summary(
    trajs: Sequence[MITrajectory],
    events: Sequence[Mapping[int, str]] | None = None,
    *,
    strip: bool = False,
    pattern: str | None = None,
) -> PeakSummary:
    """Counts, event enrichment and peak tokens of many MI trajectories.

    Args:
        trajs: The trajectories (their ``peaks`` as they are).
        events: For each trajectory, ``position -> label`` (None: no labels, every step "other").
        strip: Strip whitespace from tokens before counting (default: keep ``" So"`` and ``"So"``
            apart, and whitespace tokens such as ``"\\n"`` visible).
        pattern: Count only tokens matching this regex (see :func:`peak_token_counts`).

    Returns:
        A :class:`PeakSummary`.

    Examples:
        >>> traj = MITrajectory(mi=torch.tensor([0.0, 5.0, 0.0, 3.0]), positions=torch.arange(10, 14),
        ...                     tokens=["a", " Wait", "b", " So"], peaks=torch.tensor([1, 3]))
        >>> s = peak_summary([traj], [{11: "backtrack"}])
        >>> s.n_peaks, s.peak_ratio, s.mean_mi, s.token_counts
        (2, 0.5, 2.0, {' Wait': 1, ' So': 1})
    """
    events = [{} for _ in trajs] if events is None else events
    counts = peak_token_counts(trajs, strip=strip, pattern=pattern)
    return PeakSummary(
        n_traces=len(trajs),
        n_steps=sum(len(t) for t in trajs),
        n_peaks=sum(int(t.peaks.shape[0]) for t in trajs),
        mean_mi=mean([t.stats().mean_mi for t in trajs]),
        events=event_enrichment(trajs, events),
        token_counts={str(k): int(v) for k, v in counts.items()},
        peak_method=", ".join(sorted({t.peak_method for t in trajs})),
    )
