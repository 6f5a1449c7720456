"""Reasoning traces: generation with a KV cache, a resumable JSONL store, and trace anatomy.

``generate`` prompts each question and decodes it with :func:`mechthink.generation.decode` (the
one decode loop: left-padded, KV-cached, greedy or seeded top-p sampling that does not depend on
batching), storing each trace as it finishes. The anatomy helpers split a trace into steps, find backtracking events
("Wait", "Alternatively", …; Venhoff et al. 2025, ARBOR #22) and the answer-reaching instances
of ARBOR #22 (wj210/cot_backtrack): occurrences of the gold answer inside the thinking, each
ending at the next ``. ? ! ; \\n``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

try:  # POSIX file locks for concurrent store writers
    import fcntl
except ImportError:  # pragma: no cover - no lock where fcntl is missing (Windows)
    fcntl = None

from mechthink.data.answers import answers_match, normalize_number
from mechthink.generation import Decoder, SamplingConfig, decode_batches

if TYPE_CHECKING:
    from mechthink.models.thinking_model import ThinkingModel

__all__ = [
    "AnswerInstance",
    "BacktrackingEvent",
    "GenerationConfig",
    "Step",
    "Trace",
    "TraceStoreError",
    "answer_instances",
    "backtracking_events",
    "generate",
    "import_traces",
    "make_trace",
    "source_key",
    "read_store",
    "split_steps",
    "trace_from_text",
]

log = logging.getLogger(__name__)

_STORE_VERSION = 1


class TraceStoreError(ValueError):
    """A JSONL trace store that cannot be read (a torn or invalid line before the last)."""


# ============================================================================ data classes
@dataclass(frozen=True)
class GenerationConfig(SamplingConfig):
    """How a trace was generated (stored with every trace): the sampling plus the prompt mode.

    Attributes:
        max_new_tokens: Generation budget per question.
        temperature: 0 for greedy decoding, else the softmax temperature.
        top_p: Nucleus threshold for sampling (1.0 = no truncation).
        seed: Sampling seed; each question's generator is seeded from ``(seed, index)``.
        thinking: The ``thinking`` mode passed to :meth:`ThinkingModel.prompt`.
        assistant_prefix: Text prefilled after the thinking prefix.
    """

    thinking: str = "on"
    assistant_prefix: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.thinking not in ("on", "off", "default"):
            raise ValueError(f"thinking must be 'on', 'off' or 'default', got {self.thinking!r}")


@dataclass
class Trace:
    """One generated (or reconstructed) reasoning trace.

    Token positions index ``ids`` (prompt + generated). Character offsets index ``text``, the
    decoding of all of ``ids`` with special tokens kept.

    Attributes:
        id: Stable identifier (the problem id, or ``"q<index>"``).
        question: The user question.
        gold: The gold answer if known.
        prompt: The prompt text (chat template applied).
        prompt_ids: Token ids of the prompt.
        ids: Token ids of prompt + generated tokens.
        text: ``decode(ids)`` with special tokens kept.
        offsets: ``(start, end)`` character span in ``text`` of each token of ``ids``.
        thinking: The thinking text (after think_open, up to think_close or the end).
        answer_text: Text after think_close (eos tokens dropped); "" if never closed.
        think_start: Position of the first token after think_open, or None if thinking never opened.
        think_end: Position of the first token of think_close, or None if never closed.
        finished: Stop reason: ``"eos"``, ``"length"`` or ``"given"`` (built from text).
        config: The generation config as a dict.
        model: The model's registry name.
        index: The question's index in the generate() call (seeds sampling).
        fingerprint: The weights fingerprint of the model that generated it
            (:meth:`ThinkingModel.fingerprint`; "" for traces built from text).
    """

    id: str
    question: str
    gold: str | None
    prompt: str
    prompt_ids: list[int]
    ids: list[int]
    text: str
    offsets: list[tuple[int, int]]
    thinking: str
    answer_text: str
    think_start: int | None
    think_end: int | None
    finished: str
    config: dict[str, Any] = field(default_factory=dict)
    model: str = ""
    index: int = 0
    fingerprint: str = ""

    @property
    def n_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def generated_ids(self) -> list[int]:
        return self.ids[len(self.prompt_ids) :]

    @property
    def thinking_span(self) -> tuple[int, int]:
        """``(start, end)`` token positions of the thinking (end exclusive; think_end or len(ids))."""
        if self.think_start is None:
            raise ValueError(f"trace {self.id!r} has no thinking (think_open never appears)")
        return self.think_start, self.think_end if self.think_end is not None else len(self.ids)

    @property
    def thinking_char_span(self) -> tuple[int, int]:
        """``(start, end)`` character offsets of the thinking in ``text``."""
        start, _ = self.thinking_span
        c0 = self.offsets[start][0] if start < len(self.offsets) else len(self.text)
        return c0, c0 + len(self.thinking)

    def token_at_char(self, char: int) -> int:
        """Position of the token whose span contains character ``char`` of ``text``."""
        return _token_at_char(self.offsets, char)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (the inverse of :meth:`from_dict`)."""
        d = dataclasses.asdict(self)
        d["offsets"] = [list(o) for o in self.offsets]
        d["version"] = _STORE_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Trace":
        d = dict(d)
        d.pop("version", None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"Trace.from_dict: unknown keys {sorted(unknown)}")
        d["offsets"] = [tuple(o) for o in d["offsets"]]
        return cls(**d)


