"""Steering vectors for thinking models: extraction (difference of means, PCA), steering hooks,
and coefficient sweeps at decision points.

Vectors are per-layer residual directions from contrastive prompt sets with assistant prefixes
(vgel/repeng), from position sets inside traces (backtracking vs wrap-up points, ARBOR:
wj210/cot_backtrack) or from labelled spans (Venhoff et al. 2025: window mean minus the overall
mean, rescaled to the overall mean norm). :func:`steer` adds ``coeff * v`` to the residual stream
during generation, once at the last prompt token, continuously, or every k tokens (ARBOR's
"once" vs "continuous" injection), optionally only while the model is still thinking.
:func:`coefficient_sweep` measures a vector's effect on the next-token probability of
backtracking words and on greedy continuations, over coefficients, at groups of decision points.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from mechthink.generation import StreamTracker, continue_greedy
from mechthink.interventions import accuracy, backtrack_pattern, logits_at_last
from mechthink.progress import track
from mechthink.results import FlatResult, Result
from mechthink.stats import is_monotonic, mean

if TYPE_CHECKING:
    import pandas as pd

    from mechthink.models.thinking_model import ThinkingModel
    from mechthink.traces import Trace

__all__ = [
    "CoefficientSweep",
    "DecisionMetrics",
    "DecisionPoint",
    "DegenerationMetrics",
    "SteerMode",
    "SteeringVector",
    "StreamTracker",
    "activations_at",
    "coefficient_sweep",
    "coefficient_sweep_points",
    "contrastive_prompts",
    "decision_metrics",
    "decision_points",
    "metrics_of_points",
    "degeneration",
    "degeneration_table",
    "from_positions",
    "from_prompts",
    "from_spans",
    "steer",
    "steered_layers",
    "sweep_from_points",
]

log = logging.getLogger(__name__)

SteerMode = Literal["continuous", "once", "every_k"]
Method = Literal["mean_diff", "pca"]


# ============================================================================ the vector
@dataclass
class SteeringVector(Result):
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
        if not self.vectors.is_floating_point() or not bool(torch.isfinite(self.vectors).all()):
            bad = sorted({self.layers[i] for i in torch.nonzero(~torch.isfinite(self.vectors.float()))[:, 0].tolist()})
            raise ValueError(f"SteeringVector: vectors must be finite floats; layers {bad} hold NaN/inf")

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

    def to_frame(self) -> "pd.DataFrame":
        """One row per layer: ``layer``, ``norm``, ``hook``, ``method`` (``to_json`` has the vectors)."""
        import pandas as pd

        return pd.DataFrame({"layer": self.layers, "norm": self.norms.tolist(), "hook": self.hook,
                             "method": self.method})

    def plot(self, ax: Any = None) -> Any:
        """Bar chart of the direction's norm per layer."""
        from mechthink.plotting.steering import plot_vector_norms

        return plot_vector_norms(self, ax)

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

        if not Path(path).is_file():
            raise FileNotFoundError(f"SteeringVector.load: {path}: no such file")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                if "mechthink" not in header:
                    raise ValueError(f"{path}: not a mechthink steering vector (no 'mechthink' metadata)")
                vectors = f.get_tensor("vectors")
            meta = json.loads(header["mechthink"])
            return cls(vectors, meta["layers"], meta["hook"], meta["method"], meta.get("metadata", {}))
        except ValueError:
            raise
        except Exception as exc:  # safetensors raises its own error types for a non-safetensors file
            raise ValueError(f"SteeringVector.load: {path} is not a safetensors file written by "
                             f"SteeringVector.save ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from None


# ============================================================================ activations
def _hook_name(layer: int, hook: str) -> str:
    """The hook name of a vector's TransformerLens suffix (``"hook_resid_post"``) at ``layer``."""
    from mechthink.hooks import hook_name, suffix_kind

    return hook_name(layer, suffix_kind(hook))


def _layers(model: "ThinkingModel", layers: Sequence[int] | None) -> list[int]:
    out = list(range(model.n_layers)) if layers is None else [int(x) for x in layers]
    bad = [x for x in out if not 0 <= x < model.n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range for a {model.n_layers}-layer model")
    return out


def activations_at(
    model: "ThinkingModel",
    sequences: Sequence[Sequence[int]],
    positions: Sequence[Sequence[int]],
    layers: Sequence[int] | None = None,
    hook: str = "hook_resid_post",
    batch_size: int = 8,
) -> list[Float[Tensor, "pos layer d_model"]]:
    """Activations of ``blocks.{L}.{hook}`` at chosen positions of each token sequence
    (through :func:`mechthink.hooks.gather`: only those positions are kept).

    Returns:
        One ``[len(positions[i]), layer, d_model]`` float32 CPU tensor per sequence.
    """
    from mechthink.hooks import gather

    if len(sequences) != len(positions):
        raise ValueError(f"activations_at: {len(sequences)} sequences but {len(positions)} position lists")
    ls = _layers(model, layers)
    for seq, pos in zip(sequences, positions):
        if any(not -len(seq) <= int(x) < len(seq) for x in pos):
            raise ValueError(f"activations_at: positions {list(pos)} outside a sequence of length {len(seq)}")
    names = [_hook_name(L, hook) for L in ls]
    cache = gather(model, [list(map(int, s)) for s in sequences], names, positions=[list(map(int, p)) for p in positions],
                   batch_size=batch_size)
    stacked = torch.stack([cache[n] for n in names], dim=2).float()  # [batch, pos, layer, d]
    return [stacked[i, : len(p)] for i, p in enumerate(positions)]


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


# ============================================================================ steering
def steered_layers(model: "ThinkingModel", vector: SteeringVector, layers: Sequence[int] | None = None) -> list[int]:
    """The blocks :func:`steer` steers: ``layers``, or ``model.steering_layers`` ∩ ``vector.layers``.

    Raises:
        ValueError: a layer the vector has no direction for, or outside the model.
    """
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
    return _layers(model, use)


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

    * ``"once"``: only the last prompt token (ARBOR's "inject once").
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
    if not math.isfinite(float(coeff)):
        raise ValueError(f"coeff={coeff!r} is not finite; pass a finite number")
    if vector.vectors.shape[-1] != model.d_model:
        raise ValueError(f"steer: the vector has width {vector.vectors.shape[-1]} but {model.spec.name} has "
                         f"d_model={model.d_model}; extract it from this model")
    hook = vector.hook if hook is None else hook
    use = steered_layers(model, vector, layers)
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
class DegenerationMetrics(FlatResult):
    """Signs of degenerate generations (e.g. under strong steering).

    One trace's scalars have no figure of their own (``plot`` raises); plot a sweep of them.

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

    plotted_by: ClassVar[str] = "degeneration_table"


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


# ============================================================================ coefficient sweeps
@dataclass
class DecisionMetrics(FlatResult):
    """What a model does at a group of decision points (prefixes), under the active hooks.

    One group's scalars have no figure of their own (``plot`` raises); see :class:`CoefficientSweep`.

    Attributes:
        p_backtrack_next: Mean P(any backtracking word) as the next token.
        p_wait_next: Mean P("Wait", any single-token spelling) as the next token.
        backtrack_rate: Fraction of greedy continuations with a backtracking word in their first
            ``window`` tokens.
        wait_rate: Fraction whose first ``window`` tokens contain "Wait".
        backtrack_words_per_100_tokens: Backtracking words per 100 tokens of those windows.
        accuracy: Fraction of continuations whose last ``\\boxed{}`` is the gold answer.
        closed_rate: Fraction of continuations that produce ``think_close``.
    """

    p_backtrack_next: float
    p_wait_next: float
    backtrack_rate: float
    wait_rate: float
    backtrack_words_per_100_tokens: float
    accuracy: float
    closed_rate: float

    plotted_by: ClassVar[str] = "CoefficientSweep.plot"


#: The metric names of :class:`DecisionMetrics`, in order.
DECISION_METRICS: tuple[str, ...] = tuple(f.name for f in fields(DecisionMetrics))


@dataclass(frozen=True)
class DecisionPoint(FlatResult):
    """What the model does at one decision point (what :class:`DecisionMetrics` averages).

    Attributes:
        p_backtrack_next: P(any backtracking word) as the next token.
        p_wait_next: P("Wait", any single-token spelling) as the next token.
        backtracked: A backtracking word in the first ``window`` tokens of the greedy continuation.
        waited: "Wait" in those tokens.
        backtrack_words: Backtracking words in them.
        window_tokens: Tokens in them (``min(len, window)``).
        correct: The continuation's last ``\\boxed{}`` is the gold answer.
        closed: The continuation produces ``think_close``.
    """

    p_backtrack_next: float
    p_wait_next: float
    backtracked: bool
    waited: bool
    backtrack_words: int
    window_tokens: int
    correct: bool
    closed: bool

    plotted_by: ClassVar[str] = "CoefficientSweep.plot"


@torch.inference_mode()
def decision_points(
    model: "ThinkingModel",
    prefixes: Sequence[Sequence[int]],
    golds: Sequence[str],
    max_new_tokens: int = 64,
    window: int = 64,
    words: Sequence[str] | None = None,
    wait_word: str = "Wait",
) -> list[DecisionPoint]:
    """Measure each decision point under whatever hooks are active around the call.

    The next-token distribution after each prefix gives the probabilities; a greedy continuation
    of ``max_new_tokens`` tokens gives the rest (backtracking words counted in its first
    ``window`` tokens, accuracy and ``think_close`` over all of it).

    Args:
        model: The loaded model.
        prefixes: Token ids ending at each decision point.
        golds: The gold final answer per prefix.
        max_new_tokens: Greedy continuation length.
        window: Tokens of each continuation in which backtracking words are counted.
        words: Backtracking words (default ``model.spec.backtracking_words``).
        wait_word: The word of ``p_wait_next`` / ``waited``.
    """
    if not prefixes or len(prefixes) != len(golds):
        raise ValueError(f"decision_metrics: need one gold per prefix, got {len(prefixes)} prefixes and "
                         f"{len(golds)} golds")
    words = list(model.spec.backtracking_words if words is None else words)
    pat, bt_ids, wait_ids = backtrack_pattern(words), model.token_ids(words), model.token_ids([wait_word])
    nxt = [logits_at_last(model, p).exp() for p in prefixes]
    gens = continue_greedy(model, prefixes, max_new_tokens)
    out = []
    for q, g, gold in zip(nxt, gens, golds):
        text, first = model.to_string(g), model.to_string(g[:window])
        out.append(DecisionPoint(
            p_backtrack_next=float(q[bt_ids].sum()), p_wait_next=float(q[wait_ids].sum()),
            backtracked=bool(pat.search(first)), waited=f" {wait_word}" in first or first.startswith(wait_word),
            backtrack_words=len(pat.findall(first)), window_tokens=min(len(g), window),
            correct=accuracy([text], [gold]) == 1.0, closed=model.spec.think_close in text,
        ))
    return out


def metrics_of_points(points: Sequence[DecisionPoint]) -> DecisionMetrics:
    """The group's :class:`DecisionMetrics`: means over its points (per 100 window tokens for words)."""
    if not points:
        raise ValueError("metrics_of_points: no decision points")
    return DecisionMetrics(
        p_backtrack_next=mean([p.p_backtrack_next for p in points]),
        p_wait_next=mean([p.p_wait_next for p in points]),
        backtrack_rate=mean([float(p.backtracked) for p in points]),
        wait_rate=mean([float(p.waited) for p in points]),
        backtrack_words_per_100_tokens=100.0 * sum(p.backtrack_words for p in points)
        / max(sum(p.window_tokens for p in points), 1),
        accuracy=sum(p.correct for p in points) / len(points),
        closed_rate=mean([float(p.closed) for p in points]),
    )


def decision_metrics(model: "ThinkingModel", prefixes: Sequence[Sequence[int]], golds: Sequence[str],
                     max_new_tokens: int = 64, window: int = 64, words: Sequence[str] | None = None,
                     wait_word: str = "Wait") -> DecisionMetrics:
    """Measure a group of decision points under whatever hooks are active around the call:
    :func:`decision_points` (same arguments), averaged by :func:`metrics_of_points`."""
    return metrics_of_points(decision_points(model, prefixes, golds, max_new_tokens, window, words, wait_word))


@dataclass
class CoefficientSweep(Result):
    """:class:`DecisionMetrics` per group of decision points and steering coefficient.

    Attributes:
        coeffs: The coefficients, in sweep order.
        layers: The steered blocks.
        metrics: Per group, one :class:`DecisionMetrics` per coefficient; ``"mix"`` is the
            groups weighted equally (the field-wise mean).
        n_per_group: Decision points per group.
        model: The model's registry name.
    """

    coeffs: list[float]
    layers: list[int]
    metrics: dict[str, list[DecisionMetrics]]
    n_per_group: dict[str, int]
    model: str = ""

    @property
    def groups(self) -> list[str]:
        """The measured groups (``"mix"`` excluded)."""
        return [g for g in self.metrics if g != "mix"]

    def series(self, group: str, metric: str) -> list[float]:
        """``metric`` of ``group`` at every coefficient."""
        if group not in self.metrics or metric not in DECISION_METRICS:
            raise ValueError(f"series: group must be one of {list(self.metrics)} and metric one of {DECISION_METRICS}")
        return [float(getattr(m, metric)) for m in self.metrics[group]]

    def rows(self) -> list[dict[str, float]]:
        """One dict per coefficient: ``coeff`` and ``"{group}/{metric}"`` for every group and metric."""
        out = []
        for j, c in enumerate(self.coeffs):
            row: dict[str, float] = {"coeff": c}
            for g, ms in self.metrics.items():
                row.update({f"{g}/{k}": getattr(ms[j], k) for k in DECISION_METRICS})
            out.append(row)
        return out

    def is_monotonic(self, group: str, metric: str) -> bool:
        """Whether ``metric`` of ``group`` never decreases as the coefficient grows."""
        return is_monotonic(self.series(group, metric))

    def against_zero(self, group: str, metric: str, sign: int) -> bool:
        """Whether every coefficient of sign ``sign`` (-1 or 1) moves ``metric`` away from its
        value at coefficient 0 in that direction (lower for -1, higher for 1); vacuously True
        without a 0 coefficient."""
        if sign not in (-1, 1):
            raise ValueError(f"against_zero: sign must be -1 or 1, got {sign!r}")
        ys = self.series(group, metric)
        zero = [y for c, y in zip(self.coeffs, ys) if c == 0]
        return all(sign * (y - z) > 0 for c, y in zip(self.coeffs, ys) if sign * c > 0 for z in zero)

    def to_frame(self) -> "pd.DataFrame":
        """One row per (coefficient, group) with the seven metrics as columns."""
        import dataclasses

        import pandas as pd

        return pd.DataFrame([
            {"coeff": c, "group": g, **dataclasses.asdict(ms[j])}
            for j, c in enumerate(self.coeffs) for g, ms in self.metrics.items()
        ])

    def plot(self, ax: Any = None) -> Any:
        """P(backtracking word next) per group and the greedy backtrack rate, against the coefficient."""
        from mechthink.plotting.steering import plot_coefficient_sweep

        return plot_coefficient_sweep(self, ax)


def coefficient_sweep_points(model: "ThinkingModel", vector: SteeringVector,
                             groups: Mapping[str, tuple[Sequence[Sequence[int]], Sequence[str]]], coeffs: Sequence[float],
                             layers: Sequence[int] | None = None, mode: SteerMode = "continuous", max_new_tokens: int = 64,
                             window: int = 64) -> dict[str, list[list[DecisionPoint]]]:
    """Per group, per coefficient, the :func:`decision_points` under ``coeff * vector`` (the
    records a :class:`CoefficientSweep` averages; arguments as for :func:`coefficient_sweep`)."""
    if not groups or not coeffs:
        raise ValueError("coefficient_sweep: groups and coeffs must be non-empty")
    use = steered_layers(model, vector, layers)
    points: dict[str, list[list[DecisionPoint]]] = {g: [] for g in groups}
    for c in track(coeffs, "steering coefficients"):
        with steer(model, vector, layers=use, coeff=float(c), mode=mode):
            for g, (prefixes, golds) in groups.items():
                points[g].append(decision_points(model, prefixes, golds, max_new_tokens, window))
    return points


def sweep_from_points(
    coeffs: Sequence[float],
    layers: Sequence[int],
    points: Mapping[str, Sequence[Sequence[DecisionPoint]]],
    model_name: str = "",
) -> CoefficientSweep:
    """A :class:`CoefficientSweep` (with the ``"mix"`` of the groups) from per-point records."""
    metrics = {g: [metrics_of_points(ps) for ps in by_coeff] for g, by_coeff in points.items()}
    groups = list(metrics)
    metrics["mix"] = [
        DecisionMetrics(*(mean([getattr(metrics[g][j], k) for g in groups]) for k in DECISION_METRICS))
        for j in range(len(coeffs))
    ]
    return CoefficientSweep([float(c) for c in coeffs], list(layers), metrics,
                            {g: len(by_coeff[0]) for g, by_coeff in points.items()}, model_name)


def coefficient_sweep(
    model: "ThinkingModel",
    vector: SteeringVector,
    groups: Mapping[str, tuple[Sequence[Sequence[int]], Sequence[str]]],
    coeffs: Sequence[float],
    layers: Sequence[int] | None = None,
    mode: SteerMode = "continuous",
    max_new_tokens: int = 64,
    window: int = 64,
) -> CoefficientSweep:
    """Steer with ``coeff * vector`` for each coefficient and measure every group of decision points.

    Args:
        model: The loaded model.
        vector: The steering vector.
        groups: ``{name: (prefixes, golds)}``, e.g. prefixes ending after wrong and after
            correct steps (base rates of backtracking near 1 and near 0).
        coeffs: Coefficients (negative steers away).
        layers: Blocks to steer (default as :func:`steer`).
        mode: The :func:`steer` mode.
        max_new_tokens: Greedy continuation length per decision point.
        window: Tokens of each continuation in which backtracking words are counted.

    Returns:
        The sweep, with the ``"mix"`` of the groups.
    """
    points = coefficient_sweep_points(model, vector, groups, coeffs, layers, mode, max_new_tokens, window)
    return sweep_from_points(coeffs, steered_layers(model, vector, layers), points, model.spec.name)
