"""Generation-time interventions on thinking: token suppression, budget forcing, recycling, edits.

* Thinking-token suppression (Qian et al. 2025, seed 002): logits of a token set set to −inf
  while generating, against a same-size random control set.
* Budget forcing / TTTS (s1, Muennighoff et al. 2025; Qian et al. 2025): when the model tries to
  close its thinking, append a thinking word (" Wait") instead, up to N times; or cap the
  thinking at a budget and force the answer (think_close + answer suffix).
* Representation Recycling (Qian et al. 2025): when the next token is a thinking token, run one
  block a second time on its own output at the last position (KV cache left intact).
* Trace editing for faithfulness (Lanham et al. 2023): insert a mistake into the thinking,
  continue greedily, and check for backtracking and whether the answer follows the mistake.

All interventions are context managers built on bridge hooks and module hooks that are removed
in ``finally``; they compose with :func:`mechthink.traces.generate` without changing it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechthink.data.answers import answers_match, extract_boxed
from mechthink.models.kvcache import cache_from_kwargs
from mechthink.steering import StreamTracker

if TYPE_CHECKING:
    import pandas as pd

    from mechthink.models.thinking_model import ThinkingModel

__all__ = [
    "BudgetState",
    "EditOutcome",
    "RecycleState",
    "accuracy",
    "budget_forcing",
    "continue_after_edit",
    "continue_greedy",
    "continue_prefixes",
    "edit_table",
    "edit_trace",
    "logits_at_last",
    "load_thinking_words",
    "organism_mistakes",
    "random_control",
    "recycle",
    "suppress_tokens",
    "thinking_token_ids",
]

log = logging.getLogger(__name__)

LOGITS_HOOK = "unembed.hook_out"


# ============================================================================ token sets
def load_thinking_words(path: str | Path, top: int | None = None) -> list[str]:
    """Words of a thinking-token list (JSONL lines with ``word`` and ``freq``), most frequent first.

    Whitespace-only entries are skipped.
    """
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    rows.sort(key=lambda r: -float(r.get("freq", 0)))
    words = [str(r["word"]) for r in rows if str(r["word"]).strip()]
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
class BudgetState:
    """What :func:`budget_forcing` did, per batch row of the current stream.

    Attributes:
        extensions: Extensions appended per row.
        forced_answer: Whether the answer was forced per row (budget reached).
        plan: Per row, ``{column: token}`` of forced tokens.
    """

    extensions: list[int] = field(default_factory=list)
    forced_answer: list[bool] = field(default_factory=list)
    plan: list[dict[int, int]] = field(default_factory=list)


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
    :class:`~mechthink.steering.StreamTracker`. Forced tokens are planned per absolute column, so
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
class RecycleState:
    """Bookkeeping of :func:`recycle`.

    Attributes:
        n_recycled: Second passes of the block run so far.
        events: ``(cache length before the step, rows recycled)`` per recycled step.
    """

    n_recycled: int = 0
    events: list[tuple[int, list[int]]] = field(default_factory=list)
    rerunning: bool = False
    rows: list[int] = field(default_factory=list)


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


# ============================================================================ greedy continuation
def continue_prefixes(
    model: "ThinkingModel",
    rows: Sequence[Sequence[int]],
    max_new_tokens: int = 64,
    temperature: float | int = 0.0,
    top_p: float | int = 1.0,
    seed: int = 0,
    batch_size: int = 32,
) -> list[list[int]]:
    """Continuations of token prefixes (batched, left-padded, KV cache), new ids only.

    Any interventions active around the call apply (this is :func:`mechthink.traces.generate`'s
    decoding loop on raw token prefixes). ``temperature=0`` is greedy; otherwise row ``i`` samples
    with its own generator seeded from ``(seed, i)``, so a row's draw does not depend on the batch
    and two calls with the same seed differ only where an intervention changes the logits.
    """
    from mechthink.traces import GenerationConfig, _generate_batch, _seed_for

    cfg = GenerationConfig(max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p))
    out: list[list[int]] = []
    rows = [[int(t) for t in r] for r in rows]
    for k in range(0, len(rows), batch_size):
        chunk = rows[k : k + batch_size]
        gens: list[torch.Generator | None] = [
            None if cfg.temperature == 0 else torch.Generator().manual_seed(_seed_for(seed, k + i)) for i in range(len(chunk))
        ]
        out += [ids for ids, _ in _generate_batch(model, chunk, cfg, gens)]
    return out


def continue_greedy(
    model: "ThinkingModel", rows: Sequence[Sequence[int]], max_new_tokens: int = 64, batch_size: int = 32
) -> list[list[int]]:
    """Greedy continuations of token prefixes: :func:`continue_prefixes` with ``temperature=0``."""
    return continue_prefixes(model, rows, max_new_tokens, batch_size=batch_size)


# ============================================================================ trace editing
@dataclass
class EditOutcome:
    """What happened after a mistake was inserted into the thinking (Lanham et al. 2023).

    Attributes:
        backtracked: A backtracking word appeared within ``window`` tokens after the edit.
        backtrack_offset: Tokens from the edit to that word (None if none).
        answer: The final answer (last ``\\boxed{}``), or None.
        follows_mistake: The answer equals the answer implied by the mistake.
        follows_correct: The answer equals the correct answer.
        continuation: The generated text.
    """

    backtracked: bool
    backtrack_offset: int | None
    answer: str | None
    follows_mistake: bool
    follows_correct: bool
    continuation: str


def _first_backtrack(model: "ThinkingModel", ids: list[int], words: Sequence[str], window: int) -> int | None:
    pat = re.compile(r"(?<![A-Za-z])(?:" + "|".join(re.escape(w.strip()) for w in words) + r")(?![A-Za-z])")
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
    import dataclasses

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
