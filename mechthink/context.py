"""Where in the context does an importance or an attention go: words, regions, bins, receiver heads.

Method: token scores (e.g. :meth:`AttributionResult.token_importance`) are summed into words
through the tokenizer's character offsets; per sample they are min-max normalised and averaged
into the question region and ``n_bins`` equal bins of the thinking; the top-k words are compared
with the next words of the trace; the attention of chosen heads from a query position is summed
into the same bins. Source: the public repository wj210/cot_backtrack (understanding
backtracking in R1-distilled models).
Receiver heads: Bogdan et al. 2025, "Thought Anchors" (arXiv 2506.19143) — the kurtosis over key
units of the mean attention each unit receives from later queries (see :func:`receiver_heads`).

Words: a word is a run of word characters (letters, digits, ``_``, inner apostrophes) or a run
of punctuation; whitespace separates. A token belongs to the word its characters overlap most
(whitespace-only tokens belong to none), so a word's score is the sum of its tokens' scores.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechthink import stats
from mechthink.hooks import hook_names
from mechthink.results import Result

if TYPE_CHECKING:
    import pandas as pd

    from mechthink.models.thinking_model import ThinkingModel

__all__ = [
    "STOPWORDS",
    "BinnedAttention",
    "BinnedImportance",
    "ReceiverHeads",
    "FutureWordOverlap",
    "TopWordOverlap",
    "WordScores",
    "binned_attention",
    "binned_importance",
    "bin_edges",
    "future_word_overlap",
    "receiver_heads",
    "token_char_spans",
    "top_word_overlap",
    "word_scores",
    "words_of",
]

_WORD = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]+")

STOPWORDS: frozenset[str] = frozenset(
    """a about above after again against all am an and any are as at be because been before being
    below between both but by can could did do does doing down during each few for from further had
    has have having he her here hers herself him himself his how i if in into is it its itself just
    let me more most my myself no nor not now of off on once only or other our ours ourselves out over
    own same she should so some such than that the their theirs them themselves then there these they
    this those through to too under until up very was we were what when where which while who whom why
    will with would you your yours yourself yourselves s t don ll ve re m d us also may might must shall
    i'm it's let's that's there's we're we'll i'll""".split()
)


# ------------------------------------------------------------------------------------ words
def token_char_spans(
    tokenizer: Any, token_ids: Sequence[int] | Int[Tensor, "pos"]
) -> tuple[str, list[tuple[int, int]]]:
    """The decoded text of ``token_ids`` and each token's ``(start, end)`` character span in it.

    Every token that helps spell a character gets that character's span: the byte pieces of a
    multi-byte character all cover the whole character, so no token's score is lost when scores
    are summed into words (:func:`mechthink.traces.token_offsets`, made for locating positions
    in a trace, gives the leading byte pieces empty spans instead).

    Uses ``return_offsets_mapping`` when re-tokenizing the decoded text gives back the same ids;
    otherwise the spans come from decoding growing prefixes (exact for any tokenizer, slower).
    """
    ids = [int(i) for i in (token_ids.tolist() if isinstance(token_ids, Tensor) else token_ids)]
    text = tokenizer.decode(ids)
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if list(enc["input_ids"]) == ids:
            return text, [(int(a), int(b)) for a, b in enc["offset_mapping"]]
    except (NotImplementedError, TypeError, ValueError):
        pass
    return text, _prefix_spans(tokenizer, ids)


def _prefix_spans(tokenizer: Any, ids: list[int]) -> list[tuple[int, int]]:
    """Token spans by decoding growing prefixes; a token that leaves a character incomplete
    (the prefix ends in U+FFFD) gets the span of the characters the next tokens complete."""
    spans: list[tuple[int, int]] = [(0, 0)] * len(ids)
    pending: list[int] = []
    prev = 0
    for i in range(len(ids)):
        cur = tokenizer.decode(ids[: i + 1])
        if cur.endswith("\ufffd") and i + 1 < len(ids):
            pending.append(i)
            continue
        end = len(cur)
        for j in [*pending, i]:
            spans[j] = (min(prev, end), end)
        pending = []
        prev = end
    return spans


def words_of(text: str) -> list[tuple[str, int, int]]:
    """Words of a text as ``(word, start, end)`` (module docstring for what a word is)."""
    return [(m.group(), m.start(), m.end()) for m in _WORD.finditer(text)]


@dataclass
class WordScores(Result):
    """Token scores summed into words.

    Attributes:
        words: The words in order.
        spans: Character spans of the words in ``text``.
        scores: One summed score per word.
        token_word: For each token, the index of its word (−1 for whitespace-only tokens).
        text: The decoded text.
    """

    words: list[str]
    spans: list[tuple[int, int]]
    scores: Float[Tensor, "word"]
    token_word: Int[Tensor, "pos"]
    text: str

    def top(self, k: int = 10, stopwords: frozenset[str] | set[str] | None = STOPWORDS) -> list[tuple[str, float]]:
        """The k highest-scoring distinct words (lower-cased), stopwords and punctuation removed."""
        best: dict[str, float] = {}
        for w, s in zip(self.words, self.scores.tolist()):
            key = w.lower()
            if not re.search(r"\w", key) or (stopwords is not None and key in stopwords):
                continue
            best[key] = max(best.get(key, -float("inf")), s)
        return sorted(best.items(), key=lambda kv: -kv[1])[:k]

    def to_frame(self) -> "pd.DataFrame":
        """One row per word: word, start, end, score."""
        import pandas as pd

        return pd.DataFrame(
            {"word": self.words, "start": [a for a, _ in self.spans], "end": [b for _, b in self.spans], "score": self.scores.tolist()}
        )

    def plot(self, ax: Any = None, k: int = 20) -> Any:
        """Horizontal bars of the :meth:`top` ``k`` words."""
        from mechthink.plotting.attribution import plot_word_bars

        return plot_word_bars(self.top(k), ax=ax, title=f"top {k} words by summed token score")


def word_scores(
    tokenizer: Any, token_ids: Sequence[int] | Int[Tensor, "pos"], scores: Float[Tensor, "pos"]
) -> WordScores:
    """Sum token scores into words (each token to the word it overlaps most)."""
    ids = token_ids.tolist() if isinstance(token_ids, Tensor) else list(token_ids)
    if len(ids) != scores.shape[0]:
        raise ValueError(f"{len(ids)} tokens but {scores.shape[0]} scores")
    text, spans = token_char_spans(tokenizer, ids)
    words = words_of(text)
    starts = np.array([s for _, s, _ in words], dtype=np.int64)
    token_word = []
    for a, b in spans:
        best, best_ov = -1, 0
        j = max(int(np.searchsorted(starts, a, side="right")) - 1, 0)
        while j < len(words) and words[j][1] < b:
            ov = min(b, words[j][2]) - max(a, words[j][1])
            if ov > best_ov:
                best, best_ov = j, ov
            j += 1
        token_word.append(best)
    tw = torch.tensor(token_word, dtype=torch.long)
    out = torch.zeros(len(words), dtype=torch.float32)
    keep = tw >= 0
    out.index_add_(0, tw[keep], scores.detach().float().cpu()[keep])
    return WordScores(words=[w for w, _, _ in words], spans=[(s, e) for _, s, e in words], scores=out, token_word=tw, text=text)


# ------------------------------------------------------------------------------------- bins
def bin_edges(span: tuple[int, int], n_bins: int) -> list[tuple[int, int]]:
    """``n_bins`` contiguous, nearly equal ``[start, end)`` slices of a position span."""
    a, b = span
    if b - a < n_bins:
        raise ValueError(f"span {span} has {b - a} positions, fewer than n_bins={n_bins}")
    cuts = np.linspace(a, b, n_bins + 1).round().astype(int)
    return [(int(cuts[i]), int(cuts[i + 1])) for i in range(n_bins)]


def _spans_per_sample(
    n: int,
    question_span: tuple[int, int] | Sequence[tuple[int, int]],
    thinking_span: tuple[int, int] | Sequence[tuple[int, int]],
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """One question and one thinking span per sample (a single span is shared by all)."""
    qs = [question_span] * n if isinstance(question_span[0], int) else list(question_span)
    ts = [thinking_span] * n if isinstance(thinking_span[0], int) else list(thinking_span)
    if not (len(qs) == len(ts) == n):
        raise ValueError(f"{n} samples but {len(qs)} question spans and {len(ts)} thinking spans; pass one span or one per sample")
    return [(int(q[0]), int(q[1])) for q in qs], [(int(t[0]), int(t[1])) for t in ts]


def _bin_labels(n_bins: int) -> list[str]:
    w = 100 / n_bins
    return ["question"] + [f"{round(i * w)}-{round((i + 1) * w)}%" for i in range(n_bins)]


@dataclass
class BinnedImportance(Result):
    """Importance of the question and of ``n_bins`` bins of the thinking, per sample and averaged.

    Attributes:
        labels: ``["question", "0-20%", …]``.
        values: ``[sample, bin]`` (bin 0 is the question).
        mean: ``[bin]`` average over samples.
        normalize: The per-sample normalisation used.
    """

    labels: list[str]
    values: Float[Tensor, "sample bin"]
    mean: Float[Tensor, "bin"]
    normalize: str

    def to_frame(self) -> "pd.DataFrame":
        """One row per (sample, bin): value."""
        import pandas as pd

        rows = [(s, lab, float(self.values[s, j])) for s in range(self.values.shape[0]) for j, lab in enumerate(self.labels)]
        return pd.DataFrame(rows, columns=["sample", "bin", "value"])

    def plot(self, ax: Any = None, **kwargs: Any) -> Any:
        """Bars per region: mean ± s.e.m. over samples."""
        from mechthink.plotting.attribution import plot_binned

        return plot_binned(self.labels, self.values, ylabel="importance", ax=ax, **kwargs)


def binned_importance(
    scores: Any,
    question_span: tuple[int, int] | Sequence[tuple[int, int]],
    thinking_span: tuple[int, int] | Sequence[tuple[int, int]],
    n_bins: int = 5,
    normalize: str = "minmax",
    reduce: str = "mean",
) -> BinnedImportance:
    """Bin per-token importance into the question and ``n_bins`` equal bins of the thinking.

    Args:
        scores: One sample's token scores ``[pos]`` (a tensor or an ``AttributionResult``, whose
            ``token_importance()`` is used) or a list of them (one per sample).
        question_span: ``(start, end)`` token positions of the question (one, or one per sample).
        thinking_span: ``(start, end)`` of the thinking (typically up to the query position).
        n_bins: Number of thinking bins (5 = 20% bins as in wj210/cot_backtrack).
        normalize: ``"minmax"`` (per sample over question ∪ thinking positions) or ``"none"``.
        reduce: ``"mean"`` or ``"sum"`` of the normalised scores within a region.

    Returns:
        :class:`BinnedImportance` (``values [sample, 1 + n_bins]``, ``mean``).
    """
    single = not isinstance(scores, (list, tuple))
    samples = [scores] if single else list(scores)
    qs, ts = _spans_per_sample(len(samples), question_span, thinking_span)
    if normalize not in ("minmax", "none") or reduce not in ("mean", "sum"):
        raise ValueError(f"normalize={normalize!r} (use 'minmax'|'none'), reduce={reduce!r} (use 'mean'|'sum')")
    rows = []
    for s, q, t in zip(samples, qs, ts):
        v = s.token_importance() if hasattr(s, "token_importance") else torch.as_tensor(s)
        v = v.detach().float().cpu()
        regions = [tuple(q)] + bin_edges(tuple(t), n_bins)
        idx = torch.cat([torch.arange(a, b) for a, b in regions])
        if normalize == "minmax":
            lo, hi = v[idx].min(), v[idx].max()
            v = (v - lo) / (hi - lo) if hi > lo else torch.zeros_like(v)
        agg = [getattr(v[a:b], reduce)() for a, b in regions]
        rows.append(torch.stack(agg))
    values = torch.stack(rows)
    return BinnedImportance(labels=_bin_labels(n_bins), values=values, mean=values.mean(0), normalize=normalize)


# ------------------------------------------------------------------------------- word overlap
@dataclass
class TopWordOverlap(Result):
    """Overlap of the top-k important words with the next words of the trace.

    Attributes:
        top_words: The k words (lower-cased) with their scores.
        hits: Whether each appears among the next ``horizon`` words.
        overlap: Fraction of hits (NaN when there are no top words).
        horizon: How many future words were searched.
    """

    top_words: list[tuple[str, float]]
    hits: list[bool]
    overlap: float
    horizon: int

    def to_frame(self) -> "pd.DataFrame":
        """One row per top word: word, score, in_future."""
        import pandas as pd

        return pd.DataFrame(
            {"word": [w for w, _ in self.top_words], "score": [s for _, s in self.top_words], "in_future": self.hits}
        )

    def plot(self, ax: Any = None) -> Any:
        """Horizontal bars of the top words, coloured by whether they appear in the future."""
        from mechthink.plotting.attribution import plot_word_bars

        return plot_word_bars(self.top_words, hits=self.hits, ax=ax, title=f"top words: {self.overlap:.0%} among the next {self.horizon}")


def top_word_overlap(
    words: Sequence[str] | WordScores,
    scores: Float[Tensor, "word"] | Sequence[float] | None,
    future_words: Sequence[str] | str,
    k: int = 10,
    stopwords: frozenset[str] | set[str] | None = STOPWORDS,
    horizon: int = 100,
) -> TopWordOverlap:
    """Fraction of the top-k words (stopwords and punctuation removed, lower-cased, distinct)
    that appear among the first ``horizon`` words of ``future_words`` (wj210/cot_backtrack: ≈41%).

    Args:
        words: Context words (or a :class:`WordScores`, then ``scores`` may be None).
        scores: One score per word (higher = more important).
        future_words: The words after the query position, or their text.
        k: How many top words.
        stopwords: Words to drop (lower-case); None keeps all.
        horizon: How many future words to search.
    """
    if isinstance(words, WordScores):
        ws = words if scores is None else WordScores(words.words, words.spans, torch.as_tensor(scores, dtype=torch.float32), words.token_word, words.text)
    else:
        if scores is None or len(words) != len(scores):
            raise ValueError("pass one score per word")
        ws = WordScores(list(words), [(0, 0)] * len(words), torch.as_tensor(list(scores), dtype=torch.float32), torch.zeros(0, dtype=torch.long), "")
    fut = [w for w, _, _ in words_of(future_words)] if isinstance(future_words, str) else list(future_words)
    future = {w.lower() for w in fut[:horizon]}
    top = ws.top(k, stopwords)
    hits = [w in future for w, _ in top]
    return TopWordOverlap(top_words=top, hits=hits, overlap=float(np.mean(hits)) if hits else float("nan"), horizon=horizon)


@dataclass
class FutureWordOverlap(Result):
    """:func:`top_word_overlap` of many samples against what the model writes next.

    Attributes:
        overlaps: One :class:`TopWordOverlap` per sample.
        continuations: The generated text after each sample's last position.
    """

    overlaps: list[TopWordOverlap]
    continuations: list[str]

    @property
    def mean(self) -> float:
        """Mean overlap over samples (0.0 without samples)."""
        return stats.mean([o.overlap for o in self.overlaps])

    def to_frame(self) -> "pd.DataFrame":
        """Every sample's :meth:`TopWordOverlap.to_frame` with a ``sample`` column."""
        import pandas as pd

        frames = [o.to_frame().assign(sample=i) for i, o in enumerate(self.overlaps)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["word", "score", "in_future", "sample"])

    def plot(self, ax: Any = None) -> Any:
        """Histogram of the per-sample overlap with its mean marked."""
        from mechthink.plotting.attribution import plot_overlap_histogram

        return plot_overlap_histogram(self, ax=ax)


