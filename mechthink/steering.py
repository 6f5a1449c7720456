"""Steering vectors for thinking models: extraction (difference of means, PCA) and steering hooks.

Vectors are per-layer residual directions from contrastive prompt sets with assistant prefixes
(repeng PR #69, seed 001), from position sets inside traces (backtracking vs wrap-up points,
ARBOR #22, seed 003) or from labelled spans (Venhoff et al. 2025: window mean minus the overall
mean, rescaled to the overall mean norm). :func:`steer` adds ``coeff * v`` to the residual stream
during generation, once at the last prompt token, continuously, or every k tokens (ARBOR #22's
"once" vs "continuous" injection), optionally only while the model is still thinking.
"""

from __future__ import annotations

import contextlib
import json
import logging
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from mechthink.models.kvcache import cache_from_kwargs

if TYPE_CHECKING:
    import pandas as pd

    from mechthink.models.thinking_model import ThinkingModel
    from mechthink.traces import Trace

__all__ = [
    "DegenerationMetrics",
    "SteerMode",
    "SteeringVector",
    "StreamTracker",
    "activations_at",
    "contrastive_prompts",
    "degeneration",
    "degeneration_table",
    "from_positions",
    "from_prompts",
    "from_spans",
    "steer",
]

log = logging.getLogger(__name__)

SteerMode = Literal["continuous", "once", "every_k"]
Method = Literal["mean_diff", "pca"]


# ============================================================================ the vector
@dataclass
class SteeringVector:
    """One steering direction per layer.

    Attributes:
        vectors: ``[layer, d_model]`` directions, row ``i`` for ``layers[i]``.
        layers: The block indices the rows belong to.
        hook: The hook suffix the activations were read at (``"hook_resid_post"``).
        method: ``"mean_diff"``, ``"pca"`` or ``"spans"``.
        metadata: Anything else (model name, example counts, …); JSON-serialisable.
    """

    vectors: Float[Tensor, "layer d_model"]
    layers: list[int]
    hook: str = "hook_resid_post"
    method: str = "mean_diff"
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layers = [int(x) for x in self.layers]
        if self.vectors.ndim != 2 or self.vectors.shape[0] != len(self.layers):
            raise ValueError(
                f"SteeringVector: vectors must be [len(layers)={len(self.layers)}, d_model], got {tuple(self.vectors.shape)}"
            )
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"SteeringVector: duplicate layers {self.layers}")

    def __getitem__(self, layer: int) -> Float[Tensor, " d_model"]:
        """The direction of block ``layer``."""
        if layer not in self.layers:
            raise KeyError(f"SteeringVector has no layer {layer}; it has {self.layers}")
        return self.vectors[self.layers.index(layer)]

    def __neg__(self) -> "SteeringVector":
        return SteeringVector(-self.vectors, list(self.layers), self.hook, self.method, dict(self.metadata))

    def __mul__(self, c: float) -> "SteeringVector":
        return SteeringVector(self.vectors * float(c), list(self.layers), self.hook, self.method, dict(self.metadata))

    __rmul__ = __mul__

    @property
    def norms(self) -> Float[Tensor, " layer"]:
        return self.vectors.norm(dim=-1)

    def save(self, path: str | Path) -> Path:
        """Write a safetensors file; the JSON metadata rides in the header (``"mechthink"``)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"layers": self.layers, "hook": self.hook, "method": self.method, "metadata": self.metadata}
        save_file({"vectors": self.vectors.detach().float().cpu().contiguous()}, str(path),
                  metadata={"mechthink": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "SteeringVector":
        """Read a file written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            if "mechthink" not in header:
                raise ValueError(f"{path}: not a mechthink steering vector (no 'mechthink' metadata)")
            vectors = f.get_tensor("vectors")
        meta = json.loads(header["mechthink"])
        return cls(vectors, meta["layers"], meta["hook"], meta["method"], meta.get("metadata", {}))


