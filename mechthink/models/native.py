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

Hooks whose HF equivalent is exact are carried over for the call: hooks on the residual hook
points ``blocks.L.hook_in`` / ``hook_out`` (the point is called on HF decoder layer L's input /
output, so its hooks run as they do on the bridge; :func:`mechthink.steering.steer` uses these)
and forward pre-hooks on the embedding and block-0 wrappers (the steering stream tracker). It
refuses (returns ``None``) whenever anything else could observe or change an intermediate: a
hook on any other module of the bridge, global module hooks, an active :func:`fast_attention`
block or gradients being recorded. Callers then use the bridge as before, so no hook ever goes
missing.
"""

from __future__ import annotations

import contextvars
import inspect
import re
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

__all__ = ["ROW_INDEPENDENT", "native_blockers", "native_forward", "rows_can_be_dropped", "steady_hooks"]


#: Hooks that only observe and are not ours to see: TransformerLens 4.3 keeps two on its own
#: wrappers at all times (a re-entrancy guard on the first block, the capture of the norms'
#: inputs for ``hook_resid_mid`` / ``hook_mlp_in``; both on wrappers the native forward takes
#: out, feeding hook points only), and transformers installs its output-capturing hooks
#: (``output_hidden_states`` / ``output_attentions``; spelled "capuring" in 5.24) on the original
#: modules the first time a model is asked for them, recording only while such a call runs.
#: Any other hook blocks the native forward.
_BRIDGE_INTERNAL = ("install_context_guard.", "BlockBridge._maybe_wire_capture_hooks.",
                    "install_output_capuring_hook.", "install_output_capturing_hook.")


def _internal(fn: Any) -> bool:
    """Whether a hook function is one of the bridge's or transformers' own (``_BRIDGE_INTERNAL``)."""
    return getattr(fn, "__qualname__", "").startswith(_BRIDGE_INTERNAL)


def _global_hooks() -> bool:
    """Whether a global module forward (pre-)hook is registered."""
    return bool(torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks)


#: Attribute a hook function sets (to True) to declare that it treats every batch row alike and
#: keeps no per-row state, so the decode loop may drop finished rows under it (e.g. a counter).
ROW_INDEPENDENT = "_mechthink_row_independent"


def rows_can_be_dropped(module: torch.nn.Module) -> bool:
    """Whether a decode loop may drop finished rows from the batch without any hook noticing.

    True when no global module hook is registered and every hook on ``module`` and its
    submodules is the bridge's own (``_BRIDGE_INTERNAL``) or marked :data:`ROW_INDEPENDENT`.
    Anything else (a steering tracker that keeps per-row state, a hook caching activations by
    row) keeps the batch whole, so dropping never changes what a hook sees per row.
    """
    if _global_hooks():
        return False
    for _, m in _walk(module):
        for d in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks):
            if any(not _internal(fn) and not getattr(fn, ROW_INDEPENDENT, False) for fn in d.values()):
                return False
    return True


_RESID_POINT = re.compile(r"^blocks\.(\d+)\.hook_(in|out)$")


def _foreign(d: dict[int, Any]) -> list[tuple[int, Any]]:
    return [(k, fn) for k, fn in d.items() if not _internal(fn)]


def _walk(root: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """``root.named_modules()`` (pre-order, each module once), iteratively: the hook scan runs
    before every decode step (on tiny-thinker's bridge it takes 0.22 ms this way, 0.38 ms with
    the recursive generator)."""
    seen: set[int] = set()
    stack: list[tuple[str, torch.nn.Module]] = [("", root)]
    while stack:
        name, m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        yield name, m
        for k, c in reversed(m._modules.items()):
            if c is not None:
                stack.append((f"{name}.{k}" if name else k, c))


#: Inside :func:`steady_hooks`: ``{id(bridge): (bridge, handle counter, plan, hooks seen)}``.
_PLANS: contextvars.ContextVar[dict[int, tuple[Any, int, Any, list[tuple[dict[int, Any], int]]]] | None] = \
    contextvars.ContextVar("mechthink_steady_hooks", default=None)


@contextmanager
def steady_hooks() -> Iterator[None]:
    """Within the block, :func:`native_forward` scans the bridge's hooks once and reuses the result
    while it still holds (a decode loop calls it once per step, and the scan of a few hundred
    modules is a fifth of a tiny model's step).

    The kept scan is used only while no hook handle has been made anywhere since it was taken
    (``torch.utils.hooks.RemovableHandle`` numbers every registration) and every foreign hook it
    saw is still registered; otherwise the bridge is scanned again. What it cannot see, while the
    block runs: a module swapped into the bridge carrying hooks registered before the scan, or a
    hook written into a module's hook dict by hand (no handle) — hence a block, around one decode
    loop, not a global cache."""
    token = _PLANS.set({})
    try:
        yield
    finally:
        _PLANS.reset(token)


def _plan_now(bridge: Any) -> tuple[list[str], list[tuple[str, Any, Any]]]:
    """:func:`_plan`, reused inside :func:`steady_hooks` while no hook was added or removed."""
    memo = _PLANS.get()
    if memo is None:
        return _plan(bridge)
    kept = memo.get(id(bridge))
    if (kept is not None and kept[0] is bridge and kept[1] == RemovableHandle.next_id
            and all(k in d for d, k in kept[3])):
        return kept[2]
    seen: list[tuple[dict[int, Any], int]] = []
    plan = _plan(bridge, seen)
    memo[id(bridge)] = (bridge, RemovableHandle.next_id, plan, seen)
    return plan


def _plan_settled(bridge: Any, counter: int, made: int) -> None:
    """After a native call registered (and removed) ``made`` carried hooks from handle number
    ``counter`` on: if no other handle was made meanwhile, the kept scan still holds."""
    memo = _PLANS.get()
    kept = memo.get(id(bridge)) if memo is not None else None
    if kept is not None and kept[1] == counter and RemovableHandle.next_id == counter + made:
        memo[id(bridge)] = (kept[0], RemovableHandle.next_id, kept[2], kept[3])


def _plan(bridge: Any, seen: list[tuple[dict[int, Any], int]] | None = None
          ) -> tuple[list[str], list[tuple[str, Any, Any]]]:
    """``(hooked modules that block the native forward, hooks it can carry over)``; ``seen``
    collects ``(hook dict, key)`` of every foreign hook found.

    Carried over, because their HF equivalent is exact: forward hooks on the residual hook points
    ``blocks.L.hook_in`` / ``hook_out`` (resid_pre / resid_post = the input / output of HF decoder
    layer L; the point itself is called there, so its hooks run as on the bridge), and forward
    pre-hooks on the embedding and block-0 wrappers (they see the same call as the original
    module: the stream tracker of :func:`mechthink.steering.steer`)."""
    blocked, carried = [], []
    first = bridge.blocks[0] if len(bridge.blocks) else None
    for name, m in _walk(bridge):
        if not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks):
            continue
        fwd, pre = _foreign(m._forward_hooks), _foreign(m._forward_pre_hooks)
        back = _foreign(m._backward_hooks) + _foreign(m._backward_pre_hooks)
        if not (fwd or pre or back):
            continue
        if seen is not None:
            seen += [(d, k) for d in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks)
                     for k, fn in d.items() if not _internal(fn)]
        point = _RESID_POINT.match(name)
        if point and fwd and not pre and not back:
            carried.append((point.group(2), bridge.blocks[int(point.group(1))], m))
        elif (m is bridge.embed or m is first) and pre and not fwd and not back:
            carried.append(("pre", m, pre))
        else:
            blocked.append(name)
    return blocked, carried


def native_blockers(bridge: Any, plan: tuple[list[str], list[tuple[str, Any, Any]]] | None = None) -> list[str]:
    """Why a call must go through the bridge now (empty: the native forward is the same call).
    ``plan``: :func:`_plan` of the bridge when the caller has it already."""
    out = []
    if torch.is_grad_enabled():
        out.append("gradients are recorded")
    if _global_hooks():
        out.append("global module hooks are registered")
    if "_mechthink_fast_attention" in bridge.__dict__:
        out.append("inside fast_attention")
    hooked = (plan or _plan_now(bridge))[0]
    if hooked:
        out.append(f"hooks on {hooked[:3]}{' …' if len(hooked) > 3 else ''}")
    if not getattr(bridge, "compatibility_mode", True):
        out.append("compatibility mode is off")
    return out


def _carry(carried: list[tuple[str, Any, Any]], handles: list[Any]) -> None:
    """Register the carried-over hooks on the original modules, appending each handle to
    ``handles`` at once (so a failure part-way still removes what was registered)."""
    for kind, owner, what in carried:
        orig = owner._modules["_original_component"]
        if kind == "out":
            def post(mod: Any, inp: Any, out: Any, hp: Any = what) -> Any:
                return (hp(out[0]), *out[1:]) if isinstance(out, tuple) else hp(out)

            handles.append(orig.register_forward_hook(post))
        elif kind == "in":
            def pre_in(mod: Any, args: tuple[Any, ...], kwargs: dict[str, Any], hp: Any = what) -> Any:
                if args:
                    return (hp(args[0]), *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": hp(kwargs["hidden_states"])}

            handles.append(orig.register_forward_pre_hook(pre_in, with_kwargs=True))
        else:
            for hid, fn in what:
                handles.append(orig.register_forward_pre_hook(fn, with_kwargs=hid in owner._forward_pre_hooks_with_kwargs))


def _swaps(hf: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Module, torch.nn.Module]]:
    """``(parent, name, wrapper, original)`` for every bridge wrapper in the HF module tree.

    The list is kept on ``hf`` and reused while every entry still holds (the parent still has
    that wrapper under that name, wrapping that original): checking it costs a dict lookup per
    wrapper, walking the tree a few hundred. A wrapper added since is not in it and simply runs
    wrapped (the same computation; its hooks, if any, are seen by :func:`_plan`). A scan finding
    fewer wrappers than the kept one (made while originals are swapped in) is used, not kept."""
    cached = hf.__dict__.get("_mechthink_swaps")
    if cached is not None and all(
        parent._modules.get(name) is wrapper and wrapper._modules.get("_original_component") is orig
        for parent, name, wrapper, orig in cached
    ):
        return cached
    out = _scan_swaps(hf)
    if len(out) >= len(cached or ()):  # a shorter scan (inside a native call, the originals in place) is not kept
        hf.__dict__["_mechthink_swaps"] = out
    return out


def _scan_swaps(hf: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Module, torch.nn.Module]]:
    out = []
    for _, parent in list(_walk(hf)):
        for name, child in list(parent._modules.items()):
            orig = child._modules.get("_original_component") if child is not None else None
            if isinstance(orig, torch.nn.Module):
                out.append((parent, name, child, orig))
    return out


_CACHE_NAMES: dict[Any, str] = {}


def _cache_name(hf: torch.nn.Module) -> str:
    """What ``hf``'s forward calls its KV cache (``cache`` from transformers 5.24 on), kept per
    forward function (reading a signature costs more than a tiny model's layer)."""
    fn = getattr(type(hf), "forward", None)
    name = _CACHE_NAMES.get(fn) if "forward" not in hf.__dict__ else None
    if name is None:
        try:
            params = inspect.signature(hf.forward).parameters
        except (TypeError, ValueError):
            params = {}
        name = "cache" if "cache" in params else "past_key_values"
        if "forward" not in hf.__dict__ and fn is not None:
            _CACHE_NAMES[fn] = name
    return name


def native_forward(bridge: Any, input_ids: Tensor, **kwargs: Any) -> tuple[Tensor, Any] | None:
    """``(logits, cache)`` of the HF model's own forward with the bridge's wrappers taken out, or
    ``None`` when :func:`native_blockers` names a reason (then call the bridge).

    ``kwargs``: ``attention_mask``, ``position_ids``, ``past_key_values`` (a HF cache, also
    accepted under the transformers 5.24 name ``cache``), ``logits_to_keep``.
    """
    from mechthink.models.shared_prefix import IMPLEMENTATION, SharedPrefixCache

    plan = _plan_now(bridge)
    blockers = native_blockers(bridge, plan)
    shared = isinstance(kwargs.get("past_key_values", kwargs.get("cache")), SharedPrefixCache)
    if blockers and shared:  # the bridge would attend to the rows' own positions only: refuse, never guess
        raise RuntimeError("a SharedPrefixCache runs only on the HF model's own forward, which is blocked here by "
                           f"{', '.join(blockers)}; fork the cache instead (generation.fork_cache)")
    if blockers:
        return None
    carried = plan[1]
    hf = bridge.original_model
    kv = kwargs.pop("past_key_values", None)
    kv = kwargs.pop("cache", kv)
    if shared:
        kv.check_mask(kwargs.get("attention_mask"))
    name = _cache_name(hf)
    if kv is not None:
        kwargs[name] = kv
    swaps = _swaps(hf)
    cfg = hf.config
    old_impl = cfg._attn_implementation
    handles: list[Any] = []
    counter = RemovableHandle.next_id
    try:
        for parent, attr, _, orig in swaps:
            parent._modules[attr] = orig
        # a shared prefix: its attention (exact; no mask is built for it, the cache checked the rows' mask)
        cfg._attn_implementation = IMPLEMENTATION if shared else "sdpa"
        _carry(carried, handles)
        with kv.active() if shared else nullcontext():
            out = hf(input_ids=input_ids, use_cache=True, **kwargs)
    finally:
        for h in handles:
            h.remove()
        cfg._attn_implementation = old_impl
        for parent, attr, wrapper, _ in reversed(swaps):
            parent._modules[attr] = wrapper
        _plan_settled(bridge, counter, len(handles))
    return out.logits, getattr(out, name, None)