def _content_end(trace: Trace) -> int:
    """Character end of ``text`` (the completion region's end)."""
    return trace.offsets[-1][1] if trace.offsets else 0


def _token_at_char(offsets: Sequence[tuple[int, int]], char: int) -> int:
    """Index of the token whose span contains ``char`` (the next token starting after it if none)."""
    lo, hi = 0, len(offsets)
    while lo < hi:  # first token with end > char
        mid = (lo + hi) // 2
        if offsets[mid][1] <= char:
            lo = mid + 1
        else:
            hi = mid
    if lo >= len(offsets):
        raise ValueError(f"character {char} is beyond the trace text ({offsets[-1][1] if offsets else 0} chars)")
    return lo


# ============================================================================ building traces
def token_offsets(tokenizer: Any, ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """Decoded text and each token's character span, by incremental decoding.

    Each token's text is the difference between decoding a short window ending at it and the
    same window without it (handles byte-level BPE and SentencePiece leading spaces). Tokens
    that complete a multi-byte character get the span of the whole character; the bytes before
    get empty spans. Falls back to decoding every prefix if the windowed pieces do not join to
    the full decoding.

    Returns:
        ``(text, offsets)`` with ``text == tokenizer.decode(ids)``.
    """
    ids = [int(i) for i in ids]
    full = tokenizer.decode(ids, skip_special_tokens=False)
    offsets: list[tuple[int, int]] = []
    pieces: list[str] = []
    pos = 0
    for i in range(len(ids)):
        w = max(0, i - 6)
        prev = tokenizer.decode(ids[w:i], skip_special_tokens=False).rstrip("\ufffd") if i > w else ""
        cur = tokenizer.decode(ids[w : i + 1], skip_special_tokens=False)
        if cur.endswith("\ufffd") and i + 1 < len(ids):  # an incomplete multi-byte character
            offsets.append((pos, pos))
            continue
        if not cur.startswith(prev):
            break
        piece = cur[len(prev) :]
        pieces.append(piece)
        offsets.append((pos, pos + len(piece)))
        pos += len(piece)
    if len(offsets) != len(ids) or "".join(pieces) != full:
        offsets = []
        prev_len = 0
        for i in range(len(ids)):
            n = len(tokenizer.decode(ids[: i + 1], skip_special_tokens=False))
            offsets.append((min(prev_len, n), max(prev_len, n)))
            prev_len = max(prev_len, n)
    return full, offsets


def make_trace(
    model: "ThinkingModel",
    prompt_ids: Sequence[int],
    generated_ids: Sequence[int],
    *,
    id: str,
    question: str = "",
    gold: str | None = None,
    prompt: str | None = None,
    finished: str = "given",
    config: dict[str, Any] | None = None,
    index: int = 0,
) -> Trace:
    """Build a :class:`Trace` from token ids: decoded text, token offsets, thinking boundaries.

    ``think_start`` is the first token after the last ``think_open`` of the prompt (or, if the
    prompt has none, after the first one generated); ``think_end`` is the token holding the
    first ``think_close`` after that.
    """
    spec = model.spec
    prompt_ids = [int(i) for i in prompt_ids]
    ids = prompt_ids + [int(i) for i in generated_ids]
    text, offsets = token_offsets(model.tokenizer, ids)
    prompt_chars = offsets[len(prompt_ids) - 1][1] if prompt_ids else 0
    open_at = text.rfind(spec.think_open, 0, prompt_chars)
    if open_at < 0:
        open_at = text.find(spec.think_open, prompt_chars)
    think_start = think_end = None
    thinking, answer_text = "", ""
    eos = set(model.eos_token_ids)
    content_end = len(text)
    k = len(ids)
    while k > len(prompt_ids) and ids[k - 1] in eos:
        k -= 1
    content_end = offsets[k - 1][1] if k > 0 else 0
    if open_at >= 0:
        c0 = open_at + len(spec.think_open)
        think_start = _token_at_char(offsets, c0) if c0 < len(text) else len(ids)
        if think_start < len(ids) and offsets[think_start][0] < c0:
            think_start += 1  # the token straddles think_open's end: thinking starts after it
        t_chars = offsets[think_start][0] if think_start < len(ids) else len(text)
        close_at = text.find(spec.think_close, t_chars)
        if close_at >= 0:
            think_end = _token_at_char(offsets, close_at)
            thinking = text[t_chars:close_at]
            answer_text = text[close_at + len(spec.think_close) : max(content_end, close_at + len(spec.think_close))]
        else:
            thinking = text[t_chars:content_end]
    return Trace(
        id=str(id),
        question=question,
        gold=gold,
        prompt=prompt if prompt is not None else model.to_string(prompt_ids),
        prompt_ids=prompt_ids,
        ids=ids,
        text=text,
        offsets=offsets,
        thinking=thinking,
        answer_text=answer_text,
        think_start=think_start,
        think_end=think_end,
        finished=finished,
        config=dict(config or {}),
        model=spec.name,
        index=index,
    )


def trace_from_text(
    model: "ThinkingModel",
    question: str,
    completion: str,
    *,
    id: str = "text",
    gold: str | None = None,
    thinking: Literal["on", "off", "default"] = "on",
) -> Trace:
    """A :class:`Trace` from a question and a completion text (e.g. a saved or hand-written one).

    The completion is tokenized on its own after the prompt built by ``model.prompt``.
    """
    prompt = model.prompt(question, thinking=thinking)
    prompt_ids = model.to_token_lists([prompt])[0]
    gen = [int(i) for i in model.tokenizer(completion, add_special_tokens=False)["input_ids"]]
    return make_trace(model, prompt_ids, gen, id=id, question=question, gold=gold, prompt=prompt)


# ============================================================================ generation
def _question_fields(q: Any, index: int) -> tuple[str, str, str | None]:
    """(id, question, gold) from a str, a Problem-like object or a dict."""
    if isinstance(q, str):
        return f"q{index}", q, None
    if isinstance(q, dict):
        if "question" not in q:
            raise ValueError(f"question {index}: a dict needs a 'question' key, got keys {sorted(q)}")
        return str(q.get("id", f"q{index}")), str(q["question"]), q.get("answer", q.get("gold"))
    if hasattr(q, "question"):
        return str(getattr(q, "id", f"q{index}")), str(q.question), getattr(q, "answer", None)
    raise TypeError(f"question {index}: expected a str, dict or Problem, got {type(q).__name__}")


def read_store(path: str | os.PathLike[str], repair: bool = False) -> list[Trace]:
    """Read a JSONL trace store.

    A torn last line (an interrupted write) is dropped with a logged warning; with
    ``repair=True`` the file is also truncated to its last complete line.

    Raises:
        TraceStoreError: a line other than the last is not valid JSON, naming file and line.
    """
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    traces: list[Trace] = []
    good_end = 0
    offset = 0
    for lineno, line in enumerate(lines, start=1):
        is_last = lineno == len(lines) or (lineno == len(lines) - 1 and lines[-1] == b"")
        end = offset + len(line) + 1
        if not line.strip():
            offset = end
            if lineno < len(lines):
                good_end = min(end, len(raw))
            continue
        try:
            d = json.loads(line.decode("utf-8"))
            complete = end <= len(raw)  # the line has its newline
            if not complete:
                raise ValueError("no newline")
            traces.append(Trace.from_dict(d))
            good_end = end
        except (ValueError, UnicodeDecodeError, TypeError, KeyError) as exc:
            if is_last:
                log.warning(
                    "%s: line %d is torn (an interrupted write, %s); %s", path, lineno, type(exc).__name__,
                    "truncating it" if repair else "ignoring it",
                )
                if repair:
                    with open(path, "r+b") as f:
                        f.truncate(good_end)
                        f.flush()
                        os.fsync(f.fileno())
                break
            raise TraceStoreError(f"{path}: line {lineno} is not a valid trace ({exc}); fix or remove it") from None
        offset = end
    return traces


class _StoreWriter:
    """Appends traces to a JSONL store under an exclusive file lock (``<store>.lock``).

    Before each append it reads what other writers appended since it last looked, so two
    processes filling one store never write the same id twice.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")
        self.offset = 0
        self.ids: set[str] = set()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.lock_path, "a") as lock:
            if fcntl is not None:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                if fcntl is not None:
                    fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _catch_up(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1  # whole lines only (a line being written is read next time)
        for line in chunk[:end].split(b"\n"):
            if line.strip():
                try:
                    self.ids.add(str(json.loads(line)["id"]))
                except (ValueError, KeyError, TypeError):
                    continue
        self.offset += end

    def append(self, trace: Trace) -> bool:
        """Append ``trace`` unless its id is already stored; returns whether it was written."""
        with self._locked():
            self._catch_up()
            if trace.id in self.ids:
                log.info("%s: trace %r was written by another process; not appending it twice", self.path, trace.id)
                return False
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(trace.to_dict(), ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self._catch_up()
            return True


def _check_stored(path: Path, stored: Trace, model: "ThinkingModel", cfg: dict[str, Any], question: str) -> None:
    """A stored trace is reused only for exactly the request it answered (else one line)."""
    wanted = {"model": model.spec.name, "weights": model.fingerprint(), "config": cfg, "question": question}
    have = {"model": stored.model, "weights": stored.fingerprint, "config": stored.config, "question": stored.question}
    diff = [k for k in wanted if wanted[k] != have[k]]
    if diff:
        k = diff[0]
        raise TraceStoreError(
            f"{path}: trace {stored.id!r} was generated with {k}={have[k]!r}, but this request has {k}={wanted[k]!r}; "
            "a store holds one experiment: pass another store= or delete this one"
        )


def generate(
    model: "ThinkingModel",
    questions: Sequence[Any],
    *,
    max_new_tokens: int = 512,
    batch_size: int = 8,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    thinking: Literal["on", "off", "default"] = "on",
    assistant_prefix: str = "",
    store: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> list[Trace]:
    """Generate a trace per question, batched, optionally appending each to a JSONL store.

    Decoding is :func:`mechthink.generation.decode` through the bridge (any hooks active around
    the call apply): one left-padded prefill, then one token per step on the KV cache. Greedy
    (``temperature=0``) or temperature + top-p sampling where each question draws from its own
    ``torch.Generator`` seeded from ``(seed, index)``, so results do not depend on batching.
    Generation stops at the model's eos ids or after ``max_new_tokens``.

    With ``store``, each finished trace is appended as one JSON line (flushed and fsynced, under
    a file lock so concurrent writers never duplicate an id) in question order; a re-run reads
    the store, reuses the traces of the ids asked for (a torn last line is truncated with a
    warning) and generates the rest. A stored trace is reused only for exactly the request it
    answered — the same model, weights fingerprint, generation config and question — otherwise
    :class:`TraceStoreError` says what differs (a store holds one experiment).

    Args:
        model: The loaded model.
        questions: Strings, :class:`~mechthink.data.Problem` objects or dicts with
            ``question`` (and optional ``id``, ``answer``).
        max_new_tokens: Generation budget per question.
        batch_size: Prompts decoded together.
        temperature: 0 = greedy.
        top_p: Nucleus threshold when sampling.
        seed: Sampling seed.
        thinking: Thinking mode for :meth:`ThinkingModel.prompt`.
        assistant_prefix: Text prefilled after the thinking prefix.
        store: Optional JSONL path.
        progress: Show a tqdm bar.

    Returns:
        The traces in question order (those read from the store included).
    """
    cfg = GenerationConfig(max_new_tokens, float(temperature), float(top_p), int(seed), thinking, assistant_prefix)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(questions, (str, bytes)):
        raise TypeError("generate: questions must be a sequence of questions, not one string")
    items = [_question_fields(q, i) for i, q in enumerate(questions)]
    ids_seen: dict[str, int] = {}
    for i, (qid, _, _) in enumerate(items):
        if qid in ids_seen:
            raise ValueError(f"generate: duplicate question id {qid!r} (questions {ids_seen[qid]} and {i})")
        ids_seen[qid] = i
    done: dict[str, Trace] = {}
    store_path = Path(store) if store is not None else None
    cfg_dict = dataclasses.asdict(cfg)
    writer = None
    if store_path is not None:
        if store_path.exists() and not store_path.is_file():
            raise TraceStoreError(f"store={store_path} is not a file; pass a path to a .jsonl file")
        if any(p.is_file() for p in store_path.parents):
            raise TraceStoreError(f"store={store_path} lies below a regular file; pass a path in a folder")
        store_path.parent.mkdir(parents=True, exist_ok=True)
        questions_by_id = {qid: q for qid, q, _ in items}
        for t in read_store(store_path, repair=True):
            if t.id in questions_by_id:
                _check_stored(store_path, t, model, cfg_dict, questions_by_id[t.id])
                done[t.id] = t
        writer = _StoreWriter(store_path)
        if done:
            log.info("%s: %d traces already stored; generating the other %d", store_path, len(done),
                     sum(1 for q in items if q[0] not in done))
    todo = [i for i, (qid, _, _) in enumerate(items) if qid not in done]
    prompts = {i: model.prompt(items[i][1], thinking=thinking, assistant_prefix=assistant_prefix) for i in todo}
    prompt_ids = {i: model.to_token_lists([prompts[i]])[0] for i in todo}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="generate")
    rows = [prompt_ids[i] for i in todo]
    for batch, results in decode_batches(Decoder.for_model(model), rows, cfg, batch_size, indices=todo):
        for i, (new_ids, why) in zip(batch, results):
            qid, question, gold = items[i]
            tr = make_trace(
                model, prompt_ids[i], new_ids, id=qid, question=question,
                gold=None if gold is None else str(gold), prompt=prompts[i],
                finished=why, config=cfg_dict, index=i,
            )
            tr.fingerprint = model.fingerprint()
            done[qid] = tr
            if writer is not None:
                writer.append(tr)
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return [done[qid] for qid, _, _ in items]


# ============================================================================ anatomy
@dataclass(frozen=True)
class Step:
    """One step (sentence or line) of a text or trace.

    ``char_start``/``char_end`` index the text that was split (``trace.text`` for a trace);
    ``token_start``/``token_end`` (end exclusive) are set for traces.
    """

    index: int
    text: str
    char_start: int
    char_end: int
    token_start: int | None = None
    token_end: int | None = None


@dataclass(frozen=True)
class BacktrackingEvent:
    """A backtracking word in the thinking: the token that starts it and the word."""

    position: int
    word: str
    char: int


@dataclass(frozen=True)
class AnswerInstance:
    """An answer-reaching instance (ARBOR #22): the gold answer inside the thinking.

    Attributes:
        index: 0-based instance number in the trace.
        position: Token position of the instance end (the token holding the ``. ? ! ; \\n``
            that ends it, or the last thinking token); probe after this token.
        number_position: Token position where the answer occurrence starts.
        char_start: Character offset of the occurrence in ``trace.text``.
        char_end: Character offset just past the instance end.
        matched: The matched text (e.g. ``"1,250"``).
        next_word: The word after the instance (e.g. ``"Wait"``), or None at the end.
    """

    index: int
    position: int
    number_position: int
    char_start: int
    char_end: int
    matched: str
    next_word: str | None


_STEP_RE = re.compile(r"[^\n]*?(?:[.?!](?=\s|$)|\n|$)")
_END_CHARS = ".?!;\n"
_NUMBER_RE = re.compile(
    r"(?:(?<![\w)\]])-)?(?<![\w.,])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\d]|[.,]\d)"
)


def _region(trace_or_text: Trace | str, region: str) -> tuple[str, int, Trace | None]:
    if isinstance(trace_or_text, str):
        return trace_or_text, 0, None
    tr = trace_or_text
    if region == "thinking":
        c0, c1 = _require_thinking(tr)
    elif region == "completion":
        c0 = tr.offsets[tr.n_prompt][0] if tr.n_prompt < len(tr.ids) else len(tr.text)
        c1 = _content_end(tr)
    else:
        raise ValueError(f"region must be 'thinking' or 'completion', got {region!r}")
    return tr.text[c0:c1], c0, tr


def _require_thinking(tr: Trace) -> tuple[int, int]:
    if tr.think_start is None:
        raise ValueError(
            f"trace {tr.id!r} has no thinking: its text never opens {_open_tag(tr)!r}; "
            "generate with thinking='on' or use region='completion'"
        )
    return tr.thinking_char_span


def _open_tag(tr: Trace) -> str:
    from mechthink.models.registry import get_spec, resolve_name

    return get_spec(tr.model).think_open if tr.model and resolve_name(tr.model) else "<think>"


def split_steps(trace_or_text: Trace | str, region: Literal["thinking", "completion"] = "thinking") -> list[Step]:
    """Split into steps: sentences (ending at ``. ? !`` before whitespace) and lines.

    Args:
        trace_or_text: A trace (its thinking, or the whole completion) or a plain string.
        region: For traces: ``"thinking"`` (default) or ``"completion"``.

    Returns:
        Non-empty steps (whitespace-only pieces skipped), each with its stripped text and char
        span (into ``trace.text`` for traces, else into the string) and, for traces, token span.

    Raises:
        ValueError: a trace without thinking and ``region="thinking"``.
    """
    text, base, tr = _region(trace_or_text, region)
    steps: list[Step] = []
    i = 0
    while i < len(text):
        m = _STEP_RE.match(text, i)
        assert m is not None
        end = m.end() if m.end() > i else len(text)
        piece = text[i:end]
        stripped = piece.strip()
        if stripped:
            s = i + (len(piece) - len(piece.lstrip()))
            e = s + len(stripped)
            t0 = t1 = None
            if tr is not None:
                t0 = tr.token_at_char(base + s)
                t1 = tr.token_at_char(base + e - 1) + 1
            steps.append(Step(len(steps), stripped, base + s, base + e, t0, t1))
        i = end
    return steps


def backtracking_events(
    trace: Trace,
    words: Iterable[str] | None = None,
    *,
    model: "ThinkingModel | None" = None,
    ignore_case: bool = False,
) -> list[BacktrackingEvent]:
    """Backtracking words in the thinking, each with the position of the token that starts it.

    Args:
        trace: The trace.
        words: Words/phrases to find (whole words); default ``model.spec.backtracking_words``,
            else the registry entry of ``trace.model``, else R1 defaults.
        model: Supplies the default words.
        ignore_case: Match case-insensitively.

    Returns:
        Events in text order; overlapping matches keep the longest word.

    Raises:
        ValueError: the trace has no thinking.
    """
    if words is None:
        words = _default_words(trace, model)
    wl = sorted({w.strip() for w in words if w.strip()}, key=len, reverse=True)
    if not wl:
        raise ValueError("backtracking_events: no words given")
    c0, c1 = _require_thinking(trace)
    text = trace.text[c0:c1]
    pat = re.compile(r"(?<![A-Za-z])(?:" + "|".join(re.escape(w) for w in wl) + r")(?![A-Za-z])",
                     re.IGNORECASE if ignore_case else 0)
    return [
        BacktrackingEvent(trace.token_at_char(c0 + m.start()), m.group(0), c0 + m.start())
        for m in pat.finditer(text)
    ]


def _default_words(trace: Trace, model: "ThinkingModel | None") -> tuple[str, ...]:
    if model is not None:
        return model.spec.backtracking_words
    from mechthink.models.registry import DEFAULT_BACKTRACKING_WORDS, resolve_name, get_spec

    if trace.model and resolve_name(trace.model):
        return get_spec(trace.model).backtracking_words
    return DEFAULT_BACKTRACKING_WORDS


def answer_instances(trace: Trace, gold: str | None = None) -> list[AnswerInstance]:
    """Answer-reaching instances: occurrences of the gold answer inside the thinking (ARBOR #22).

    A numeric gold matches whole numbers only (``18`` is not found in ``180`` or ``1.8``;
    ``1,250`` matches gold ``1250``). A non-numeric gold matches its literal text. Each
    instance ends at the next ``. ? ! ; \\n`` after the occurrence (or at the end of the
    thinking); occurrences ending at the same place count once.

    Args:
        trace: The trace.
        gold: The gold answer (default ``trace.gold``).

    Returns:
        The instances in order; an empty list when the answer never occurs in the thinking.

    Raises:
        ValueError: no gold answer, or the trace has no thinking.
    """
    gold = trace.gold if gold is None else gold
    if gold is None or not str(gold).strip():
        raise ValueError(f"answer_instances: trace {trace.id!r} has no gold answer; pass gold=")
    c0, c1 = _require_thinking(trace)
    text = trace.text[c0:c1]
    g = normalize_number(str(gold))
    matches: list[tuple[int, int, str]] = []
    if re.fullmatch(r"-?\d+(?:\.\d+)?|-?\d+/\d+", g):
        for m in _NUMBER_RE.finditer(text):
            if answers_match(m.group(0), g):
                matches.append((m.start(), m.end(), m.group(0)))
    else:
        lit = str(gold).strip()
        for m in re.finditer(r"(?<![\w])" + re.escape(lit) + r"(?![\w])", text):
            matches.append((m.start(), m.end(), m.group(0)))
    out: list[AnswerInstance] = []
    seen_end: set[int] = set()
    for s, e, matched in matches:
        j = e
        while j < len(text) and text[j] not in _END_CHARS:
            j += 1
        end_char = min(j, len(text) - 1)
        if end_char in seen_end:
            continue
        seen_end.add(end_char)
        nw = re.match(r"\s*([A-Za-z]+(?:'[a-z]+)?)", text[end_char + 1 :])
        out.append(
            AnswerInstance(
                index=len(out),
                position=trace.token_at_char(c0 + end_char),
                number_position=trace.token_at_char(c0 + s),
                char_start=c0 + s,
                char_end=c0 + end_char + 1,
                matched=matched,
                next_word=nw.group(1) if nw else None,
            )
        )
    return out


from mechthink.trace_import import import_traces, source_key  # noqa: E402  (they build on the names above)
