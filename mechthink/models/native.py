"""Run the wrapped Hugging Face model itself, without the bridge's wrappers, when nothing is hooked.

TransformerLens 4.3's bridge replaces every submodule of the HF model it wraps (decoder layers,
attention, MLP, norms, linears, embedding, unembedding) by a bridge component that calls the
original module between hook points. Where no hook is attached anywhere, those wrappers only cost
time: on SmolLM2 a decode step through the bridge takes ~1.3-1.5x the HF step, most of it
Python overhead spread over ~200 wrapper calls per step.

:func:`native_forward` puts the original modules back into the HF module tree for one call and
runs the HF model's own forward (with its SDPA attention), then restores the wrappers. It is the
same computation on the same (compatibility-mode, folded) weights: the wrappers in
compatibility mode compute what the modules they wrap compute, so the logits equal the bridge's
to float rounding (``tests/test_native.py`` checks every architecture, KV-cache steps included).

It refuses (returns ``None``) whenever anything could observe or change an intermediate: a hook
on any module of the bridge (hook points, TransformerLens hooks, torch hooks such as the
steering stream tracker's), global module hooks, an active :func:`fast_attention` block or
gradients being recorded. Callers then use the bridge as before, so no hook ever goes missing.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor

__all__ = ["native_blockers", "native_forward"]


#: Hooks that only observe and are not ours to see: TransformerLens 4.3 keeps two on its own
#: wrappers at all times (a re-entrancy guard on the first block, the capture of the norms'
#: inputs for ``hook_resid_mid`` / ``hook_mlp_in``; both on wrappers the native forward takes
#: out, feeding hook points only), and transformers installs its output-capturing hooks
#: (``output_hidden_states`` / ``output_attentions``; spelled "capuring" in 5.24) on the original
#: modules the first time a model is asked for them, recording only while such a call runs.
#: Any other hook blocks the native forward.
_BRIDGE_INTERNAL = ("install_context_guard.", "BlockBridge._maybe_wire_capture_hooks.",
                    "install_output_capuring_hook.", "install_output_capturing_hook.")


def _foreign_hooks(module: torch.nn.Module) -> bool:
    for d in (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks):
        for fn in d.values():
            if not getattr(fn, "__qualname__", "").startswith(_BRIDGE_INTERNAL):
                return True
    return False


def native_blockers(bridge: Any) -> list[str]:
    """Why a call must go through the bridge now (empty: the native forward is the same call)."""
    out = []
    if torch.is_grad_enabled():
        out.append("gradients are recorded")
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        out.append("global module hooks are registered")
    if "_mechthink_fast_attention" in bridge.__dict__:
        out.append("inside fast_attention")
    hooked = [name for name, m in bridge.named_modules() if _foreign_hooks(m)]
    if hooked:
        out.append(f"hooks on {hooked[:3]}{' …' if len(hooked) > 3 else ''}")
    if not getattr(bridge, "compatibility_mode", True):
        out.append("compatibility mode is off")
    return out


def _swaps(hf: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Module, torch.nn.Module]]:
    """``(parent, name, wrapper, original)`` for every bridge wrapper in the HF module tree."""
    out = []
    for parent in list(hf.modules()):
        for name, child in list(parent._modules.items()):
            orig = child._modules.get("_original_component") if child is not None else None
            if isinstance(orig, torch.nn.Module):
                out.append((parent, name, child, orig))
    return out


def _cache_name(hf: torch.nn.Module) -> str:
    try:
        params = inspect.signature(hf.forward).parameters
    except (TypeError, ValueError):
        params = {}
    return "cache" if "cache" in params else "past_key_values"


def native_forward(bridge: Any, input_ids: Tensor, **kwargs: Any) -> tuple[Tensor, Any] | None:
    """``(logits, cache)`` of the HF model's own forward with the bridge's wrappers taken out, or
    ``None`` when :func:`native_blockers` names a reason (then call the bridge).

    ``kwargs``: ``attention_mask``, ``position_ids``, ``past_key_values`` (a HF cache, also
    accepted under the transformers 5.24 name ``cache``), ``logits_to_keep``.
    """
    if native_blockers(bridge):
        return None
    hf = bridge.original_model
    kv = kwargs.pop("past_key_values", None)
    kv = kwargs.pop("cache", kv)
    name = _cache_name(hf)
    if kv is not None:
        kwargs[name] = kv
    swaps = _swaps(hf)
    cfg = hf.config
    old_impl = cfg._attn_implementation
    try:
        for parent, attr, _, orig in swaps:
            parent._modules[attr] = orig
        cfg._attn_implementation = "sdpa"
        out = hf(input_ids=input_ids, use_cache=True, **kwargs)
    finally:
        cfg._attn_implementation = old_impl
        for parent, attr, wrapper, _ in reversed(swaps):
            parent._modules[attr] = wrapper
    return out.logits, getattr(out, name, None)
