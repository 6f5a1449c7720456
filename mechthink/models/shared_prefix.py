"""Many rows continuing one cached prefix, the prefix's keys and values held once.

Forking a batch-1 KV cache for ``N`` rows (:func:`mechthink.generation.fork_cache`) copies the
prefix ``N`` times: ``N × layers × 2 × kv_heads × P × d_head`` values (an 8B Llama at
``P = 4096`` in bf16: 0.5 GB a row, 16 GB for 32 rollouts), and every decode step then reads
each row's copy. :class:`SharedPrefixCache` keeps one view of the prefix (no copy) and per-row
buffers for what the rows add; :func:`shared_prefix_attention`, registered as the attention
implementation :data:`IMPLEMENTATION`, attends each row's queries to the shared prefix (one
matrix product per key-value head for all rows) and to its own suffix, under one softmax.

Exact attention, not an approximation: the same softmax over the same keys as a forked cache,
up to float rounding (the scores are taken in two products instead of one, in the model's dtype,
and the softmax in float32: the arithmetic of transformers' eager attention, not of a fused
kernel). Queries attend to the whole prefix and causally within the suffix
(the row's own earlier positions and themselves). Hence what it does not cover, stopped with an
error where it can be seen: a suffix with left padding or holes (padding at a row's end is fine:
causally, real positions never see it), sliding-window or soft-capped attention, dropout.
With ``slots=True`` the rows need not move in step (continuous batching,
:func:`mechthink.generation._slot_loop`): each row reads its own length of the prefix (0 to all)
and its own positions, one new position per step written at its own index, and a finished row's
slot is handed to a new row (:meth:`SharedPrefixCache.start_row`, optionally with positions read
apart) while the others go on; the step's mask is one additive bias (:class:`Slots`).
It runs only on the Hugging Face model's own forward (:func:`mechthink.models.native.native_forward`,
which switches the attention implementation for the call); a bridge forward with hooks sees the
ordinary cache API and is refused (``rows_share_prefix`` says beforehand whether it can be used).
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer

IMPLEMENTATION = "mechthink_shared_prefix"
"""The name :func:`shared_prefix_attention` is registered under in transformers' ``AttentionInterface``."""

_ACTIVE: contextvars.ContextVar["SharedPrefixCache | None"] = contextvars.ContextVar("mechthink_shared_prefix", default=None)


