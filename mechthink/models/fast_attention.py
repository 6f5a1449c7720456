"""Memory-efficient attention for hooked runs that need no attention pattern.

TransformerLens 4.3's bridge re-implements every rotary attention layer
(``PositionEmbeddingsAttentionBridge.forward``) so that ``hook_attn_scores`` and
``hook_pattern`` can fire: it materialises the ``[batch, head, pos, pos]`` scores and the
softmax pattern in float32, per layer, and autograd keeps them for the backward. Memory grows
as ``pos²`` and a hooked forward runs several times slower than the Hugging Face model's own
scaled-dot-product attention.

:func:`fast_attention` swaps, for the duration of a ``with`` block, each supported attention
component's forward for one that runs the same steps, with the same hook points, in the same
order — ``hook_in``, ``q``/``k``/``v`` (``hook_q``/``hook_k``/``hook_v``), the QK norms and
their hooks, ``hook_cos``/``hook_sin``, rotary embedding, ``hook_rot_q``/``hook_rot_k``, the KV
cache update, then ``o`` (``hook_z`` = ``o.hook_in``, ``o.hook_out``) and ``hook_out`` — but
computes the attention itself with :func:`torch.nn.functional.scaled_dot_product_attention`
(the fused kernel: the pattern is never stored, the backward recomputes it blockwise). Only
``hook_attn_scores`` and ``hook_pattern`` cannot fire on that path (:data:`PATTERN_HOOKS`).

Never a silently missing hook: at every call, a layer whose ``hook_attn_scores`` or
``hook_pattern`` has any hook attached (forward or backward), or whose configuration the fast
forward does not cover (split Q/K/V inputs, ``use_attn_result``, soft-capping, attention sinks,
gated queries, training with dropout, a non-4-D mask, global module hooks, ...), runs the
bridge's exact forward instead. Which hooks are requested is therefore decided by the hooks
themselves: a ``gather`` of ``pattern`` at two layers runs those two layers exactly and the
others fast. Attention of fewer than :data:`MIN_SCORES` queries x keys runs exact too (short
inputs: cheap on the exact path, and their numbers stay those of the exact path bit for bit).
``FastAttention.fast_calls`` / ``exact_calls`` / ``short_calls`` count the layer calls of each
kind.

Measured on CPU (torch 2.13, one causal layer of 9 heads x 64, forward + backward): the fused
kernel's extra peak memory is 18 / 22 / 54 MB at 1,024 / 2,048 / 4,096 positions (linear: the
gradients of q, k, v), against 150 / 576 / 2,304 MB for the materialised softmax; with a
boolean mask it adds the mask itself (``q·kv`` bytes).

``output_attentions`` is not a hook and does not select the exact path (TransformerLens'
``run_with_cache`` sets it on every call and discards the attentions): inside the block the HF
output's ``attentions`` hold ``None`` for layers that ran fast. Hook ``hook_pattern`` to get
patterns.

The same masks apply on both paths: inside the block the HF config's ``_attn_implementation``
is ``"sdpa"``, so the HF model builds no mask at all when nothing is padded (the kernel's own
causal mask is used) and a boolean ``[batch, 1, q, kv]`` mask otherwise.

Reference: the Hugging Face ``transformers`` SDPA attention integration
(``transformers/integrations/sdpa_attention.py``) and TransformerLens' bridge
(``transformer_lens/model_bridge/generalized_components/position_embeddings_attention.py``),
whose hook order this reproduces.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from mechthink.models import kvcache

__all__ = ["MIN_SCORES", "PATTERN_HOOKS", "FastAttention", "attention_reduce", "attention_rows", "fast_attention", "fast_path_blockers"]


#: Hook points of an attention component that only the exact (bridge) path fires.
PATTERN_HOOKS: tuple[str, ...] = ("hook_attn_scores", "hook_pattern")

#: Default :func:`fast_attention` ``min_scores``: attention of fewer queries x keys runs exact.
MIN_SCORES: int = 256 * 256

_DEPTH_ATTR = "_mechthink_fast_attention"
_ROWS_ATTR = "_mechthink_pattern_rows"


def _attention_class() -> type:
    from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (
        PositionEmbeddingsAttentionBridge,
    )

    return PositionEmbeddingsAttentionBridge


def _has_hooks(module: torch.nn.Module) -> bool:
    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks
    )


def fast_path_blockers(attn: Any, kwargs: dict[str, Any] | None = None) -> list[str]:
    """Why ``attn`` (an attention component of a bridge) must run its exact forward now.

    Args:
        attn: A bridge attention component.
        kwargs: The keyword arguments of the call, if any (checked for the mask layout and the
            rotary position embeddings).

    Returns:
        The reasons, empty when the fast forward reproduces the exact one.
    """
    cls = _attention_class()
    if not isinstance(attn, cls):
        return [f"{type(attn).__name__} is not a rotary attention bridge"]
    out = []
    if type(attn).forward is not cls.forward or type(attn)._pre_output_projection is not cls._pre_output_projection:
        out.append(f"{type(attn).__name__} overrides the bridge forward")
    hf = attn._modules.get("_original_component")
    if hf is None:
        return out + ["no HF attention module"]
    for name in PATTERN_HOOKS:
        hp = attn._modules.get(name)
        if hp is not None and _has_hooks(hp):
            out.append(f"{name} is hooked")
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        out.append("global module hooks are registered")
    cfg = attn.config
    for flag in ("use_split_qkv_input", "use_attn_in", "use_attn_result", "gated_q_proj", "qk_norm_after_rope"):
        if getattr(cfg, flag, False):
            out.append(f"config {flag}")
    if not attn.compatibility_mode:
        out.append("compatibility mode is off")
    if attn.training and getattr(hf, "attention_dropout", 0.0):
        out.append("attention dropout in training")
    if not attn.is_causal or attn.is_cross_attention:
        out.append("not causal self-attention")
    for attr in ("key_multiplier", "attn_logit_softcapping", "sinks"):
        if getattr(hf, attr, None) is not None:
            out.append(f"HF attention has {attr}")
    hf_cfg = getattr(hf, "config", None)
    if getattr(hf_cfg, "clip_qkv", None) is not None:
        out.append("clip_qkv")
    rope = getattr(hf_cfg, "rope_parameters", None)
    if isinstance(rope, dict) and rope.get("llama_4_scaling_beta") is not None:
        out.append("llama-4 query scaling")
    gate = attn._modules.get("gate")
    if gate is not None and gate._modules.get("_original_component") is not None:
        out.append("gated attention output")
    if attn._qk_norm_phase not in (None, "post_reshape") or attn._qk_norm_per_head:
        out.append(f"QK-norm phase {attn._qk_norm_phase}")
    if kwargs:
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 4:
            out.append(f"a {mask.dim()}-D attention mask")
        if kwargs.get("position_embeddings") is None and getattr(cfg, "positional_embedding_type", None) == "rotary":
            out.append("no position embeddings on a rotary model")
    return out


def _rotary(attn: Any, q: Tensor, k: Tensor, position_embeddings: tuple[Tensor, Tensor], head_dim: int) -> tuple[Tensor, Tensor]:
    """The bridge's rotary step (same convention choice as the exact forward)."""
    from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (
        _apply_rotary_pos_emb_adjacent_pairs,
    )
    from transformer_lens.utilities.hf_utils import get_rotary_pct_from_config
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cos, sin = attn._apply_position_embedding_hooks(position_embeddings)
    rotate: Any = apply_rotary_pos_emb
    if getattr(attn.config, "rotary_interleaved_cos_sin", False):
        rotate = partial(_apply_rotary_pos_emb_adjacent_pairs, relayout_cos_sin=False)
    elif getattr(attn.config, "rotary_adjacent_pairs", False):
        rotate = _apply_rotary_pos_emb_adjacent_pairs
    rotary_dim = cos.shape[-1]
    if rotary_dim * 2 == head_dim and get_rotary_pct_from_config(attn.config) == 1.0:
        return rotate(q, k, torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1))
    if rotary_dim < head_dim:
        q_rot, k_rot = rotate(q[..., :rotary_dim], k[..., :rotary_dim], cos, sin)
        return torch.cat([q_rot, q[..., rotary_dim:]], dim=-1), torch.cat([k_rot, k[..., rotary_dim:]], dim=-1)
    return rotate(q, k, cos, sin)


