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

_logging.getLogger(__name__).addHandler(_logging.NullHandler())

__all__ = [
    "REGISTRY",
    "ThinkingModel",
    "ThinkingModelSpec",
    "UnknownModelError",
    "__version__",
    "get_spec",
    "list_models",
    "load_model",
]