class SharedPrefixLayer(DynamicLayer):
    """One layer: a view of the prefix's keys / values (batch 1, never copied) and per-row
    buffers for the positions added after it.

    ``keys`` / ``values`` are the rows' own positions only; ``get_seq_length()`` counts the
    prefix too, so positions and masks computed from the cache are those of the whole sequence.
    """

    def __init__(self, prefix_keys: Tensor, prefix_values: Tensor, n_rows: int, room: int,
                 lengths: Tensor | None = None, slots: "Slots | None" = None) -> None:
        super().__init__()
        self.lengths = lengths  # [rows]: each row's own prefix length (None: all of the prefix)
        self.slots = slots  # rows at their own lengths, replaced as they finish (None: rows in step)
        if prefix_keys.dim() != 4 or prefix_keys.shape[0] != 1 or prefix_values.shape[:3] != prefix_keys.shape[:3]:
            raise ValueError(f"shared prefix: keys / values must be [1, kv_heads, pos, d] alike, got "
                             f"{tuple(prefix_keys.shape)} / {tuple(prefix_values.shape)}")
        self.prefix_keys, self.prefix_values = prefix_keys, prefix_values
        self.n_prefix = int(prefix_keys.shape[-2])
        self.device = prefix_keys.device
        h = int(prefix_keys.shape[1])
        room = max(int(room), 1)
        # slots: a row's buffer is read past its own length (masked), so it must never hold NaN / inf
        make = torch.zeros if slots is not None else torch.empty
        self._kbuf = make((n_rows, h, room, prefix_keys.shape[-1]), dtype=prefix_keys.dtype, device=self.device)
        self._vbuf = make((n_rows, h, room, prefix_values.shape[-1]), dtype=prefix_values.dtype, device=self.device)
        self._n = 0
        self.keys, self.values = self._kbuf[:, :, :0], self._vbuf[:, :, :0]
        self.is_initialized = True

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:  # built initialised
        raise RuntimeError("SharedPrefixLayer is built initialised")

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        n_rows, h, _, d = self._kbuf.shape
        if key_states.dim() != 4 or key_states.shape[0] != n_rows or key_states.shape[1] != h or key_states.shape[-1] != d:
            raise ValueError(f"shared prefix cache of {n_rows} rows x {h} kv heads x d {d}: got new keys of shape "
                             f"{tuple(key_states.shape)}")
        m = int(key_states.shape[-2])
        if self.slots is not None:
            return self._slot_update(key_states, value_states)
        if self._n + m > self._kbuf.shape[-2]:  # grow by half (the views handed out keep their own buffers)
            cap = max(self._n + m, self._kbuf.shape[-2] + max(128, self._kbuf.shape[-2] // 2))
            kb, vb = self._kbuf.new_empty((n_rows, h, cap, d)), self._vbuf.new_empty((n_rows, h, cap, self._vbuf.shape[-1]))
            kb[:, :, : self._n], vb[:, :, : self._n] = self.keys, self.values
            self._kbuf, self._vbuf = kb, vb
        # positions >= self._n are covered by no view handed out so far: writing them in place is safe
        self._kbuf[:, :, self._n : self._n + m] = key_states
        self._vbuf[:, :, self._n : self._n + m] = value_states
        self._n += m
        self.keys, self.values = self._kbuf[:, :, : self._n], self._vbuf[:, :, : self._n]
        return self.keys, self.values

    def _grow(self, need: int) -> None:
        """Room for ``need`` own positions per row (zero-filled: slot rows read past their length)."""
        n_rows, h, have, d = self._kbuf.shape
        if need <= have:
            return
        cap = max(need, have + max(128, have // 2))
        kb, vb = self._kbuf.new_zeros((n_rows, h, cap, d)), self._vbuf.new_zeros((n_rows, h, cap, self._vbuf.shape[-1]))
        kb[:, :, :have], vb[:, :, :have] = self._kbuf, self._vbuf
        self._kbuf, self._vbuf = kb, vb

    def _slot_update(self, key_states: Tensor, value_states: Tensor) -> tuple[Tensor, Tensor]:
        """Slots: each row's one new position goes to its own next index (``slots.suffix``)."""
        if key_states.shape[-2] != 1:
            raise ValueError(f"a slot cache takes one new position per row and step, got {key_states.shape[-2]}")
        slots = self.slots
        self._grow(slots.width)
        rows = torch.arange(self._kbuf.shape[0], device=self.device)
        at = slots.suffix.to(self.device)
        self._kbuf[rows, :, at] = key_states[:, :, 0]
        self._vbuf[rows, :, at] = value_states[:, :, 0]
        self.keys, self.values = self._kbuf[:, :, : slots.width], self._vbuf[:, :, : slots.width]
        return self.keys, self.values

    def put(self, row: int, keys: Tensor, values: Tensor) -> None:
        """Slots: a new row's own first positions (``[kv_heads, m, d]``, e.g. a prompt read apart)."""
        m = int(keys.shape[-2])
        self._grow(m)
        self._kbuf[row, :, :m] = keys
        self._vbuf[row, :, :m] = values

    def get_seq_length(self) -> int:
        if self.slots is not None:  # rows differ; the longest row's positions so far
            return self.slots.prefix_width + self.slots.width - 1
        return self.n_prefix + self._n

    def batch_select_indices(self, indices: Tensor) -> None:
        self._kbuf, self._vbuf = self._kbuf[indices], self._vbuf[indices]
        if self.lengths is not None:
            self.lengths = self.lengths[indices.to(self.lengths.device)]
        self.keys, self.values = self._kbuf[:, :, : self._n], self._vbuf[:, :, : self._n]

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("a SharedPrefixCache can only grow or drop rows (batch_select_indices); "
                                  "fork the cache (generation.fork_cache) to crop, repeat or reorder it")

    crop = batch_repeat_interleave = reorder_cache = offload = prefetch = _refuse

    def reset(self) -> None:
        self._refuse()


class Slots:
    """The rows of a slot cache (:class:`SharedPrefixCache` with ``slots=True``), shared by its layers.

    Row ``r`` attends to the first ``prefix[r]`` positions of the shared prefix (0: none of it)
    and to its own ``suffix[r]`` stored positions plus the one written this step; a finished row's
    slot is handed to a new one (:meth:`SharedPrefixCache.start_row`) without touching the others.
    """

    def __init__(self, prefix: Tensor, suffix: Tensor) -> None:
        self.prefix, self.suffix = prefix, suffix
        self.refresh()

    def refresh(self) -> None:
        """Recompute the widths read this step (after a row started, moved on or left)."""
        self.prefix_width = int(self.prefix.max()) if self.prefix.numel() else 0
        self.width = int(self.suffix.max()) + 1 if self.suffix.numel() else 1
        self._bias: Tensor | None = None

    def bias(self, device: torch.device) -> Tensor:
        """``[rows, 1, 1, prefix_width + width]``: 0 where a row reads, -inf elsewhere (its prefix
        beyond its length; its own positions after the one written this step), made once a step."""
        if self._bias is None or self._bias.device != device:
            p, s = self.prefix_width, self.width
            beyond = torch.arange(p, device=device)[None, :] >= self.prefix.to(device)[:, None]
            later = torch.arange(s, device=device)[None, :] > self.suffix.to(device)[:, None]
            self._bias = torch.zeros((len(self.prefix), 1, 1, p + s), dtype=torch.float32, device=device).masked_fill(
                torch.cat([beyond, later], dim=1)[:, None, None, :], float("-inf"))
        return self._bias

    def select(self, indices: Tensor) -> None:
        self.prefix, self.suffix = self.prefix[indices.to(self.prefix.device)], self.suffix[indices.to(self.suffix.device)]
        self.refresh()


class SharedPrefixCache(Cache):
    """``n_rows`` rows continuing the first ``length`` positions of a batch-1 cache.

    ``length`` may also give one prefix length per row (rows continuing different prefixes of
    the same cached sequence, e.g. every sentence boundary of a trace): row ``r`` then attends to
    the first ``length[r]`` cached positions only, and its 2-D attention mask must say exactly
    that (ones up to its length, zeros to the longest, then its own positions).
    The prefix is a view of ``cache``'s tensors (``cache`` must not change while this is used);
    each row's new positions go into its own buffers (``room`` positions to start with; they grow).
    Use it on the HF model's own forward (``native_forward``, which sets the attention
    implementation while it runs).
    """

    def __init__(self, cache: Any, n_rows: int, length: int | Sequence[int] | None = None, room: int = 128,
                 slots: bool = False) -> None:
        if isinstance(n_rows, bool) or not isinstance(n_rows, int) or n_rows < 1:
            raise ValueError(f"n_rows must be a positive int, got {n_rows!r}")
        layers = list(getattr(cache, "layers", None) or [])
        if not layers or any(type(la).__name__ not in ("DynamicLayer", "_ReservedLayer") or not la.is_initialized
                             for la in layers):
            got = ", ".join(sorted({type(la).__name__ for la in layers})) if layers else "an empty cache"
            raise ValueError(f"shared prefix: the cache must be a prefilled DynamicCache of full-attention layers, got {got}")
        have = int(layers[0].keys.shape[-2])
        per_row = length is not None and not isinstance(length, int)
        lens = [int(v) for v in length] if per_row else [have if length is None else int(length)]
        if per_row and len(lens) != n_rows:
            raise ValueError(f"length: {len(lens)} prefix lengths for {n_rows} rows; pass one per row or one int")
        lowest = 0 if slots else 1  # a slot row may read none of the prefix (its own prompt in its slot)
        if not all(lowest <= v <= have for v in lens):
            raise ValueError(f"length={length!r} is outside the cache's {lowest}..{have} positions")
        if any(la.keys.shape[0] != 1 for la in layers):
            raise ValueError(f"shared prefix: the cache must hold one row, got {layers[0].keys.shape[0]}")
        dev = layers[0].keys.device
        if slots:
            if not per_row:
                lens = lens * n_rows
            self.slots: Slots | None = Slots(torch.tensor(lens, dtype=torch.long, device=dev),
                                             torch.zeros(n_rows, dtype=torch.long, device=dev))
            super().__init__(layers=[SharedPrefixLayer(la.keys, la.values, n_rows, room, None, self.slots) for la in layers])
            return
        self.slots = None
        n_pos = max(lens)
        ragged = per_row and min(lens) < n_pos
        super().__init__(layers=[SharedPrefixLayer(la.keys[:, :, :n_pos], la.values[:, :, :n_pos], n_rows, room,
                                                   torch.tensor(lens, dtype=torch.long, device=dev) if ragged else None)
                                 for la in layers])

    @property
    def n_prefix(self) -> int:
        return self.layers[0].n_prefix

    # ---- slots (``slots=True``): rows at their own lengths, a finished row's slot reused
    def start_row(self, row: int, prefix: int, own: Sequence[tuple[Tensor, Tensor]] | None = None) -> None:
        """Slots: row ``row`` now continues the first ``prefix`` positions of the shared prefix,
        with no own positions, or with ``own`` (per layer ``(keys, values)`` of shape
        ``[kv_heads, m, d]``: positions read apart, e.g. the row's own prompt when ``prefix`` is 0)."""
        slots = self._need_slots()
        if not 0 <= int(prefix) <= self.n_prefix:
            raise ValueError(f"start_row: prefix={prefix} is outside the cache's 0..{self.n_prefix} positions")
        m = 0
        if own is not None:
            if len(own) != len(self.layers):
                raise ValueError(f"start_row: own positions for {len(own)} layers, the cache has {len(self.layers)}")
            for layer, (k, v) in zip(self.layers, own):
                layer.put(row, k, v)
            m = int(own[0][0].shape[-2])
        slots.prefix[row], slots.suffix[row] = int(prefix), m

    def positions(self) -> Tensor:
        """Slots: the position of each row's next token (its prefix length plus its own positions), ``[rows]``."""
        slots = self._need_slots()
        return slots.prefix + slots.suffix

    def prepare(self) -> None:
        """Slots: before a step, the widths it reads (after :meth:`start_row` / :meth:`advance`)."""
        self._need_slots().refresh()

    def advance(self) -> None:
        """Slots: after a step, every row holds one more own position."""
        self._need_slots().suffix += 1

    def batch_select_indices(self, indices: Tensor) -> None:
        if self.slots is not None:
            self.slots.select(indices)
        super().batch_select_indices(indices)

    def _need_slots(self) -> Slots:
        if self.slots is None:
            raise RuntimeError("this SharedPrefixCache was built without slots=True")
        return self.slots

    @contextmanager
    def active(self) -> Iterator["SharedPrefixCache"]:
        """The cache :func:`shared_prefix_attention` reads the prefix from, while the block runs."""
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)

    def check_mask(self, attention_mask: Tensor | None) -> None:
        """Refuse a 2-D mask this attention would not honour: masked prefix positions, or a
        suffix whose kept positions are not a run from its start (left padding, holes)."""
        if attention_mask is None:
            return
        if self.slots is not None:
            raise ValueError("shared prefix: a slot cache carries each row's lengths itself; pass attention_mask=None")
        m = attention_mask.bool()
        p = self.n_prefix
        if m.dim() != 2 or m.shape[1] < p:
            raise ValueError(f"shared prefix: attention_mask must be [rows, pos] covering the {p} prefix positions, "
                             f"got {tuple(attention_mask.shape)}")
        lens = self.layers[0].lengths
        if lens is None and not bool(m[:, :p].all()):
            raise ValueError("shared prefix: attention_mask masks prefix positions; every row sees the whole prefix")
        if lens is not None and not bool(
                (m[:, :p] == (torch.arange(p, device=m.device)[None] < lens.to(m.device)[:, None])).all()):
            raise ValueError("shared prefix: attention_mask must keep each row's own prefix length exactly "
                             "(ones up to it, zeros after it within the prefix)")
        suf = m[:, p:].int()
        if suf.shape[1] > 1 and bool((suf[:, 1:] > suf[:, :-1]).any()):
            raise ValueError("shared prefix: a row's suffix is left-padded or has holes; only padding at a row's end "
                             "is supported (causal attention never reads it)")


def shared_prefix_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """Attention of ``query [rows, heads, q, d]`` over the active :class:`SharedPrefixCache`'s
    prefix (all of it) and ``key`` / ``value [rows, kv_heads, s, d]`` (the rows' own positions,
    the last ``q`` of them the queries', causally). Returns ``[rows, q, heads, d]``."""
    cache = _ACTIVE.get()
    if cache is None:
        raise RuntimeError(f"attention implementation {IMPLEMENTATION!r} ran outside SharedPrefixCache.active()")
    if dropout or sliding_window is not None or softcap is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError(f"{IMPLEMENTATION}: dropout, sliding windows, soft-capping and attention sinks "
                                  f"are not supported (got dropout={dropout}, sliding_window={sliding_window}, softcap={softcap})")
    layer = cache.layers[module.layer_idx]
    pk, pv = layer.prefix_keys, layer.prefix_values
    n, h, q, d = query.shape
    kvh, s, p = int(key.shape[1]), int(key.shape[-2]), layer.n_prefix
    slots, prefix_lengths = layer.slots, layer.lengths
    if slots is not None:  # each row at its own lengths: the prefix read as far as the longest row reads it
        if q != 1:
            raise ValueError(f"{IMPLEMENTATION}: a slot cache decodes one position per row and step, got {q}")
        p, prefix_lengths = slots.prefix_width, slots.prefix
        pk, pv = pk[:, :, :p], pv[:, :, :p]
    if h % kvh or key.shape[0] != n or s < q:
        raise ValueError(f"{IMPLEMENTATION}: query {tuple(query.shape)} does not fit keys {tuple(key.shape)}")
    g = h // kvh
    scale = d**-0.5 if scaling is None else float(scaling)
    qs = query.reshape(n, kvh, g * q, d)  # query head kvh_i * g + j reads key-value head kvh_i
    # the prefix: one [rows * group * q, d] x [d, P] product per key-value head
    sp = torch.matmul(qs.transpose(0, 1).reshape(kvh, n * g * q, d), pk[0].transpose(-1, -2))
    sp = sp.reshape(kvh, n, g * q, p).transpose(0, 1)
    ss = torch.matmul(qs, key.transpose(-1, -2))  # [rows, kvh, g * q, s]
    scores = torch.cat([sp, ss], dim=-1).float() * scale
    if slots is not None:  # each row's prefix length; its own positions after this step's are another row's
        scores += slots.bias(query.device)
    elif prefix_lengths is not None:  # rows on shorter prefixes of the cached sequence
        beyond = torch.arange(p, device=query.device)[None, :] >= prefix_lengths.to(query.device)[:, None]  # [rows, P]
        scores[..., :p] = scores[..., :p].masked_fill(beyond[:, None, None, :], float("-inf"))
    if q > 1:  # query i sits at suffix position s - q + i and sees suffix positions <= it
        see = torch.arange(s, device=query.device)[None, :] <= (s - q + torch.arange(q, device=query.device))[:, None]
        scores = scores.view(n, kvh, g, q, p + s).masked_fill(~torch.cat(
            [torch.ones((q, p), dtype=torch.bool, device=query.device), see], dim=1), float("-inf")).view(n, kvh, g * q, p + s)
    w = torch.softmax(scores, dim=-1).to(value.dtype)
    wp = w[..., :p].transpose(0, 1).reshape(kvh, n * g * q, p)
    out = torch.matmul(wp, pv[0]).reshape(kvh, n, g * q, -1).transpose(0, 1) + torch.matmul(w[..., p:], value)
    return out.reshape(n, h, q, -1).transpose(1, 2).contiguous(), None


AttentionInterface.register(IMPLEMENTATION, shared_prefix_attention)


def config_supports_shared_prefix(config: Any) -> bool:
    """Whether every attention layer a model ``config`` describes is one
    :func:`shared_prefix_attention` computes exactly: full (not sliding-window) attention without
    soft-capping."""
    cfg = getattr(config, "text_config", None) or config
    if cfg is None:
        return False
    kinds = getattr(cfg, "layer_types", None) or ["full_attention"]
    if any(k != "full_attention" for k in kinds) or getattr(cfg, "use_sliding_window", False):
        return False
    return not any(getattr(cfg, a, None) for a in ("attn_logit_softcapping", "sliding_window_pattern"))


def supports_shared_prefix(hf_model: torch.nn.Module) -> bool:
    """Whether calling ``hf_model`` itself on a :class:`SharedPrefixCache` is exact: its config
    qualifies (:func:`config_supports_shared_prefix`) and its attention is transformers' own
    modules (each calls the registered attention implementation). A model wrapped by a
    TransformerLens bridge is not: the bridge's attention components compute attention on the
    keys the cache hands them, the rows' own positions only (use the bridge's native forward)."""
    if not config_supports_shared_prefix(getattr(hf_model, "config", None)):
        return False
    return not any(type(m).__module__.startswith("transformer_lens") for m in hf_model.modules())


@contextmanager
def attending(hf_model: torch.nn.Module, cache: SharedPrefixCache) -> Iterator[None]:
    """Run ``hf_model`` calls on ``cache`` with :func:`shared_prefix_attention` (a plain HF model;
    the bridge's native forward does this itself)."""
    cfg = hf_model.config
    old = cfg._attn_implementation
    cfg._attn_implementation = IMPLEMENTATION
    try:
        with cache.active():
            yield
    finally:
        cfg._attn_implementation = old