def _boolean_mask(mask: Tensor | None) -> Tensor | None:
    """A 4-D HF mask as booleans (True = attend); raises ``ValueError`` on an additive bias.

    Boolean masks (the HF SDPA layout) pass as they are; a float mask of 0 / large-negative
    entries (the HF eager layout) becomes ``mask == 0``.
    """
    if mask is None or mask.dtype == torch.bool:
        return mask
    allowed = mask == 0
    if not bool((allowed | (mask <= torch.finfo(mask.dtype).min / 2)).all()):
        raise ValueError("the attention mask carries an additive bias")
    return allowed


def _sdpa_mask(mask: Tensor | None, q_len: int, kv_len: int, device: torch.device) -> tuple[Tensor | None, bool]:
    """``(attn_mask, is_causal)`` for the kernel from the layer's boolean mask (or ``None``).

    ``None`` (nothing padded): the kernel's causal mask when ``q == kv``, no mask for one query,
    else the bottom-right-aligned causal band, as the exact path builds it. A mask is cut to the
    live queries and keys as the exact path cuts it.
    """
    if mask is not None:
        return mask[..., -q_len:, :kv_len], False
    if q_len == kv_len:
        return None, True
    if q_len == 1:
        return None, False
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(diagonal=kv_len - q_len), False


