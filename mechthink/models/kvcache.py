"""The KV cache between transformers and the TransformerLens bridge: one adapter, one check.

transformers 5.24 hands the cache to decoder layers and attention modules as ``cache=`` (the
old ``past_key_values=`` is deprecated, removal announced for 5.40); TransformerLens 4.3's
bridge attention reads only ``past_key_values`` / ``layer_past``. Without an adapter the bridge
never writes keys/values, ``return_type="logits_and_cache"`` returns an empty cache, and every
cached step sees no context — silently. :func:`install_cache_adapter` makes each attention
component of a bridge find the cache under either name; :func:`cache_from_kwargs` is the one
way mechthink's own hooks read it; :func:`check_kv_cache` proves, on the loaded model, that a
cached step equals a full forward, and raises one clear error naming the installed versions if
it does not.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Mapping
from importlib import metadata
from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import DynamicLayer

if TYPE_CHECKING:
    from mechthink.models.thinking_model import ThinkingModel

__all__ = [
    "CACHE_KWARGS",
    "KVCacheError",
    "SUPPORTED_VERSIONS",
    "cache_from_kwargs",
    "check_kv_cache",
    "install_cache_adapter",
    "installed_versions",
    "reserve_cache",
]

#: Keyword names under which transformers / TransformerLens pass a KV cache, newest first.
CACHE_KWARGS: tuple[str, ...] = ("cache", "past_key_values", "layer_past")

#: The ranges the test suite passed on (keep in sync with pyproject.toml and constraints.txt).
SUPPORTED_VERSIONS: dict[str, str] = {
    "transformers": ">=5.23,<5.25",
    "transformer-lens": ">=4.3,<4.4",
    "torch": ">=2.13,<2.14",
}

#: Largest |Δ log p| allowed between a cached step and a full forward, per dtype.
_TOLERANCE: dict[torch.dtype, float] = {torch.float32: 1e-4, torch.bfloat16: 0.1, torch.float16: 0.05}


class KVCacheError(RuntimeError):
    """The bridge's KV cache does not reproduce a full forward (wrong versions or a bug)."""


