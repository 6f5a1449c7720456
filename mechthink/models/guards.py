"""Guards that turn silently wrong forwards into errors: the context window.

A model run past the context it was trained for (``max_position_embeddings``) returns numbers
without complaint — meaningless ones (a probe mass of 6e-12 on an organism at 1,800 tokens of a
512-token context). :func:`install_context_guard` puts a forward pre-hook on the first block of
a bridge that counts the positions already in the KV cache plus the ones of the current call
and raises :class:`ContextLengthError` past the limit. The first block runs in every forward
(plain calls, ``run_with_cache``, cached generation, forks), so no path escapes it.
"""

from __future__ import annotations

from typing import Any

from mechthink.models.kvcache import cache_from_kwargs

__all__ = ["ContextLengthError", "context_length", "install_context_guard"]


class ContextLengthError(ValueError):
    """An input longer than the model's context window."""


def context_length(hf_model: Any) -> int | None:
    """The context window of an HF model (``max_position_embeddings`` of its text config)."""
    cfg = hf_model.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n = getattr(text_cfg, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def install_context_guard(bridge: Any, limit: int | None, name: str) -> Any:
    """Refuse every forward of ``bridge`` that would exceed ``limit`` positions (None: no limit).

    Returns:
        The hook handle (kept on the bridge as ``_mechthink_context_guard``; installing again
        replaces it).
    """
    old = getattr(bridge, "_mechthink_context_guard", None)
    if old is not None:
        old.remove()
    if limit is None:
        return None

    def guard(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        width = int(hidden.shape[1]) if hasattr(hidden, "shape") and len(hidden.shape) >= 2 else 0
        kv = cache_from_kwargs(kwargs)
        past = int(kv.get_seq_length()) if kv is not None and hasattr(kv, "get_seq_length") else 0
        if past + width > limit:
            raise ContextLengthError(
                f"{name}: {past + width} positions ({past} cached + {width} new) exceed the model's context "
                f"window of {limit} (max_position_embeddings); shorten the input or the generation budget"
            )

    handle = bridge.blocks[0].register_forward_pre_hook(guard, with_kwargs=True)
    bridge._mechthink_context_guard = handle
    return handle