def _n_scores(attn: Any, hidden_states: Tensor, kwargs: dict[str, Any]) -> int:
    """Query x key count of this call (keys: the mask's, else the queries plus the cached ones)."""
    q_len = int(hidden_states.shape[-2])
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() == 4:
        return q_len * int(mask.shape[-1])
    cache = kvcache.cache_from_kwargs(kwargs)
    past = 0
    if cache is not None and hasattr(cache, "get_seq_length"):
        layer = getattr(attn, "_layer_idx", None)
        past = int(cache.get_seq_length() if layer is None else cache.get_seq_length(layer))
    return q_len * (q_len + past)


def _fast_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
    """The bridge attention forward with the attention core on the fused SDPA kernel."""
    state: FastAttention | None = self.__dict__.get(_DEPTH_ATTR)
    cls = _attention_class()
    if "hidden_states" in kwargs:
        hidden_states = kwargs.pop("hidden_states")
    elif args and isinstance(args[0], Tensor):
        hidden_states, args = args[0], args[1:]
    else:
        return cls.forward(self, *args, **kwargs)
    if state is not None and _ROWS_ATTR not in self.__dict__ and _n_scores(self, hidden_states, kwargs) < state.min_scores:
        state.short_calls += 1
        return cls.forward(self, hidden_states, *args, **kwargs)
    blockers = fast_path_blockers(self, kwargs)
    try:
        attention_mask = _boolean_mask(kwargs.get("attention_mask"))
    except ValueError as exc:
        blockers.append(str(exc))
    if args or blockers:
        if state is not None:
            state.exact_calls += 1
        return cls.forward(self, hidden_states, *args, **kwargs)
    kwargs.pop("attention_mask", None)
    position_embeddings = kwargs.pop("position_embeddings", None)
    hf_attn: Any = self.original_component

    hidden_states = self.hook_in(hidden_states)
    input_shape = hidden_states.shape[:-1]
    head_dim = int(hf_attn.head_dim)
    hidden_shape = (*input_shape, -1, head_dim)
    q = self.q(hidden_states).view(hidden_shape).transpose(1, 2)
    k = self.k(hidden_states).view(hidden_shape).transpose(1, 2)
    v = self.v(hidden_states).view(hidden_shape).transpose(1, 2)
    if "q_norm" in self.submodules:
        q = self.hook_q_normed(self.q_norm(q))
        if "k_norm" in self.submodules:
            k = self.hook_k_normed(self.k_norm(k))
    if position_embeddings is not None:
        q, k = _rotary(self, q, k, position_embeddings, head_dim)
    if hasattr(self, "hook_rot_q"):
        q = self.hook_rot_q(q)
    if hasattr(self, "hook_rot_k"):
        k = self.hook_rot_k(k)
    k, v = self._update_kv_cache(k, v, **kwargs)
    groups = int(getattr(hf_attn, "num_key_value_groups", 1))
    if groups > 1:
        from transformers.models.llama.modeling_llama import repeat_kv

        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    mask, causal = _sdpa_mask(attention_mask, q.shape[-2], k.shape[-2], q.device)
    capture = self.__dict__.get(_ROWS_ATTR)
    if capture is not None:
        capture(q, k, mask, causal, float(getattr(hf_attn, "scaling", head_dim**-0.5)))
    visible = None
    if mask is not None:
        visible = mask.any(-1, keepdim=True)  # rows with no visible key: 0 out (compatibility mode), no NaN
        if not bool(visible.all()):
            mask = mask.clone()
            mask[..., 0] |= ~visible[..., 0]
        else:
            visible = None
    scale = float(getattr(hf_attn, "scaling", head_dim**-0.5))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
    if visible is not None:
        out = out * visible.to(out.dtype)
    out = out.transpose(1, 2).contiguous().reshape(*input_shape, -1)
    o_weight = getattr(getattr(self.o, "original_component", None), "weight", None)
    if isinstance(o_weight, Tensor) and o_weight.dtype.is_floating_point and out.dtype != o_weight.dtype:
        out = out.to(o_weight.dtype)
    out = self.hook_out(self.o(out))
    if state is not None:
        state.fast_calls += 1
    return out, None