# ============================================================================ activations
def _hook_name(layer: int, hook: str) -> str:
    return f"blocks.{layer}.{hook}"


def _layers(model: "ThinkingModel", layers: Sequence[int] | None) -> list[int]:
    out = list(range(model.n_layers)) if layers is None else [int(x) for x in layers]
    bad = [x for x in out if not 0 <= x < model.n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range for a {model.n_layers}-layer model")
    return out


@torch.inference_mode()
def activations_at(
    model: "ThinkingModel",
    sequences: Sequence[Sequence[int]],
    positions: Sequence[Sequence[int]],
    layers: Sequence[int] | None = None,
    hook: str = "hook_resid_post",
) -> list[Float[Tensor, "pos layer d_model"]]:
    """Activations of ``blocks.{L}.{hook}`` at chosen positions of each token sequence.

    Returns:
        One ``[len(positions[i]), layer, d_model]`` float32 CPU tensor per sequence.
    """
    if len(sequences) != len(positions):
        raise ValueError(f"activations_at: {len(sequences)} sequences but {len(positions)} position lists")
    ls = _layers(model, layers)
    names = [_hook_name(L, hook) for L in ls]
    wanted = set(names)
    out = []
    for seq, pos in zip(sequences, positions):
        t = torch.tensor([int(i) for i in seq], dtype=torch.long, device=model.device)
        p = [int(x) for x in pos]
        if any(not -len(t) <= x < len(t) for x in p):
            raise ValueError(f"activations_at: positions {p} outside a sequence of length {len(t)}")
        _, cache = model.bridge.run_with_cache(t[None], names_filter=lambda n: n in wanted)
        acts = torch.stack([cache[n][0] for n in names], dim=1).float().cpu()  # [pos, layer, d]
        out.append(acts[p])
    return out


def _combine(
    pos: Float[Tensor, "n layer d_model"], neg: Float[Tensor, "m layer d_model"], method: Method, paired: bool
) -> Float[Tensor, "layer d_model"]:
    diff = pos.mean(0) - neg.mean(0)
    if method == "mean_diff":
        return diff
    if method != "pca":
        raise ValueError(f"method must be 'mean_diff' or 'pca', got {method!r}")
    if paired:
        if pos.shape[0] != neg.shape[0]:
            raise ValueError("pca with paired differences needs as many positive as negative examples")
        d = pos - neg
    else:  # unpaired sets: differences of each example to the other set's mean
        d = torch.cat([pos - neg.mean(0), neg.mean(0) - neg])
    d = einops.rearrange(d, "n layer d -> layer n d")
    out = []
    for L in range(d.shape[0]):
        _, _, vh = torch.linalg.svd(d[L].double(), full_matrices=False)
        pc = vh[0].float()
        proj = torch.dot(pc, diff[L])
        if proj < 0:
            pc, proj = -pc, -proj
        out.append(pc * proj)  # scaled to the mean difference's projection on the PC
    return torch.stack(out)


def _meta(model: "ThinkingModel", n_pos: int, n_neg: int, **extra: Any) -> dict[str, Any]:
    return {"model": model.spec.name, "n_positive": n_pos, "n_negative": n_neg, **extra}


def contrastive_prompts(
    model: "ThinkingModel",
    questions: Sequence[str],
    positive_prefix: str = "Wait, ",
    negative_prefix: str = "So the answer is ",
    thinking: Literal["on", "off", "default"] = "on",
) -> tuple[list[str], list[str]]:
    """Paired prompts: each question with a positive and a negative assistant prefix."""
    pos = [model.prompt(q, thinking=thinking, assistant_prefix=positive_prefix) for q in questions]
    neg = [model.prompt(q, thinking=thinking, assistant_prefix=negative_prefix) for q in questions]
    return pos, neg


def from_prompts(
    model: "ThinkingModel",
    positive: Sequence[str],
    negative: Sequence[str],
    layers: Sequence[int] | None = None,
    hook: str = "hook_resid_post",
    method: Method = "mean_diff",
) -> SteeringVector:
    """A vector from contrastive prompts, read at each prompt's last token.

    ``pca`` uses the paired differences ``positive[i] - negative[i]`` (sets of equal size).
    """
    if not positive or not negative:
        raise ValueError("from_prompts: both prompt sets must be non-empty")
    ls = _layers(model, layers)
    p_ids = model.to_token_lists(list(positive))
    n_ids = model.to_token_lists(list(negative))
    p = torch.cat(activations_at(model, p_ids, [[-1]] * len(p_ids), ls, hook))
    n = torch.cat(activations_at(model, n_ids, [[-1]] * len(n_ids), ls, hook))
    vec = _combine(p, n, method, paired=True)
    return SteeringVector(vec, ls, hook, method, _meta(model, len(p), len(n), source="prompts"))


def from_positions(
    model: "ThinkingModel",
    positive: Sequence[tuple[Sequence[int], Sequence[int]]],
    negative: Sequence[tuple[Sequence[int], Sequence[int]]],
    layers: Sequence[int] | None = None,
    hook: str = "hook_resid_post",
    method: Method = "mean_diff",
) -> SteeringVector:
    """A vector from positions inside token sequences: ``[(ids, positions), …]`` per set.

    E.g. positive = backtracking points, negative = wrap-up points. ``pca`` pairs examples by
    index when the sets have equal size, else uses differences to the other set's mean.
    """
    ls = _layers(model, layers)

    def gather(items: Sequence[tuple[Sequence[int], Sequence[int]]]) -> Tensor:
        acts = activations_at(model, [s for s, _ in items], [p for _, p in items], ls, hook)
        cat = torch.cat(acts) if acts else torch.zeros(0)
        if cat.shape[0] == 0:
            raise ValueError("from_positions: a position set is empty")
        return cat

    p, n = gather(positive), gather(negative)
    vec = _combine(p, n, method, paired=p.shape[0] == n.shape[0])
    return SteeringVector(vec, ls, hook, method, _meta(model, p.shape[0], n.shape[0], source="positions"))


def from_spans(
    model: "ThinkingModel",
    sequences: Sequence[Sequence[int]],
    spans: Sequence[Sequence[tuple[int, int]]],
    window: int = 3,
    layers: Sequence[int] | None = None,
    hook: str = "hook_resid_post",
) -> SteeringVector:
    """A vector from labelled spans (Venhoff et al. 2025).

    For each span ``(start, end)`` the mean activation over ``window`` tokens starting at the
    token before the span; the vector is the mean of those minus the overall mean activation (all
    positions of all sequences), rescaled per layer to the norm of the overall mean.
    """
    if len(sequences) != len(spans):
        raise ValueError("from_spans: one span list per sequence")
    ls = _layers(model, layers)
    all_pos = [list(range(len(s))) for s in sequences]
    acts = activations_at(model, sequences, all_pos, ls, hook)
    overall = torch.cat(acts).mean(0)  # [layer, d]
    rows = []
    for a, sp in zip(acts, spans):
        for start, _end in sp:
            s = max(int(start) - 1, 0)
            e = min(s + window, a.shape[0])
            if e <= s:
                raise ValueError(f"from_spans: span {start} outside a sequence of length {a.shape[0]}")
            rows.append(a[s:e].mean(0))
    if not rows:
        raise ValueError("from_spans: no spans given")
    vec = torch.stack(rows).mean(0) - overall
    scale = overall.norm(dim=-1, keepdim=True) / vec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return SteeringVector(vec * scale, ls, hook, "spans",
                          _meta(model, len(rows), sum(len(s) for s in sequences), source="spans", window=window))


# ============================================================================ tracking generation
class StreamTracker:
    """Follows the token stream through the bridge's forward calls.

    Mechanism: a forward pre-hook on the embedding module records each call's input ids, and one
    on block 0 reads the KV-cache length before the call. A call on an empty cache starts a new
    stream (its last position is the last prompt token); a call on a non-empty cache continues
    it (the inputs are the tokens generated so far, fed back one step at a time). Per batch row
    the tracker keeps all ids seen and the absolute column at which ``think_close`` was
    completed (``None`` while thinking).

    Attributes:
        past: Cache length before the current call.
        width: Number of positions in the current call.
        prompt_end: Absolute column of the last prompt token of the current stream.
        history: Ids seen per row (left padding included).
        closed_at: Column of the last token of ``think_close`` per row, or None.
    """

    def __init__(self, model: "ThinkingModel") -> None:
        self.model = model
        tok = model.tokenizer
        self.close_ids = [int(i) for i in tok(model.spec.think_close, add_special_tokens=False)["input_ids"]]
        self.open_ids = [int(i) for i in tok(model.spec.think_open, add_special_tokens=False)["input_ids"]]
        self.past = 0
        self.width = 0
        self.prompt_end = 0
        self.new_stream = True
        self.history: list[list[int]] = []
        self.closed_at: list[int | None] = []
        self.prompt_len: list[int] = []
        self._handles: list[Any] = []

    # ------------------------------------------------------------ hooks
    def _on_embed(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = args[0] if args else kwargs.get("input_ids", kwargs.get("input"))
        if not isinstance(ids, Tensor) or ids.is_floating_point():
            return
        self._pending = ids.detach().cpu()

    def _on_block0(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kv = cache_from_kwargs(kwargs)
        past = int(kv.get_seq_length()) if kv is not None and hasattr(kv, "get_seq_length") else 0
        hidden = args[0] if args else kwargs.get("hidden_states")
        width = int(hidden.shape[1]) if isinstance(hidden, Tensor) else 0
        ids = getattr(self, "_pending", None)
        self._pending = None
        self.update(ids, past, width)

    def update(self, ids: Tensor | None, past: int, width: int) -> None:
        """Record one forward call (``ids``: ``[batch, width]`` or None)."""
        self.past, self.width = past, width
        self.new_stream = past == 0
        rows = [r.tolist() for r in ids] if ids is not None else None
        if self.new_stream:
            self.prompt_end = width - 1
            self.history = rows if rows is not None else []
            self.prompt_len = [len(r) for r in self.history]
            self.closed_at = [self._find_close(h, 0) for h in self.history]
            return
        if rows is None:
            return
        if len(rows) != len(self.history):  # a forked / re-batched cache
            if len(self.history) == 1:
                self.history = [list(self.history[0]) for _ in rows]
                self.closed_at = self.closed_at * len(rows)
                self.prompt_len = self.prompt_len * len(rows)
            else:
                log.debug("StreamTracker: batch changed %d -> %d; restarting row state", len(self.history), len(rows))
                self.history = [[] for _ in rows]
                self.closed_at = [None] * len(rows)
                self.prompt_len = [0] * len(rows)
        for i, r in enumerate(rows):
            if len(self.history[i]) > past:  # the cache was rewound (crop) and this call redoes columns
                del self.history[i][past:]
                c = self.closed_at[i]
                if c is not None and c >= past:
                    self.closed_at[i] = None
            start = len(self.history[i])
            self.history[i].extend(r)
            if self.closed_at[i] is None:
                self.closed_at[i] = self._find_close(self.history[i], max(0, start - len(self.close_ids) + 1))

    def _find_close(self, h: list[int], start: int) -> int | None:
        """Column of the last token of the first think_close after the last think_open (from start)."""
        n = len(self.close_ids)
        if n == 0:
            return None
        last_open = _last_index(h, self.open_ids)
        lo = max(start, (last_open + 1) if last_open is not None else 0)
        for j in range(lo, len(h) - n + 1):
            if h[j : j + n] == self.close_ids:
                return j + n - 1
        return None

    # ------------------------------------------------------------ queries
    def columns(self) -> range:
        """Absolute columns of the current call's positions."""
        return range(self.past, self.past + self.width)

    def n_generated(self, row: int) -> int:
        """Tokens generated and fed back so far in ``row`` (the current call's inputs included)."""
        if row >= len(self.history):
            return 0
        return max(0, len(self.history[row]) - self.prompt_len[row])

    def is_closed(self, row: int, column: int) -> bool:
        """Whether ``think_close`` has been completed at or before ``column`` in ``row``."""
        if row >= len(self.closed_at):
            return False
        c = self.closed_at[row]
        return c is not None and c <= column

    @contextlib.contextmanager
    def attached(self) -> Iterator["StreamTracker"]:
        """Register the tracker's module hooks for the duration of the block."""
        bridge = self.model.bridge
        try:
            self._handles.append(bridge.embed.register_forward_pre_hook(self._on_embed, with_kwargs=True))
            self._handles.append(bridge.blocks[0].register_forward_pre_hook(self._on_block0, with_kwargs=True))
            yield self
        finally:
            while self._handles:
                self._handles.pop().remove()


def _last_index(h: list[int], sub: list[int]) -> int | None:
    n = len(sub)
    if n == 0:
        return None
    for j in range(len(h) - n, -1, -1):
        if h[j : j + n] == sub:
            return j + n - 1
    return None


# ============================================================================ steering
@contextlib.contextmanager
def steer(
    model: "ThinkingModel",
    vector: SteeringVector,
    layers: Sequence[int] | None = None,
    coeff: float = 1.0,
    mode: SteerMode = "continuous",
    k: int = 1,
    relative: bool = False,
    thinking_only: bool = False,
    hook: str | None = None,
    from_position: int | None = None,
) -> Iterator[StreamTracker]:
    """Add ``coeff * v[L]`` to ``blocks.{L}.{hook}`` while the block is active.

    Which positions are steered (tracked by a :class:`StreamTracker`; see its docstring): a forward
    on an empty KV cache starts a stream and its last position is the last prompt token; later
    forwards on that cache are generated tokens.

    * ``"once"``: only the last prompt token (ARBOR #22's "inject once").
    * ``"continuous"``: the last prompt token and every later position (every generated token).
    * ``"every_k"``: the last prompt token and every ``k``-th token after it.

    With ``from_position`` the last-prompt-token column is fixed instead (useful for full-sequence
    forwards without a cache). With ``thinking_only``, a row stops being steered from the position
    whose input token completes ``think_close``. ``relative`` scales the unit direction by
    ``coeff`` times the residual norm at each steered position.

    Composes with :func:`mechthink.traces.generate` and the forked-cache probes of
    :mod:`mechthink.confidence` (any bridge call inside the block is steered by these rules).
    Hooks are removed in ``finally``; the model is unchanged afterwards.

    Args:
        model: The loaded model.
        vector: The steering vector.
        layers: Blocks to steer (default ``model.steering_layers`` ∩ ``vector.layers``).
        coeff: Scale (negative to steer away).
        mode: ``"continuous"``, ``"once"`` or ``"every_k"``.
        k: Period for ``"every_k"``.
        relative: Scale by the residual norm at each position.
        thinking_only: Stop after ``think_close`` was generated.
        hook: Hook suffix (default ``vector.hook``).
        from_position: Fixed absolute column of the last prompt token.

    Yields:
        The stream tracker (inspect ``tracker.history`` etc.).
    """
    if mode not in ("continuous", "once", "every_k"):
        raise ValueError(f"mode must be 'continuous', 'once' or 'every_k', got {mode!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    hook = vector.hook if hook is None else hook
    if layers is None:
        use = [L for L in model.steering_layers if L in vector.layers]
        if not use:
            raise ValueError(
                f"steer: the vector's layers {vector.layers} miss the default steering layers "
                f"{list(model.steering_layers)}; pass layers="
            )
    else:
        use = [int(L) for L in layers]
        missing = [L for L in use if L not in vector.layers]
        if missing:
            raise ValueError(f"steer: the vector has no direction for layers {missing} (it has {vector.layers})")
    _layers(model, use)
    tracker = StreamTracker(model)
    coeff = float(coeff)

    def mask_for(act: Tensor) -> Tensor:
        """[batch, pos] bool of positions to steer in this call."""
        b, w = act.shape[0], act.shape[1]
        start = tracker.prompt_end if from_position is None else int(from_position)
        cols = torch.arange(tracker.past, tracker.past + w)
        rel = cols - start
        if mode == "once":
            m = rel == 0
        elif mode == "continuous":
            m = rel >= 0
        else:
            m = (rel >= 0) & (rel % k == 0)
        m = einops.repeat(m, "pos -> batch pos", batch=b).clone()
        if thinking_only:
            for r in range(b):
                c = tracker.closed_at[r] if r < len(tracker.closed_at) else None
                if c is not None:
                    m[r] &= cols < c
        return m.to(act.device)

    def make_fn(v: Tensor) -> Any:
        unit = v / v.norm().clamp_min(1e-12)

        def fn(act: Tensor, hook: Any) -> Tensor:
            m = mask_for(act)
            if not bool(m.any()):
                return act
            if relative:
                add = coeff * act.norm(dim=-1, keepdim=True) * unit.to(act.dtype)
            else:
                add = (coeff * v).to(act.dtype).expand_as(act)
            return torch.where(m[..., None], act + add, act)

        return fn

    fwd_hooks = [(_hook_name(L, hook), make_fn(vector[L].to(model.device))) for L in use]
    with tracker.attached(), model.bridge.hooks(fwd_hooks=fwd_hooks):
        yield tracker


# ============================================================================ degeneration
@dataclass
class DegenerationMetrics:
    """Signs of degenerate generations (e.g. under strong steering).

    Attributes:
        repetition: Fraction of repeated token n-grams (1 − unique / total) in the completion.
        compression: zlib-compressed size / raw size of the completion text (low = repetitive).
        closed: Whether ``think_close`` was produced.
        thinking_tokens: Thinking length in tokens (to think_close or the end).
        n: The n-gram order used.
    """

    repetition: float
    compression: float
    closed: bool
    thinking_tokens: int
    n: int = 4


def ngram_repetition(ids: Sequence[Any], n: int = 4) -> float:
    """1 − (unique n-grams / n-grams); 0 for sequences shorter than n."""
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return 0.0 if not grams else 1.0 - len(set(grams)) / len(grams)


def compression_ratio(text: str) -> float:
    """zlib-compressed bytes / raw bytes (1.0 for empty text)."""
    raw = text.encode("utf-8")
    return 1.0 if not raw else len(zlib.compress(raw, 9)) / len(raw)


def degeneration(trace: "Trace", n: int = 4) -> DegenerationMetrics:
    """Degeneration metrics of one generated trace (on its completion: ids after the prompt)."""
    gen = trace.ids[trace.n_prompt :]
    text = trace.text[trace.offsets[trace.n_prompt][0] :] if trace.n_prompt < len(trace.ids) else ""
    if trace.think_start is None:
        think_len = 0
    else:
        end = trace.think_end if trace.think_end is not None else len(trace.ids)
        think_len = max(0, end - max(trace.think_start, trace.n_prompt))
    return DegenerationMetrics(ngram_repetition(gen, n), compression_ratio(text), trace.think_end is not None, think_len, n)


def degeneration_table(traces: Sequence["Trace"], n: int = 4) -> "pd.DataFrame":
    """One row of :class:`DegenerationMetrics` per trace (plus ``id``)."""
    import dataclasses

    import pandas as pd

    return pd.DataFrame([{"id": t.id, **dataclasses.asdict(degeneration(t, n))} for t in traces])
