"""mechthink: mechanistic interpretability of thinking language models, on TransformerLens.

    import mechthink as mt
    model = mt.load_model("tiny-thinker")
"""

import logging as _logging

from mechthink.models import (
    REGISTRY,
    ThinkingModel,
    ThinkingModelSpec,
    UnknownModelError,
    get_spec,
    list_models,
    load_model,
)

__version__ = "0.1.0"

from mechthink import (  # noqa: E402  (technique modules, after the models they build on)
    attribution,
    confidence,
    context,
    data,
    generation,
    hooks,
    interventions,
    lens,
    mi,
    stats,
    steering,
    traces,
    value_vectors,
)

_logging.getLogger(__name__).addHandler(_logging.NullHandler())

__all__ = [
    "attribution",
    "confidence",
    "context",
    "data",
    "generation",
    "hooks",
    "interventions",
    "lens",
    "mi",
    "stats",
    "steering",
    "traces",
    "value_vectors",
    "REGISTRY",
    "ThinkingModel",
    "ThinkingModelSpec",
    "UnknownModelError",
    "__version__",
    "get_spec",
    "list_models",
    "load_model",
]
