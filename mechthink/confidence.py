"""Answer confidence while a model thinks: forced-answer probes through a forked KV cache.

At chosen points of a trace, append an answer-forcing suffix (``</think> The final answer is
\\boxed{``) and read the log-probability of each answer choice (a choice = several spellings,
each a possibly multi-token sequence, combined by logsumexp), plus the probability mass on all
choices as a sanity monitor. This is the "action confidence" of repeng PR #69 /
wassname/llm-moral-foundations2 (``gather/cot.py``: logp(Yes) − logp(No)) and the early-exit
experiment of ARBOR #22 (wj210/cot_backtrack: force the answer at each answer-reaching instance).

The shared prefix is never recomputed: one incremental pass over the trace with a Hugging Face
``DynamicCache``; at each probe position the next prefix chunk and the suffix run in one call
on the cache, unembedding only the last position (the suffix is then cropped away),
and multi-token choice sequences run in one right-padded batch with an attention mask: on one
shared copy of the cached trace where nothing is hooked
(:class:`mechthink.models.shared_prefix.SharedPrefixCache`, the HF model's own forward), else on
a forked cache (``deepcopy`` + ``batch_repeat_interleave``) through the bridge.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field, fields
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechthink.data.answers import answers_match, normalize_number
from mechthink.models.native import native_blockers, native_forward
from mechthink.models.shared_prefix import SharedPrefixCache, config_supports_shared_prefix
from mechthink.progress import track
from mechthink.results import Result
from mechthink.stats import mean
from mechthink.traces import Trace, answer_instances

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from mechthink.models.thinking_model import ThinkingModel

__all__ = [
    "AnswerProbeResult",
    "EarlyExitInstance",
    "EarlyExitResult",
    "EarlyExitRow",
    "EarlyExitSummary",
    "GoldConfidenceCurves",
    "GoldConfidenceRow",
    "answer_probe",
    "confidence_curve",
    "early_exit",
    "early_exit_summary",
    "gold_candidates",
    "gold_confidence_curves",
    "gold_variants",
]


# ============================================================================ results
@dataclass
class AnswerProbeResult(Result):
    """Forced-answer log-probabilities at several positions of one sequence.

    Attributes:
        logprobs: ``[pos, choice]`` log-prob of each choice after prefix + suffix (logsumexp
            over the choice's sequences of the summed token log-probs).
        mean_logit: ``[pos, choice]`` mean raw logit of the tokens of the choice's most likely
            sequence (compatibility mode centres the unembedding, so logits are centred).
        mass: ``[pos]`` total probability of all choices (a sanity monitor: low mass means the
            suffix did not elicit any of the choices).
        positions: The probe positions (prefix = ``tokens[:pos + 1]``).
        choice_names: The choice labels, indexing the second axis.
        suffix: The suffix text.
        greedy: Greedy-decoded continuation after the suffix at each position (or None).
        marks: Named token positions to mark on plots (e.g. ``{"think_end": 812}``).

    Examples:
        >>> res = AnswerProbeResult(
        ...     logprobs=torch.tensor([[-0.5, -2.0], [-0.25, -3.0]]), mean_logit=torch.zeros(2, 2),
        ...     mass=torch.tensor([0.74, 0.83]), positions=[10, 20], choice_names=["yes", "no"], suffix=" Answer:")
        >>> res.log_ratio.tolist()
        [1.5, 2.75]
        >>> list(res.to_frame().columns)
        ['position', 'logp_yes', 'logp_no', 'mean_logit_yes', 'mean_logit_no', 'mass', 'log_ratio']
    """

    logprobs: Float[Tensor, "pos choice"]
    mean_logit: Float[Tensor, "pos choice"]
    mass: Float[Tensor, " pos"]
    positions: list[int]
    choice_names: list[str]
    suffix: str
    greedy: list[str] | None = None
    marks: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n, c = len(self.positions), len(self.choice_names)
        if tuple(self.logprobs.shape) != (n, c) or tuple(self.mean_logit.shape) != (n, c):
            raise ValueError(f"AnswerProbeResult: logprobs/mean_logit must be [{n}, {c}], got {tuple(self.logprobs.shape)}")
        if tuple(self.mass.shape) != (n,):
            raise ValueError(f"AnswerProbeResult: mass must be [{n}], got {tuple(self.mass.shape)}")
        if self.greedy is not None and len(self.greedy) != n:
            raise ValueError("AnswerProbeResult: greedy must have one text per position")

    @property
    def log_ratio(self) -> Float[Tensor, " pos"]:
        """``logprobs[:, 0] - logprobs[:, 1]`` (e.g. logp(Yes) − logp(No)); needs two choices."""
        if len(self.choice_names) != 2:
            raise ValueError(f"log_ratio needs exactly two choices, got {self.choice_names}")
        return self.logprobs[:, 0] - self.logprobs[:, 1]

    def to_frame(self) -> "pd.DataFrame":
        """One row per position: ``position``, ``logp_<choice>``, ``mean_logit_<choice>``, ``mass``
        (and ``log_ratio``, ``greedy`` when available)."""
        import pandas as pd

        data: dict[str, Any] = {"position": self.positions}
        for j, name in enumerate(self.choice_names):
            data[f"logp_{name}"] = self.logprobs[:, j].tolist()
        for j, name in enumerate(self.choice_names):
            data[f"mean_logit_{name}"] = self.mean_logit[:, j].tolist()
        data["mass"] = self.mass.tolist()
        if len(self.choice_names) == 2:
            data["log_ratio"] = self.log_ratio.tolist()
        if self.greedy is not None:
            data["greedy"] = self.greedy
        return pd.DataFrame(data)

    def plot(self, ax: Any = None, **kwargs: Any) -> "Figure":
        """Confidence curve figure (see :func:`mechthink.plotting.confidence.plot_probe`)."""
        from mechthink.plotting.confidence import plot_probe

        return plot_probe(self, ax=ax, **kwargs)


# ============================================================================ probing
def _ids_of(tokens: Any) -> list[int]:
    if isinstance(tokens, Trace):
        return list(tokens.ids)
    if isinstance(tokens, torch.Tensor):
        if tokens.ndim == 2 and tokens.shape[0] == 1:
            tokens = tokens[0]
        if tokens.ndim != 1 or tokens.is_floating_point():
            raise ValueError(f"answer_probe: tokens must be one 1-D integer sequence, got shape {tuple(tokens.shape)}")
        return [int(t) for t in tokens.tolist()]
    return [int(t) for t in tokens]


def _encode(model: "ThinkingModel", text: str) -> list[int]:
    return [int(i) for i in model.tokenizer(text, add_special_tokens=False)["input_ids"]]


def _choice_sequences(model: "ThinkingModel", choices: Mapping[str, Sequence[str]]) -> list[list[list[int]]]:
    if not choices:
        raise ValueError("answer_probe: choices is empty; pass e.g. {'yes': [' Yes'], 'no': [' No']}")
    out: list[list[list[int]]] = []
    for name, strings in choices.items():
        if isinstance(strings, str):
            strings = [strings]
        if not strings:
            raise ValueError(f"answer_probe: choice {name!r} has no strings")
        seqs: list[list[int]] = []
        for s in strings:
            ids = _encode(model, s)
            if not ids:
                raise ValueError(f"answer_probe: choice {name!r}: {s!r} tokenizes to nothing")
            if ids not in seqs:  # the same token sequence twice would be counted twice
                seqs.append(ids)
        out.append(seqs)
    return out


def _forward(model: "ThinkingModel", ids: Sequence[int] | Tensor, kv: Any, **kw: Any) -> tuple[Tensor, Any]:
    from mechthink.models.fast_attention import fast_attention

    x = ids if isinstance(ids, Tensor) else torch.tensor([list(ids)], dtype=torch.long)
    with fast_attention(model):  # long prefills on the fused kernel (no [pos, pos] scores); short calls exact
        logits, kv = model.bridge(x.to(model.device), return_type="logits_and_cache", past_key_values=kv, **kw)
    return logits.float(), kv


def _fork(kv: Any, n: int) -> Any:
    fork = copy.deepcopy(kv)
    if n > 1:
        fork.batch_repeat_interleave(n)
    return fork


def _score_multi(
    model: "ThinkingModel", kv: Any, seqs: list[list[int]]
) -> list[tuple[list[float], list[float]]]:
    """Log-probs and logits of tokens 1.. of each sequence, one right-padded batch on a fork."""
    n = len(seqs)
    cache_len = kv.get_seq_length()
    width = max(len(s) for s in seqs) - 1
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else seqs[0][0]
    x = torch.full((n, width), int(pad), dtype=torch.long)
    row_mask = torch.zeros((n, width), dtype=torch.long)
    for r, s in enumerate(seqs):
        x[r, : len(s) - 1] = torch.tensor(s[:-1])
        row_mask[r, : len(s) - 1] = 1
    mask = torch.cat([torch.ones((n, cache_len), dtype=torch.long), row_mask], dim=1).to(model.device)
    pos = (cache_len + torch.arange(width)).expand(n, width).to(model.device)
    if n > 1 and config_supports_shared_prefix(model.bridge.original_model.config) and not native_blockers(model.bridge):
        # nothing hooked: the rows read one shared copy of the cached trace (no per-row copy of it)
        logits = native_forward(model.bridge, x.to(model.device), attention_mask=mask, position_ids=pos,
                                past_key_values=SharedPrefixCache(kv, n, room=width))[0].float()
    else:
        logits, _ = _forward(model, x, _fork(kv, n), attention_mask=mask, position_ids=pos)
    lps = logits.log_softmax(-1)
    out = []
    for r, s in enumerate(seqs):
        tgt = torch.tensor(s[1:], device=logits.device)
        idx = torch.arange(len(s) - 1, device=logits.device)
        out.append((lps[r, idx, tgt].tolist(), logits[r, idx, tgt].tolist()))
    return out


def _greedy(
    model: "ThinkingModel", kv: Any, first_logits: Tensor, max_tokens: int, stop: str | None
) -> str:
    """Greedy continuation from ``first_logits`` on a fork of ``kv`` (the one decode loop,
    :func:`mechthink.generation.decode_from_cache`); the text ends before eos or ``stop``."""
    from mechthink.generation import Decoder, SamplingConfig, decode_from_cache

    (cont,) = decode_from_cache(Decoder.for_model(model), kv, first_logits,
                                SamplingConfig(max_new_tokens=max_tokens, temperature=0.0), indices=[0])
    ids = cont.ids[:-1] if cont.finished == "eos" else cont.ids
    text = model.to_string(ids)
    if stop is not None and stop in text:
        text = text[: text.index(stop)]
    return text


@torch.inference_mode()
def answer_probe(
    model: "ThinkingModel",
    tokens: Int[Tensor, " pos"] | Sequence[int] | Trace,
    positions: Sequence[int],
    choices: Mapping[str, Sequence[str]],
    suffix: str | None = None,
    greedy_tokens: int = 0,
    greedy_stop: str | None = None,
) -> AnswerProbeResult:
    """Forced-answer log-probs of each choice at each probe position, via a forked KV cache.

    Args:
        model: The loaded model.
        tokens: One token sequence (1-D tensor, list, or a :class:`Trace` for its ``ids``).
        positions: Probe after token ``pos`` (prefix = ``tokens[:pos + 1]``); any order,
            results follow the given order.
        choices: ``name -> strings``; each string is a possibly multi-token sequence scored
            after prefix + suffix; a choice's log-prob is the logsumexp over its strings.
        suffix: Text appended after the prefix (default ``model.spec.answer_suffix``; ``""``
            for none).
        greedy_tokens: If > 0, also greedy-decode that many tokens after the suffix.
        greedy_stop: Stop greedy decoding at this string (e.g. ``"}"``), excluded from the text.

    Returns:
        A :class:`AnswerProbeResult`.

    Examples:
        >>> model = mt.load_model("tiny-thinker")  # doctest: +SKIP
        >>> probe = answer_probe(model, trace, [40, 80], {"yes": [" Yes"], "no": [" No"]})  # doctest: +SKIP
        >>> probe.log_ratio, probe.mass  # doctest: +SKIP

    Raises:
        ValueError: empty positions, a position outside the sequence, an empty choice string,
            or an empty sequence.
    """
    ids = _ids_of(tokens)
    if not ids:
        raise ValueError("answer_probe: tokens is empty")
    positions = [int(p) for p in positions]
    if not positions:
        raise ValueError("answer_probe: positions is empty; pass at least one cut point")
    bad = [p for p in positions if not 0 <= p < len(ids)]
    if bad:
        raise ValueError(f"answer_probe: positions {bad[:5]} are outside the sequence (valid: 0..{len(ids) - 1})")
    if suffix is None:
        suffix = model.spec.answer_suffix
    suffix_ids = _encode(model, suffix)
    seqs = _choice_sequences(model, choices)
    flat = [s for group in seqs for s in group]
    multi_idx = [k for k, s in enumerate(flat) if len(s) > 1]

    per_pos: dict[int, tuple[list[float], list[float], str | None]] = {}
    last_only = model.last_logits_kwargs()  # only the suffix's last logits are read
    kv = None
    done = 0
    for p in sorted(set(positions)):
        # The new part of the prefix and the suffix run in one call (causal: the prefix's
        # keys/values do not see the suffix); the suffix is cropped away afterwards.
        chunk = ids[done : p + 1]
        lg, kv = _forward(model, chunk + suffix_ids, kv, **last_only)
        done = p + 1
        head = lg[0, -1]
        head_lp = head.log_softmax(-1)
        tok_lp = [[float(head_lp[s[0]])] for s in flat]
        tok_lg = [[float(head[s[0]])] for s in flat]
        if multi_idx:
            for k, (lps, lgs) in zip(multi_idx, _score_multi(model, kv, [flat[k] for k in multi_idx])):
                tok_lp[k] += lps
                tok_lg[k] += lgs
        greedy = _greedy(model, kv, head, greedy_tokens, greedy_stop) if greedy_tokens > 0 else None
        if suffix_ids:
            kv.crop(-len(suffix_ids))  # rewind to the prefix
        per_pos[p] = ([sum(v) for v in tok_lp], [sum(v) / len(v) for v in tok_lg], greedy)

    n_choice = len(seqs)
    logprobs = torch.empty(len(positions), n_choice, dtype=torch.float64)
    mean_logit = torch.empty(len(positions), n_choice, dtype=torch.float64)
    for i, p in enumerate(positions):
        seq_lp, seq_lg, _ = per_pos[p]
        k = 0
        for j, group in enumerate(seqs):
            vals = torch.tensor(seq_lp[k : k + len(group)], dtype=torch.float64)
            logprobs[i, j] = torch.logsumexp(vals, 0)
            mean_logit[i, j] = seq_lg[k + int(vals.argmax())]
            k += len(group)
    # Mass over all distinct sequences (a sequence shared by two choices counts once).
    uniq: dict[tuple[int, ...], int] = {}
    for k, s in enumerate(flat):
        uniq.setdefault(tuple(s), k)
    mass = torch.tensor(
        [sum(math.exp(per_pos[p][0][k]) for k in uniq.values()) for p in positions], dtype=torch.float64
    )
    greedy_texts = [per_pos[p][2] or "" for p in positions] if greedy_tokens > 0 else None
    return AnswerProbeResult(
        logprobs=logprobs.float(),
        mean_logit=mean_logit.float(),
        mass=mass.float(),
        positions=positions,
        choice_names=[str(c) for c in choices],
        suffix=suffix,
        greedy=greedy_texts,
    )


# ============================================================================ early exit
def gold_variants(gold: str) -> list[str]:
    """Spellings of a numeric gold answer scored as one choice: ``"1250"`` and ``"1,250"``.

    Examples:
        >>> gold_variants("1250"), gold_variants("18")
        (['1250', '1,250'], ['18'])
    """
    g = normalize_number(str(gold))
    out = [g]
    m = g.lstrip("-")
    if m.isdigit() and len(m) > 3:
        out.append(f"{int(g):,}")
    return out


@dataclass(frozen=True)
class EarlyExitRow:
    """The forced answer at one answer-reaching instance of a trace.

    Attributes:
        instance: Index of the instance in the trace (0-based).
        position: Token position the answer is forced after.
        next_word: The word after the instance in the thinking (None at the end).
        logprob: Log-prob of the gold sequence(s) after the suffix.
        prob: ``exp(logprob)``.
        mean_logit: Mean logit of the gold's tokens.
        greedy: The greedy-decoded answer up to ``}``.
        correct: Whether ``greedy`` matches the gold.
    """

    instance: int
    position: int
    next_word: str | None
    logprob: float
    prob: float
    mean_logit: float
    greedy: str
    correct: bool


_EARLY_EXIT_COLUMNS = [f.name for f in fields(EarlyExitRow)]


@dataclass
class EarlyExitResult(Result):
    """Forced answers at each answer-reaching instance of one trace (ARBOR #22).

    Attributes:
        trace_id: The trace's id.
        gold: The gold answer.
        suffix: The answer-forcing suffix.
        rows: One :class:`EarlyExitRow` per instance, in trace order (empty when the answer
            never appears in the thinking).
        probe: The underlying probe (None without instances).
    """

    trace_id: str
    gold: str
    suffix: str
    rows: list[EarlyExitRow]
    probe: AnswerProbeResult | None

    def to_frame(self) -> "pd.DataFrame":
        """One row per instance: ``trace_id`` and the :class:`EarlyExitRow` fields."""
        import pandas as pd

        df = pd.DataFrame([asdict(r) for r in self.rows], columns=_EARLY_EXIT_COLUMNS)
        df.insert(0, "trace_id", self.trace_id)
        return df

    def plot(self, ax: Any = None, **kwargs: Any) -> "Figure":
        """p(gold) at each instance, coloured by correctness (see
        :func:`mechthink.plotting.confidence.plot_early_exit`)."""
        from mechthink.plotting.confidence import plot_early_exit

        return plot_early_exit(self, ax=ax, **kwargs)


def early_exit(
    model: "ThinkingModel",
    trace: Trace,
    gold: str | None = None,
    suffix: str | None = None,
    max_answer_tokens: int = 8,
    terminator: str | None = None,
) -> EarlyExitResult:
    """Force an answer at every answer-reaching instance of a trace and score it (ARBOR #22).

    Args:
        model: The loaded model.
        trace: The trace (needs thinking).
        gold: The gold answer (default ``trace.gold``).
        suffix: The answer-forcing suffix (default ``model.spec.answer_suffix``).
        max_answer_tokens: Greedy decoding budget for the forced answer (stops at ``}``).
        terminator: Appended to every gold spelling before scoring so the choice is the whole
            answer, not a prefix of a longer number ("1}" excludes "12}"); default ``"}"`` when
            the suffix ends in ``{`` (``\\boxed{``), else none. ``mean_logit`` covers it too.

    Returns:
        An :class:`EarlyExitResult`; no rows when the answer never appears in the thinking.

    Examples:
        >>> model = mt.load_model("tiny-thinker")  # doctest: +SKIP
        >>> early_exit(model, trace).to_frame()[["instance", "prob", "correct"]]  # doctest: +SKIP
    """
    gold = trace.gold if gold is None else gold
    if gold is None:
        raise ValueError(f"early_exit: trace {trace.id!r} has no gold answer; pass gold=")
    suffix = model.spec.answer_suffix if suffix is None else suffix
    inst = answer_instances(trace, gold)
    if not inst:
        return EarlyExitResult(trace.id, str(gold), suffix, [], None)
    if terminator is None:
        terminator = "}" if suffix.rstrip().endswith("{") else ""
    probe = answer_probe(
        model, trace.ids, [i.position for i in inst], {"gold": [g + terminator for g in gold_variants(gold)]},
        suffix=suffix, greedy_tokens=max_answer_tokens, greedy_stop="}",
    )
    rows = []
    for k, i in enumerate(inst):
        greedy = (probe.greedy or [""])[k].strip()
        lp = float(probe.logprobs[k, 0])
        rows.append(EarlyExitRow(
            instance=i.index, position=i.position, next_word=i.next_word, logprob=lp, prob=math.exp(lp),
            mean_logit=float(probe.mean_logit[k, 0]), greedy=greedy,
            correct=bool(answers_match(normalize_number(greedy) if greedy else None, str(gold))),
        ))
    return EarlyExitResult(trace.id, str(gold), suffix, rows, probe)


@dataclass(frozen=True)
class EarlyExitInstance:
    """Early-exit accuracy and confidence at the k-th answer instance, over traces.

    Attributes:
        instance: The instance number (1-based: 1st, 2nd, …).
        n: Traces that reach this instance.
        accuracy: Share of them whose forced answer is correct.
        mean_logprob: Mean log p(gold).
        mean_prob: Mean p(gold).
        mean_logit: Mean gold logit.
    """

    instance: int
    n: int
    accuracy: float
    mean_logprob: float
    mean_prob: float
    mean_logit: float


@dataclass
class EarlyExitSummary(Result):
    """Early exit over many traces, by answer-instance number (the ARBOR #22 table).

    Attributes:
        n_traces: Traces probed.
        n_traces_with_instances: Traces whose thinking reaches the gold answer at least once.
        by_instance: One :class:`EarlyExitInstance` per instance number, ascending.
    """

    n_traces: int
    n_traces_with_instances: int
    by_instance: list[EarlyExitInstance]

    def to_frame(self) -> "pd.DataFrame":
        """One row per instance number: ``instance, n, accuracy, mean_logprob, mean_prob, mean_logit``."""
        import pandas as pd

        return pd.DataFrame([asdict(r) for r in self.by_instance], columns=[f.name for f in fields(EarlyExitInstance)])

    def numbers(self) -> dict[str, Any]:
        """The summary as JSON-friendly numbers (what the early-exit analysis writes)."""
        return {"n_traces": self.n_traces, "n_traces_with_instances": self.n_traces_with_instances,
                "by_instance": [asdict(r) for r in self.by_instance]}

    def plot(self, ax: Any = None, **kwargs: Any) -> "Figure":
        """Accuracy bars and mean gold logit by instance (see
        :func:`mechthink.plotting.confidence.plot_early_exit_summary`)."""
        from mechthink.plotting.confidence import plot_early_exit_summary

        return plot_early_exit_summary(self, ax=ax, **kwargs)


def early_exit_summary(results: Sequence[EarlyExitResult], max_instances: int | None = None) -> EarlyExitSummary:
    """Accuracy and confidence by instance number (1st, 2nd, …) over many traces.

    Args:
        results: One :func:`early_exit` result per trace.
        max_instances: Keep only the first ``max_instances`` instance numbers (None: all).

    Returns:
        An :class:`EarlyExitSummary`.

    Examples:
        >>> first = EarlyExitRow(0, 40, "Wait", -0.5, 0.61, 20.0, "18", True)
        >>> second = EarlyExitRow(1, 60, None, -0.1, 0.90, 24.0, "18", True)
        >>> s = early_exit_summary([EarlyExitResult("a", "18", "", [first, second], None),
        ...                         EarlyExitResult("b", "18", "", [first], None)])
        >>> [(r.instance, r.n, r.mean_logit) for r in s.by_instance]
        [(1, 2, 20.0), (2, 1, 24.0)]
    """
    import pandas as pd

    if max_instances is not None and max_instances < 1:
        raise ValueError(f"early_exit_summary: max_instances={max_instances} must be >= 1 or None")
    frames = [r.to_frame() for r in results if r.rows]
    by_instance: list[EarlyExitInstance] = []
    if frames:
        df = pd.concat(frames, ignore_index=True)
        if max_instances is not None:
            df = df[df["instance"] < max_instances]
        g = df.groupby("instance")
        table = pd.DataFrame({"n": g.size(), "accuracy": g["correct"].mean(), "mean_logprob": g["logprob"].mean(),
                              "mean_prob": g["prob"].mean(), "mean_logit": g["mean_logit"].mean()})
        by_instance = [
            EarlyExitInstance(int(r.Index) + 1, int(r.n), float(r.accuracy), float(r.mean_logprob),
                              float(r.mean_prob), float(r.mean_logit))
            for r in table.itertuples()
        ]
    return EarlyExitSummary(len(results), len(frames), by_instance)


# ============================================================================ curves
def confidence_curve(
    model: "ThinkingModel",
    trace: Trace,
    choices: Mapping[str, Sequence[str]],
    *,
    every: int | None = None,
    n_points: int = 20,
    positions: Sequence[int] | None = None,
    suffix: str | None = None,
    greedy_tokens: int = 0,
) -> AnswerProbeResult:
    """Probe ``choices`` at evenly spaced positions through the thinking of a trace.

    Args:
        model: The loaded model.
        trace: The trace (needs thinking unless ``positions`` is given).
        choices: As in :func:`answer_probe`.
        every: Probe every ``every`` tokens from the start of the thinking.
        n_points: Otherwise, this many evenly spaced points (first and last thinking token included).
        positions: Explicit positions (overrides ``every``/``n_points``).
        suffix: The suffix (default ``model.spec.answer_suffix``).
        greedy_tokens: Passed to :func:`answer_probe`.

    Returns:
        A :class:`AnswerProbeResult` with ``marks`` holding ``think_start`` and ``think_end``.

    Examples:
        >>> model = mt.load_model("tiny-thinker")  # doctest: +SKIP
        >>> confidence_curve(model, trace, {"42": ["42}"]}, n_points=20).plot()  # doctest: +SKIP
    """
    if positions is None:
        start, end = trace.thinking_span
        last = end - 1
        if last < start:
            raise ValueError(f"confidence_curve: trace {trace.id!r} has an empty thinking")
        if every is not None:
            if every < 1:
                raise ValueError(f"every must be >= 1, got {every}")
            positions = list(range(start, last + 1, every))
        else:
            if n_points < 1:
                raise ValueError(f"n_points must be >= 1, got {n_points}")
            n = min(n_points, last - start + 1)
            positions = sorted({round(start + k * (last - start) / max(n - 1, 1)) for k in range(n)})
    res = answer_probe(model, trace.ids, positions, choices, suffix=suffix, greedy_tokens=greedy_tokens)
    if trace.think_start is not None:
        res.marks["think_start"] = trace.think_start
    if trace.think_end is not None:
        res.marks["think_end"] = trace.think_end
    return res


def gold_candidates(gold: str, radius: int = 10) -> list[str]:
    """The gold answer and the whole numbers within ``radius`` of it (from 0), sorted as strings.

    Scored together, their probability mass shows whether the answer suffix elicits a number at
    all; a non-numeric gold is its own only candidate.

    Examples:
        >>> gold_candidates("3", radius=2), gold_candidates("12", radius=1), gold_candidates("x")
        (['1', '2', '3', '4', '5'], ['11', '12', '13'], ['x'])
    """
    if radius < 0:
        raise ValueError(f"gold_candidates: radius={radius} must be >= 0")
    g = int(float(gold)) if gold.lstrip("-").replace(".", "", 1).isdigit() else None
    near = {str(v) for v in range(max(0, g - radius), g + radius + 1)} if g is not None else set()
    return sorted({gold} | near)


@dataclass(frozen=True)
class GoldConfidenceRow:
    """The gold answer's confidence curve of one trace, in numbers.

    Attributes:
        id: The trace id.
        gold: The gold answer.
        think_closed: Whether the trace closed its thinking.
        logp_gold_first: log p(gold) at the first probe point.
        logp_gold_last: log p(gold) at the last probe point.
        mass_mean: Mean probability mass on all candidates over the probe points.
        mass_min: Its minimum.
    """

    id: str
    gold: str
    think_closed: bool
    logp_gold_first: float
    logp_gold_last: float
    mass_mean: float
    mass_min: float


@dataclass
class GoldConfidenceCurves(Result):
    """log p(gold) through the thinking of many traces (one :func:`confidence_curve` each).

    Attributes:
        curves: The probe of each trace (choices: :func:`gold_candidates` of its gold).
        rows: One :class:`GoldConfidenceRow` per trace, in the same order.
    """

    curves: list[AnswerProbeResult]
    rows: list[GoldConfidenceRow]

    @property
    def golds(self) -> list[str]:
        """The gold answer of each curve."""
        return [r.gold for r in self.rows]

    @property
    def mean_logp_gold_first(self) -> float:
        """Mean over traces of log p(gold) at the first probe point (0.0 without traces)."""
        return mean([r.logp_gold_first for r in self.rows])

    @property
    def mean_logp_gold_last(self) -> float:
        """Mean over traces of log p(gold) at the last probe point (0.0 without traces)."""
        return mean([r.logp_gold_last for r in self.rows])

    @property
    def mean_mass(self) -> float:
        """Mean over traces of the mean mass on the candidates (0.0 without traces)."""
        return mean([r.mass_mean for r in self.rows])

    def to_frame(self) -> "pd.DataFrame":
        """One row per trace, the :class:`GoldConfidenceRow` fields as columns."""
        import pandas as pd

        return pd.DataFrame([asdict(r) for r in self.rows], columns=[f.name for f in fields(GoldConfidenceRow)])

    def numbers(self) -> dict[str, Any]:
        """The summary and per-trace rows as JSON-friendly numbers (what the analysis writes)."""
        return {
            "n_traces": len(self.rows),
            "mean_logp_gold_first_point": self.mean_logp_gold_first,
            "mean_logp_gold_last_point": self.mean_logp_gold_last,
            "mean_mass_on_candidates": self.mean_mass,
            "traces": [asdict(r) for r in self.rows],
        }

    def plot(self, ax: Any = None, **kwargs: Any) -> "Figure":
        """One line per trace (see :func:`mechthink.plotting.confidence.plot_gold_confidence`)."""
        from mechthink.plotting.confidence import plot_gold_confidence

        return plot_gold_confidence(self, ax=ax, **kwargs)


def gold_confidence_curves(
    model: "ThinkingModel",
    traces: Sequence[Trace],
    golds: Sequence[str] | None = None,
    *,
    n_points: int = 16,
    radius: int = 10,
    suffix: str | None = None,
) -> GoldConfidenceCurves:
    """Confidence in the gold answer at evenly spaced points through each trace's thinking.

    Each trace is probed with :func:`confidence_curve` on the choices :func:`gold_candidates`
    (the gold and the numbers near it), each closed by ``}`` so that it is a whole answer after
    ``\\boxed{`` ("1}" does not include "12}") and the mass on candidates is meaningful.
    Traces without thinking are skipped.

    Args:
        model: The loaded model.
        traces: The traces.
        golds: The gold answer of each trace (default: each ``trace.gold``).
        n_points: Probe points per trace.
        radius: Numbers within ``radius`` of the gold are candidates.
        suffix: The answer-forcing suffix (default ``model.spec.answer_suffix``).

    Returns:
        A :class:`GoldConfidenceCurves`.

    Examples:
        >>> model = mt.load_model("tiny-thinker")  # doctest: +SKIP
        >>> gold_confidence_curves(model, mt.traces.generate(model, problems)).numbers()  # doctest: +SKIP
    """
    golds = [t.gold for t in traces] if golds is None else list(golds)
    if len(golds) != len(traces):
        raise ValueError(f"gold_confidence_curves: {len(golds)} golds for {len(traces)} traces; pass one per trace")
    curves, rows = [], []
    for tr, gold in track(list(zip(traces, golds)), desc="confidence curves"):
        if tr.think_start is None:
            continue
        if gold is None:
            raise ValueError(f"gold_confidence_curves: trace {tr.id!r} has no gold answer; pass golds=")
        gold = str(gold)
        res = confidence_curve(model, tr, {c: [c + "}"] for c in gold_candidates(gold, radius)}, n_points=n_points,
                               suffix=suffix)
        c = res.choice_names.index(gold)
        curves.append(res)
        rows.append(GoldConfidenceRow(
            id=tr.id, gold=gold, think_closed=tr.think_end is not None, logp_gold_first=float(res.logprobs[0, c]),
            logp_gold_last=float(res.logprobs[-1, c]), mass_mean=float(res.mass.mean()),
            mass_min=float(res.mass.min()),
        ))
    return GoldConfidenceCurves(curves, rows)