def _pattern_rows(q: Tensor, k: Tensor, mask: Tensor | None, causal: bool, scale: float, rows: Tensor) -> Tensor:
    """The softmax attention of query rows ``rows`` (indices into this call's queries):
    ``[batch, head, len(rows), kv]`` float32, with the mask the kernel gets (module docstring of
    :func:`attention_rows`)."""
    q_len, kv_len = q.shape[-2], k.shape[-2]
    r = rows.to(q.device)
    scores = (q[..., r, :].float() @ k.float().transpose(-1, -2)) * scale
    if mask is not None:
        allowed = mask[..., r, :].to(torch.bool)
    else:  # the bottom-right-aligned causal band (no mask for one query: every key)
        keys = torch.arange(kv_len, device=q.device)
        allowed = keys[None, :] <= (r[:, None] + (kv_len - q_len)) if (causal or q_len > 1) else torch.ones(
            len(r), kv_len, dtype=torch.bool, device=q.device)
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = scores.softmax(-1)
    return torch.nan_to_num(out, nan=0.0).detach()  # a row with no visible key: 0 (compatibility mode)


@dataclass
class FastAttention:
    """The state of one :func:`fast_attention` block (counts are of attention-layer calls).

    Attributes:
        enabled: Whether the block runs the fast forward (``False``: exact everywhere, nested
            blocks included).
        min_scores: Calls with fewer queries x keys run the exact forward.
        layers: Attention components given the fast forward.
        fast_calls: Layer calls that ran on the fused kernel.
        exact_calls: Layer calls that fell back to the exact forward (a hook or a configuration
            the fast forward does not cover).
        short_calls: Layer calls below ``min_scores`` (exact forward).
    """

    enabled: bool = True
    min_scores: int = 0
    layers: int = 0
    fast_calls: int = 0
    exact_calls: int = 0
    short_calls: int = 0


