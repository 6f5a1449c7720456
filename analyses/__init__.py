"""The analyses that reproduce mechthink's figures: one thin module per figure.

Each module has ``NAME``, a ``Config`` dataclass (an :class:`mechthink.config.AnalysisConfig`
with a docstring per field) and ``main(cfg, loaded_model=None) -> dict`` that calls library
functions and ends with :func:`mechthink.report.write_outputs`. Use them from scripts::

    from analyses import attribution
    numbers = attribution.main(attribution.Config(n_samples=20), loaded_model=model)

or from the shell: ``mechthink attribution --n-samples 20`` (also ``python -m analyses.attribution``).
``REGISTRY`` gives the order ``mechthink reproduce`` runs them in.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["REGISTRY", "all_analyses", "get"]

#: Every analysis, in the order ``mechthink reproduce`` runs them.
REGISTRY: tuple[str, ...] = (
    "confidence_curve",
    "early_exit",
    "logit_lens",
    "value_vectors",
    "attribution",
    "steering",
    "suppression",
    "budget_forcing",
    "mi_peaks",
    "readiness",
    "thought_anchors",
    "circuits",
)


def get(name: str) -> ModuleType:
    """The analysis module called ``name`` (one of :data:`REGISTRY`)."""
    if name not in REGISTRY:
        raise KeyError(f"unknown analysis {name!r}; available: {', '.join(REGISTRY)}")
    return importlib.import_module(f"analyses.{name}")


def all_analyses() -> dict[str, ModuleType]:
    """Every analysis module by name, in :data:`REGISTRY` order."""
    return {name: get(name) for name in REGISTRY}
