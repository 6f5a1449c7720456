"""Thought anchors: which sentences of a reasoning trace matter, by every method on one trace.

Sentences are the unit (Bogdan, Macar, Nanda & Conmy 2025, "Thought Anchors: Which LLM
Reasoning Steps Matter?", arXiv:2506.19143; code: github.com/interp-reasoning/thought-anchors).

* **Sentences** (:func:`sentences`): :func:`mechthink.traces.split_steps` of the thinking, each
  with its character and token span and a rule-based label (:func:`classify_sentences`: plan,
  computation, check, backtrack, consolidation, final answer, other; from the model's
  backtracking / wrap-up words and a few patterns, usable offline).
* **Counterfactual resampling** (:func:`resampling_importance`): for each sentence ``S_i``,
  ``N`` rollouts from the prefix before ``S_i`` (``S_i`` is resampled) and ``N`` from the
  prefix through it (the rollouts of the next sentence's prefix, as in the paper's code). The
  trace is prefilled once; every prefix's rollouts continue that one KV cache
  (:func:`mechthink.generation.decode_from_prefixes`), so no prefix is ever re-read. Answers are
  parsed with :func:`mechthink.data.parse_answer`. Importances follow the paper's code:
  resampling KL ``KL(p_resampled || p_kept)`` with Laplace smoothing ``alpha`` (1e-9), the
  accuracy difference ``acc(kept) − acc(resampled)``, and the counterfactual variants that keep
  only the resamples whose new sentence means something different from ``S_i``.
* **Attention suppression** (:func:`suppress_attention`, :func:`suppression_matrix`): mask the
  attention of every later position to the tokens of sentence ``i`` (pre-softmax scores set to
  −inf: exactly deleting those keys for those queries) and measure the KL of the later
  sentences' next-token distributions: a sentence × sentence dependency matrix.
* **Receiver heads** (:func:`receiver_heads`): per head the sentence-averaged attention
  matrix, each sentence's "vertical" score (mean attention it receives from sentences at least
  ``proximity_ignore`` later), heads ranked by the kurtosis of those scores (Fisher, biased), and
  the sentences the top heads attend to.
* **Token methods at sentence level** (:func:`sentence_scores`, :func:`sentence_attribution`,
  :func:`sentence_mi`): token importances (AtP, MI) summed / maxed over each sentence.
* **Agreement** (:func:`method_agreement`): Spearman matrix across methods and top-k overlaps.

On tiny-thinker the generator's ground truth (:func:`organism_sentences`) labels every sentence
and says which results feed the final answer and where the planted errors are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import einops
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechthink.data import answers_match, parse_answer
from mechthink.generation import Decoder, SamplingConfig, decode_from_prefixes, fork_cache, seed_for
from mechthink.models.native import native_blockers, native_forward
from mechthink.models.shared_prefix import SharedPrefixCache, config_supports_shared_prefix
from mechthink.results import Result, jsonable
from mechthink.traces import Trace, make_trace, split_steps

if TYPE_CHECKING:
    import pandas as pd

    from mechthink.models.organism import Transcript
    from mechthink.models.thinking_model import ThinkingModel

__all__ = [
    "METHODS",
    "SENTENCE_LABELS",
    "AdaptiveStopping",
    "AnchorTrace",
    "EveryMethod",
    "MethodAgreement",
    "OrganismSentences",
    "ReceiverHeads",
    "ResamplingImportance",
    "Rollout",
    "Sentence",
    "SentenceScores",
    "SuppressionMatrix",
    "anchor_traces",
    "answer_kl",
    "answer_logprob_metric",
    "auroc",
    "classify_sentences",
    "every_method",
    "final_answer_positions",
    "first_sentence",
    "importance_from_rollouts",
    "method_agreement",
    "organism_checks",
    "organism_sentences",
    "prefill_trace",
    "receiver_heads",
    "replay_adaptive",
    "resampling_importance",
    "rollout_answer",
    "sentence_attention",
    "sentence_attribution",
    "sentence_mi",
    "sentence_scores",
    "sentences",
    "suppress_attention",
    "suppression_matrix",
    "vertical_scores",
]

log = logging.getLogger(__name__)

#: The sentence taxonomy (after the paper's: plan generation, active computation, self
#: checking, uncertainty management, result consolidation, final answer emission).
SENTENCE_LABELS: tuple[str, ...] = ("plan", "computation", "check", "backtrack", "consolidation", "final_answer", "other")
SentenceLabel = Literal["plan", "computation", "check", "backtrack", "consolidation", "final_answer", "other"]

_DEFAULT_BACKTRACK = ("Wait", "Alternatively", "Hmm", "But wait")
_DEFAULT_WRAPUP = ("So", "Therefore", "Thus")


# ============================================================================ sentences
@dataclass(frozen=True)
class Sentence:
    """One sentence of a trace.

    Attributes:
        index: Position in the trace's sentence list.
        text: The stripped sentence text.
        char_start: Offset of its first character in ``trace.text``.
        char_end: Offset just past its last character.
        token_start: Position of its first token in ``trace.ids``.
        token_end: Position just past its last token.
        label: Its rule-based label (one of :data:`SENTENCE_LABELS`).
    """

    index: int
    text: str
    char_start: int
    char_end: int
    token_start: int
    token_end: int
    label: str = "other"

    @property
    def n_tokens(self) -> int:
        return self.token_end - self.token_start

    @property
    def positions(self) -> range:
        """The token positions of the sentence."""
        return range(self.token_start, self.token_end)


_WS = r"[\s,:;]"
_BACKTRACK_PHRASES = re.compile(
    r"\b(?:i made (?:a|an) (?:mistake|error)|that(?:'s| is) (?:wrong|incorrect|not right)|"
    r"let me (?:redo|recompute|recalculate|reconsider))\b", re.IGNORECASE)
_CHECK = re.compile(
    r"^(?:(?:let me|let's|i(?:'ll| will| should)|we (?:can|should))\s+)?(?:double[- ]check|check|verify|confirm)\b"
    r"|\b(?:sanity check|to verify|let me (?:double[- ])?check|let's (?:double[- ])?check)\b", re.IGNORECASE)
_ANSWER = re.compile(r"\b(?:final answer|the answer is|answer\s*:)|\\boxed\{", re.IGNORECASE)
_COMPUTE = re.compile(
    r"\d\s*[-+*/×÷^]\s*\(?\s*\d|=\s*-?\$?\d|\d\s*=|\b\d+(?:\.\d+)?\s+(?:plus|minus|times|divided by|multiplied by)\s+\d",
    re.IGNORECASE)
_PLAN = re.compile(
    r"^(?:first|next|then|now|to (?:find|solve|get|compute|figure)|i (?:need|have|want|should|will|'ll|must)|"
    r"we (?:need|have|want|should|can|must)|let me|let's|the (?:plan|approach|strategy|idea|goal|question))\b",
    re.IGNORECASE)


def _starts_with(text: str, words: Sequence[str]) -> bool:
    t = text.lstrip()
    return any(re.match(re.escape(w.strip()) + r"(?![A-Za-z])", t, re.IGNORECASE) for w in words if w.strip())


def classify_sentences(
    texts: Sequence[str],
    backtracking_words: Sequence[str] = _DEFAULT_BACKTRACK,
    wrapup_words: Sequence[str] = _DEFAULT_WRAPUP,
) -> list[str]:
    """Rule-based labels of a trace's sentences, in order (usable offline, no model).

    Rules, first match wins: starts with a backtracking word or says it redoes / was wrong ->
    ``backtrack``; "check / verify / confirm" -> ``check``; states an answer ("the answer is",
    "final answer", ``\\boxed{``) -> ``consolidation``, except the last such sentence ->
    ``final_answer``; an equation or arithmetic between numbers -> ``computation``; starts with
    a wrap-up word -> ``consolidation``; "first / next / I need to / let me ..." -> ``plan``;
    else ``other``.

    Args:
        texts: The sentences of one trace, in order.
        backtracking_words: Words that open a backtracking sentence (``model.spec``'s).
        wrapup_words: Words that open a consolidating sentence (``model.spec``'s).

    Returns:
        One of :data:`SENTENCE_LABELS` per sentence.
    """
    labels: list[str] = []
    answer_rows: list[int] = []
    for i, t in enumerate(texts):
        if _starts_with(t, backtracking_words) or _BACKTRACK_PHRASES.search(t):
            lab = "backtrack"
        elif _CHECK.search(t.strip()):
            lab = "check"
        elif _ANSWER.search(t):
            lab = "consolidation"
            answer_rows.append(i)
        elif _COMPUTE.search(t):
            lab = "computation"
        elif _starts_with(t, wrapup_words):
            lab = "consolidation"
        elif _PLAN.search(t.strip()):
            lab = "plan"
        else:
            lab = "other"
        labels.append(lab)
    if answer_rows:
        labels[answer_rows[-1]] = "final_answer"
    return labels


def sentences(
    trace: Trace,
    region: Literal["thinking", "completion"] = "thinking",
    model: "ThinkingModel | None" = None,
) -> list[Sentence]:
    """The sentences of a trace's thinking (or completion), labelled by :func:`classify_sentences`.

    Args:
        trace: The trace.
        region: ``"thinking"`` (default) or ``"completion"``.
        model: Supplies the backtracking / wrap-up words (else the R1 defaults).

    Raises:
        ValueError: the region has no sentence (or the trace no thinking).
    """
    steps = split_steps(trace, region=region)
    if not steps:
        raise ValueError(f"sentences: trace {trace.id!r} has no sentences in its {region}; pass a trace with text there")
    bt = model.spec.backtracking_words if model is not None else _DEFAULT_BACKTRACK
    wu = model.spec.wrapup_words if model is not None else _DEFAULT_WRAPUP
    labels = classify_sentences([s.text for s in steps], bt, wu)
    return [
        Sentence(i, s.text, s.char_start, s.char_end, int(s.token_start or 0), int(s.token_end or 0), lab)
        for i, (s, lab) in enumerate(zip(steps, labels))
    ]


def _check_sentences(sents: Sequence[Sentence], n_tokens: int, fn: str) -> None:
    if not sents:
        raise ValueError(f"{fn}: sentences is empty; pass at least one sentence (see mechthink.anchors.sentences)")
    for s in sents:
        if not 0 <= s.token_start < s.token_end <= n_tokens:
            raise ValueError(f"{fn}: sentence {s.index} spans tokens [{s.token_start}, {s.token_end}) outside the "
                             f"trace's {n_tokens} tokens")


# ============================================================================ tiny-thinker truth
@dataclass
class OrganismSentences:
    """A tiny-thinker transcript as a trace with the generator's ground truth per sentence.

    Attributes:
        trace: The transcript as a :class:`~mechthink.traces.Trace` (teacher-forced).
        sentences: Its thinking sentences with the rule-based labels.
        true_labels: The generator's label of each sentence.
        answer_determining: Whether the sentence writes a running total the final answer is
            computed from (correct first attempts and corrections; not wrong attempts, nor
            the check / restatement / wrap-up lines that repeat the answer).
        states_answer: Whether the sentence writes the final answer (the generator's answer
            mentions: the last step's result, the check, the restatement, the wrap-up).
        error_pairs: ``(wrong step sentence, its backtracking sentence)`` for each planted error.
    """

    trace: Trace
    sentences: list[Sentence]
    true_labels: list[str]
    answer_determining: list[bool]
    states_answer: list[bool]
    error_pairs: list[tuple[int, int]]


def organism_sentences(model: "ThinkingModel", transcript: "Transcript", id: str = "organism") -> OrganismSentences:
    """The sentences of a tiny-thinker transcript with the generator's labels (from its token positions).

    Each sentence is matched to the generator's record by the token positions it covers: the
    backtracking word of a planted error -> ``backtrack``; a step's final "." -> ``computation``;
    the re-check line's result -> ``check``; the restatement after it -> ``consolidation``; the
    wrap-up word -> ``final_answer``.
    """
    ids = list(transcript.input_ids)
    n_prompt = transcript.think_open_position + 2  # through "<think>\n"
    trace = make_trace(model, ids[:n_prompt], ids[n_prompt:], id=id, question=transcript.problem.question,
                       gold=str(transcript.answer))
    sents = sentences(trace, model=model)
    labels, determining = [], []
    owner: dict[int, tuple[str, bool]] = {}
    for st in transcript.steps:
        owner[st.period_position] = ("computation", not st.is_error)
        if st.backtrack_position is not None:
            owner[st.backtrack_position] = ("backtrack", True)
    if transcript.has_check:
        owner[transcript.answer_positions[-3][0]] = ("check", False)
        owner[transcript.answer_positions[-2][0]] = ("consolidation", False)
    owner[transcript.wrapup_position] = ("final_answer", False)
    index_of: dict[int, int] = {}
    for s in sents:
        hits = [owner[p] for p in s.positions if p in owner]
        backs = [h for h in hits if h[0] == "backtrack"]
        lab, det = (backs or hits or [("other", False)])[0]
        labels.append(lab)
        determining.append(det)
        for p in s.positions:
            index_of[p] = s.index
    pairs = [(index_of[st.period_position], index_of[st.backtrack_position])
             for st in transcript.steps if st.is_error and st.backtrack_position is not None]
    mentions = {p for occ in transcript.answer_positions for p in occ}
    states = [any(p in mentions for p in s.positions) for s in sents]
    return OrganismSentences(trace, sents, labels, determining, states, pairs)


# ============================================================================ answers
def answer_kl(p_answers: Sequence[str | None], q_answers: Sequence[str | None], alpha: float = 1e-9) -> float:
    """``KL(p || q)`` between two samples of final answers, as in the thought-anchors code.

    Counts of the parsed answers (None is skipped) are smoothed with ``alpha`` over the union
    ``V`` of answers seen in either sample: ``Σ_a p̂(a) · log(((c_p(a) + α) / (n_p + αV)) /
    ((c_q(a) + α) / (n_q + αV)))`` with the unsmoothed ``p̂``, clipped at 0; 0 when either
    sample has no answer.
    """
    cp = Counter(a for a in p_answers if a is not None)
    cq = Counter(a for a in q_answers if a is not None)
    n_p, n_q = sum(cp.values()), sum(cq.values())
    if n_p == 0 or n_q == 0:
        return 0.0
    support = set(cp) | set(cq)
    v = len(support)
    kl = 0.0
    for a in support:
        if cp[a] == 0:
            continue
        p = (cp[a] + alpha) / (n_p + alpha * v)
        q = (cq[a] + alpha) / (n_q + alpha * v)
        kl += cp[a] / n_p * math.log(p / q)
    return max(0.0, kl)


def _accuracy(answers: Sequence[str | None], reference: str) -> tuple[int, int]:
    """(matches, parsed) among ``answers``."""
    parsed = [a for a in answers if a is not None]
    return sum(answers_match(a, reference) for a in parsed), len(parsed)


def _nanmean(values: Sequence[float]) -> float:
    ok = [v for v in values if v == v]
    return sum(ok) / len(ok) if ok else float("nan")


def _rate(answers: Sequence[str | None], reference: str) -> float:
    x, n = _accuracy(answers, reference)
    return x / n if n else 0.0


def rollout_answer(text: str, finished: str) -> str | None:
    """The final answer of a rollout's text (:func:`mechthink.data.parse_answer`), or None when
    it was cut off (``finished != "eos"``) before closing a ``\\boxed{}`` after the thinking."""
    if finished != "eos":
        tail = text.rsplit("</think>", 1)[-1]
        if "\\boxed{" not in tail or "}" not in tail.rsplit("\\boxed{", 1)[-1]:
            return None
    return parse_answer(text)


def _own_answer(trace: Trace) -> str | None:
    """The final answer the trace's completion gives (None if none parses)."""
    start = trace.offsets[trace.n_prompt][0] if trace.n_prompt < len(trace.ids) else len(trace.text)
    return parse_answer(trace.text[start:])


def _reference_answer(trace: Trace, reference: str | None) -> str:
    if reference is not None:
        return str(reference)
    if trace.gold is not None and str(trace.gold).strip():
        return str(trace.gold)
    found = _own_answer(trace)
    if found is None:
        raise ValueError(f"resampling_importance: trace {trace.id!r} has no gold and its completion no parsable "
                         "answer; pass reference=")
    return found


# ============================================================================ resampling
@dataclass(frozen=True)
class Rollout:
    """One continuation of a prefix.

    Attributes:
        point: The prefix it continues: before sentence ``point`` (``point == n_sentences``:
            after the last sentence).
        index: Its rollout number at that prefix (seeds its generator).
        ids: The sampled tokens.
        answer: The parsed final answer (None if none).
        sentence: The first sentence it wrote (the resample of sentence ``point``).
        similarity: Similarity of that sentence to the original (1.0 if token-identical;
            NaN after the last sentence).
        finished: ``"eos"`` or ``"length"``.
    """

    point: int
    index: int
    ids: tuple[int, ...]
    answer: str | None
    sentence: str
    similarity: float
    finished: str


@dataclass(frozen=True)
class AdaptiveStopping:
    """Stop sampling a prefix once the importance intervals of the sentences it serves are tight.

    Rollouts are drawn in rounds; after each, every sentence's accuracy importance
    ``acc(kept) − acc(resampled)`` gets an Agresti–Caffo interval (each accuracy as
    ``(x + 1) / (n + 2)``, half-width ``z · sqrt(Σ p̃(1 − p̃) / (n + 2))``). A prefix keeps
    sampling while either sentence that uses it (the one it resamples, the one before it kept)
    has a half-width above ``tolerance``, up to the ``n_rollouts`` cap. Rollouts are seeded per
    (prefix, index), so a stopped run is exactly the first rollouts of the full run. The
    default tolerance comes from ``benchmarks/bench_anchors.py`` on tiny-thinker (N = 100:
    half the rollouts, Spearman >= 0.98 of both KL importances against the full runs).

    Attributes:
        tolerance: Interval half-width at which a sentence is settled.
        min_rollouts: Rollouts per prefix in the first round.
        round_size: Rollouts added per prefix in each later round.
        z: Normal quantile of the interval (1.96: 95%).
    """

    tolerance: float = 0.07
    min_rollouts: int = 16
    round_size: int = 16
    z: float = 1.96

    def __post_init__(self) -> None:
        if not self.tolerance > 0:
            raise ValueError(f"tolerance must be > 0, got {self.tolerance!r}")
        for name in ("min_rollouts", "round_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")

    def half_widths(self, rollouts: Sequence[Sequence[Rollout]], reference: str) -> list[float]:
        """The interval half-width of each sentence's accuracy importance (one fewer than prefixes)."""
        def var(rs: Sequence[Rollout]) -> tuple[float, int]:
            x, n = _accuracy([r.answer for r in rs], reference)
            p = (x + 1) / (n + 2)
            return p * (1 - p) / (n + 2), n

        out = []
        for i in range(len(rollouts) - 1):
            (v1, _), (v2, _) = var(rollouts[i]), var(rollouts[i + 1])
            out.append(self.z * math.sqrt(v1 + v2))
        return out

    def needs_more(self, rollouts: Sequence[Sequence[Rollout]], reference: str) -> list[bool]:
        """Per prefix: whether a sentence it serves is still unsettled."""
        hw = self.half_widths(rollouts, reference)
        open_ = [h > self.tolerance for h in hw]
        return [(j < len(open_) and open_[j]) or (j > 0 and open_[j - 1]) for j in range(len(rollouts))]


@dataclass
class ResamplingImportance(Result):
    """Counterfactual resampling importance of each sentence of one trace.

    Attributes:
        sentences: The sentences.
        points: Token position of each prefix (``len(sentences) + 1``: before each sentence,
            then after the last).
        rollouts: The rollouts of each prefix.
        reference: The answer accuracy is measured against (the gold, else the trace's own).
        importance: ``[metric, sentence]``, the rows named by :attr:`METRICS` (read one with
            :meth:`metric`): ``resampling_kl`` = ``KL(p_resampled || p_kept)``;
            ``resampling_accuracy`` = ``acc(kept) − acc(resampled)``; ``counterfactual_kl`` =
            ``KL(p_different || p_kept + p_similar)``, only the resamples whose new sentence
            differs (similarity below the threshold), against the kept rollouts pooled with the
            similar resamples (the paper's code); ``counterfactual_accuracy`` =
            ``acc(kept) − acc(different)`` (the paper's code reports the opposite sign). The
            counterfactual ones are 0 when no resample differs.
        different_fraction: Share of the resamples judged different.
        n_rollouts: Rollouts drawn at each prefix.
        n_max: The cap per prefix.
        config: Sampling and similarity settings.
    """

    sentences: list[Sentence]
    points: list[int]
    rollouts: list[list[Rollout]]
    reference: str
    importance: Float[Tensor, "metric sentence"]
    different_fraction: Float[Tensor, " sentence"]
    n_rollouts: Int[Tensor, " point"]
    n_max: int
    config: dict[str, Any] = field(default_factory=dict)

    #: The importances, in the order of :attr:`importance`'s rows.
    METRICS: ClassVar[tuple[str, ...]] = ("resampling_kl", "resampling_accuracy", "counterfactual_kl", "counterfactual_accuracy")

    @property
    def rollouts_drawn(self) -> int:
        return int(self.n_rollouts.sum())

    @property
    def rollouts_saved(self) -> int:
        """Rollouts not drawn compared with ``n_max`` at every prefix."""
        return self.n_max * len(self.points) - self.rollouts_drawn

    @property
    def saved_fraction(self) -> float:
        return self.rollouts_saved / max(1, self.n_max * len(self.points))

    def metric(self, name: str) -> Float[Tensor, " sentence"]:
        """One of :attr:`METRICS` by name."""
        if name not in self.METRICS:
            raise ValueError(f"metric={name!r}; use one of {self.METRICS}")
        return self.importance[self.METRICS.index(name)]

    def to_frame(self) -> "pd.DataFrame":
        """One row per sentence: text, label, the four importances, rollouts before / after."""
        import pandas as pd

        return pd.DataFrame([
            {"sentence": s.index, "label": s.label, "text": s.text,
             **{m: float(self.metric(m)[s.index]) for m in self.METRICS},
             "different_fraction": float(self.different_fraction[s.index]),
             "n_resampled": int(self.n_rollouts[s.index]), "n_kept": int(self.n_rollouts[s.index + 1])}
            for s in self.sentences
        ])

    def plot(self, ax: Any = None) -> Any:
        """Bars of the importances per sentence (:func:`mechthink.plotting.anchors.plot_resampling`)."""
        from mechthink.plotting.anchors import plot_resampling

        return plot_resampling(self, ax=ax)

    def to_json(self, path: Any = None) -> str:
        """JSON without the rollouts' token ids (answers, sentences and similarities kept), with
        the names of :attr:`importance`'s rows under ``"metrics"``."""
        light = dataclasses.replace(self, rollouts=[[dataclasses.replace(r, ids=()) for r in rs] for rs in self.rollouts])
        text = json.dumps({"metrics": list(self.METRICS), **jsonable(light)}, indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text


def importance_from_rollouts(
    sents: Sequence[Sentence],
    points: Sequence[int],
    rollouts: Sequence[Sequence[Rollout]],
    reference: str,
    n_max: int,
    similarity_threshold: float = 0.8,
    alpha: float = 1e-9,
    config: dict[str, Any] | None = None,
) -> ResamplingImportance:
    """The importances (see :class:`ResamplingImportance`) of given rollouts per prefix."""
    if len(rollouts) != len(sents) + 1 or len(points) != len(sents) + 1:
        raise ValueError(f"need {len(sents) + 1} prefixes (one per sentence and one after the last), "
                         f"got {len(rollouts)} rollout lists and {len(points)} points")
    if not any(r.answer is not None for rs in rollouts for r in rs):
        raise ValueError(f"none of the {sum(len(rs) for rs in rollouts)} rollouts gave a parsable answer; "
                         "raise max_new_tokens or check the answer format")
    rows = []
    for i in range(len(sents)):
        before = [r.answer for r in rollouts[i]]
        kept = [r.answer for r in rollouts[i + 1]]
        diff = [r.answer for r in rollouts[i] if not r.similarity >= similarity_threshold]
        same = [r.answer for r in rollouts[i] if r.similarity >= similarity_threshold]
        cf_kl = answer_kl(diff, kept + same, alpha) if diff else 0.0
        cf_acc = _rate(kept, reference) - _rate(diff, reference) if diff else 0.0
        rows.append((answer_kl(before, kept, alpha), _rate(kept, reference) - _rate(before, reference),
                     cf_kl, cf_acc, len(diff) / max(1, len(before))))
    cols = torch.tensor(rows, dtype=torch.float64).reshape(len(sents), 5).T
    return ResamplingImportance(
        sentences=list(sents), points=list(points), rollouts=[list(rs) for rs in rollouts], reference=reference,
        importance=cols[:4], different_fraction=cols[4],
        n_rollouts=torch.tensor([len(rs) for rs in rollouts], dtype=torch.long), n_max=int(n_max),
        config=dict(config or {}, similarity_threshold=similarity_threshold, alpha=alpha),
    )


Draw = Callable[[list[tuple[int, int, int]]], list[list[Rollout]]]


def _draw_rounds(
    n_points: int, n_max: int, draw: Draw, reference: str, adaptive: AdaptiveStopping | None
) -> list[list[Rollout]]:
    """Rollouts per prefix: ``n_max`` each, or adaptive rounds. ``draw(requests)`` gets a
    round's ``[(point, start, count), ...]`` at once (so one batch may hold several prefixes'
    rollouts) and returns their rollouts, one list per request."""
    got: list[list[Rollout]] = [[] for _ in range(n_points)]
    want = [n_max if adaptive is None else min(n_max, adaptive.min_rollouts)] * n_points
    active = list(range(n_points))
    while active:
        reqs = [(j, len(got[j]), want[j] - len(got[j])) for j in active]
        for (j, _, _), drawn in zip(reqs, draw(reqs)):
            got[j] += drawn
        if adaptive is None:
            break
        more = adaptive.needs_more(got, reference)
        active = [j for j in range(n_points) if more[j] and len(got[j]) < n_max]
        for j in active:
            want[j] = min(n_max, len(got[j]) + adaptive.round_size)
    return got


def replay_adaptive(result: ResamplingImportance, adaptive: AdaptiveStopping) -> ResamplingImportance:
    """What ``adaptive`` would have drawn from ``result``'s rollouts (a full run): the same
    rollouts, seeds and numbers as running :func:`resampling_importance` with it."""
    def draw(reqs: list[tuple[int, int, int]]) -> list[list[Rollout]]:
        return [result.rollouts[j][start : start + count] for j, start, count in reqs]

    got = _draw_rounds(len(result.points), result.n_max, draw, result.reference, adaptive)
    cfg = result.config
    return importance_from_rollouts(result.sentences, result.points, got, result.reference, result.n_max,
                                    cfg.get("similarity_threshold", 0.8), cfg.get("alpha", 1e-9),
                                    {**cfg, "adaptive": _adaptive_dict(adaptive)})


def _adaptive_dict(adaptive: AdaptiveStopping | None) -> dict[str, Any] | None:
    if adaptive is None:
        return None
    return {"tolerance": adaptive.tolerance, "min_rollouts": adaptive.min_rollouts,
            "round_size": adaptive.round_size, "z": adaptive.z}


@dataclass
class _Prefilled:
    """One chunked prefill of a trace: its KV cache, the logits and last-layer states kept."""

    cache: Any
    logits: dict[int, Tensor]
    resid: dict[int, Tensor]
    tokens_processed: int


def _last_resid_hook(model: "ThinkingModel") -> str:
    return f"blocks.{model.n_layers - 1}.hook_resid_post"


def _forward_reading_last_block(
    model: "ThinkingModel", x: Tensor, want_resid: bool, fork: tuple[Any, int] | None = None, **kwargs: Any
) -> tuple[Tensor, Any, Tensor | None]:
    """``(logits, cache, last block's output or None)`` of one forward: the HF model's own
    (:func:`mechthink.models.native.native_forward`, the read carried over onto its last decoder
    layer) when nothing else is hooked, else the bridge. Same values either way (to float
    rounding; ``tests/test_native.py``). ``fork=(cache, n_pos)``: every row of ``x`` continues
    the first ``n_pos`` positions of that batch-1 cache, on one shared copy of them
    (:class:`mechthink.models.shared_prefix.SharedPrefixCache`) where the native forward runs,
    else on a :func:`mechthink.generation.fork_cache` copy per row."""
    grabbed: list[Tensor] = []

    def grab(act: Tensor, hook: Any) -> None:
        grabbed.append(act.detach())

    with model.bridge.hooks(fwd_hooks=[(_last_resid_hook(model), grab)] if want_resid else []):
        if fork is not None:  # rows continuing one cached prefix: shared where the native forward runs, else copied
            cache, n_pos = fork
            shared = config_supports_shared_prefix(model.bridge.original_model.config) and not native_blockers(model.bridge)
            kwargs["past_key_values"] = (SharedPrefixCache(cache, int(x.shape[0]), n_pos, room=int(x.shape[1])) if shared
                                         else fork_cache(cache, int(x.shape[0]), n_pos))
        out = native_forward(model.bridge, x, **kwargs)
        if out is None:
            grabbed.clear()
            out = model.bridge(x, return_type="logits_and_cache", **kwargs)
    logits, cache = out
    if want_resid and len(grabbed) != 1:
        raise RuntimeError(f"reading {_last_resid_hook(model)}: the forward called it {len(grabbed)} times, expected once")
    return logits, cache, grabbed[0] if want_resid else None


@torch.inference_mode()
def prefill_trace(
    model: "ThinkingModel", ids: Sequence[int], logits_at: Sequence[int], resid_at: Sequence[int] = (), chunk_size: int = 512
) -> _Prefilled:
    """Prefill ``ids`` once (in chunks through the cache), keeping the logits at ``logits_at``
    and the last block's output at ``resid_at``."""
    want_l, want_r = set(int(p) for p in logits_at), set(int(p) for p in resid_at)
    kv = None
    logits: dict[int, Tensor] = {}
    resid: dict[int, Tensor] = {}
    for c0 in range(0, len(ids), chunk_size):
        x = torch.tensor([list(ids[c0 : c0 + chunk_size])], dtype=torch.long, device=model.device)
        extra = {} if kv is None else {"past_key_values": kv}
        lg, kv, h = _forward_reading_last_block(model, x, bool(want_r), **extra)
        for p in range(c0, c0 + x.shape[1]):
            if p in want_l:
                logits[p] = lg[0, p - c0].float()
            if p in want_r:
                resid[p] = h[0, p - c0].float()
    return _Prefilled(kv, logits, resid, len(ids))


def first_sentence(model: "ThinkingModel", ids: Sequence[int]) -> tuple[str, int]:
    """The first sentence of a continuation and how many of its tokens it spans."""
    text = model.to_string(list(ids))
    steps = split_steps(text)
    if not steps:
        return "", 0
    end = steps[0].char_end
    lo, hi = 1, len(ids)
    while lo < hi:  # fewest tokens whose decoding reaches the sentence's end
        mid = (lo + hi) // 2
        if len(model.to_string(list(ids[:mid]))) >= end:
            hi = mid
        else:
            lo = mid + 1
    return steps[0].text, lo


@torch.inference_mode()
def _hidden_similarity(
    model: "ThinkingModel", pre: _Prefilled, point: int, original: Tensor, rows: Sequence[Sequence[int]]
) -> list[float]:
    """Cosine between the last block's output at the end of each resampled sentence (read on a
    fork of the prefix) and at the end of the original sentence."""
    n, width = len(rows), max(len(r) for r in rows)
    pad = int(model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else rows[0][0])
    x = torch.full((n, width), pad, dtype=torch.long)
    m = torch.zeros((n, width), dtype=torch.long)
    for r, toks in enumerate(rows):
        x[r, : len(toks)] = torch.tensor(list(toks))
        m[r, : len(toks)] = 1
    mask = torch.cat([torch.ones((n, point), dtype=torch.long), m], dim=1).to(model.device)
    pos = einops.repeat(point + torch.arange(width), "w -> n w", n=n).to(model.device)
    _, _, h = _forward_reading_last_block(model, x.to(model.device), True, fork=(pre.cache, point),
                                          attention_mask=mask, position_ids=pos, **model.last_logits_kwargs())
    ends = torch.tensor([len(r) - 1 for r in rows], device=h.device)
    states = h[torch.arange(n, device=ends.device), ends].float()
    return torch.nn.functional.cosine_similarity(states, original[None].to(states.device), dim=-1).tolist()


def _similarities(
    model: "ThinkingModel",
    pre: _Prefilled,
    trace: Trace,
    sentence: Sentence,
    point: int,
    conts: Sequence[Any],
    firsts: Sequence[tuple[str, int]],
    similarity: str | Callable[[str, str], float],
) -> list[float]:
    """Similarity of each rollout's first sentence to ``sentence``: 1 if token-identical, 0 if
    it wrote none, else ``"hidden"`` (:func:`_hidden_similarity`) or the callable on the texts."""
    orig = list(trace.ids[sentence.token_start : sentence.token_end])
    sims = [1.0 if list(c.ids[:k]) == orig else 0.0 for c, (_, k) in zip(conts, firsts)]
    todo = [r for r, (_, k) in enumerate(firsts) if k > 0 and sims[r] < 1.0]
    if not todo:
        return sims
    if callable(similarity):
        got = [float(similarity(sentence.text, firsts[r][0])) for r in todo]
    else:
        got = _hidden_similarity(model, pre, point, pre.resid[sentence.token_end - 1],
                                 [conts[r].ids[: firsts[r][1]] for r in todo])
    for r, v in zip(todo, got):
        sims[r] = v
    return sims


def resampling_importance(
    model: "ThinkingModel",
    trace: Trace,
    sentences_: Sequence[Sentence] | None = None,
    *,
    n_rollouts: int = 100,
    batch_size: int = 50,
    max_new_tokens: int = 256,
    temperature: float = 0.6,
    top_p: float = 0.95,
    seed: int = 0,
    similarity: str | Callable[[str, str], float] = "hidden",
    similarity_threshold: float = 0.8,
    alpha: float = 1e-9,
    adaptive: AdaptiveStopping | None = None,
    reference: str | None = None,
    chunk_size: int = 512,
) -> ResamplingImportance:
    """Counterfactual resampling importance of every sentence, from forks of one prefill.

    The trace is prefilled once (in ``chunk_size`` chunks). The prefix before sentence ``i`` is
    that cache cut at the sentence's first token; its rollouts decode from it
    (:func:`mechthink.generation.decode_from_prefixes`: the rows of all prefixes of a round
    queued together on ``batch_size`` slots, each row on one shared copy of the cache masked to
    its own prefix and a finished row's slot taken by the next queued row at once, where nothing
    is hooked; else on forks a prefix at a time), rollout
    ``k`` sampling from its own generator seeded with ``(seed_for(seed, position), k)``: the
    same seed gives the same numbers whatever the batch size, and the rollouts equal those of
    re-prefilling each prefix (the thought-anchors code's way) token for token. A rollout that
    has finished leaves its batch (``drop_finished``) unless a hook that may keep per-row state
    is attached, so finished rows are not fed padding.

    Similarity (for the counterfactual variants): ``"hidden"`` is the cosine between the
    model's own last-block output at the last token of the resampled sentence and at the last
    token of the original, both read in the same context (the prefix): the state a sentence
    hands to what follows. (A mean over the sentence's tokens, like the paper's sentence
    embedding, barely moves when one number changes: 0.95 for "8 - 2 = 6." vs "8 - 2 = 5." on
    tiny-thinker, 0.32 at the last token.) A token-identical resample has similarity 1. A
    callable ``similarity(original, resampled) -> float`` on the texts replaces it (e.g. a
    sentence-embedding model, the paper's all-MiniLM-L6-v2).

    Args:
        model: The loaded model.
        trace: The trace (prompt + thinking + answer).
        sentences_: Its sentences (default :func:`sentences` of the thinking).
        n_rollouts: Rollouts per prefix (the cap with ``adaptive``); the paper uses 100.
        batch_size: Rows decoded together.
        max_new_tokens: Budget per rollout (rollouts cut off before an answer count as none).
        temperature: Sampling temperature (the paper: 0.6).
        top_p: Nucleus threshold (the paper: 0.95).
        seed: Sampling seed.
        similarity: ``"hidden"`` or a callable on two sentence texts.
        similarity_threshold: Resamples below it count as different (the paper: 0.8).
        alpha: Laplace smoothing of the answer distributions (the paper: 1e-9).
        adaptive: Stop sampling a prefix early (:class:`AdaptiveStopping`); None draws all.
        reference: The answer accuracy is measured against (default the trace's gold, else
            its own final answer).
        chunk_size: Tokens per prefill chunk.

    Returns:
        A :class:`ResamplingImportance`.

    Raises:
        ValueError: no sentences, ``n_rollouts`` or ``batch_size`` < 1, a sentence outside the
            trace, or no rollout with a parsable answer.
    """
    for name, v in (("n_rollouts", n_rollouts), ("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"resampling_importance: {name} must be a positive int, got {v!r}")
    sents = list(sentences(trace, model=model) if sentences_ is None else sentences_)
    _check_sentences(sents, len(trace.ids), "resampling_importance")
    points = [s.token_start for s in sents] + [sents[-1].token_end]
    if points[0] < 1 or any(b <= a for a, b in zip(points, points[1:])):
        raise ValueError(f"resampling_importance: sentences must start after token 0 and in order, got prefixes {points}")
    ref = _reference_answer(trace, reference)
    use_hidden = similarity == "hidden"
    if not use_hidden and not callable(similarity):
        raise ValueError(f"similarity={similarity!r}; use 'hidden' or a callable(original, resampled) -> float")
    ends = [s.token_end - 1 for s in sents] if use_hidden else []
    pre = prefill_trace(model, trace.ids, [p - 1 for p in points], ends, chunk_size)
    decoder = Decoder.for_model(model)
    base = SamplingConfig(max_new_tokens, float(temperature), float(top_p), 0)

    def draw(reqs: list[tuple[int, int, int]]) -> list[list[Rollout]]:
        # every requested rollout of the round in one queue, batch_size rows at a time: a batch may
        # hold several prefixes' rollouts (each row masked to its own prefix; decode_from_prefixes)
        rows = [(j, start + r) for j, start, count in reqs for r in range(count)]
        lengths = [points[j] for j, _ in rows]
        conts_all = decode_from_prefixes(decoder, pre.cache, [pre.logits[p - 1] for p in lengths], lengths,
                                         [seed_for(seed, p) for p in lengths], [k for _, k in rows], base, batch_size,
                                         drop_finished=True)
        out, at = [], 0
        for j, start, count in reqs:
            conts, at = conts_all[at : at + count], at + count
            p = points[j]
            firsts = [first_sentence(model, c.ids) for c in conts]
            sims = _similarities(model, pre, trace, sents[j], p, conts, firsts, similarity) if j < len(sents) else [
                float("nan")] * len(conts)
            out.append([Rollout(j, start + r, tuple(c.ids), rollout_answer(model.to_string(c.ids), c.finished),
                                firsts[r][0], sims[r], c.finished) for r, c in enumerate(conts)])
        return out

    got = _draw_rounds(len(points), n_rollouts, draw, ref, adaptive)
    cfg_out = {"n_rollouts": n_rollouts, "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
               "seed": seed, "similarity": "hidden" if use_hidden else getattr(similarity, "__name__", "callable"),
               "adaptive": _adaptive_dict(adaptive), "prefill_tokens": pre.tokens_processed}
    return importance_from_rollouts(sents, points, got, ref, n_rollouts, similarity_threshold, alpha, cfg_out)


# ============================================================================ attention suppression
def _span_rows(spans: tuple[int, int] | Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    rows = [spans] if (len(spans) == 2 and all(isinstance(v, int) for v in spans)) else list(spans)  # one span or one per row
    out = []
    for sp in rows:
        if len(sp) != 2:
            raise ValueError(f"suppress_attention: a span is (start, end) token positions, got {sp!r}")
        a, b = int(sp[0]), int(sp[1])
        if not 0 <= a <= b:
            raise ValueError(f"suppress_attention: span ({a}, {b}) needs 0 <= start <= end")
        out.append((a, b))
    if not out:
        raise ValueError("suppress_attention: spans is empty; pass (start, end) or one span per batch row")
    return out


def _blocked(
    rows: Sequence[tuple[int, int]], n_q: int, n_k: int, device: torch.device
) -> Bool[Tensor, "row q k"]:
    """Which (query, key) pairs are masked: keys in the span, queries at or after its end."""
    span = torch.tensor(rows, dtype=torch.long, device=device)
    cols = torch.arange(n_k, device=device)
    qcols = torch.arange(n_k - n_q, n_k, device=device)  # absolute columns of the queries (a cache precedes them)
    key_in = (cols[None] >= span[:, :1]) & (cols[None] < span[:, 1:])
    after = qcols[None] >= span[:, 1:]
    return after[:, :, None] & key_in[:, None, :]


@contextlib.contextmanager
def suppress_attention(
    model: "ThinkingModel",
    spans: tuple[int, int] | Sequence[tuple[int, int]],
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
) -> Iterator[None]:
    """Mask the attention of every later position to the tokens of a span, while the block runs.

    Inside the block, each chosen head of each chosen layer gets −inf pre-softmax scores
    (``blocks.L.attn.hook_attn_scores``, the bridge's own mask value) for keys in
    ``[start, end)`` from queries at columns ``>= end``: exactly what deleting those keys for
    those queries does (the same as a 4-D attention mask). Columns are absolute (a KV cache
    before the call counts). The hooks are removed when the block exits, also on error.

    Args:
        model: The loaded model.
        spans: ``(start, end)`` for every batch row, or one span per row.
        layers: Layers to suppress in (default all).
        heads: Heads to suppress in each chosen layer (default all).

    Raises:
        ValueError: a span with ``start > end`` or negative, a layer or head out of range.
    """
    rows = _span_rows(spans)
    n_layers, n_heads = model.n_layers, int(model.cfg.n_heads)
    layer_list = list(range(n_layers)) if layers is None else [int(L) for L in layers]
    head_list = list(range(n_heads)) if heads is None else [int(h) for h in heads]
    if any(not 0 <= L < n_layers for L in layer_list):
        raise ValueError(f"suppress_attention: layers {layer_list} outside 0..{n_layers - 1}")
    if any(not 0 <= h < n_heads for h in head_list):
        raise ValueError(f"suppress_attention: heads {head_list} outside 0..{n_heads - 1}")

    def hook(scores: Tensor, hook: Any) -> Tensor:
        b, h, q, k = scores.shape
        if len(rows) not in (1, b):
            raise ValueError(f"suppress_attention: {len(rows)} spans for a batch of {b} rows")
        block = _blocked(rows, q, k, scores.device)[:, None].expand(b, h, q, k)
        on = torch.zeros(h, dtype=torch.bool, device=scores.device)
        on[head_list] = True
        return scores.masked_fill(block & on[None, :, None, None], float("-inf"))

    # the bridge's hooks() context removes exactly the hooks it added in its ``finally``
    with model.bridge.hooks(fwd_hooks=[(f"blocks.{L}.attn.hook_attn_scores", hook) for L in layer_list]):
        yield


@dataclass
class SuppressionMatrix(Result):
    """Sentence-to-sentence dependencies by attention suppression.

    Attributes:
        sentences: The sentences.
        matrix: ``[target, suppressed]``: mean KL (or mean log KL) over the target sentence's
            positions between the next-token distributions without and with the attention to
            the suppressed sentence masked; NaN where ``target <= suppressed``.
        token_kl: ``[suppressed, pos]``: the KL at every position.
        temperature: Softmax temperature of both distributions.
        log: Whether ``matrix`` averages ``log(KL + 1e-9)`` (the paper's code) instead of KL.
        layers: Layers suppressed (None: all).
        heads: Heads suppressed (None: all).
    """

    sentences: list[Sentence]
    matrix: Float[Tensor, "target suppressed"]
    token_kl: Float[Tensor, "suppressed pos"]
    temperature: float = 1.0
    log: bool = False
    layers: list[int] | None = None
    heads: list[int] | None = None

    def effect(self) -> Float[Tensor, " sentence"]:
        """Each sentence's mean effect on the sentences after it (NaN for the last)."""
        m = self.matrix
        counts = (~m.isnan()).sum(0)
        total = torch.nan_to_num(m, nan=0.0).sum(0)
        return torch.where(counts > 0, total / counts.clamp(min=1), torch.full_like(total, float("nan")))

    def strongest_source(self, target: int) -> int:
        """The earlier sentence whose suppression changes ``target`` most."""
        if not 0 < target < len(self.sentences):
            raise ValueError(f"target={target} has no earlier sentence (use 1..{len(self.sentences) - 1})")
        return int(torch.nan_to_num(self.matrix[target, :target], nan=-float("inf")).argmax())

    def to_frame(self) -> "pd.DataFrame":
        """One row per (target, suppressed) pair with ``target > suppressed``."""
        import pandas as pd

        n = len(self.sentences)
        return pd.DataFrame([{"target": j, "suppressed": i, "target_label": self.sentences[j].label,
                              "suppressed_label": self.sentences[i].label, "value": float(self.matrix[j, i])}
                             for j in range(n) for i in range(j)])

    def plot(self, ax: Any = None) -> Any:
        """The matrix as a heatmap (:func:`mechthink.plotting.anchors.plot_dependency_matrix`)."""
        from mechthink.plotting.anchors import plot_dependency_matrix

        return plot_dependency_matrix(self, ax=ax)


def _kl_rows(base: Float[Tensor, "pos d_vocab"], other: Float[Tensor, "row pos d_vocab"], temperature: float) -> Tensor:
    lp = (base.float() / temperature).log_softmax(-1)
    lq = (other.float() / temperature).log_softmax(-1)
    return (lp.exp()[None] * (lp[None] - lq)).sum(-1).clamp(min=0)


@torch.inference_mode()
def suppression_matrix(
    model: "ThinkingModel",
    trace: Trace | Sequence[int],
    sentences_: Sequence[Sentence],
    *,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    temperature: float = 1.0,
    log: bool = False,
    batch_size: int = 8,
) -> SuppressionMatrix:
    """The sentence × sentence matrix of attention-suppression effects on one trace.

    For each sentence ``i`` (``batch_size`` at a time, one batch row each), the trace runs with
    :func:`suppress_attention` of ``i``'s tokens; the KL between the unsuppressed and
    suppressed next-token distributions (at ``temperature``) at every position ``t`` of a later
    sentence ``j`` is averaged over ``j``'s positions (the paper's code: at temperature 0.6,
    averaging ``log(KL + 1e-9)``; ``log=True``).

    Raises:
        ValueError: no sentences, a sentence outside the trace, ``temperature <= 0``.
    """
    ids = list(trace.ids) if isinstance(trace, Trace) else [int(t) for t in trace]
    sents = list(sentences_)
    _check_sentences(sents, len(ids), "suppression_matrix")
    if not temperature > 0:
        raise ValueError(f"suppression_matrix: temperature must be > 0, got {temperature!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"suppression_matrix: batch_size must be a positive int, got {batch_size!r}")
    x = torch.tensor([ids], dtype=torch.long, device=model.device)
    base = model.bridge(x)[0]
    token_kl = torch.zeros(len(sents), len(ids), dtype=torch.float32)
    for k in range(0, len(sents), batch_size):
        chunk = sents[k : k + batch_size]
        with suppress_attention(model, [(s.token_start, s.token_end) for s in chunk], layers, heads):
            out = model.bridge(x.expand(len(chunk), -1))
        token_kl[k : k + len(chunk)] = _kl_rows(base, out, temperature).cpu()
    vals = torch.log(token_kl + 1e-9) if log else token_kl
    n = len(sents)
    matrix = torch.full((n, n), float("nan"))
    for j, s in enumerate(sents):
        matrix[j, :j] = vals[:j, s.token_start : s.token_end].mean(-1)
    return SuppressionMatrix(sents, matrix, token_kl, float(temperature), bool(log),
                             None if layers is None else [int(v) for v in layers],
                             None if heads is None else [int(v) for v in heads])


# ============================================================================ receiver heads
def _assignment(sents: Sequence[Sentence], n_tokens: int) -> Float[Tensor, "sentence pos"]:
    """Row ``i``: ``1 / len`` on sentence ``i``'s tokens (a mean over them as a matrix product)."""
    a = torch.zeros(len(sents), n_tokens)
    for i, s in enumerate(sents):
        a[i, s.token_start : s.token_end] = 1.0 / max(1, s.n_tokens)
    return a


@torch.inference_mode()
def sentence_attention(
    model: "ThinkingModel", trace: Trace | Sequence[int], sentences_: Sequence[Sentence]
) -> Float[Tensor, "layer head sentence sentence2"]:
    """Per head, the mean attention from the tokens of sentence ``i`` to those of sentence ``j``
    (the paper's sentence-averaged matrix; masked entries count as 0)."""
    ids = list(trace.ids) if isinstance(trace, Trace) else [int(t) for t in trace]
    sents = list(sentences_)
    _check_sentences(sents, len(ids), "sentence_attention")
    a = _assignment(sents, len(ids)).to(model.device)
    out: dict[int, Tensor] = {}

    def make(L: int) -> Callable[[Tensor, Any], None]:
        def hook(pattern: Tensor, hook: Any) -> None:
            out[L] = torch.einsum("iq,hqk,jk->hij", a, pattern[0].float(), a).cpu()

        return hook

    from mechthink.models.fast_attention import attention_reduce

    row = torch.tensor([ids], device=model.device)
    # pattern rows by chunks of queries from the fused path (no [head, pos, pos] pattern)
    acc = {L: torch.zeros(int(model.cfg.n_heads), len(sents), len(sents), device=model.device) for L in range(model.n_layers)}

    def reduce(L: int, rows: Tensor, p: Tensor) -> None:
        acc[L] += torch.einsum("iq,hqk,jk->hij", a[:, rows.to(a.device)], p[0].float(), a)

    rest = attention_reduce(model, row, range(model.n_layers), reduce)
    out.update({L: acc[L].cpu() for L in range(model.n_layers) if L not in rest})
    if rest:  # layers the fused path does not cover: their hook_pattern on the exact path
        model.bridge.run_with_hooks(row, fwd_hooks=[(f"blocks.{L}.attn.hook_pattern", make(L)) for L in rest],
                                    return_type=None)
    return torch.stack([out[L] for L in range(model.n_layers)])


def vertical_scores(
    matrix: Float[Tensor, "*heads sentence sentence2"], proximity_ignore: int = 4
) -> Float[Tensor, "*heads sentence2"]:
    """Each sentence's mean attention received from sentences at least ``proximity_ignore``
    later (NaN where there is none): the paper's "vertical" score."""
    n = matrix.shape[-1]
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    keep = (i - j) >= proximity_ignore
    vals = torch.where(keep, matrix.float(), torch.full_like(matrix.float(), float("nan")))
    counts = keep.sum(0)
    total = torch.nan_to_num(vals, nan=0.0).sum(-2)
    return torch.where(counts > 0, total / counts.clamp(min=1), torch.full_like(total, float("nan")))


def _kurtosis(v: Float[Tensor, "*heads sentence"]) -> Float[Tensor, "*heads"]:
    """Fisher kurtosis (biased, NaN omitted) along the last axis (``scipy.stats.kurtosis``)."""
    import warnings

    from scipy.stats import kurtosis

    with warnings.catch_warnings():  # constant or too few scores: NaN, which callers omit
        warnings.simplefilter("ignore", RuntimeWarning)
        k = kurtosis(v.double().numpy(), axis=-1, fisher=True, bias=True, nan_policy="omit")
    return torch.as_tensor(k, dtype=torch.float64)


@dataclass
class ReceiverHeads(Result):
    """Receiver heads: heads whose attention concentrates on a few sentences.

    Attributes:
        kurtosis: ``[layer, head]``: kurtosis of the vertical scores, mean over traces.
        top_heads: The ``top_k`` heads by kurtosis, ``(layer, head)``.
        scores: Per trace, each sentence's vertical score averaged over the top heads.
        top_sentences: Per trace, the sentences with the highest such scores (best first).
        proximity_ignore: Sentences closer than this do not count towards a vertical score.
    """

    kurtosis: Float[Tensor, "layer head"]
    top_heads: list[tuple[int, int]]
    scores: list[Tensor]
    top_sentences: list[list[int]]
    proximity_ignore: int = 4

    def to_frame(self) -> "pd.DataFrame":
        """One row per head: layer, head, kurtosis, rank among the heads (1 = highest)."""
        import pandas as pd

        flat = torch.nan_to_num(self.kurtosis.flatten(), nan=-float("inf"))
        rank = torch.empty_like(flat, dtype=torch.long)
        rank[flat.argsort(descending=True)] = torch.arange(1, len(flat) + 1)
        n_heads = self.kurtosis.shape[1]
        return pd.DataFrame([{"layer": k // n_heads, "head": k % n_heads, "kurtosis": float(self.kurtosis.flatten()[k]),
                              "rank": int(rank[k]), "top": (k // n_heads, k % n_heads) in self.top_heads}
                             for k in range(len(flat))])

    def plot(self, ax: Any = None) -> Any:
        """The kurtosis per head (:func:`mechthink.plotting.anchors.plot_receiver_heads`)."""
        from mechthink.plotting.anchors import plot_receiver_heads

        return plot_receiver_heads(self, ax=ax)


def receiver_heads(
    model: "ThinkingModel",
    traces: Sequence[Trace],
    sentences_per_trace: Sequence[Sequence[Sentence]],
    top_k: int = 16,
    proximity_ignore: int = 4,
    n_top_sentences: int = 3,
) -> ReceiverHeads:
    """Rank heads by the kurtosis of their sentence-level vertical attention, over traces.

    Per trace and head: :func:`sentence_attention`, then :func:`vertical_scores`; each head's
    kurtosis across sentences (Fisher, biased, NaN omitted), averaged over the traces (NaN
    omitted); the ``top_k`` heads by it; per trace the mean vertical score over those heads and
    the ``n_top_sentences`` sentences with the highest one (the paper uses ``top_k=20``,
    ``proximity_ignore=4``).

    Raises:
        ValueError: no traces, mismatched sentence lists, ``top_k`` < 1.
    """
    if not traces or len(traces) != len(sentences_per_trace):
        raise ValueError(f"receiver_heads: need one sentence list per trace, got {len(traces)} traces and "
                         f"{len(sentences_per_trace)} lists")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"receiver_heads: top_k must be a positive int, got {top_k!r}")
    verts = [vertical_scores(sentence_attention(model, t, s), proximity_ignore) for t, s in zip(traces, sentences_per_trace)]
    kurts = torch.stack([_kurtosis(v) for v in verts])
    mean_k = torch.nanmean(kurts, 0)
    flat = torch.nan_to_num(mean_k.flatten(), nan=-float("inf"))
    n_heads = mean_k.shape[1]
    top = [(int(k) // n_heads, int(k) % n_heads) for k in flat.argsort(descending=True)[: min(top_k, len(flat))]]
    scores = [torch.nanmean(torch.stack([v[L, h] for L, h in top]), 0) for v in verts]
    tops = [torch.nan_to_num(s, nan=-float("inf")).argsort(descending=True)[:n_top_sentences].tolist() for s in scores]
    return ReceiverHeads(mean_k, top, scores, tops, proximity_ignore)


# ============================================================================ token methods per sentence
@dataclass
class SentenceScores(Result):
    """A token-level score aggregated over each sentence.

    Attributes:
        sentences: The sentences.
        sum: Sum over the sentence's tokens (NaN tokens skipped; NaN if all are).
        max: Max over its tokens.
        method: What the token scores were.
    """

    sentences: list[Sentence]
    sum: Float[Tensor, " sentence"]
    max: Float[Tensor, " sentence"]
    method: str = ""

    def to_frame(self) -> "pd.DataFrame":
        """One row per sentence: index, label, text, sum, max."""
        import pandas as pd

        return pd.DataFrame([{"sentence": s.index, "label": s.label, "text": s.text, "sum": float(self.sum[s.index]),
                              "max": float(self.max[s.index]), "method": self.method} for s in self.sentences])

    def plot(self, ax: Any = None) -> Any:
        """Bars of the sums (:func:`mechthink.plotting.anchors.plot_sentence_bars`)."""
        from mechthink.plotting.anchors import plot_sentence_bars

        return plot_sentence_bars({f"{self.method} (sum)": self.sum, f"{self.method} (max)": self.max}, self.sentences, ax=ax)


def sentence_scores(values: Float[Tensor, " pos"], sentences_: Sequence[Sentence], method: str = "") -> SentenceScores:
    """Sum and max of token values over each sentence's tokens (NaN values are skipped)."""
    sents = list(sentences_)
    _check_sentences(sents, int(values.shape[0]), "sentence_scores")
    v = values.detach().float().cpu()
    sums, maxs = [], []
    for s in sents:
        seg = v[s.token_start : s.token_end]
        ok = seg[~seg.isnan()]
        sums.append(float(ok.sum()) if len(ok) else float("nan"))
        maxs.append(float(ok.max()) if len(ok) else float("nan"))
    return SentenceScores(sents, torch.tensor(sums), torch.tensor(maxs), method)


def sentence_attribution(
    attribution: Any, sentences_: Sequence[Sentence], node: str = "resid_pre", sign: float = -1.0, reduce: str = "max"
) -> SentenceScores:
    """An attribution result's token importance (``attribution.token_importance(node, reduce,
    sign)``, e.g. a :class:`mechthink.attribution.AttributionResult`) per sentence."""
    return sentence_scores(attribution.token_importance(node, reduce=reduce, sign=sign), sentences_, method=f"atp/{node}")


def sentence_mi(trajectory: Any, sentences_: Sequence[Sentence], n_tokens: int, peaks: bool = False) -> SentenceScores:
    """An MI trajectory (:class:`mechthink.mi.MITrajectory`) per sentence: MI at each step's
    token position (``peaks=True``: 1 at the peaks, 0 elsewhere, so ``sum`` counts peaks)."""
    vals = torch.full((n_tokens,), float("nan"))
    pos = trajectory.positions.long()
    mi = trajectory.mi.float()
    if peaks:
        mi = torch.zeros_like(mi)
        mi[trajectory.peaks.long()] = 1.0
    inside = pos < n_tokens
    vals[pos[inside]] = mi[inside]
    return sentence_scores(vals, sentences_, method="mi_peaks" if peaks else "mi")


# ============================================================================ answer metric (AtP)
def final_answer_positions(trace: Trace, answer: str | None = None) -> list[int]:
    """Token positions of the final answer's last occurrence after the thinking (``answer``
    default: the answer the completion gives, else the gold).

    Raises:
        ValueError: no answer, or it does not occur after the thinking.
    """
    ans = answer if answer is not None else (_own_answer(trace) or trace.gold)
    if ans is None or not str(ans).strip():
        raise ValueError(f"final_answer_positions: trace {trace.id!r} gives no parsable answer and has no gold")
    ans = str(ans)
    start = trace.offsets[trace.think_end][0] if trace.think_end is not None else (
        trace.offsets[trace.n_prompt][0] if trace.n_prompt < len(trace.ids) else 0)
    at = trace.text.rfind(ans, start)
    if at < 0:
        raise ValueError(f"final_answer_positions: answer {ans!r} does not occur after the thinking of trace {trace.id!r}")
    first, last = trace.token_at_char(at), trace.token_at_char(at + len(ans) - 1)
    return list(range(first, last + 1))


def answer_logprob_metric(ids: Sequence[int], positions: Sequence[int]) -> Callable[[Tensor], Tensor]:
    """Metric for attribution: the summed log-probability of the tokens at ``positions``
    (teacher-forced), one value per batch row."""
    pos = [int(p) for p in positions]
    if not pos or min(pos) < 1:
        raise ValueError(f"answer_logprob_metric: positions must be >= 1, got {pos}")
    tgt = torch.tensor([int(ids[p]) for p in pos])
    prev = torch.tensor([p - 1 for p in pos])

    def metric(logits: Tensor) -> Tensor:
        lp = logits[:, prev.to(logits.device)].float().log_softmax(-1)
        return lp.gather(-1, einops.repeat(tgt.to(logits.device), "t -> b t 1", b=logits.shape[0]))[..., 0].sum(-1)

    return metric


# ============================================================================ agreement
def auroc(scores: Sequence[float] | Tensor, labels: Sequence[bool] | Tensor) -> float:
    """Area under the ROC curve of ``scores`` for the positive ``labels`` (ties count half;
    NaN scores are dropped); NaN when a class is empty."""
    from scipy.stats import rankdata

    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    y = torch.as_tensor(labels, dtype=torch.bool).flatten()
    if s.shape != y.shape:
        raise ValueError(f"auroc: {s.numel()} scores for {y.numel()} labels")
    ok = ~s.isnan()
    s, y = s[ok], y[ok]
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = torch.as_tensor(rankdata(s.numpy()))
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@dataclass
class MethodAgreement(Result):
    """How well sentence-importance methods agree over traces.

    Attributes:
        methods: The method names (rows and columns).
        spearman: ``[method, method]``: Spearman's rho over the sentences of a trace, mean over
            the traces where both methods vary (NaN if none).
        top_k_overlap: ``[method, method]``: shared share of the top-``k`` sentences, mean over
            traces.
        k: The ``k`` of the overlaps.
        n_traces: Traces compared.
    """

    methods: list[str]
    spearman: Float[Tensor, "method method2"]
    top_k_overlap: Float[Tensor, "method method2"]
    k: int
    n_traces: int

    def to_frame(self) -> "pd.DataFrame":
        """One row per method pair: spearman, top-k overlap."""
        import pandas as pd

        return pd.DataFrame([{"a": a, "b": b, "spearman": float(self.spearman[i, j]), "top_k_overlap": float(self.top_k_overlap[i, j])}
                             for i, a in enumerate(self.methods) for j, b in enumerate(self.methods)])

    def plot(self, ax: Any = None) -> Any:
        """The Spearman matrix (:func:`mechthink.plotting.anchors.plot_agreement`)."""
        from mechthink.plotting.anchors import plot_agreement

        return plot_agreement(self, ax=ax)


def _top(v: Tensor, k: int) -> set[int]:
    return set(torch.nan_to_num(v.double(), nan=-float("inf")).argsort(descending=True)[:k].tolist())


def method_agreement(scores: Mapping[str, Sequence[Tensor]], k: int = 3) -> MethodAgreement:
    """Spearman matrix and top-``k`` overlaps between methods' per-sentence scores.

    Args:
        scores: Per method, one score vector per trace (all methods the same traces and
            lengths; NaN entries are left out of that trace's comparison).
        k: Size of the top sets.

    Raises:
        ValueError: no methods, or methods with different traces or lengths.
    """
    from mechthink.stats import spearman

    methods = list(scores)
    if not methods:
        raise ValueError("method_agreement: scores is empty; pass {method: [scores per trace]}")
    n = len(scores[methods[0]])
    shapes = {m: [tuple(v.shape) for v in scores[m]] for m in methods}
    if any(shapes[m] != shapes[methods[0]] for m in methods):
        raise ValueError(f"method_agreement: every method needs the same traces and sentence counts, got {shapes}")
    rho = torch.full((len(methods), len(methods)), float("nan"))
    over = torch.full((len(methods), len(methods)), float("nan"))
    for a, ma in enumerate(methods):
        for b, mb in enumerate(methods):
            rs, os_ = [], []
            for t in range(n):
                va, vb = scores[ma][t].double().flatten(), scores[mb][t].double().flatten()
                ok = ~(va.isnan() | vb.isnan())
                if int(ok.sum()) >= 3 and va[ok].std() > 0 and vb[ok].std() > 0:
                    rs.append(spearman(va[ok], vb[ok]))
                kk = min(k, int(ok.sum()))
                if kk > 0:
                    os_.append(len(_top(va.masked_fill(~ok, float("nan")), kk) & _top(vb.masked_fill(~ok, float("nan")), kk)) / kk)
            rho[a, b] = sum(rs) / len(rs) if rs else float("nan")
            over[a, b] = sum(os_) / len(os_) if os_ else float("nan")
    return MethodAgreement(methods, rho, over, int(k), n)


# ============================================================================ one trace, every method
@dataclass
class AnchorTrace:
    """A trace with its sentences and, on tiny-thinker, the generator's ground truth.

    Attributes:
        trace: The trace.
        sentences: Its thinking sentences.
        truth: The generator's record (tiny-thinker), else None.
    """

    trace: Trace
    sentences: list[Sentence]
    truth: OrganismSentences | None = None


def anchor_traces(
    model: "ThinkingModel", n: int, seed: int = 0, max_new_tokens: int = 256, gsm8k_path: str | None = None
) -> list[AnchorTrace]:
    """Traces to find anchors in: tiny-thinker's held-out transcripts (teacher-forced, with
    planted errors and ground truth), else greedy traces of ``model`` on GSM8K (those whose
    thinking has at least one sentence)."""
    from mechthink.models.organism import is_organism, problems_for, sample_transcripts

    if is_organism(model):
        out = []
        for k, tr in enumerate(sample_transcripts(n, seed=f"anchors-{seed}")):
            o = organism_sentences(model, tr, id=f"organism-{seed}-{k}")
            out.append(AnchorTrace(o.trace, o.sentences, o))
        return out
    from mechthink import traces as traces_mod

    gen = traces_mod.generate(model, problems_for(model, n, seed, gsm8k_path or None), max_new_tokens=max_new_tokens)
    out = []
    for t in gen:
        try:
            final_answer_positions(t)
            out.append(AnchorTrace(t, sentences(t, model=model)))
        except ValueError as exc:  # no thinking sentence, or no final answer to score
            log.info("anchor_traces: trace %s skipped (%s)", t.id, exc)
    return out


#: The methods compared on every trace (columns of :attr:`EveryMethod.scores`).
METHODS: tuple[str, ...] = ("resampling", "counterfactual", "suppression", "receiver", "atp", "mi")


@dataclass
class EveryMethod(Result):
    """Every sentence-importance method on the same traces.

    Attributes:
        traces: The traces.
        resampling: Resampling importance per trace.
        suppression: Attention-suppression matrix per trace.
        receivers: Receiver heads over the traces.
        atp: Sentence-level attribution patching per trace (the final answer's log-probability).
        mi: Sentence-level MI (max over the sentence's steps) per trace.
        agreement: Agreement of the methods' scores.
        scores: Per method (:data:`METHODS`), one score per sentence per trace.
    """

    traces: list[AnchorTrace]
    resampling: list[ResamplingImportance]
    suppression: list[SuppressionMatrix]
    receivers: ReceiverHeads
    atp: list[SentenceScores]
    mi: list[SentenceScores]
    agreement: MethodAgreement
    scores: dict[str, list[Tensor]]

    def to_frame(self) -> "pd.DataFrame":
        """One row per (trace, sentence): label, true label (tiny-thinker) and every method's score."""
        import pandas as pd

        rows = []
        for t, item in enumerate(self.traces):
            for s in item.sentences:
                row = {"trace": item.trace.id, "sentence": s.index, "label": s.label, "text": s.text,
                       "true_label": item.truth.true_labels[s.index] if item.truth else None}
                row.update({m: float(self.scores[m][t][s.index]) for m in self.scores})
                rows.append(row)
        return pd.DataFrame(rows)

    def plot(self, ax: Any = None, example: int | None = None) -> Any:
        """Per-sentence bars of every method for one trace, its dependency matrix and the
        agreement matrix (:func:`mechthink.plotting.anchors.anchors_figure`; default example:
        :meth:`example`)."""
        from mechthink.plotting.anchors import anchors_figure

        return anchors_figure(self, example=self.example() if example is None else example)

    def example(self) -> int:
        """The trace to show: the first with a planted error (tiny-thinker), else the first."""
        return next((i for i, it in enumerate(self.traces) if it.truth is not None and it.truth.error_pairs), 0)

    def summary(self) -> dict[str, Any]:
        """The numbers of the comparison: agreement matrices, receiver heads, rollouts drawn and
        tokens read (with the ratio re-prefilling every rollout would read), and each method's
        mean score per sentence label."""
        m = self.agreement.methods
        labels = sorted({s.label for it in self.traces for s in it.sentences})
        by_label: dict[str, dict[str, float]] = {}
        for name in self.scores:
            vals = [(s.label, float(v[s.index])) for it, v in zip(self.traces, self.scores[name]) for s in it.sentences]
            by_label[name] = {lab: _nanmean([x for lb, x in vals if lb == lab]) for lab in labels}
        rollout_tokens = sum(len(x.ids) for r in self.resampling for rs in r.rollouts for x in rs)
        prefill = sum(int(r.config.get("prefill_tokens", 0)) for r in self.resampling)
        # what re-reading every rollout's prefix (the thought-anchors code's way) would add
        not_reread = sum(sum(int(n) * p for n, p in zip(r.n_rollouts, r.points)) for r in self.resampling) - prefill
        return {
            "n_traces": len(self.traces),
            "n_sentences": sum(len(it.sentences) for it in self.traces),
            "methods": m,
            "spearman": {a: {b: float(self.agreement.spearman[i, j]) for j, b in enumerate(m)} for i, a in enumerate(m)},
            f"top{self.agreement.k}_overlap": {a: {b: float(self.agreement.top_k_overlap[i, j]) for j, b in enumerate(m)}
                                               for i, a in enumerate(m)},
            "receiver_heads": [f"L{L}H{h}" for L, h in self.receivers.top_heads],
            "rollouts_drawn": sum(r.rollouts_drawn for r in self.resampling),
            "rollout_tokens": rollout_tokens,
            "prefill_tokens": prefill,
            "prefix_tokens_not_reread": not_reread,
            # tokens read by re-prefilling every rollout over those read from the forks (prefixes
            # + rollouts either way; the similarity reads, a few percent, are left out of both)
            "token_ratio_vs_reprefill": (rollout_tokens + prefill + not_reread) / max(1, rollout_tokens + prefill),
            "mean_score_by_label": by_label,
            "label_counts": dict(Counter(s.label for it in self.traces for s in it.sentences)),
        }


def every_method(
    model: "ThinkingModel",
    items: Sequence[AnchorTrace],
    resampling: Mapping[str, Any] | None = None,
    top_k_heads: int = 4,
    proximity_ignore: int = 2,
    k: int = 2,
) -> EveryMethod:
    """Resampling importance, attention suppression, receiver heads, sentence-level AtP and MI
    on the same traces, and their agreement (Spearman matrix, top-``k`` overlaps).

    ``resampling`` holds keyword arguments of :func:`resampling_importance` (default here:
    64 rollouts, batches of 64, 160 tokens, temperature 1, top-p 1). AtP scores the summed
    log-probability of the final answer's tokens (mean-ablation baseline over the traces,
    ``resid_pre``, importance = max over layers of −score, summed over each sentence); MI is
    the paper's HSIC trajectory against "So the answer is N." (max over each sentence's steps).
    The receiver heads are the ``top_k_heads`` by kurtosis with ``proximity_ignore``.
    """
    from mechthink import attribution as atp
    from mechthink import mi as mi_mod
    from mechthink.progress import track

    if not items:
        raise ValueError("every_method: items is empty; pass traces from anchor_traces")
    kw = {"n_rollouts": 64, "batch_size": 64, "max_new_tokens": 160, "temperature": 1.0, "top_p": 1.0, **(resampling or {})}
    means = atp.mean_activations(model, [it.trace.ids for it in items], hooks=("resid_pre",))
    res, sup, at, mis = [], [], [], []
    for it in track(items, "thought anchors"):
        tr, sents = it.trace, it.sentences
        res.append(resampling_importance(model, tr, sents, **kw))
        sup.append(suppression_matrix(model, tr, sents))
        metric = answer_logprob_metric(tr.ids, final_answer_positions(tr))
        attr = atp.attribution_patching(model, torch.tensor(tr.ids), metric, baseline="mean", means=means, nodes=("resid_pre",))
        at.append(sentence_attribution(attr, sents))
        answer = torch.tensor(model.tokenizer(f"So the answer is {res[-1].reference}.", add_special_tokens=False)["input_ids"])
        traj = mi_mod.mi_trajectory(model, torch.tensor(tr.ids), answer, start=sents[0].token_start)
        mis.append(sentence_mi(traj, sents, len(tr.ids)))
    rec = receiver_heads(model, [it.trace for it in items], [it.sentences for it in items], top_k_heads, proximity_ignore)
    scores = {
        "resampling": [r.metric("resampling_kl").float() for r in res],
        "counterfactual": [r.metric("counterfactual_kl").float() for r in res],
        "suppression": [m.effect().float() for m in sup],
        "receiver": [s.float() for s in rec.scores],
        "atp": [a.sum.float() for a in at],
        "mi": [m.max.float() for m in mis],
    }
    return EveryMethod(list(items), res, sup, rec, at, mis, method_agreement(scores, k), scores)


def organism_checks(
    items: Sequence[AnchorTrace],
    suppression: Sequence[SuppressionMatrix] | None = None,
    resampling: Sequence[ResamplingImportance] | None = None,
    adaptive: AdaptiveStopping | None = None,
) -> dict[str, Any]:
    """tiny-thinker's ground-truth checks of the methods (items must carry ``truth``).

    * ``taxonomy_agreement``: share of sentences whose rule label equals the generator's
      (``taxonomy_confusion``: counts of ``true -> rule`` pairs that differ).
    * ``suppression_wrong_step_strongest``: share of planted errors where suppressing the wrong
      step's sentence changes its backtracking sentence most among the earlier sentences
      (``..._traces``: share of traces where that holds for every error).
    * ``resampling_auroc``: per importance, AUROC for the sentences whose result feeds the final
      answer (``answer_determining``) against the rest; ``resampling_auroc_states_answer``: for
      the sentences that state the final answer (the generator's answer mentions);
      ``resampling_auroc_without_error_pairs``: the first, leaving out each planted wrong step
      and its backtracking sentence.
    * ``adaptive_*`` (with ``adaptive``): rollouts saved by replaying the stopping rule on the
      full runs and Spearman's rho of each importance (pooled over sentences) against full N.
    """
    from mechthink.stats import spearman

    truth = [it.truth for it in items]
    if any(t is None for t in truth):
        raise ValueError("organism_checks: every item needs the generator's truth (tiny-thinker traces)")
    tru = [t for t in truth if t is not None]
    pairs = [(lab, s.label) for t in tru for s, lab in zip(t.sentences, t.true_labels)]
    out: dict[str, Any] = {
        "n_sentences": len(pairs),
        "taxonomy_agreement": sum(a == b for a, b in pairs) / max(1, len(pairs)),
        "taxonomy_confusion": {f"{a} -> {b}": n for (a, b), n in Counter(p for p in pairs if p[0] != p[1]).items()},
    }
    if suppression is not None:
        per = [[m.strongest_source(b) == w for w, b in t.error_pairs] for t, m in zip(tru, suppression)]
        flat = [h for p in per for h in p]
        out["n_planted_errors"] = len(flat)
        out["suppression_wrong_step_strongest"] = sum(flat) / len(flat) if flat else float("nan")
        with_err = [all(p) for p in per if p]
        out["suppression_wrong_step_strongest_traces"] = sum(with_err) / len(with_err) if with_err else float("nan")
    if resampling is not None:
        det = [d for t in tru[: len(resampling)] for d in t.answer_determining]
        states = [t.states_answer for t in tru[: len(resampling)]]
        out["resampling_auroc"] = {m: auroc(torch.cat([r.metric(m) for r in resampling]), det) for m in ResamplingImportance.METRICS}
        out["resampling_auroc_states_answer"] = {
            m: auroc(torch.cat([r.metric(m) for r in resampling]), [s for st in states for s in st])
            for m in ResamplingImportance.METRICS}
        out["n_answer_determining"] = int(sum(det))
        # the planted errors apart: a wrong step is not answer-determining by the generator's
        # label, yet its KL importance is high (the rollouts from the prefix that holds it and
        # end wrong end at the answer it leads to, so the answer distribution moves even though
        # accuracy barely does: 0.77-0.86 before a wrong step, 0.84-0.88 after, seed 0 at
        # temperature 1.5, N = 100), and its backtrack is overdetermined (the model backtracks from the
        # prefix that holds the error whether or not the backtrack is resampled)
        keep = [i not in {j for p in t.error_pairs for j in p} for t in tru[: len(resampling)] for i in range(len(t.sentences))]
        out["resampling_auroc_without_error_pairs"] = {
            m: auroc(torch.cat([r.metric(m) for r in resampling])[torch.tensor(keep)], [d for d, k in zip(det, keep) if k])
            for m in ResamplingImportance.METRICS}
    if resampling is not None and adaptive is not None:
        replay = [replay_adaptive(r, adaptive) for r in resampling]
        out["adaptive_rollouts_full"] = sum(r.rollouts_drawn for r in resampling)
        out["adaptive_rollouts_drawn"] = sum(r.rollouts_drawn for r in replay)
        out["adaptive_saved_fraction"] = 1 - out["adaptive_rollouts_drawn"] / max(1, out["adaptive_rollouts_full"])
        out["adaptive_spearman_vs_full"] = {
            m: spearman(torch.cat([r.metric(m) for r in replay]), torch.cat([r.metric(m) for r in resampling]))
            for m in ResamplingImportance.METRICS}
    return out
