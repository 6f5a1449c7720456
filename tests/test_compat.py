"""Behaviour pinned through refactors: every analysis, at a small size, gives the numbers it gave
before (``tests/data/compat/<analysis>.json``, within 1e-6).

Two kinds of number are compared more loosely, because they are not reproducible to 1e-6 across
CPUs while the code is unchanged. Float32 round-off differs with the CPU's vector width (AVX-512
here, AVX2 elsewhere; ``ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2`` simulates it).
Rank correlations (keys naming ``spearman``) are within ``RANK_TOL``: up to 40% of the
exact-patching entries they rank are noise-level (|effect| < 1e-5 of the largest) and reorder
with the round-off. Measured: up to 9e-3 under the AVX2 simulation and 1.1e-2 on a CI machine,
for the same commit. Round-off magnitudes (keys ending ``_error``) are within ``ERROR_TOL``
absolute: 3.8e-6 on one machine, 5.7e-6 on another. Every other number, raw scores included,
stays within 1e-6, and each estimator's exactness has its own test against its exact reference.

The references were written by the code before the analyses were moved into the library; a
refactor that changes a number fails here. To re-pin after a deliberate change of results, run
``MECHTHINK_COMPAT_WRITE=1 python -m pytest tests/test_compat.py`` and say why in the commit.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

import analyses

REF_DIR = Path(__file__).parent / "data" / "compat"
WRITE = os.environ.get("MECHTHINK_COMPAT_WRITE") == "1"

#: Small configs: every code path of each analysis, in about a minute for all of them.
SMALL: dict[str, dict] = {
    "confidence_curve": dict(n_samples=3, n_points=4),
    "early_exit": dict(n_samples=4),
    "logit_lens": dict(n_samples=8, tuned_steps=5),
    "value_vectors": dict(n_samples=16, n_ablate=3),
    "attribution": dict(n_samples=6, n_exact=2, n_node_types=1, horizon_tokens=20),
    "steering": dict(n_vector=8, n_samples=3, max_new_tokens=16, coeffs="-1,0,1", window=16),
    "suppression": dict(n_samples=3, n_random=2, n_seeds=2, n_random_sampled=1, n_seeds_control=1, max_new_tokens=30),
    "budget_forcing": dict(n_samples=3, budgets="2,8", extensions="0,1", max_new_tokens=60),
    "mi_peaks": dict(n_samples=3),
    "readiness": dict(n_samples=12, n_folds=2, n_lens_steps=2, budgets="8,32"),
    "thought_anchors": dict(n_samples=2, n_rollouts=4, batch_size=4, rollout_tokens=100, n_check_traces=2),
    "circuits": dict(n_samples=4, n_exact=1, n_random=2),
}
#: Keys whose values are not numbers of the analysis (file names).
IGNORE = {"html_view"}
#: Absolute tolerance of rank correlations (see the module docstring for the measured spread).
RANK_TOL = 0.03
#: Absolute tolerance of round-off magnitudes (``..._error`` keys).
ERROR_TOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def thinker():
    import mechthink as mt

    return mt.load_model("tiny-thinker")


def _compare(got, want, path: str = "") -> list[str]:
    """Differences between two JSON trees (numbers within 1e-6 relative/absolute)."""
    if isinstance(want, dict) and isinstance(got, dict):
        out = [f"{path}: keys {sorted(set(got) ^ set(want))} differ"] if set(got) != set(want) else []
        return out + [d for k in want if k in got and k not in IGNORE for d in _compare(got[k], want[k], f"{path}.{k}")]
    if isinstance(want, list) and isinstance(got, list):
        if len(got) != len(want):
            return [f"{path}: length {len(got)} != {len(want)}"]
        return [d for i, (g, w) in enumerate(zip(got, want)) for d in _compare(g, w, f"{path}[{i}]")]
    if isinstance(want, bool) or isinstance(got, bool) or not isinstance(want, (int, float)):
        return [] if got == want else [f"{path}: {got!r} != {want!r}"]
    if not isinstance(got, (int, float)):
        return [f"{path}: {got!r} != {want!r}"]
    if math.isnan(want) and math.isnan(got):
        return []
    abs_tol = RANK_TOL if "spearman" in path else ERROR_TOL if path.endswith("_error") else 1e-6
    return [] if math.isclose(got, want, rel_tol=1e-6, abs_tol=abs_tol) else [f"{path}: {got!r} != {want!r}"]


def test_every_analysis_is_pinned():
    assert set(SMALL) == set(analyses.REGISTRY)


@pytest.mark.parametrize("name", analyses.REGISTRY)
def test_numbers_unchanged(thinker, name, tmp_path, monkeypatch):
    """The numbers are the pinned ones, and the figure passes the layout check (no overlapping
    tick labels, no text off the canvas)."""
    import mechthink.report as report
    from mechthink.plotting.checks import layout_problems

    module = analyses.get(name)
    cfg = module.Config(out=tmp_path, **SMALL[name])
    figures = []
    write = report.write_outputs
    monkeypatch.setattr(report, "write_outputs", lambda out, n, m, fig, *a, **k: (figures.append(fig), write(out, n, m, fig, *a, **k))[1])
    numbers = json.loads(json.dumps(module.main(cfg, loaded_model=thinker), default=_default))
    assert len(figures) == 1 and figures[0] is not None
    problems = layout_problems(figures[0])
    assert not problems, "\n".join(problems[:10])
    ref = REF_DIR / f"{name}.json"
    if WRITE:
        REF_DIR.mkdir(parents=True, exist_ok=True)
        ref.write_text(json.dumps(numbers, indent=1, sort_keys=True) + "\n")
    want = json.loads(ref.read_text())
    diffs = _compare(numbers, want)
    assert not diffs, "\n".join(diffs[:20])


def _default(obj):
    from mechthink.results import jsonable as _jsonable

    return _jsonable(obj)