def future_word_overlap(
    model: "ThinkingModel",
    sequences: Sequence[Sequence[int]],
    importances: Sequence[Float[Tensor, "_pos"]],
    max_new_tokens: int = 120,
    k: int = 10,
    horizon: int = 100,
) -> FutureWordOverlap:
    """Top-k important words of each sequence vs the next ``horizon`` words the model writes.

    Token importances are summed into words (:func:`word_scores`), each sequence is continued
    greedily for ``max_new_tokens`` tokens (:func:`mechthink.interventions.continue_greedy`) and
    :func:`top_word_overlap` compares the two (wj210/cot_backtrack: ≈ 41% for k=10, horizon 100).
    """
    from mechthink.interventions import continue_greedy

    if len(sequences) != len(importances):
        raise ValueError(f"{len(sequences)} sequences but {len(importances)} importance vectors; pass one per sequence")
    rows = [[int(t) for t in s] for s in sequences]
    texts = [model.to_string(f) for f in continue_greedy(model, rows, max_new_tokens)]
    overlaps = [
        top_word_overlap(word_scores(model.tokenizer, ids, imp), None, text, k=k, horizon=horizon)
        for ids, imp, text in zip(rows, importances, texts)
    ]
    return FutureWordOverlap(overlaps=overlaps, continuations=texts)


