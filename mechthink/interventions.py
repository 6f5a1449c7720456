"""Generation-time interventions on thinking: token suppression, budget forcing, recycling, edits.

* Thinking-token suppression (Qian et al. 2025): logits of a token set set to −inf while
  generating, against same-size random control sets (uniform, and uniform over the tokens the
  model never produced unsuppressed); greedy sweeps over single and cumulative sets, and a
  paired comparison under sampling with bootstrap intervals (Efron & Tibshirani 1993).
* Budget forcing / TTTS (s1, Muennighoff et al. 2025; Qian et al. 2025): when the model tries to
  close its thinking, append a thinking word (" Wait") instead, up to N times; or cap the
  thinking at a budget and force the answer (think_close + answer suffix); sweeps over budgets
  and over numbers of extensions.
* Representation Recycling (Qian et al. 2025): when the next token is a thinking token, run one
  block a second time on its own output at the last position (KV cache left intact).
* Trace editing for faithfulness (Lanham et al. 2023): insert a mistake into the thinking,
  continue greedily, and check for backtracking and whether the answer follows the mistake.

All interventions are context managers built on bridge hooks and module hooks that are removed
in ``finally``; they compose with :mod:`mechthink.generation`'s decode loop (and so with
:func:`mechthink.traces.generate`) without changing it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import re
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from mechthink.data.answers import answers_match, extract_boxed
from mechthink.generation import StreamTracker, continue_greedy, continue_prefixes
from mechthink.models.kvcache import cache_from_kwargs
from mechthink.progress import track
from mechthink.results import FlatResult, Result
from mechthink.stats import PairedChange, paired_change

if TYPE_CHECKING:
    import pandas as pd

    from mechthink.models.thinking_model import ThinkingModel
    from mechthink.traces import Trace

__all__ = [
    "BudgetState",
    "ControlOutcome",
    "EditOutcome",
    "FlatResult",
    "ForcingOutcome",
    "ForcingSweep",
    "GenerationScore",
    "RecycleState",
    "SampledCondition",
    "SampledSuppression",
    "SuppressionOutcome",
    "SuppressionSweep",
    "accuracy",
    "backtrack_pattern",
    "budget_forcing",
    "continue_after_edit",
    "continue_greedy",
    "continue_prefixes",
    "edit_table",
    "edit_trace",
    "forcing_outcomes",
    "forcing_sweep",
    "logits_at_last",
    "load_thinking_words",
    "organism_mistakes",
    "random_control",
    "recycle",
    "sampled_suppression",
    "score_outcomes",
    "score_traces",
    "suppress_tokens",
    "sweep_from_outcomes",
    "suppression_sweep",
    "thinking_token_ids",
]

log = logging.getLogger(__name__)

LOGITS_HOOK = "unembed.hook_out"


# ============================================================================ token sets
def load_thinking_words(path: str | Path, top: int | None = None) -> list[str]:
    """Words of a thinking-token list (JSONL lines with ``word`` and ``freq``), most frequent first.

    Whitespace-only entries are skipped. A line that is not a JSON object with a ``word`` and a
    numeric ``freq`` raises a one-line ValueError naming the file and line.
    """
    from mechthink.data import read_jsonl

    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 1):
        raise ValueError(f"load_thinking_words: top={top!r} is not accepted; use a positive int or None")
    rows = []
    for lineno, row in enumerate(read_jsonl(path), start=1):
        if "word" not in row:
            raise ValueError(f"{path}: entry {lineno} has no 'word' (keys {sorted(row)}); expected {{\"word\": ..., \"freq\": ...}}")
        try:
            freq = float(row.get("freq", 0))
        except (TypeError, ValueError):
            raise ValueError(f"{path}: entry {lineno} has freq={row.get('freq')!r}, not a number") from None
        rows.append((freq, str(row["word"])))
    rows.sort(key=lambda r: -r[0])
    words = [w for _, w in rows if w.strip()]
    return words[:top] if top is not None else words


def thinking_token_ids(model: "ThinkingModel", words: Sequence[str] | None = None) -> list[int]:
    """Single-token ids of thinking words (default: the spec's backtracking and wrap-up words).

    Words with no single-token variant are skipped (logged).
    """
    words = list(model.spec.backtracking_words) + list(model.spec.wrapup_words) if words is None else list(words)
    out: dict[int, None] = {}
    for w in words:
        try:
            out.update(dict.fromkeys(model.token_ids(w)))
        except ValueError:
            log.info("thinking_token_ids: %r is not a single token for %s; skipped", w, model.spec.name)
    return list(out)


def random_control(
    model: "ThinkingModel",
    n: int,
    exclude: Sequence[int] = (),
    seed: int = 0,
    pool: Sequence[int] | None = None,
) -> list[int]:
    """``n`` random token ids (a control set of the same size), never special or excluded ids.

    ``pool`` restricts the draw to those candidates (e.g. tokens the model never produced
    unsuppressed: in a 150k vocabulary almost every random token is such a token, in a small
    vocabulary most are not, so the uniform draw is a much harsher control there).
    """
    special = set(int(i) for i in getattr(model.tokenizer, "all_special_ids", []) or [])
    vocab = int(model.bridge.cfg.d_vocab)
    banned = special | {int(i) for i in exclude}
    cands = range(min(vocab, len(model.tokenizer))) if pool is None else sorted({int(i) for i in pool})
    eligible = [i for i in cands if i not in banned and 0 <= i < vocab]
    if n > len(eligible):
        raise ValueError(f"random_control: asked for {n} tokens but only {len(eligible)} are eligible")
    return sorted(random.Random(seed).sample(eligible, n))


# ============================================================================ suppression
@contextlib.contextmanager
def suppress_tokens(model: "ThinkingModel", token_ids: Sequence[int]) -> Iterator[list[int]]:
    """Set the logits of ``token_ids`` to −inf at every position of every forward in the block.

    A hook on ``unembed.hook_out`` (the logits), so greedy decoding, sampling and probes inside
    the block never produce these tokens. Removed on exit, also after an exception.
    """
    ids = sorted({int(i) for i in token_ids})
    vocab = int(model.bridge.cfg.d_vocab)
    if any(not 0 <= i < vocab for i in ids):
        raise ValueError(f"suppress_tokens: ids outside the vocabulary of size {vocab}")
    idx = torch.tensor(ids, dtype=torch.long, device=model.device)

    def fn(logits: Tensor, hook: Any) -> Tensor:
        if not len(ids):
            return logits
        out = logits.clone()
        out[..., idx] = float("-inf")
        return out

    with model.bridge.hooks(fwd_hooks=[(LOGITS_HOOK, fn)]):
        yield ids


# ============================================================================ budget forcing
@dataclass
class BudgetState(FlatResult):
    """What :func:`budget_forcing` did, per batch row of the current stream.

    A state object: ``to_frame`` / ``to_json`` report it, ``plot`` raises (no figure of its own;
    :class:`ForcingSweep` plots sweeps of it).

    Attributes:
        extensions: Extensions appended per row.
        forced_answer: Whether the answer was forced per row (budget reached).
        plan: Per row, ``{column: token}`` of forced tokens.
    """

    plotted_by: ClassVar[str] = "ForcingSweep.plot"
    extensions: list[int] = field(default_factory=list)
    forced_answer: list[bool] = field(default_factory=list)
    plan: list[dict[int, int]] = field(default_factory=list)

    def to_frame(self) -> "pd.DataFrame":
        """One row per batch row: ``row``, ``extensions``, ``forced_answer``, ``n_forced_tokens``."""
        import pandas as pd

        return pd.DataFrame({"row": range(len(self.plan)), "extensions": self.extensions,
                             "forced_answer": self.forced_answer, "n_forced_tokens": [len(p) for p in self.plan]})


def _encode(model: "ThinkingModel", text: str) -> list[int]:
    return [int(i) for i in model.tokenizer(text, add_special_tokens=False)["input_ids"]]


@contextlib.contextmanager
def budget_forcing(
    model: "ThinkingModel",
    budget: int | None = None,
    max_extensions: int = 0,
    extend_with: str = " Wait",
    answer_suffix: str | None = None,
) -> Iterator[BudgetState]:
    """Budget forcing (s1) / thinking-token test-time scaling (TTTS) during generation.

    * Extension: when the model tries to close its thinking (``think_close``'s first token is the
      most likely next token — exact for greedy decoding), ``extend_with`` is forced instead, at
      most ``max_extensions`` times per sequence.
    * Cap: once ``budget`` tokens have been generated while thinking is open, ``answer_suffix``
      (default ``model.spec.answer_suffix``: think_close + "The final answer is \\boxed{") is
      forced, then the model answers freely.

    Forcing sets every logit but the forced token's to −inf at the last position (hook on
    ``unembed.hook_out``); the generated stream is followed by a
    :class:`~mechthink.generation.StreamTracker`. Forced tokens are planned per absolute column, so
    a recomputed step (e.g. under :func:`recycle`) forces the same token again.

    Yields:
        A :class:`BudgetState` (extensions used, whether the answer was forced).
    """
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
        raise ValueError(f"budget must be a non-negative int or None, got {budget!r}")
    if isinstance(max_extensions, bool) or not isinstance(max_extensions, int) or max_extensions < 0:
        raise ValueError(f"max_extensions must be a non-negative int, got {max_extensions!r}")
    ext_ids = _encode(model, extend_with)
    if max_extensions and not ext_ids:
        raise ValueError(f"extend_with {extend_with!r} tokenizes to nothing")
    suffix_ids = _encode(model, model.spec.answer_suffix if answer_suffix is None else answer_suffix)
    tracker = StreamTracker(model)
    if not tracker.close_ids:
        raise ValueError(f"{model.spec.name}: think_close {model.spec.think_close!r} tokenizes to nothing")
    close_first = tracker.close_ids[0]
    state = BudgetState()
    stream = {"id": None}

    def fn(logits: Tensor, hook: Any) -> Tensor:
        b = logits.shape[0]
        if stream["id"] is not tracker.history or len(state.plan) != b:
            stream["id"] = tracker.history
            if len(state.plan) != b or tracker.new_stream:
                state.extensions = [0] * b
                state.forced_answer = [False] * b
                state.plan = [{} for _ in range(b)]
        c = tracker.past + tracker.width - 1  # column of the last position; it predicts column c + 1
        target = c + 1
        out = None
        for r in range(b):
            plan = state.plan[r]
            if target not in plan and not tracker.is_closed(r, c) and not _planned_after(plan, target):
                thought = c - tracker.prompt_end  # tokens generated so far in this row
                if budget is not None and thought >= budget and not state.forced_answer[r]:
                    plan.update({target + j: t for j, t in enumerate(suffix_ids)})
                    state.forced_answer[r] = True
                elif state.extensions[r] < max_extensions and int(logits[r, -1].argmax()) == close_first:
                    plan.update({target + j: t for j, t in enumerate(ext_ids)})
                    state.extensions[r] += 1
            if target in plan:
                if out is None:
                    out = logits.clone()
                row = torch.full_like(out[r, -1], float("-inf"))
                row[plan[target]] = 0.0
                out[r, -1] = row
        return logits if out is None else out

    with tracker.attached(), model.bridge.hooks(fwd_hooks=[(LOGITS_HOOK, fn)]):
        yield state


def _planned_after(plan: dict[int, int], target: int) -> bool:
    """Whether a forced sequence is still running past ``target`` (then do not start another)."""
    return any(col > target for col in plan)


# ============================================================================ recycling
@dataclass
class RecycleState(FlatResult):
    """Bookkeeping of :func:`recycle`.

    A state object: ``to_frame`` / ``to_json`` report it, ``plot`` raises (no figure of its own).

    Attributes:
        n_recycled: Second passes of the block run so far.
        events: ``(cache length before the step, rows recycled)`` per recycled step.
        rerunning: Whether a recomputed step is running now (internal).
        rows: The rows being recycled in that step (internal).
    """

    plotted_by: ClassVar[str] = "RecycleState.to_frame"
    n_recycled: int = 0
    events: list[tuple[int, list[int]]] = field(default_factory=list)
    rerunning: bool = False
    rows: list[int] = field(default_factory=list)

    def to_frame(self) -> "pd.DataFrame":
        """One row per recycled step: ``event``, ``cache_length``, ``n_rows``, ``rows``."""
        import pandas as pd

        return pd.DataFrame({"event": range(len(self.events)), "cache_length": [c for c, _ in self.events],
                             "n_rows": [len(r) for _, r in self.events], "rows": [list(r) for _, r in self.events]})


def _slice_last(v: Any) -> Any:
    """The last query position of a position-dependent block argument."""
    if isinstance(v, Tensor):
        if v.ndim == 4:  # attention mask [batch, 1, q, k]
            return v[:, :, -1:, :]
        if v.ndim == 2:  # position ids [batch, pos]
            return v[:, -1:]
        if v.ndim == 1:  # cache position [pos]
            return v[-1:]
        if v.ndim == 3:  # [batch, pos, dim]
            return v[:, -1:]
        return v
    if isinstance(v, tuple):
        return tuple(_slice_last(x) for x in v)
    return v


@contextlib.contextmanager
def recycle(
    model: "ThinkingModel",
    layer: int,
    token_ids: Sequence[int] | None = None,
    block: Callable[..., Any] | None = None,
) -> Iterator[RecycleState]:
    """Representation Recycling (Qian et al. 2025) inside the block.

    After each bridge forward, rows whose most likely next token is in ``token_ids`` (default
    :func:`thinking_token_ids`) have that step recomputed once: the KV cache is rewound by the
    call's length (``DynamicCache.crop``) and the forward runs again; in that second run block
    ``layer``'s output ``h`` at the last position is passed through the block a second time. The
    second pass attends to the cached keys/values of earlier positions plus its own; to keep the
    cache exact, layer ``layer``'s cache is cropped by one before the pass (the pass appends its
    own entry) and its original tensors are put back afterwards, so the cache holds exactly one
    entry per token and equals an unrecycled step's. The recomputed output replaces the first
    (the returned logits/cache are the second run's). Exactly one recycle per step: the rerun
    itself never triggers another.

    Forwards through ``run_with_cache`` (which bypass module ``__call__``) are not recycled.

    Args:
        model: The loaded model.
        layer: The block to run twice.
        token_ids: Trigger tokens (argmax of the step).
        block: Replacement for the second pass, called like the HF decoder layer
            (``block(hidden_states, **kwargs) -> hidden_states``); default the block itself.
            An identity block leaves generation unchanged (a test of the cache handling).

    Yields:
        A :class:`RecycleState`.
    """
    if not 0 <= int(layer) < model.n_layers:
        raise ValueError(f"recycle: layer {layer} out of range for a {model.n_layers}-layer model")
    trig = torch.tensor(sorted(set(thinking_token_ids(model) if token_ids is None else [int(t) for t in token_ids])),
                        dtype=torch.long)
    bridge = model.bridge
    blk = bridge.blocks[int(layer)]
    second = block if block is not None else blk.original_component
    state = RecycleState()

    def block_hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        if not state.rerunning or not state.rows:
            return None
        h = output[0] if isinstance(output, tuple) else output
        kv = cache_from_kwargs(kwargs)
        kw = {k: _slice_last(v) for k, v in kwargs.items() if k not in ("hidden_states",)}
        h_last = h[:, -1:]
        saved = None
        if kv is not None and hasattr(kv, "layers"):
            lay = kv.layers[int(layer)]
            saved = (lay.keys, lay.values)
            lay.keys, lay.values = lay.keys[..., :-1, :], lay.values[..., :-1, :]
        try:
            res = second(h_last, **kw)
        finally:
            if saved is not None:
                lay.keys, lay.values = saved
        res = res[0] if isinstance(res, tuple) else res
        state.n_recycled += 1
        rows = torch.tensor(state.rows, dtype=torch.long, device=h.device)
        new_h = h.clone()
        new_h[rows, -1] = res[rows, -1].to(h.dtype)
        if isinstance(output, tuple):
            return (new_h, *output[1:])
        return new_h

    def bridge_hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        if state.rerunning:
            return None
        logits = output[0] if isinstance(output, tuple) else output
        if not isinstance(logits, Tensor) or logits.ndim != 3:
            return None
        nxt = logits[:, -1].argmax(-1).cpu()
        rows = [int(r) for r in torch.nonzero(torch.isin(nxt, trig)).flatten()]
        if not rows:
            return None
        x = args[0] if args else kwargs.get("input")
        width = int(x.shape[1]) if isinstance(x, Tensor) else 0
        kv = cache_from_kwargs(kwargs)
        before = 0
        if kv is not None:
            before = int(kv.get_seq_length()) - width
            if width:
                kv.crop(-width)
        state.rows, state.rerunning = rows, True
        try:
            new = module(*args, **kwargs)
        finally:
            state.rerunning, state.rows = False, []
        state.events.append((before, rows))
        return new

    handles = []
    try:
        handles.append(blk.register_forward_hook(block_hook, with_kwargs=True))
        handles.append(bridge.register_forward_hook(bridge_hook, with_kwargs=True))
        yield state
    finally:
        for hd in handles:
            hd.remove()


# ============================================================================ trace editing
@dataclass
class EditOutcome(FlatResult):
    """What happened after a mistake was inserted into the thinking (Lanham et al. 2023).

    ``plot`` raises (one outcome has no figure); :func:`edit_table` tabulates many.

    Attributes:
        backtracked: A backtracking word appeared within ``window`` tokens after the edit.
        backtrack_offset: Tokens from the edit to that word (None if none).
        answer: The final answer (last ``\\boxed{}``), or None.
        follows_mistake: The answer equals the answer implied by the mistake.
        follows_correct: The answer equals the correct answer.
        continuation: The generated text.
    """

    plotted_by: ClassVar[str] = "edit_table"
    backtracked: bool
    backtrack_offset: int | None
    answer: str | None
    follows_mistake: bool
    follows_correct: bool
    continuation: str


def backtrack_pattern(words: Sequence[str]) -> re.Pattern[str]:
    """A regex matching any of ``words`` as whole words (no letter right before or after)."""
    if not words:
        raise ValueError("backtrack_pattern: words must be non-empty")
    return re.compile(r"(?<![A-Za-z])(?:" + "|".join(re.escape(w) for w in words) + r")(?![A-Za-z])")


def _first_backtrack(model: "ThinkingModel", ids: list[int], words: Sequence[str], window: int) -> int | None:
    pat = backtrack_pattern([w.strip() for w in words])
    for j in range(min(window, len(ids))):
        if pat.search(model.to_string(ids[j : j + 1])):
            return j
    text = model.to_string(ids[:window])
    m = pat.search(text)
    if m is None:
        return None
    for j in range(min(window, len(ids))):  # multi-token word: first token whose prefix reaches it
        if len(model.to_string(ids[: j + 1])) > m.start():
            return j
    return None


@torch.inference_mode()
def continue_after_edit(
    model: "ThinkingModel",
    prefixes: Sequence[Sequence[int]],
    correct: Sequence[str],
    mistaken: Sequence[str | None],
    window: int = 8,
    max_new_tokens: int = 96,
    words: Sequence[str] | None = None,
    batch_size: int = 32,
) -> list[EditOutcome]:
    """Greedy continuation after edited prefixes, scored for backtracking and answer faithfulness.

    Args:
        prefixes: Token ids ending right after the edited step.
        correct: The correct final answer per prefix.
        mistaken: The final answer the mistake implies (None if unknown).
        window: Tokens after the edit in which a backtracking word counts.
        words: Backtracking words (default ``model.spec.backtracking_words``).
    """
    if not len(prefixes) == len(correct) == len(mistaken):
        raise ValueError("continue_after_edit: prefixes, correct and mistaken must have equal lengths")
    words = list(model.spec.backtracking_words if words is None else words)
    gens = continue_greedy(model, prefixes, max_new_tokens, batch_size)
    out = []
    for ids, good, bad in zip(gens, correct, mistaken):
        text = model.to_string(ids)
        ans = extract_boxed(text)
        off = _first_backtrack(model, ids, words, window)
        out.append(
            EditOutcome(
                backtracked=off is not None,
                backtrack_offset=off,
                answer=ans,
                follows_mistake=bad is not None and ans is not None and answers_match(ans, str(bad)),
                follows_correct=ans is not None and answers_match(ans, str(good)),
                continuation=text,
            )
        )
    return out


def edit_trace(
    model: "ThinkingModel",
    trace: Any,
    char_start: int,
    char_end: int,
    replacement: str,
    correct: str,
    mistaken: str | None = None,
    **kwargs: Any,
) -> EditOutcome:
    """Replace ``trace.text[char_start:char_end]`` inside the thinking and continue greedily.

    The prefix is cut after the edited step (the next ``.`` or newline after ``char_end``); the
    thinking part is re-tokenized after the trace's prompt ids. Works with any model.
    """
    if trace.think_start is None:
        raise ValueError(f"edit_trace: trace {trace.id!r} has no thinking")
    c0, c1 = trace.thinking_char_span
    if not c0 <= char_start <= char_end <= c1:
        raise ValueError(f"edit_trace: the span {char_start}:{char_end} is outside the thinking {c0}:{c1}")
    j = char_end
    while j < c1 and trace.text[j] not in ".\n":
        j += 1
    p_chars = trace.offsets[trace.n_prompt - 1][1]
    edited = trace.text[p_chars:char_start] + replacement + trace.text[char_end : min(j + 1, c1)]
    ids = list(trace.prompt_ids) + _encode(model, edited)
    return continue_after_edit(model, [ids], [correct], [mistaken], **kwargs)[0]


def organism_mistakes(n: int, seed: int | str = "edits", delta: int = 1) -> list[dict[str, Any]]:
    """tiny-thinker transcripts with a mistake inserted into a correctly written step.

    The step's result is replaced by ``correct + delta`` (or ``correct - delta`` if that would be
    out of range) and the prefix ends after its ``"."``. The mistaken answer propagates the error
    through the later steps (all steps add or subtract constants): ``answer + (wrong - correct)``.

    Returns:
        Dicts with ``input_ids``, ``answer``, ``mistaken_answer``, ``step_index``, ``question``.
    """
    from mechthink.models.organism import MAX_TOTAL, sample_transcripts
    from mechthink.models.organism.tokenizer import build_raw_tokenizer

    tok = build_raw_tokenizer()
    out: list[dict[str, Any]] = []
    k = 0
    while len(out) < n:
        batch = sample_transcripts(4 * n, seed=f"{seed}-{k}")
        k += 1
        for tr in batch:
            steps = [s for s in tr.steps if not s.is_error]
            if not steps:
                continue
            st = steps[len(out) % len(steps)]
            wrong = st.correct_result + delta if st.correct_result + delta <= MAX_TOTAL else st.correct_result - delta
            ids = tr.input_ids[: st.result_positions[0]] + tok.encode(f"{wrong}.", add_special_tokens=False).ids
            out.append({
                "input_ids": [int(i) for i in ids],
                "answer": str(tr.answer),
                "mistaken_answer": str(tr.answer + wrong - st.correct_result),
                "step_index": st.index,
                "question": tr.problem.question,
            })
            if len(out) == n:
                break
    return out


def edit_table(outcomes: Sequence[EditOutcome]) -> "pd.DataFrame":
    """One row per outcome."""
    import pandas as pd

    return pd.DataFrame([dataclasses.asdict(o) for o in outcomes])


def accuracy(texts_or_ids: Sequence[str], golds: Sequence[str]) -> float:
    """Fraction of texts whose last ``\\boxed{}`` matches the gold answer."""
    if not texts_or_ids:
        return float("nan")
    hits = [extract_boxed(t) is not None and answers_match(extract_boxed(t), str(g)) for t, g in zip(texts_or_ids, golds)]
    return sum(hits) / len(hits)


def logits_at_last(model: "ThinkingModel", ids: Sequence[int]) -> Float[Tensor, " d_vocab"]:
    """Log-probabilities of the next token after ``ids`` (with any active interventions)."""
    with torch.inference_mode():
        x = torch.tensor([[int(i) for i in ids]], dtype=torch.long, device=model.device)
        return model.bridge(x)[0, -1].float().log_softmax(-1)


# ============================================================================ suppression experiments
@dataclass
class SuppressionOutcome(FlatResult):
    """Greedy continuations under one suppressed set.

    ``plot`` raises (one condition's scalars); :class:`SuppressionSweep` plots many.

    Attributes:
        accuracy: Fraction of continuations ending in the gold boxed answer.
        backtrack_rate: Fraction containing any backtracking word (detected in the text, so
            words that are never one token count too).
        n_tokens: Size of the suppressed set.
    """

    plotted_by: ClassVar[str] = "SuppressionSweep.plot"
    accuracy: float
    backtrack_rate: float
    n_tokens: int


@dataclass
class ControlOutcome(FlatResult):
    """Greedy continuations under random control sets of one size (one run per draw).

    ``plot`` raises (one condition's scalars); :class:`SuppressionSweep` plots many.

    Attributes:
        accuracy: Mean accuracy over the draws.
        accuracy_sd: Population standard deviation of the accuracy over the draws.
        accuracy_median: Median accuracy over the draws.
        accuracy_each: Accuracy of each draw.
        backtrack_rate: Mean backtracking-word rate over the draws.
        n_tokens: Size of each control set.
    """

    plotted_by: ClassVar[str] = "SuppressionSweep.plot"
    accuracy: float
    accuracy_sd: float
    accuracy_median: float
    accuracy_each: list[float]
    backtrack_rate: float
    n_tokens: int

    def to_frame(self) -> "pd.DataFrame":
        """One row per draw: ``draw``, ``accuracy`` (plus the set size)."""
        import pandas as pd

        return pd.DataFrame({"draw": range(len(self.accuracy_each)), "accuracy": self.accuracy_each,
                             "n_tokens": self.n_tokens})


@dataclass
class SuppressionSweep(Result):
    """Greedy accuracy under single and cumulative thinking-word sets and their random controls.

    Attributes:
        words: The suppressible kinds (words with a single-token spelling), in order.
        detected: The words whose occurrence in a continuation counts as backtracking.
        sets: Suppressed ids per condition: each word, then the cumulative sets.
        cumulative: Names of the cumulative sets (``"Wait + Hmm"``, …), 1, 2, … kinds.
        outcomes: Per condition: ``"none"``, each set's name, and ``"{control}({set})"`` for
            every control pool.
        pools: Control pools: ``None`` for the uniform draw over the vocabulary, else the ids
            drawn from (``"random unused"``: tokens never produced unsuppressed).
        exclude: Ids never drawn into a control set (every kind's ids).
        set_text: Each set's tokens as text.
        n_produced: Distinct tokens in the unsuppressed continuations.
        n_problems: Prefixes continued.
        model: The model's registry name.
    """

    words: list[str]
    detected: list[str]
    sets: dict[str, list[int]]
    cumulative: list[str]
    outcomes: dict[str, SuppressionOutcome | ControlOutcome]
    pools: dict[str, list[int] | None]
    exclude: list[int]
    set_text: dict[str, list[str]]
    n_produced: int
    n_problems: int
    model: str = ""

    def drop(self, name: str, control: str) -> float:
        """Accuracy of ``control``'s same-size random sets minus accuracy with set ``name``."""
        return self.outcomes[f"{control}({name})"].accuracy - self.outcomes[name].accuracy

    def summary(self) -> dict[str, Any]:
        """The numbers the suppression analysis reports (stable keys)."""
        first, last = self.words[0], self.cumulative[-1]
        unused = self.pools.get("random unused") or []
        return {
            "suppressed_sets": self.set_text,
            "n_vocab_tokens_produced_unsuppressed": self.n_produced,
            "n_unused_pool": len([i for i in unused if i not in self.exclude]),
            "results": {k: dataclasses.asdict(v) for k, v in self.outcomes.items()},
            "cumulative_sets": list(self.cumulative),
            "drop_wait_vs_random": self.drop(first, "random"),
            "drop_wait_vs_random_unused": self.drop(first, "random unused"),
            "drop_all_vs_random": self.drop(last, "random"),
            "drop_all_vs_random_unused": self.drop(last, "random unused"),
        }

    def to_frame(self) -> "pd.DataFrame":
        """One row per condition: ``condition``, ``set``, ``control`` (None for a word set),
        ``n_tokens``, ``accuracy``, ``accuracy_sd`` (NaN without draws), ``backtrack_rate``."""
        import pandas as pd

        rows = []
        for name, o in self.outcomes.items():
            control, _, inner = name.partition("(")
            is_ctl = isinstance(o, ControlOutcome)
            rows.append({"condition": name, "set": inner[:-1] if is_ctl else name,
                         "control": control if is_ctl else None, "n_tokens": o.n_tokens, "accuracy": o.accuracy,
                         "accuracy_sd": o.accuracy_sd if is_ctl else float("nan"), "backtrack_rate": o.backtrack_rate})
        return pd.DataFrame(rows)

    def plot(self, ax: Any = None) -> Any:
        """Accuracy against the number of kinds suppressed, with the same-size random controls."""
        from mechthink.plotting.interventions import plot_suppression_curve

        return plot_suppression_curve(self, ax)


def _continue_suppressed(
    model: "ThinkingModel",
    prefixes: Sequence[Sequence[int]],
    ids: Sequence[int],
    max_new_tokens: int,
    batch_size: int,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[list[int]]:
    """Continuations of ``prefixes`` with ``ids`` suppressed (none suppressed for an empty set)."""
    with suppress_tokens(model, ids):
        return continue_prefixes(model, prefixes, max_new_tokens, temperature=temperature, seed=seed,
                                 batch_size=batch_size)


def _outcome(
    model: "ThinkingModel", gens: Sequence[Sequence[int]], golds: Sequence[str], pat: re.Pattern[str], n_tokens: int
) -> SuppressionOutcome:
    texts = [model.to_string(g) for g in gens]
    return SuppressionOutcome(accuracy(texts, golds), sum(bool(pat.search(t)) for t in texts) / len(texts), n_tokens)


def suppression_sweep(
    model: "ThinkingModel",
    prefixes: Sequence[Sequence[int]],
    golds: Sequence[str],
    words: Sequence[str] | None = None,
    n_random: int = 6,
    seed: int = 0,
    max_new_tokens: int = 80,
    batch_size: int = 32,
) -> SuppressionSweep:
    """Greedy accuracy with thinking words suppressed one at a time and cumulatively, against
    same-size random control sets (Qian et al. 2025).

    The kinds are the ``words`` with a single-token spelling (every spelling of a kind is
    suppressed, :meth:`ThinkingModel.token_ids`); words that are never one token (e.g.
    "But wait" on R1 / Qwen3) are still detected in the text but cannot be suppressed. Two
    control pools: ``"random"``, uniform over the non-special vocabulary, and
    ``"random unused"``, uniform over the tokens the unsuppressed continuations never produce
    (the analog of a random draw from a 150k vocabulary, almost none of which a model produces;
    under greedy decoding it cannot change a continuation). ``n_random`` draws per set size
    (seeds ``seed, seed + 1, …``); every kind's ids are excluded from the draws.

    Args:
        model: The loaded model.
        prefixes: Token ids to continue (e.g. thinking prefilled up to a wrongly written step).
        golds: The gold final answer per prefix.
        words: Thinking words (default ``model.spec.backtracking_words``).
        n_random: Control draws per set.
        seed: Seed of the first control draw.
        max_new_tokens: Continuation length.
        batch_size: Prefixes decoded together.
    """
    words = list(model.spec.backtracking_words if words is None else words)
    if not prefixes or len(prefixes) != len(golds):
        raise ValueError(f"suppression_sweep: need one gold per prefix, got {len(prefixes)} and {len(golds)}")
    kinds = [w for w in words if model.token_variants(w)]
    if not kinds:
        raise ValueError(f"suppression_sweep: none of the words {words} is a single token for {model.spec.name}")
    pat = backtrack_pattern(words)

    def run(ids: Sequence[int]) -> SuppressionOutcome:
        gens = _continue_suppressed(model, prefixes, ids, max_new_tokens, batch_size)
        return _outcome(model, gens, golds, pat, len(ids))

    base = _continue_suppressed(model, prefixes, (), max_new_tokens, batch_size)
    produced = {int(t) for g in base for t in g}
    sets: dict[str, list[int]] = {w: model.token_ids([w]) for w in kinds}
    cumulative = [" + ".join(kinds[: k + 1]) for k in range(len(kinds))]
    for k, name in enumerate(cumulative):
        sets.setdefault(name, model.token_ids(kinds[: k + 1]))
    exclude = model.token_ids(kinds)
    pools: dict[str, list[int] | None] = {
        "random": None, "random unused": [i for i in range(int(model.bridge.cfg.d_vocab)) if i not in produced]}
    outcomes: dict[str, SuppressionOutcome | ControlOutcome] = {"none": _outcome(model, base, golds, pat, 0)}
    for name, ids in track(sets.items(), "suppression sets"):
        outcomes[name] = run(ids)
        for cname, pool in pools.items():
            ctl = [run(random_control(model, len(ids), exclude=exclude, seed=seed + s, pool=pool))
                   for s in range(n_random)]
            accs = [c.accuracy for c in ctl]
            outcomes[f"{cname}({name})"] = ControlOutcome(
                statistics.mean(accs), statistics.pstdev(accs), statistics.median(accs), accs,
                statistics.mean(c.backtrack_rate for c in ctl), len(ids))
    set_text = {k: [model.to_string([i]) for i in v] for k, v in sets.items()}
    return SuppressionSweep(kinds, words, sets, cumulative, outcomes, pools, exclude, set_text, len(produced),
                            len(prefixes), model.spec.name)


@dataclass
class SampledCondition(FlatResult):
    """One suppressed condition under sampling, paired with the unsuppressed run on the same seeds.

    ``plot`` raises (one condition); :class:`SampledSuppression` plots them all.

    Attributes:
        accuracy: Mean accuracy over its (seed, problem) pairs.
        accuracy_none_same_seeds: The unsuppressed accuracy on the same seeds.
        change: The paired change vs unsuppressed (mean, 95% bootstrap interval over problems,
            pairs lost and gained, seeds).
    """

    plotted_by: ClassVar[str] = "SampledSuppression.plot"
    accuracy: float
    accuracy_none_same_seeds: float
    change: PairedChange

    def summary(self) -> dict[str, Any]:
        """The numbers the suppression analysis reports for this condition."""
        c = self.change
        return {"n_seeds": c.n_seeds, "accuracy": self.accuracy,
                "accuracy_none_same_seeds": self.accuracy_none_same_seeds, "change_vs_none": c.mean, "change_ci95": list(c.ci95), "problem_seed_pairs_lost": c.lost,
                "problem_seed_pairs_gained": c.gained}

    def to_frame(self) -> "pd.DataFrame":
        """One row: the fields with the change flattened."""
        import pandas as pd

        return pd.DataFrame([self.summary()])


@dataclass
class SampledSuppression(Result):
    """One word suppressed under sampling vs same-size random controls, paired over (seed, problem).

    Attributes:
        word: The suppressed word (a kind of a :class:`SuppressionSweep`).
        baseline_accuracy: Unsuppressed accuracy over all seeds and problems.
        conditions: ``word`` and ``"{control}({word})"`` per control pool.
        backtrack_rate: Any-backtracking-word rate, ``"none"`` and ``word``.
        correct: Per condition (``"none"`` included), ``[seed, problem]`` 1.0 where the
            continuation ends in the gold answer (controls: the mean over draws).
        temperature: Sampling temperature.
        n_seeds: Seeds of ``"none"`` and ``word``.
        n_seeds_control: Seeds of the controls (the first ones of ``n_seeds``).
        n_draws: Control sets drawn per pool.
        n_problems: Prefixes continued.
        model: The model's registry name.
    """

    word: str
    baseline_accuracy: float
    conditions: dict[str, SampledCondition]
    backtrack_rate: dict[str, float]
    correct: dict[str, Float[Tensor, "seed problem"]]
    temperature: float
    n_seeds: int
    n_seeds_control: int
    n_draws: int
    n_problems: int
    model: str = ""

    def summary(self) -> dict[str, Any]:
        """The numbers the suppression analysis reports (stable keys)."""
        return ({"temperature": self.temperature, "n_seeds": self.n_seeds, "n_random_draws": self.n_draws,
                 "none": {"accuracy": self.baseline_accuracy}}
                | {k: c.summary() for k, c in self.conditions.items()}
                | {"any_backtracking_word_rate": dict(self.backtrack_rate)})

    def to_frame(self) -> "pd.DataFrame":
        """One row per condition (``"none"`` first) with the paired numbers."""
        import pandas as pd

        none = {"condition": "none", "accuracy": self.baseline_accuracy, "n_seeds": self.n_seeds}
        return pd.DataFrame([none] + [{"condition": k, **c.summary()} for k, c in self.conditions.items()])

    def plot(self, ax: Any = None) -> Any:
        """Accuracy per condition, with the 95% interval of the change vs unsuppressed."""
        from mechthink.plotting.interventions import plot_sampled_suppression

        return plot_sampled_suppression(self, ax)


def _sampled_correct(
    model: "ThinkingModel", prefixes: Sequence[Sequence[int]], golds: Sequence[str], ids: Sequence[int], n_seeds: int,
    temperature: float, max_new_tokens: int, batch_size: int, pat: re.Pattern[str],
) -> tuple[Float[Tensor, "seed problem"], float]:
    """``[seed, problem]`` 1.0 where the sampled continuation is right, and the backtracking rate."""
    rows, bt = [], []
    for s in range(n_seeds):
        gens = _continue_suppressed(model, prefixes, ids, max_new_tokens, batch_size, temperature, s)
        texts = [model.to_string(g) for g in gens]
        rows.append([accuracy([t], [gold]) for t, gold in zip(texts, golds)])
        bt += [bool(pat.search(t)) for t in texts]
    return torch.tensor(rows, dtype=torch.float64), sum(bt) / len(bt)


def sampled_suppression(
    model: "ThinkingModel",
    prefixes: Sequence[Sequence[int]],
    golds: Sequence[str],
    sweep: SuppressionSweep,
    word: str | None = None,
    n_seeds: int = 30,
    n_seeds_control: int = 4,
    n_draws: int = 2,
    temperature: float = 1.0,
    max_new_tokens: int = 80,
    seed: int = 0,
    batch_size: int = 32,
) -> SampledSuppression:
    """Suppress one word under sampling, paired over (seed, problem) with the unsuppressed run.

    Greedy decoding hides a single word's role (the argmax moves to the next thinking word), so
    this samples at ``temperature``: seed ``s`` gives every prefix the same generator stream
    in every condition (:func:`~mechthink.generation.continue_prefixes`), so the conditions are
    paired. The controls are ``sweep``'s pools (the same draws as its greedy controls: seeds
    ``seed, seed + 1, …``), ``n_draws`` sets each on the first ``n_seeds_control`` seeds,
    averaged over draws. Changes vs unsuppressed come with 95% bootstrap intervals over
    problems (:func:`mechthink.stats.paired_change`, seeded with ``seed``).

    Args:
        model: The loaded model.
        prefixes: The prefixes of ``sweep``.
        golds: Their gold answers.
        sweep: The greedy sweep (sets, control pools, excluded ids).
        word: The word (default the sweep's first kind).
        n_seeds: Seeds of the unsuppressed and the suppressed runs.
        n_seeds_control: Seeds of each control draw (at most ``n_seeds``).
        n_draws: Control sets per pool.
        temperature: Sampling temperature (> 0).
        max_new_tokens: Continuation length.
        seed: Seed of the control draws and of the bootstrap.
        batch_size: Prefixes decoded together.
    """
    word = sweep.words[0] if word is None else word
    if word not in sweep.sets:
        raise ValueError(f"sampled_suppression: word {word!r} is not a set of the sweep ({list(sweep.sets)})")
    if not temperature > 0 or not 1 <= n_seeds_control <= n_seeds:
        raise ValueError(f"sampled_suppression: need temperature > 0 and 1 <= n_seeds_control <= n_seeds, got "
                         f"{temperature}, {n_seeds_control}, {n_seeds}")
    pat = backtrack_pattern(sweep.detected)
    ids = sweep.sets[word]

    def correct(suppressed: Sequence[int], seeds: int) -> tuple[Tensor, float]:
        return _sampled_correct(model, prefixes, golds, suppressed, seeds, temperature, max_new_tokens, batch_size, pat)

    (base, bt_none), (cond, bt_word) = correct((), n_seeds), correct(ids, n_seeds)
    matrices = {word: cond}
    for cname, pool in track(sweep.pools.items(), "sampled controls"):
        draws = [correct(random_control(model, len(ids), exclude=sweep.exclude, seed=seed + d, pool=pool),
                         n_seeds_control)[0] for d in range(n_draws)]
        matrices[f"{cname}({word})"] = torch.stack(draws).mean(0)
    conditions = {
        name: SampledCondition(float(m.mean()), float(base[: len(m)].mean()), paired_change(m, base, seed=seed))
        for name, m in matrices.items()
    }
    return SampledSuppression(word, float(base.mean()), conditions, {"none": bt_none, word: bt_word},
                              {"none": base, **matrices}, float(temperature), n_seeds, n_seeds_control, n_draws,
                              len(prefixes), model.spec.name)


# ============================================================================ forcing sweeps
@dataclass
class GenerationScore(FlatResult):
    """Accuracy and thinking statistics of a set of generated traces.

    ``plot`` raises (one condition's scalars); :class:`ForcingSweep` plots sweeps of it.

    Attributes:
        accuracy: Fraction of answers (text after think_close) whose last ``\\boxed{}`` is right.
        mean_thinking_tokens: Mean thinking length in tokens.
        closed_rate: Fraction of traces that close their thinking.
        mean_repetition: Mean 4-gram repetition of the completions.
    """

    plotted_by: ClassVar[str] = "ForcingSweep.plot"
    accuracy: float
    mean_thinking_tokens: float
    closed_rate: float
    mean_repetition: float


def score_traces(traces: Sequence["Trace"], golds: Sequence[str]) -> GenerationScore:
    """Score generated traces against their gold answers (degeneration from :mod:`mechthink.steering`)."""
    from mechthink.steering import degeneration  # steering builds on this module

    if not traces or len(traces) != len(golds):
        raise ValueError(f"score_traces: need one gold per trace, got {len(traces)} traces and {len(golds)} golds")
    deg = [degeneration(t) for t in traces]
    return GenerationScore(
        accuracy([t.answer_text for t in traces], golds),
        sum(d.thinking_tokens for d in deg) / len(deg),
        sum(d.closed for d in deg) / len(deg),
        sum(d.repetition for d in deg) / len(deg),
    )


@dataclass
class ForcingSweep(Result):
    """Budget forcing swept over one parameter: thinking budgets or numbers of extensions.

    Attributes:
        parameter: ``"budget"`` or ``"max_extensions"``.
        values: The parameter's values, in sweep order.
        scores: The traces' score at each value.
        forced: At each value, the fraction of traces whose answer was forced (``"budget"``) or
            the mean number of extensions used (``"max_extensions"``).
        baseline: The score without forcing.
        extend_with: The extension text (``"max_extensions"`` sweeps).
        n_problems: Questions generated.
        model: The model's registry name.
    """

    parameter: str
    values: list[int]
    scores: list[GenerationScore]
    forced: list[float]
    baseline: GenerationScore
    extend_with: str = ""
    n_problems: int = 0
    model: str = ""

    @property
    def forced_name(self) -> str:
        """The name of ``forced``: ``"forced_rate"`` or ``"mean_extensions"``."""
        return "forced_rate" if self.parameter == "budget" else "mean_extensions"

    def rows(self) -> list[dict[str, Any]]:
        """One dict per value: the parameter, ``forced_name`` and the score's four fields."""
        return [{self.parameter: v, self.forced_name: f, **dataclasses.asdict(sc)}
                for v, f, sc in zip(self.values, self.forced, self.scores)]

    def to_frame(self) -> "pd.DataFrame":
        """One row per value (see :meth:`rows`)."""
        import pandas as pd

        return pd.DataFrame(self.rows())

    def plot(self, ax: Any = None) -> Any:
        """Accuracy and the forcing statistics against the swept parameter."""
        from mechthink.plotting.interventions import plot_forcing_sweep

        return plot_forcing_sweep(self, ax)


@dataclass(frozen=True)
class ForcingOutcome(FlatResult):
    """One question's trace under one forcing setting: what a :class:`ForcingSweep` averages.

    Attributes:
        answer_text: The text after think_close (scored by :func:`accuracy`).
        gold: The gold answer.
        thinking_tokens: Thinking length in tokens.
        closed: Whether the thinking closed.
        repetition: 4-gram repetition of the completion.
        forced: Whether the answer was forced (``"budget"``) or the extensions used
            (``"max_extensions"``); 0 without forcing.
    """

    plotted_by: ClassVar[str] = "ForcingSweep.plot"
    answer_text: str
    gold: str
    thinking_tokens: int
    closed: bool
    repetition: float
    forced: int


def forcing_outcomes(
    model: "ThinkingModel",
    questions: Sequence[Any],
    golds: Sequence[str],
    parameter: str,
    value: int | None,
    extend_with: str = " Wait",
    max_new_tokens: int = 160,
    batch_size: int | None = None,
) -> list[ForcingOutcome]:
    """Greedy traces under :func:`budget_forcing` at one value (None: unforced), one outcome per question."""
    from mechthink.steering import degeneration  # steering builds on this module
    from mechthink.traces import generate  # traces builds on generation, not on this module

    if parameter not in ("budget", "max_extensions"):
        raise ValueError(f"parameter must be 'budget' or 'max_extensions', got {parameter!r}")
    if not questions or len(questions) != len(golds):
        raise ValueError(f"forcing_sweep: need one gold per question, got {len(questions)} and {len(golds)}")
    bs = len(questions) if batch_size is None else int(batch_size)
    out: list[ForcingOutcome] = []
    for k in range(0, len(questions), bs):
        with contextlib.ExitStack() as stack:
            st = None
            if value is not None:
                st = stack.enter_context(budget_forcing(model, budget=value) if parameter == "budget" else
                                         budget_forcing(model, max_extensions=value, extend_with=extend_with))
            gen = generate(model, questions[k : k + bs], max_new_tokens=max_new_tokens, batch_size=bs)
            forced = [0] * len(gen) if st is None else [int(f) for f in (
                st.forced_answer if parameter == "budget" else st.extensions)]
        for tr, gold, f in zip(gen, golds[k : k + bs], forced):
            d = degeneration(tr)
            out.append(ForcingOutcome(tr.answer_text, str(gold), d.thinking_tokens, d.closed, d.repetition, f))
    return out


def score_outcomes(outcomes: Sequence[ForcingOutcome]) -> GenerationScore:
    """The score of a set of outcomes (equal to :func:`score_traces` of their traces)."""
    if not outcomes:
        raise ValueError("score_outcomes: no outcomes")
    n = len(outcomes)
    return GenerationScore(accuracy([o.answer_text for o in outcomes], [o.gold for o in outcomes]),
                           sum(o.thinking_tokens for o in outcomes) / n, sum(o.closed for o in outcomes) / n,
                           sum(o.repetition for o in outcomes) / n)


def sweep_from_outcomes(
    parameter: str,
    values: Sequence[int],
    outcomes: Sequence[Sequence[ForcingOutcome]],
    baseline: GenerationScore,
    extend_with: str = " Wait",
    model_name: str = "",
) -> ForcingSweep:
    """A :class:`ForcingSweep` from the outcomes at each value (e.g. merged from shards of the questions)."""
    n = len(outcomes[0]) if outcomes else 0
    return ForcingSweep(parameter, [int(v) for v in values], [score_outcomes(o) for o in outcomes],
                        [sum(x.forced for x in o) / len(o) for o in outcomes], baseline,
                        extend_with if parameter == "max_extensions" else "", n, model_name)


def forcing_sweep(
    model: "ThinkingModel",
    questions: Sequence[Any],
    golds: Sequence[str],
    parameter: str,
    values: Sequence[int],
    extend_with: str = " Wait",
    max_new_tokens: int = 160,
    batch_size: int | None = None,
    baseline: GenerationScore | None = None,
) -> ForcingSweep:
    """Greedy traces under :func:`budget_forcing` at each value of one parameter.

    * ``parameter="budget"``: the thinking is capped at each budget (s1: the answer is forced
      after it); ``forced`` is the fraction of traces whose answer was forced.
    * ``parameter="max_extensions"``: each attempt to close the thinking becomes
      ``extend_with``, up to N times (TTTS); ``forced`` is the mean number of extensions used.

    Args:
        model: The loaded model.
        questions: Anything :func:`mechthink.traces.generate` takes.
        golds: The gold answer per question.
        parameter: ``"budget"`` or ``"max_extensions"``.
        values: The parameter's values (non-negative ints).
        extend_with: Text forced instead of think_close (``"max_extensions"``).
        max_new_tokens: Generation budget per trace.
        batch_size: Questions generated together (default all; one forcing state per batch).
        baseline: The unforced score, if already computed (else generated here).
    """
    args = (model, questions, golds, parameter)
    kw = dict(extend_with=extend_with, max_new_tokens=max_new_tokens, batch_size=batch_size)
    base = score_outcomes(forcing_outcomes(*args, None, **kw)) if baseline is None else baseline
    runs = [forcing_outcomes(*args, int(v), **kw) for v in track(values, f"{parameter} sweep")]
    return sweep_from_outcomes(parameter, values, runs, base, extend_with, model.spec.name)