def _bridge(model: Any) -> Any:
    bridge = getattr(model, "bridge", model)
    if not hasattr(bridge, "original_model"):
        raise ValueError(f"model must be a ThinkingModel or a TransformerBridge, got {type(model).__name__}")
    return bridge


@contextlib.contextmanager
def fast_attention(model: Any, enabled: bool = True, min_scores: int | None = None) -> Iterator[FastAttention]:
    """Run the model's attention on the fused SDPA kernel inside the block, where exactness allows.

    Every rotary attention component of the bridge gets the fast forward (module docstring);
    at each call it falls back to the exact forward where a hook the fast path cannot fire is
    attached (:data:`PATTERN_HOOKS`) or the configuration is not covered
    (:func:`fast_path_blockers`). On exit the components and the HF config are restored.
    Re-entrant: a nested block changes nothing and yields the outer block's state, so an outer
    ``enabled=False`` keeps every nested call (e.g. a ``gather`` inside) on the exact path.

    Args:
        model: A ThinkingModel or its TransformerBridge.
        enabled: ``False``: the exact forward everywhere inside the block, nested blocks too.
        min_scores: Layer calls with fewer than this many queries x keys per head run the exact
            forward (default :data:`MIN_SCORES`, 256 x 256; ``0``: every call that can run fast).
            Short attention costs the exact path little, and short runs keep its numbers bit
            for bit.

    Yields:
        A :class:`FastAttention` whose counters tell how many layer calls ran each path.

    Example:
        >>> with fast_attention(model) as fa:  # doctest: +SKIP
        ...     cache = gather(model, tokens, ["resid_pre", "z"])
        >>> fa.exact_calls  # doctest: +SKIP
        0
    """
    bridge = _bridge(model)
    outer: FastAttention | None = bridge.__dict__.get(_DEPTH_ATTR)
    if outer is not None:
        yield outer
        return
    if min_scores is None:
        min_scores = MIN_SCORES
    if isinstance(min_scores, bool) or not isinstance(min_scores, int) or min_scores < 0:
        raise ValueError(f"min_scores must be a non-negative int, got {min_scores!r}")
    state = FastAttention(enabled=enabled, min_scores=min_scores)
    cls = _attention_class()
    attns = [m for m in bridge.modules() if isinstance(m, cls)] if enabled else []
    hf_config = bridge.original_model.config
    old_impl = hf_config._attn_implementation
    saved = [(a, a.__dict__.get("forward")) for a in attns]
    object.__setattr__(bridge, _DEPTH_ATTR, state)
    try:
        if enabled:
            hf_config._attn_implementation = "sdpa"
        for a in attns:
            object.__setattr__(a, "forward", types.MethodType(_fast_forward, a))
            object.__setattr__(a, _DEPTH_ATTR, state)
        state.layers = len(attns)
        yield state
    finally:
        for a, fwd in saved:
            a.__dict__.pop(_DEPTH_ATTR, None)
            if fwd is None:
                a.__dict__.pop("forward", None)
            else:
                object.__setattr__(a, "forward", fwd)
        hf_config._attn_implementation = old_impl
        bridge.__dict__.pop(_DEPTH_ATTR, None)