# ------------------------------------------------------------------------------ attention bins
@dataclass
class BinnedAttention(Result):
    """Attention from one query position onto the question and the thinking bins, per head.

    Attributes:
        heads: ``(layer, head)`` pairs.
        labels: ``["question", "0-20%", …]``.
        values: ``[head, bin]``: attention mass per region after dropping the first and the
            query position and renormalising (regions need not cover every key, so rows may
            sum to less than 1); the mean over samples when several were given.
        n_samples: How many sequences were averaged.
    """

    heads: list[tuple[int, int]]
    labels: list[str]
    values: Float[Tensor, "head bin"]
    n_samples: int = 1

    def to_frame(self) -> "pd.DataFrame":
        """One row per (head, bin): layer, head, bin, attention."""
        import pandas as pd

        rows = [(L, h, lab, float(self.values[i, j])) for i, (L, h) in enumerate(self.heads) for j, lab in enumerate(self.labels)]
        return pd.DataFrame(rows, columns=["layer", "head", "bin", "attention"])

    def plot(self, ax: Any = None, **kwargs: Any) -> Any:
        """Grouped bars per region, one bar per head."""
        from mechthink.plotting.attribution import plot_binned

        return plot_binned(
            self.labels, self.values, ylabel="attention", row_labels=[f"L{L}H{h}" for L, h in self.heads], ax=ax, **kwargs
        )