def installed_versions() -> dict[str, str]:
    """Installed versions of the packages whose internals mechthink relies on."""
    out = {}
    for pkg in ("torch", "transformers", "transformer-lens"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _versions_line() -> str:
    have = installed_versions()
    return "; ".join(f"{p} {have.get(p, '?')} (supported {r})" for p, r in SUPPORTED_VERSIONS.items())


def cache_from_kwargs(kwargs: Mapping[str, Any]) -> Any | None:
    """The KV cache a module call received, whatever keyword carried it (None if none)."""
    for key in CACHE_KWARGS:
        kv = kwargs.get(key)
        if kv is not None:
            return kv
    return None


def _update_kv_cache_any_name(self: Any, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> Any:
    if kwargs.get("past_key_values") is None:
        kv = cache_from_kwargs(kwargs)
        if kv is not None:
            kwargs["past_key_values"] = kv
    return type(self)._update_kv_cache(self, k, v, **kwargs)


def install_cache_adapter(bridge: Any) -> int:
    """Let every attention component of ``bridge`` read the cache from ``cache=`` too.

    The bridge's attention components extend the cache in ``_update_kv_cache``, reading
    ``past_key_values``; this binds, on each instance (not the class, so other bridges are
    untouched), a method that first copies a cache passed as ``cache=`` into
    ``past_key_values``. Idempotent; harmless where the cache already arrives as
    ``past_key_values`` (transformers <= 5.23).

    Returns:
        The number of attention components adapted.
    """
    n = 0
    for module in bridge.modules():
        if not callable(getattr(type(module), "_update_kv_cache", None)):
            continue
        current = module.__dict__.get("_update_kv_cache")
        if getattr(current, "__func__", None) is not _update_kv_cache_any_name:
            module._update_kv_cache = types.MethodType(_update_kv_cache_any_name, module)
        n += 1
    return n


@torch.inference_mode()
def check_kv_cache(model: "ThinkingModel", n_tokens: int = 6) -> float:
    """Prove on ``model`` that the bridge's KV cache reproduces a full forward.

    Prefills ``n_tokens - 1`` tokens with ``return_type="logits_and_cache"``, checks the cache
    holds exactly that many positions, runs the last token on the cache and compares its
    log-probabilities with the last position of one uncached forward over all ``n_tokens``
    (tolerance 1e-4 in float32, 0.05 / 0.1 nats in float16 / bfloat16).

    Returns:
        The largest absolute log-probability difference found.

    Raises:
        KVCacheError: one line naming what failed and the installed vs supported versions of
            torch, transformers and transformer-lens.
    """
    bridge = model.bridge
    vocab = int(bridge.cfg.d_vocab)
    bos = model.bos_token_id
    ids = [int(bos)] if (model.prepend_bos and bos is not None and bos < vocab) else []
    step = max(1, vocab // (n_tokens + 1))
    ids += [(7 + i * step) % vocab for i in range(n_tokens - len(ids))]
    tokens = torch.tensor([ids], dtype=torch.long, device=model.device)
    full = bridge(tokens).float().log_softmax(-1)[0, -1]
    try:
        _, kv = bridge(tokens[:, :-1], return_type="logits_and_cache")
    except Exception as exc:  # any failure here is a version mismatch, reported as one line
        raise KVCacheError(
            f"KV-cache self-check on {model.spec.name}: a cached prefill failed "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); {_versions_line()}"
        ) from None
    length = int(kv.get_seq_length()) if kv is not None and hasattr(kv, "get_seq_length") else 0
    if length != tokens.shape[1] - 1:
        raise KVCacheError(
            f"KV-cache self-check on {model.spec.name}: the bridge's cache holds {length} positions "
            f"after a {tokens.shape[1] - 1}-token prefill, so cached generation and forks would be "
            f"silently wrong; {_versions_line()}. Install the versions in constraints.txt"
        )
    step_lp = bridge(tokens[:, -1:], past_key_values=kv).float().log_softmax(-1)[0, -1]
    diff = float((step_lp - full).abs().max())
    tol = _TOLERANCE.get(model.dtype, 0.1)
    if not diff <= tol:  # also catches NaN
        raise KVCacheError(
            f"KV-cache self-check on {model.spec.name}: a cached step differs from a full forward by "
            f"{diff:.3g} nats (tolerance {tol:g} for {model.dtype}); {_versions_line()}. "
            "Install the versions in constraints.txt"
        )
    return diff


# ============================================================================ room to grow
class _ReservedLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys / values are prefix views of buffers with spare positions.

    ``DynamicLayer.update`` concatenates, so every decode step copies the whole cache into a
    fresh allocation: O(T) bytes per step per layer, most of a small model's step at batch 32
    and a few hundred positions. Here an update writes the new positions into the buffers'
    spare room and views ``[..., :n + m, :]``. It falls back to the concatenation (the plain
    ``DynamicLayer`` behaviour) whenever ``keys`` / ``values`` are not exactly a prefix view of
    the buffers any more (something replaced them: ``batch_repeat_interleave``, ``offload``, an
    outside assignment) or the new states do not fit their shape; a crop keeps the prefix view,
    so writing after it is right. When the room runs out the buffers grow by half their length
    (at least 128 positions), up to ``limit`` positions where one is set.

    Why the in-place write is safe: the buffers are written only at positions no tensor handed
    out so far covers. ``_handed`` is the longest view ever given out of the current buffers;
    a write that would start below it (after a crop, or after someone set ``keys`` to a shorter
    view of the buffers and kept the longer one, as representation recycling does) first copies
    into new buffers, so every view handed out earlier keeps its values, as with ``DynamicLayer``.
    """

    _kbuf: torch.Tensor | None
    _vbuf: torch.Tensor | None
    _limit: int | None
    _handed: int

    def _is_prefix_view(self) -> bool:
        kb, vb, k, v = self._kbuf, self._vbuf, self.keys, self.values
        return (
            kb is not None and vb is not None and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
            and k.data_ptr() == kb.data_ptr() and v.data_ptr() == vb.data_ptr()
            and k.stride() == kb.stride() and v.stride() == vb.stride()
            and k.shape[:2] == kb.shape[:2] and k.shape[-1] == kb.shape[-1]
            and v.shape[:2] == vb.shape[:2] and v.shape[-1] == vb.shape[-1]
            and k.shape[-2] == v.shape[-2]
        )

    def _regrow(self, need: int) -> None:
        """New buffers holding the current keys / values and room for ``need`` positions in all."""
        n = int(self.keys.shape[-2])
        cap = max(need, n + max(128, n // 2))
        if self._limit is not None:
            cap = max(need, min(cap, self._limit))
        k, v = self.keys, self.values
        kb = k.new_empty((*k.shape[:-2], cap, k.shape[-1]))
        vb = v.new_empty((*v.shape[:-2], cap, v.shape[-1]))
        kb[..., :n, :] = k
        vb[..., :n, :] = v
        self._kbuf, self._vbuf, self._handed = kb, vb, n
        self.keys, self.values = kb[..., :n, :], vb[..., :n, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        fits = (
            self.is_initialized and self.keys.dim() == 4 and key_states.dim() == 4 and value_states.dim() == 4
            and self._is_prefix_view()
            and key_states.shape[:2] == self.keys.shape[:2] and key_states.shape[-1] == self.keys.shape[-1]
            and value_states.shape[:2] == self.values.shape[:2] and value_states.shape[-1] == self.values.shape[-1]
            and key_states.shape[-2] == value_states.shape[-2]
            and key_states.dtype == self.keys.dtype and value_states.dtype == self.values.dtype
            and key_states.device == self.keys.device and value_states.device == self.values.device
        )
        if not fits:
            self._kbuf = self._vbuf = None
            return super().update(key_states, value_states, *args, **kwargs)
        n, m = int(self.keys.shape[-2]), int(key_states.shape[-2])
        if n + m > self._kbuf.shape[-2] or n < self._handed:  # no room, or positions n.. are in a view out there
            self._regrow(n + m)
        self._kbuf[..., n : n + m, :] = key_states
        self._vbuf[..., n : n + m, :] = value_states
        self._handed = n + m
        self.keys, self.values = self._kbuf[..., : n + m, :], self._vbuf[..., : n + m, :]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() > 0 and self._is_prefix_view():
            n = int(self.keys.shape[-2])
            self._kbuf, self._vbuf = self._kbuf[indices, ...], self._vbuf[indices, ...]
            self._handed = n
            self.keys, self.values = self._kbuf[..., :n, :], self._vbuf[..., :n, :]
        else:
            super().batch_select_indices(indices)

    def reset(self) -> None:
        self._kbuf = self._vbuf = None
        super().reset()


def reserve_cache(cache: Any, extra: int) -> int:
    """Give every plain ``DynamicLayer`` of ``cache`` room for ``extra`` more positions, in place.

    The layers become :class:`_ReservedLayer` (a ``DynamicLayer`` whose updates write into spare
    room instead of concatenating; same values, bit for bit): a decode loop of ``extra`` steps
    then never copies the whole cache per step. Layers of any other type (sliding windows,
    static, quantised caches), uninitialised ones and anything not 4-d are left alone.

    Args:
        cache: A transformers ``Cache`` with ``.layers`` (anything else: nothing happens).
        extra: Positions the caller may still add (the buffers start with
            ``min(extra, max(128, n // 2))`` spare positions and grow up to ``n + extra``).

    Returns:
        The number of layers reserved.
    """
    if isinstance(extra, bool) or not isinstance(extra, int) or extra < 0:
        raise ValueError(f"reserve_cache: extra must be an int >= 0, got {extra!r}")
    done = 0
    for layer in getattr(cache, "layers", None) or []:
        if type(layer) is _ReservedLayer and layer._is_prefix_view():
            layer._limit = int(layer.keys.shape[-2]) + extra
            done += 1
            continue
        if type(layer) not in (DynamicLayer, _ReservedLayer) or not getattr(layer, "is_initialized", False):
            continue
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not (isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor) and k.dim() == 4 and v.dim() == 4
                and k.shape[-2] == v.shape[-2] and k.shape[0] == v.shape[0]):
            continue
        n = int(k.shape[-2])
        layer.__class__ = _ReservedLayer
        layer._limit = n + extra
        layer._kbuf = layer._vbuf = None
        layer._regrow(n + min(extra, max(128, n // 2)))
        done += 1
    return done


# TransformerLens 4.3's bridge passes the cache to the HF model as ``past_key_values`` on every
# cached call; transformers 5.24 warns about that spelling each time. The warning is about the
# bridge's call, not the user's, and nothing they can act on (our bounds exclude 5.40, which
# removes the spelling), so it is silenced here, narrowly.
warnings.filterwarnings(
    "ignore", message=r"`past_key_values` is deprecated and will be removed in version 5\.40", category=FutureWarning
)
