"""The one way to run tokens through a model and gather named activations.

Method: forward hooks on the requested TransformerLens hook points only (never a cache of every
hook), each keeping just the rows asked for (the chosen positions of each sequence, or the chosen
query rows of an attention pattern) and moving them off the model device at once, so stored
memory grows with the number of positions, not with ``pos``. Ragged sequences run right-padded in
batches with an attention mask and position ids from the mask; a long input can be prefilled in
chunks through a Hugging Face ``DynamicCache`` so that the per-layer ``pos x pos`` attention
scores never materialise (keys and values are cached, queries come ``chunk_size`` at a time).
With ``metric`` the hooked activations stay in the autograd graph and the gradients of the metric
with respect to them are returned alongside (attribution patching needs both). Hook names follow
TransformerLens (``transformer_lens.utilities.get_act_name``; TransformerLens' ``run_with_cache``
and ``names_filter`` are the reference this reproduces).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import numbers
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from mechthink.models.fast_attention import fast_attention
from mechthink.progress import track
from mechthink.results import Result

if TYPE_CHECKING:
    import pandas as pd

    from mechthink.models.thinking_model import ThinkingModel

__all__ = [
    "HOOK_KINDS",
    "ActivationCache",
    "gather",
    "hook_kind",
    "suffix_kind",
    "hook_name",
    "hook_names",
    "is_pattern_hook",
]

#: The per-layer activation kinds :func:`hook_name` knows (TransformerLens names).
HOOK_KINDS: tuple[str, ...] = (
    "resid_pre",
    "resid_mid",
    "resid_post",
    "attn_out",
    "mlp_out",
    "mlp_post",
    "pattern",
    "z",
    "q",
    "k",
    "v",
    "attn_scores",
)
#: Kinds laid out ``[batch, head, query_pos, key_pos]``; every other kind is ``[batch, pos, ...]``.
PATTERN_KINDS: tuple[str, ...] = ("pattern", "attn_scores")

Metric = Callable[[Tensor], Tensor]
Reduce = Literal["mean", "sum"]
_LAYER_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


# ----------------------------------------------------------------------------------- hook names
def _n_layers(model: Any) -> int:
    cfg = getattr(model, "cfg", None) or getattr(getattr(model, "bridge", None), "cfg", None)
    if cfg is None:
        raise ValueError(f"model must be a ThinkingModel or a TransformerBridge, got {type(model).__name__}")
    return int(cfg.n_layers)


def _check_kind(kind: str) -> None:
    if kind not in HOOK_KINDS:
        raise ValueError(f"unknown hook kind {kind!r}; accepted kinds: {', '.join(HOOK_KINDS)}")


def hook_name(layer: int, kind: str, model: "ThinkingModel | Any | None" = None) -> str:
    """The TransformerLens hook name of an activation kind at a layer.

    Args:
        layer: Block index; negative counts from the end when ``model`` is given.
        kind: One of :data:`HOOK_KINDS` (``"resid_pre"`` -> ``blocks.L.hook_resid_pre``,
            ``"mlp_post"`` -> ``blocks.L.mlp.hook_post``, ``"pattern"`` ->
            ``blocks.L.attn.hook_pattern``, ...).
        model: When given (a ThinkingModel or its bridge), the layer is checked against its depth
            and the name against its hook points.

    Returns:
        The hook name, e.g. ``"blocks.3.hook_resid_pre"``.

    >>> hook_name(3, "resid_pre"), hook_name(0, "mlp_post"), hook_name(2, "pattern")
    ('blocks.3.hook_resid_pre', 'blocks.0.mlp.hook_post', 'blocks.2.attn.hook_pattern')
    """
    from transformer_lens.utilities import get_act_name

    _check_kind(kind)
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(f"layer must be an int, got {layer!r}")
    if model is not None:
        n = _n_layers(model)
        if not -n <= layer < n:
            raise ValueError(f"layer {layer} is out of range for a {n}-layer model; use 0..{n - 1} (or -{n}..-1)")
        layer %= n
    elif layer < 0:
        raise ValueError(f"layer {layer} is negative; pass model= to count from the end")
    name = str(get_act_name(kind, layer))
    if model is not None:
        bridge = getattr(model, "bridge", model)
        if name not in bridge.hook_dict:
            raise ValueError(f"{name!r} is not a hook point of this model (kind {kind!r} is absent from its blocks)")
    return name


def hook_names(model: "ThinkingModel | Any", kind: str, layers: Sequence[int] | range | None = None) -> list[str]:
    """:func:`hook_name` of ``kind`` at each of ``layers`` (default: every layer), in order."""
    _check_kind(kind)
    ls = range(_n_layers(model)) if layers is None else layers
    return [hook_name(int(L), kind, model) for L in ls]


def hook_kind(name: str) -> tuple[int, str] | None:
    """``(layer, kind)`` of a per-layer hook name (``"blocks.3.mlp.hook_post"`` -> ``(3, "mlp_post")``),
    ``None`` for names that are not one of :data:`HOOK_KINDS`."""
    m = _LAYER_RE.match(name)
    if m is None:
        return None
    return (int(m.group(1)), _SUFFIX_KIND[m.group(2)]) if m.group(2) in _SUFFIX_KIND else None


def suffix_kind(suffix: str) -> str:
    """The kind of a per-block TransformerLens suffix (``"hook_resid_post"`` -> ``"resid_post"``,
    ``"mlp.hook_post"`` -> ``"mlp_post"``), or a kind given as is; one-line error otherwise.

    >>> suffix_kind("hook_resid_post"), suffix_kind("mlp.hook_post"), suffix_kind("z")
    ('resid_post', 'mlp_post', 'z')
    """
    if suffix in HOOK_KINDS:
        return suffix
    if suffix in _SUFFIX_KIND:
        return _SUFFIX_KIND[suffix]
    raise ValueError(f"unknown hook {suffix!r}; pass a kind ({', '.join(HOOK_KINDS)}) or its suffix "
                     f"({', '.join(sorted(_SUFFIX_KIND))})")


def is_pattern_hook(name: str) -> bool:
    """Whether a hook is laid out ``[batch, head, query_pos, key_pos]`` (attention patterns/scores)."""
    return name.endswith(("attn.hook_pattern", "attn.hook_attn_scores"))


def _suffixes() -> dict[str, str]:
    from transformer_lens.utilities import get_act_name

    return {str(get_act_name(k, 0)).split(".", 2)[2]: k for k in HOOK_KINDS}


_SUFFIX_KIND: dict[str, str] = _suffixes()


# ---------------------------------------------------------------------------------- the result
@dataclass
class ActivationCache(Result):
    """Activations gathered by :func:`gather`, keyed by the hook names asked for.

    Layouts (``batch`` = the input sequences in the order given, ``pos`` = the gathered
    positions of each, padded to the longest list; see ``positions``):

    * position-wise hooks: ``[batch, pos, ...]`` (``[batch, pos, d_model]``, ``[batch, pos,
      head, d_head]`` for ``z``/``q``/``k``/``v``, ``[batch, pos, d_mlp]`` for ``mlp_post``);
    * attention patterns / scores: ``[batch, head, pos, key]`` — only the gathered query rows,
      keys at absolute positions (a prefix cache's positions first), up to the last gathered
      query; keys after a query hold 0 (pattern) or ``-inf`` (scores), as in a full forward;
    * with ``reduce``: the positions axis is reduced away (``[batch, ...]``, ``[batch, head,
      key]`` for patterns).

    Attributes:
        acts: Hook name -> activation tensor (layouts above).
        positions: Token position (within the tokens given) of each gathered slot; ``-1``
            marks padding. Padded slots hold zeros.
        lengths: Token count of each sequence.
        prefix_len: Positions held by the ``past_key_values`` prefix (0 without one).
        reduce: ``None``, ``"mean"`` or ``"sum"`` over the gathered positions.
        grads: With a ``metric``: hook name -> d metric / d activation, the layout of ``acts``.
        metric: With a ``metric``: its value on each sequence.
        logits: With ``logits=True`` (or a metric): ``[batch, pos, d_vocab]`` at the gathered
            positions.
    """

    acts: dict[str, Tensor]
    positions: Int[Tensor, "batch pos"]
    lengths: Int[Tensor, "batch"]
    prefix_len: int = 0
    reduce: str | None = None
    grads: dict[str, Tensor] | None = None
    metric: Float[Tensor, "batch"] | None = None
    logits: Float[Tensor, "batch pos d_vocab"] | None = None

    # ---- mapping access
    def __getitem__(self, name: str) -> Tensor:
        if name not in self.acts:
            raise KeyError(f"{name!r} was not gathered; this cache holds {list(self.acts)[:4]} ({len(self.acts)} hooks)")
        return self.acts[name]

    def __contains__(self, name: object) -> bool:
        return name in self.acts

    def __iter__(self) -> Any:
        return iter(self.acts)

    def __len__(self) -> int:
        return len(self.acts)

    def keys(self) -> list[str]:
        return list(self.acts)

    @property
    def mask(self) -> Tensor:
        """``[batch, pos]``: True where a slot holds a gathered position."""
        return self.positions >= 0

    # ---- views
    def layers(self, kind: str) -> list[int]:
        """The layers at which ``kind`` was gathered, ascending."""
        _check_kind(kind)
        return sorted(L for L, k in (hook_kind(n) or (-1, "") for n in self.acts) if k == kind)

    def stack(self, kind: str, layers: Sequence[int] | None = None, grads: bool = False) -> Tensor:
        """The ``kind`` activations (or their gradients) stacked over layers: ``[layer, *layout]``,
        e.g. ``[layer, batch, pos, d_model]`` for residual hooks."""
        have = self.layers(kind)
        ls = have if layers is None else [int(L) for L in layers]
        missing = [L for L in ls if L not in have]
        if not ls or missing:
            raise ValueError(f"kind {kind!r} was gathered at layers {have}; cannot stack layers {missing or ls}")
        source = self._grads() if grads else self.acts
        return einops.rearrange([source[hook_name(L, kind)] for L in ls], "layer ... -> layer ...")

    def per_sequence(self, name: str, grads: bool = False) -> list[Tensor]:
        """One tensor per sequence with the padding removed (``[n_pos, ...]`` or, for patterns,
        ``[head, n_pos, key]``); reduced caches return ``[...]`` per sequence."""
        t = (self._grads() if grads else self.acts).get(name, None)
        if t is None:
            raise KeyError(f"{name!r} was not gathered")
        n_keys = [min(t.shape[-1], self.prefix_len + int(L)) for L in self.lengths]
        if self.reduce is not None:
            return [t[i, ..., :k] if is_pattern_hook(name) else t[i] for i, k in enumerate(n_keys)]
        counts = self.mask.sum(-1).tolist()
        if not is_pattern_hook(name):
            return [t[i, :n] for i, n in enumerate(counts)]
        return [t[i, :, :n, :k] for i, (n, k) in enumerate(zip(counts, n_keys))]

    def _grads(self) -> dict[str, Tensor]:
        if self.grads is None:
            raise ValueError("this cache has no gradients; gather with metric=...")
        return self.grads

    def to(self, device: torch.device | str) -> "ActivationCache":
        """A copy with every tensor on ``device``."""

        def move(d: dict[str, Tensor] | None) -> dict[str, Tensor] | None:
            return None if d is None else {k: v.to(device) for k, v in d.items()}

        return dataclasses.replace(
            self,
            acts=move(self.acts) or {},
            positions=self.positions.to(device),
            lengths=self.lengths.to(device),
            grads=move(self.grads),
            metric=None if self.metric is None else self.metric.to(device),
            logits=None if self.logits is None else self.logits.to(device),
        )

    # ---- Result views
    def to_frame(self) -> "pd.DataFrame":
        """One row per (hook, sequence): layer, kind, gathered positions and the mean L2 norm of
        the activation over them (over the last axis; for patterns, over keys)."""
        import pandas as pd

        rows = []
        for name in self.acts:
            L, kind = hook_kind(name) or (None, None)
            for i, t in enumerate(self.per_sequence(name)):
                n = int(self.mask[i].sum())
                norm = float(t.float().nan_to_num(neginf=0.0).norm(dim=-1).mean()) if t.numel() else float("nan")
                rows.append({"hook": name, "layer": L, "kind": kind, "sequence": i, "n_positions": n, "mean_norm": norm})
        return pd.DataFrame(rows, columns=["hook", "layer", "kind", "sequence", "n_positions", "mean_norm"])

    def to_json(self, path: str | Path | None = None) -> str:
        """A summary as JSON: the gathered positions, lengths and :meth:`to_frame` rows (the
        activations themselves are not serialised; ``torch.save(cache.acts, ...)`` keeps them)."""
        text = json.dumps(
            {
                "hooks": {n: list(t.shape) for n, t in self.acts.items()},
                "positions": self.positions.tolist(),
                "lengths": self.lengths.tolist(),
                "prefix_len": self.prefix_len,
                "reduce": self.reduce,
                "metric": None if self.metric is None else self.metric.tolist(),
                "rows": self.to_frame().to_dict(orient="records"),
            },
            indent=1,
        )
        if path is not None:
            Path(path).write_text(text)
        return text


# ------------------------------------------------------------------------------- input checks
def _is_index(x: Any) -> bool:
    """An integer scalar (Python, NumPy or a 0-d integer tensor), not a bool."""
    if isinstance(x, Tensor):
        return x.dim() == 0 and not x.is_floating_point() and x.dtype != torch.bool
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _one_sequence(s: Any, i: int) -> list[int]:
    if isinstance(s, Tensor):
        if s.is_floating_point() or s.dim() != 1:
            raise ValueError(f"tokens[{i}] must be a 1-D integer sequence, got {s.dtype} {tuple(s.shape)}")
        return [int(t) for t in s.tolist()]
    if _is_index(s) or isinstance(s, str) or not all(_is_index(t) for t in s):
        raise ValueError(f"tokens[{i}] is {s!r}; pass token ids, a list of token-id lists, or a tensor")
    return [int(t) for t in s]


def _sequences(tokens: Any, vocab: int) -> list[list[int]]:
    """The token sequences as lists of ids (one sequence -> a list of one)."""
    if isinstance(tokens, Tensor):
        if tokens.is_floating_point() or tokens.dim() not in (1, 2):
            raise ValueError(f"tokens must be integer ids of shape [pos] or [batch, pos], got {tokens.dtype} {tuple(tokens.shape)}")
        seqs = [tokens.tolist()] if tokens.dim() == 1 else tokens.tolist()
    else:
        items = list(tokens)
        single = bool(items) and all(_is_index(t) for t in items)
        seqs = [[int(t) for t in items]] if single else [_one_sequence(s, i) for i, s in enumerate(items)]
    if not seqs:
        raise ValueError("tokens is empty; pass one sequence of token ids or a list of them")
    for i, s in enumerate(seqs):
        if not s:
            raise ValueError(f"tokens[{i}] is an empty sequence; every sequence needs at least one token")
        bad = [t for t in s if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"tokens[{i}] holds id {bad[0]} outside the vocabulary [0, {vocab})")
    return seqs


def _positions(positions: Any, seqs: list[list[int]]) -> list[list[int]]:
    """Per sequence, the non-negative positions to gather (None: all)."""
    if positions is None:
        return [list(range(len(s))) for s in seqs]
    if isinstance(positions, Tensor):
        positions = positions.tolist()
    if _is_index(positions):
        per = [[int(positions)]] * len(seqs)
    else:
        positions = list(positions)
        if all(_is_index(p) for p in positions):
            per = [[int(p) for p in positions]] * len(seqs)
        else:
            if len(positions) != len(seqs):
                raise ValueError(f"positions has {len(positions)} lists for {len(seqs)} sequences; pass one list per sequence")
            per = []
            for i, p in enumerate(positions):
                p = p.tolist() if isinstance(p, Tensor) else p
                p = [p] if _is_index(p) else list(p)
                if not all(_is_index(q) for q in p):
                    raise ValueError(f"positions[{i}] must hold ints, got {p!r}")
                per.append([int(q) for q in p])
    out = []
    for i, (p, s) in enumerate(zip(per, seqs)):
        n = len(s)
        bad = [q for q in p if not -n <= q < n]
        if bad:
            raise ValueError(f"position {bad[0]} is outside sequence {i} (length {n}); positions must lie in [-{n}, {n})")
        out.append([q % n for q in p])
    return out


def _hook_list(model: "ThinkingModel", hooks: str | Sequence[str], layers: Sequence[int] | range | None) -> list[str]:
    if isinstance(hooks, str):
        hooks = [hooks]
    names: list[str] = []
    hook_dict = model.bridge.hook_dict
    for h in hooks:
        if h in HOOK_KINDS:
            expanded = hook_names(model, h, layers)
        elif h in hook_dict:
            expanded = [h]
        elif (m := _LAYER_RE.match(h)) is not None and int(m.group(1)) >= model.n_layers:
            raise ValueError(f"hook {h!r}: layer out of range for a {model.n_layers}-layer model; use 0..{model.n_layers - 1}")
        else:
            raise ValueError(f"unknown hook {h!r}; pass a hook name of model.bridge.hook_dict or a kind: {', '.join(HOOK_KINDS)}")
        names += [n for n in expanded if n not in names]
    if not names:
        raise ValueError("hooks is empty; name at least one hook or kind")
    return names


# ------------------------------------------------------------------------------------- gather
@dataclass
class _Plan:
    """Which (row, slot, column) cells one batch gathers, and the current chunk's share."""

    rows: Tensor  # local row in the batch
    slots: Tensor  # slot in the output positions axis
    cols: Tensor  # token column within the new tokens
    glob: Tensor  # global sequence index
    start: int = 0
    sel: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    def chunk(self, start: int, end: int) -> None:
        self.start = start
        self.sel = ((self.cols >= start) & (self.cols < end)).nonzero().flatten()


@dataclass
class _Store:
    """Gathered pieces (or running sums) per hook, on the output device."""

    n_seq: int
    n_slots: int
    key_len: int
    reduce: str | None
    pieces: dict[str, list[tuple[Tensor, Tensor, Tensor]]] = field(default_factory=dict)
    sums: dict[str, Tensor] = field(default_factory=dict)

    def fit_keys(self, name: str, sel: Tensor, grad: bool = False) -> Tensor:
        """Pattern rows cut or padded to ``key_len`` keys (0, or -inf for scores, as in a causal
        forward; gradients pad with 0)."""
        if not is_pattern_hook(name):
            return sel
        sel = sel[..., : self.key_len]
        fill = float("-inf") if name.endswith("hook_attn_scores") and not grad else 0.0
        return F.pad(sel, (0, self.key_len - sel.shape[-1]), value=fill)

    def add(self, name: str, glob: Tensor, slots: Tensor, sel: Tensor) -> None:
        if self.reduce is None:
            self.pieces.setdefault(name, []).append((glob, slots, sel))
            return
        v = sel.double().nan_to_num(neginf=0.0) if name.endswith("hook_attn_scores") else sel.double()
        if name not in self.sums:
            self.sums[name] = torch.zeros((self.n_seq, *v.shape[1:]), dtype=torch.float64, device=v.device)
        self.sums[name].index_add_(0, glob.to(v.device), v)

    def assemble(self, name: str, dtype: torch.dtype | None, counts: Tensor) -> Tensor:
        if self.reduce is not None:
            s = self.sums[name]
            if self.reduce == "mean":
                s = s / counts.clamp(min=1).to(s).reshape(-1, *[1] * (s.dim() - 1))
            return s.to(dtype or torch.float32)
        parts = self.pieces[name]
        first = parts[0][2]
        out = torch.zeros((self.n_seq, self.n_slots, *first.shape[1:]), dtype=dtype or first.dtype, device=first.device)
        for glob, slots, sel in parts:
            out[glob.to(out.device), slots.to(out.device)] = sel.to(out.dtype)
        return out.movedim(1, 2) if is_pattern_hook(name) else out


def gather(
    model: "ThinkingModel",
    tokens: Int[Tensor, "pos"] | Int[Tensor, "batch pos"] | Sequence[int] | Sequence[Sequence[int] | Tensor],
    hooks: str | Sequence[str],
    positions: int | Sequence[int] | Sequence[Sequence[int]] | Tensor | None = None,
    *,
    layers: Sequence[int] | range | None = None,
    batch_size: int = 8,
    chunk_size: int | None = None,
    reduce: Reduce | None = None,
    metric: Metric | None = None,
    logits: bool = False,
    past_key_values: Any = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    fast: bool = True,
) -> ActivationCache:
    """Run token sequences through the model and keep the named activations only.

    Args:
        model: The loaded model (its hooks and parameters are left as they were).
        tokens: One sequence (1-D tensor or list of ids), a ``[batch, pos]`` tensor, or a list
            of sequences of any lengths.
        hooks: Hook names (``"blocks.3.hook_resid_pre"``, ``"ln_final.hook_scale"``, any key of
            ``model.bridge.hook_dict``) and/or kinds of :data:`HOOK_KINDS` (every layer, or
            ``layers``).
        positions: ``None`` (every position), an int or a list of ints (the same positions in
            every sequence), or one list (or int) per sequence. Negative positions count from the
            end of each sequence; order and repeats are kept. For attention patterns/scores they
            select query rows.
        layers: Layers at which hook kinds are taken (default all).
        batch_size: Sequences per forward (right-padded, masked; results do not depend on it
            beyond float rounding).
        chunk_size: Prefill at most this many positions per forward through a ``DynamicCache``
            (keys/values cached; the transient attention scores shrink from ``pos²`` to
            ``chunk_size · pos`` per layer). ``None``: one forward per batch.
        reduce: ``"mean"`` or ``"sum"`` over the gathered positions of each sequence,
            accumulated in float64 while running (memory independent of ``pos``).
        metric: ``logits [1, pos, d_vocab] -> scalar``, applied to each sequence's own logits;
            gradients of it with respect to the gathered activations go to ``.grads`` and its
            values to ``.metric`` (autograd w.r.t. activations only; parameters untouched).
        logits: Also keep the logits at the gathered positions (``.logits``).
        past_key_values: A ``DynamicCache`` of one prefix (batch 1): the tokens continue it
            (every sequence gets a copy; the cache passed is not modified). Positions are within
            the new tokens; pattern keys start with the prefix's. With a ``metric`` the prefix is
            a constant (gradients stop at its cached keys and values).
        dtype: Cast the stored tensors (default: the activations' dtype; reductions float32).
        device: Where the stored tensors go (default CPU).
        fast: Run attention on the fused SDPA kernel in every layer whose ``hook_pattern`` /
            ``hook_attn_scores`` is not requested (:func:`mechthink.models.fast_attention.fast_attention`:
            memory linear in ``pos``, the same hooks fire, values equal to float rounding);
            ``False`` runs the bridge's exact attention everywhere.

    Returns:
        An :class:`ActivationCache`.
    """
    if not isinstance(fast, bool):
        raise ValueError(f"fast must be True or False, got {fast!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")
    if reduce not in (None, "mean", "sum"):
        raise ValueError(f"reduce must be None, 'mean' or 'sum', got {reduce!r}")
    if reduce is not None and metric is not None:
        raise ValueError("reduce and metric are exclusive: gradients are kept per position; reduce them afterwards")
    bridge = model.bridge
    seqs = _sequences(tokens, int(bridge.cfg.d_vocab))
    per = _positions(positions, seqs)
    names = _hook_list(model, hooks, layers)
    prefix_len = 0
    if past_key_values is not None:
        if not hasattr(past_key_values, "get_seq_length") or not hasattr(past_key_values, "batch_repeat_interleave"):
            raise ValueError(f"past_key_values must be a transformers DynamicCache, got {type(past_key_values).__name__}")
        prefix_len = int(past_key_values.get_seq_length())
    if not any(per):
        raise ValueError("positions selects no position in any sequence; pass at least one")
    n_slots = max(len(p) for p in per)
    last = max(max(p) for p in per if p)
    store = _Store(len(seqs), n_slots, prefix_len + last + 1, reduce)
    logit_store = _Store(len(seqs), n_slots, 0, None)
    grad_store = _Store(len(seqs), n_slots, prefix_len + last + 1, None)
    metric_vals = torch.zeros(len(seqs))
    run = _Runner(model, names, store, logit_store, grad_store, metric, logits, past_key_values, dtype, device, chunk_size, fast)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in track(batches, desc="gather") if len(batches) > 1 else batches:
        vals = run.batch([seqs[i] for i in batch], [per[i] for i in batch], batch)
        if vals is not None:
            metric_vals[torch.tensor(batch)] = vals
    missing = [n for n in names if n not in store.pieces and n not in store.sums]
    if missing:
        raise ValueError(f"hook {missing[0]!r} never fired on this model; check the name against model.bridge.hook_dict")
    counts = torch.tensor([len(p) for p in per])
    pos_t = torch.full((len(seqs), n_slots), -1, dtype=torch.long)
    for i, p in enumerate(per):
        pos_t[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    return ActivationCache(
        acts={n: store.assemble(n, dtype, counts) for n in names},
        positions=pos_t,
        lengths=torch.tensor([len(s) for s in seqs]),
        prefix_len=prefix_len,
        reduce=reduce,
        grads={n: grad_store.assemble(n, dtype, counts) for n in names} if metric is not None else None,
        metric=metric_vals if metric is not None else None,
        logits=logit_store.assemble("logits", dtype, counts) if (logits or metric is not None) else None,
    )


@dataclass
class _Runner:
    """Runs one batch (optionally in chunks) with the gathering hooks attached."""

    model: "ThinkingModel"
    names: list[str]
    store: _Store
    logit_store: _Store
    grad_store: _Store
    metric: Metric | None
    want_logits: bool
    prefix: Any
    dtype: torch.dtype | None
    device: torch.device | str
    chunk_size: int | None
    fast: bool = True
    plan: _Plan = field(default_factory=lambda: _Plan(*(torch.zeros(0, dtype=torch.long) for _ in range(4))))
    live: list[tuple[str, Tensor, Tensor, Tensor, Tensor]] = field(default_factory=list)  # (name, glob, slot, col, sel)
    batch_rows: int = 0

    @property
    def prefix_len(self) -> int:
        return 0 if self.prefix is None else int(self.prefix.get_seq_length())

    def _hook(self, name: str) -> Callable[..., Tensor | None]:
        axis = 2 if is_pattern_hook(name) else 1

        def hook(act: Tensor, hook: Any) -> Tensor | None:
            plan = self.plan
            a = act.movedim(axis, 1)
            if a.dim() < 2 or a.shape[0] not in (1, self.batch_rows):
                raise ValueError(f"gather cannot index hook {name!r} by position (activation shape {tuple(act.shape)})")
            if a.shape[0] != self.batch_rows:
                a = a.expand(self.batch_rows, *a.shape[1:])
            idx = plan.sel
            rows, cols = plan.rows[idx], plan.cols[idx] - plan.start
            if idx.numel() and int(cols.max()) >= a.shape[1]:
                raise ValueError(f"gather cannot index hook {name!r} by position (activation shape {tuple(act.shape)})")
            if self.metric is None:
                sel = self.store.fit_keys(name, a[rows, cols].detach()).to(self.device, self.dtype)
                self.store.add(name, plan.glob[idx], plan.slots[idx], sel)
                return None
            if not a.requires_grad:
                a = a.detach().requires_grad_(True)
            sel = a[rows, cols]
            self.live.append((name, plan.glob[idx], plan.slots[idx], plan.cols[idx], sel))
            return a.index_put((rows, cols), sel).movedim(1, axis)

        return hook

    def batch(self, seqs: list[list[int]], per: list[list[int]], glob: list[int]) -> Tensor | None:
        """Gather one batch; returns the per-sequence metric values when a metric is set."""
        self.batch_rows = len(seqs)
        rows = [r for r, p in enumerate(per) for _ in p]
        self.plan = _Plan(
            rows=torch.tensor(rows, dtype=torch.long),
            slots=torch.tensor([j for p in per for j in range(len(p))], dtype=torch.long),
            cols=torch.tensor([c for p in per for c in p], dtype=torch.long),
            glob=torch.tensor([glob[r] for r in rows], dtype=torch.long),
        )
        lengths = [len(s) for s in seqs]
        # Causal: without a metric nothing after the last gathered position is needed.
        width = max(lengths) if self.metric is not None else max((max(p) + 1 for p in per if p), default=0)
        if width == 0:
            return None
        with_grad = self.metric is not None
        with torch.inference_mode(False) if with_grad else torch.inference_mode(), torch.set_grad_enabled(with_grad):
            with fast_attention(self.model, enabled=self.fast), self.model.bridge.hooks(
                fwd_hooks=[(n, self._hook(n)) for n in self.names]
            ):
                logits = self._forward([s[:width] for s in seqs], width)
            return self._backward(logits, lengths) if with_grad else None

    def _forward(self, seqs: list[list[int]], width: int) -> Tensor | None:
        """Right-padded forward(s) of one batch, ``chunk_size`` columns at a time."""
        model, b, dev = self.model, len(seqs), self.model.device
        pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
        x = torch.full((b, width), int(pad), dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        for r, s in enumerate(seqs):
            x[r, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[r, : len(s)] = 1
        kv, p_len = None, self.prefix_len
        if self.prefix is not None:
            kv = copy.deepcopy(self.prefix)
            if b > 1:
                kv.batch_repeat_interleave(b)
        step = self.chunk_size or width
        if step < width and kv is None:
            from transformers import DynamicCache

            kv = DynamicCache()
        full_mask = torch.cat([torch.ones((b, p_len), dtype=torch.long), mask], dim=1).to(dev)
        pos_ids = (p_len + (mask.cumsum(-1) - 1).clamp(min=0)).to(dev)
        x = x.to(dev)
        need_logits = self.metric is not None or self.want_logits
        unembed_hooked = any(n.startswith(("unembed", "hook_unembed")) for n in self.names)
        keep = {} if need_logits or unembed_hooked else model.last_logits_kwargs()
        chunk_logits: list[Tensor] = []
        for s in range(0, width, step):
            e = min(width, s + step)
            self.plan.chunk(s, e)
            kw: dict[str, Any] = {"attention_mask": full_mask[:, : p_len + e], "position_ids": pos_ids[:, s:e], **keep}
            if kv is not None:
                kw["past_key_values"] = kv
            out = model.bridge(x[:, s:e], return_type="logits" if need_logits else None, **kw)
            if need_logits:
                chunk_logits.append(out)
                self._keep_logits(out)
        return torch.cat(chunk_logits, dim=1) if chunk_logits else None

    def _keep_logits(self, out: Tensor) -> None:
        plan = self.plan
        idx = plan.sel
        sel = out[plan.rows[idx], plan.cols[idx] - plan.start].detach().to(self.device, self.dtype)
        self.logit_store.add("logits", plan.glob[idx], plan.slots[idx], sel)

    def _backward(self, logits: Tensor | None, lengths: list[int]) -> Tensor:
        metric = self.metric
        if metric is None or logits is None:
            raise RuntimeError("gather: a metric backward without a metric or logits")
        vals = []
        for r, n in enumerate(lengths):
            v = metric(logits[r : r + 1, :n])
            if v.numel() != 1:
                raise ValueError(f"metric must return one value per sequence, got shape {tuple(v.shape)}")
            vals.append(v.reshape(()))
        total = torch.stack(vals).sum()
        live = [sel for *_, sel in self.live]
        grads = torch.autograd.grad(total, live, allow_unused=True) if live else []
        for (name, glob, slots, cols, sel), g in zip(self.live, grads):
            g = torch.zeros_like(sel) if g is None else g
            if is_pattern_hook(name):  # keys after the query: structurally 0, gradient defined as 0
                keys = torch.arange(g.shape[-1], device=g.device)
                future = keys[None, :] > (self.prefix_len + cols.to(g.device))[:, None]
                g = g.masked_fill(future[:, None, :], 0.0)
            self.store.add(name, glob, slots, self.store.fit_keys(name, sel.detach()).to(self.device, self.dtype))
            self.grad_store.add(name, glob, slots, self.grad_store.fit_keys(name, g.detach(), grad=True).to(self.device, self.dtype))
        self.live = []
        return torch.stack([v.detach().float().cpu() for v in vals])