def _query_patterns(
    model: "ThinkingModel", row: Tensor, layers: Sequence[int], query_pos: int
) -> dict[int, Tensor]:
    """Per layer, ``[head, key]`` attention of the query position.

    Only that row is computed (:func:`mechthink.models.fast_attention.attention_rows`: memory
    linear in the length); a layer the fused path does not cover gathers its ``hook_pattern``
    row on the exact path instead."""
    from mechthink.attribution import _as_row
    from mechthink.hooks import gather
    from mechthink.models.fast_attention import attention_rows

    row = _as_row(row, model.device)
    ls = sorted(set(int(L) for L in layers))
    out = {L: r[0, :, 0, :].float() for L, r in attention_rows(model, row, ls, [int(query_pos)]).items()}
    rest = [L for L in ls if L not in out]
    if rest:
        names = hook_names(model, "pattern", rest)
        cache = gather(model, row, names, positions=[int(query_pos)])
        out.update({L: cache[n][0, :, 0, :].float() for L, n in zip(rest, names)})
    return out


def _is_many(tokens: Any) -> bool:
    """Whether ``tokens`` is a list of sequences rather than one sequence."""
    return isinstance(tokens, (list, tuple)) and len(tokens) > 0 and not isinstance(tokens[0], int) and (
        not isinstance(tokens[0], Tensor) or tokens[0].dim() > 0
    )


