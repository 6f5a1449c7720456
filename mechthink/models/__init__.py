"""Model loading, the registry of thinking models, and the `ThinkingModel` wrapper."""

from mechthink.models.loading import load_model, parse_dtype, supported_architectures
from mechthink.models.registry import (
    REGISTRY,
    ThinkingModelSpec,
    UnknownModelError,
    get_spec,
    list_models,
)
from mechthink.models.thinking_model import ThinkingModel

__all__ = [
    "REGISTRY",
    "ThinkingModel",
    "ThinkingModelSpec",
    "UnknownModelError",
    "get_spec",
    "list_models",
    "load_model",
    "parse_dtype",
    "supported_architectures",
]