def attention_reduce(
    model: Any,
    tokens: Tensor,
    layers: Any,
    reduce: Any,
    query_positions: Any = None,
    chunk: int = 256,
    attention_mask: Tensor | None = None,
) -> list[int]:
    """Stream attention patterns through ``reduce``, ``chunk`` query rows at a time, in one forward.

    One forward in :func:`fast_attention` (every call fast, ``min_scores=0``). In each requested
    layer, the pattern rows of ``chunk`` queries at a time are computed from the same (rotated,
    normed) queries and keys, scale and mask the fused kernel gets, soft-maxed in float32 as the
    bridge's exact path computes ``hook_pattern``, and handed to
    ``reduce(layer, query_rows [n], pattern [batch, head, n, kv])``. Nothing ``[pos, pos]`` is ever
    stored: memory is ``O(heads · chunk · pos)`` per layer. Rows of queries that see no key are 0
    (compatibility mode).

    Args:
        model: A ThinkingModel or its TransformerBridge.
        tokens: ``[batch, pos]`` token ids.
        layers: Block indices.
        reduce: Called once per (layer, chunk of queries), layer by layer.
        query_positions: Query positions (negative counts from the end); default all.
        chunk: Query rows per call of ``reduce``.
        attention_mask: Optional ``[batch, pos]`` padding mask passed to the model.

    Returns:
        The layers that could not run the fast forward (:func:`fast_path_blockers`) and were not
        reduced; callers fall back to hooking their ``hook_pattern``.
    """
    bridge = _bridge(model)
    if not isinstance(tokens, Tensor) or tokens.dim() != 2:
        raise ValueError(f"attention patterns: tokens must be a [batch, pos] tensor, got {getattr(tokens, 'shape', tokens)!r}")
    T = int(tokens.shape[1])
    qs = list(range(T)) if query_positions is None else [int(p) for p in query_positions]
    bad = [p for p in qs if not -T <= p < T]
    if bad or not qs:
        raise ValueError(f"attention patterns: query positions {bad or qs} are not in [-{T}, {T}) for {T} tokens")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"attention patterns: chunk must be a positive int, got {chunk!r}")
    rows = torch.tensor([p % T for p in qs], dtype=torch.long)
    ls = sorted({int(L) for L in layers})
    blocks = bridge.blocks
    if any(not 0 <= L < len(blocks) for L in ls):
        raise ValueError(f"attention patterns: layers {ls} must be in [0, {len(blocks)})")
    done: set[int] = set()

    def make(L: int) -> Any:
        def capture(q: Tensor, k: Tensor, mask: Tensor | None, causal: bool, scale: float) -> None:
            if q.shape[-2] != T:
                raise RuntimeError(f"attention patterns: layer {L} saw {q.shape[-2]} queries for {T} tokens")
            for c0 in range(0, len(rows), chunk):
                r = rows[c0 : c0 + chunk]
                reduce(L, r, _pattern_rows(q, k, mask, causal, scale, r))
            done.add(L)

        return capture

    mods = {L: blocks[L].attn for L in ls}
    kw: dict[str, Any] = {} if attention_mask is None else {"attention_mask": attention_mask}
    try:
        for L in ls:
            object.__setattr__(mods[L], _ROWS_ATTR, make(L))
        with torch.no_grad(), fast_attention(bridge, min_scores=0):
            bridge(tokens, return_type=None, **kw)
    finally:
        for L in ls:
            mods[L].__dict__.pop(_ROWS_ATTR, None)
    return [L for L in ls if L not in done]


def attention_rows(
    model: Any, tokens: Tensor, layers: Any, query_positions: Any, attention_mask: Tensor | None = None,
) -> dict[int, Float[Tensor, "batch head query key"]]:
    """Attention patterns of a few query rows at chosen layers, without any ``[pos, pos]`` pattern
    (:func:`attention_reduce`).

    Returns:
        ``{layer: [batch, head, len(query_positions), pos]}`` (float32, on the model's device);
        layers the fused path does not cover are left out.
    """
    got: dict[int, list[Tensor]] = {}
    attention_reduce(model, tokens, layers, lambda L, r, p: got.setdefault(L, []).append(p), query_positions,
                     chunk=1 << 30, attention_mask=attention_mask)
    return {L: v[0] for L, v in got.items()}