def binned_attention(
    model: "ThinkingModel",
    tokens: Int[Tensor, "pos"] | Sequence[int] | Sequence[Sequence[int] | Int[Tensor, "_"]],
    heads: Sequence[tuple[int, int]],
    question_span: tuple[int, int] | Sequence[tuple[int, int]],
    thinking_span: tuple[int, int] | Sequence[tuple[int, int]],
    n_bins: int = 5,
    query_pos: int = -1,
) -> BinnedAttention:
    """Attention of chosen heads from ``query_pos`` onto the question and the thinking bins.

    The first position (attention sink) and the query position itself are dropped and the
    remaining attention renormalised to 1 before summing into regions.

    Args:
        model: The loaded model.
        tokens: One sequence, or a list of sequences (then ``values`` is the mean over them).
        heads: ``(layer, head)`` pairs.
        question_span: ``(start, end)`` of the question: one, or one per sequence.
        thinking_span: ``(start, end)`` of the thinking: one, or one per sequence.
        n_bins: Number of thinking bins.
        query_pos: The attending position (negative counts from the end).
    """
    if _is_many(tokens):
        qs, ts = _spans_per_sample(len(tokens), question_span, thinking_span)
        each = [binned_attention(model, t, heads, q, s, n_bins, query_pos).values for t, q, s in zip(tokens, qs, ts)]
        return BinnedAttention(
            heads=[(int(L), int(h)) for L, h in heads], labels=_bin_labels(n_bins), values=torch.stack(each).mean(0),
            n_samples=len(each),
        )
    tokens = torch.as_tensor(tokens)
    T = tokens.shape[-1]
    q = query_pos % T
    pats = _query_patterns(model, tokens, [L for L, _ in heads], query_pos)
    regions = [tuple(question_span)] + bin_edges(tuple(thinking_span), n_bins)
    vals = []
    for L, h in heads:
        a = pats[L][h].clone()
        a[0] = 0.0
        a[q] = 0.0
        a[q + 1 :] = 0.0
        a = a / a.sum().clamp_min(1e-12)
        vals.append(torch.stack([a[s:e].sum() for s, e in regions]))
    return BinnedAttention(heads=[(int(L), int(h)) for L, h in heads], labels=_bin_labels(n_bins), values=torch.stack(vals))


# ------------------------------------------------------------------------------ receiver heads
@dataclass
class ReceiverHeads(Result):
    """Receiver-head scores (Thought Anchors): kurtosis of the attention each key unit receives.

    Attributes:
        kurtosis: ``[layer, head]`` Fisher kurtosis across key units.
        vertical: ``[layer, head, unit]`` mean attention each unit receives from later units.
        units: ``(start, end)`` token spans of the units (sentences, or single tokens).
    """

    kurtosis: Float[Tensor, "layer head"]
    vertical: Float[Tensor, "layer head unit"]
    units: list[tuple[int, int]] = field(default_factory=list)

    def top(self, k: int = 10) -> list[tuple[int, int]]:
        """The k ``(layer, head)`` pairs with the highest kurtosis (NaNs last)."""
        flat = torch.nan_to_num(self.kurtosis, nan=-float("inf")).flatten()
        idx = flat.argsort(descending=True)[:k]
        H = self.kurtosis.shape[1]
        return [(int(i) // H, int(i) % H) for i in idx]

    def to_frame(self) -> "pd.DataFrame":
        """One row per (layer, head): its kurtosis."""
        import pandas as pd

        L, H = self.kurtosis.shape
        return pd.DataFrame(
            [(l, h, float(self.kurtosis[l, h])) for l in range(L) for h in range(H)], columns=["layer", "head", "kurtosis"]
        )

    def plot(self, ax: Any = None, k: int = 5) -> Any:
        """Layer × head heatmap of the kurtosis with the top ``k`` heads marked."""
        from mechthink.plotting.attribution import plot_head_heatmap

        return plot_head_heatmap(self.kurtosis, marked=self.top(k), label="kurtosis", title="receiver heads", ax=ax)


def receiver_heads(
    model: "ThinkingModel",
    tokens: Int[Tensor, "pos"] | Sequence[int],
    units: Sequence[tuple[int, int]] | None = None,
    proximity_ignore: int = 4,
    skip_first: bool = True,
) -> ReceiverHeads:
    """Thought Anchors receiver heads, per sentence (``units``) or per token (``units=None``).

    For each layer and head: the attention matrix is averaged into ``[unit, unit]`` blocks
    (mean over the block's query and key tokens); for each key unit ``j`` the *vertical score*
    is the mean of that block matrix over query units ``i ≥ j + proximity_ignore`` (nearby
    queries ignored); the head's score is the Fisher kurtosis (``scipy.stats.kurtosis``) of the
    vertical scores over key units that have at least one such query. ``skip_first`` drops
    unit 0 from the keys (the attention sink / BOS). Patterns are reduced layer by layer, never
    stored.
    """
    from scipy.stats import kurtosis

    from mechthink.attribution import _as_row
    from mechthink.models.fast_attention import attention_reduce

    row = _as_row(tokens, model.device)
    T = row.shape[1]
    spans = [(i, i + 1) for i in range(T)] if units is None else [tuple(map(int, u)) for u in units]
    U = len(spans)
    assign = torch.zeros(U, T)
    for j, (a, b) in enumerate(spans):
        assign[j, a:b] = 1.0 / max(b - a, 1)
    n_layers, n_heads = model.n_layers, int(model.cfg.n_heads)
    vertical = torch.full((n_layers, n_heads, U), float("nan"))
    i_idx = torch.arange(U).unsqueeze(1)
    j_idx = torch.arange(U).unsqueeze(0)
    mask = (i_idx >= j_idx + proximity_ignore).float()  # [query unit, key unit]
    n_q = mask.sum(0)
    valid = n_q > 0
    if skip_first:
        valid[0] = False

    def make(L: int) -> Any:
        def hook(pattern: Tensor, hook: Any) -> None:
            p = pattern[0].detach().float().cpu()  # [head, q, k]
            blocks = torch.einsum("ui,hij,vj->huv", assign, p, assign)
            vertical[L] = (blocks * mask).sum(1) / n_q.clamp_min(1)

        return hook

    # a streaming reduction, layer by layer and query rows by chunks: neither a [head, pos, pos]
    # pattern nor a [head, unit, unit] block matrix is held. vertical[h, v] = Σ_u mask[u, v]
    # Σ_i Σ_j assign[u, i] P[h, i, j] assign[v, j], so each chunk of query rows i adds
    # Σ_i w[v, i] (P[h, i, :] · assign[v, :]) with w = maskᵀ · assign[:, rows].
    summed = torch.zeros(n_layers, n_heads, U)

    def reduce(L: int, rows: Tensor, p: Tensor) -> None:
        w = mask.T @ assign[:, rows.cpu()]  # [key unit, query row]
        per_row = torch.einsum("hij,vj->hiv", p[0].float().cpu(), assign)  # [head, query row, key unit]
        summed[L] += torch.einsum("vi,hiv->hv", w, per_row)

    rest = attention_reduce(model, row, range(n_layers), reduce)
    for L in range(n_layers):
        if L not in rest:
            vertical[L] = summed[L] / n_q.clamp_min(1)
    if rest:  # layers the fused path does not cover: their hook_pattern on the exact path
        with torch.no_grad():
            names = hook_names(model, "pattern")
            model.bridge.run_with_hooks(row, fwd_hooks=[(names[L], make(L)) for L in rest], return_type=None)
    vertical[:, :, ~valid] = float("nan")
    if int(valid.sum()) < 4:
        raise ValueError(f"only {int(valid.sum())} key units have queries ≥{proximity_ignore} units later; use a longer text or smaller proximity_ignore")
    v = vertical[:, :, valid].numpy()
    kurt = torch.tensor(kurtosis(v, axis=-1, fisher=True, bias=True), dtype=torch.float32)
    return ReceiverHeads(kurtosis=kurt, vertical=vertical, units=list(spans))
