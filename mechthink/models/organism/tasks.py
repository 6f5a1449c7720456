"""Task generator of the tiny-thinker organism: multi-step arithmetic as R1-style thinking traces.

Each problem is a chain of 2-5 single-digit operands joined by ``+``/``-`` whose running total stays
in ``0..MAX_TOTAL``. The transcript writes one step per line; a step is sometimes written wrong
and is then followed by a backtracking word (" Wait", " Hmm", " Alternatively") and the corrected
step. The ground truth (token positions of operands, results, backtracking words, answer mentions)
is recorded for every transcript. Source: this repository (planted mechanism, DeepSeek-R1 format,
arXiv:2501.12948).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field

from .tokenizer import (
    ASSISTANT_TOKEN,
    BOS_TOKEN,
    EOS_TOKEN,
    THINK_CLOSE,
    THINK_OPEN,
    USER_TOKEN,
    build_raw_tokenizer,
)

__all__ = [
    "BACKTRACK_WORDS",
    "MAX_TOTAL",
    "ArithmeticProblem",
    "StepExample",
    "StepInfo",
    "Transcript",
    "TranscriptConfig",
    "held_out_examples",
    "make_transcript",
    "minimal_pair",
    "minimal_pairs",
    "prompt_text",
    "render_transcript",
    "sample_problem",
    "sample_transcripts",
]

#: Backtracking words as single tokens (with their leading space), in order of frequency.
BACKTRACK_WORDS: tuple[str, ...] = (" Wait", " Hmm", " Alternatively")
#: Running totals stay in ``0..MAX_TOTAL``.
MAX_TOTAL = 30
#: Default seed of held-out examples (training uses a different stream, see ``train.py``).
HELD_OUT_SEED = 1234


@dataclass(frozen=True)
class TranscriptConfig:
    """Sampling probabilities of the transcript generator.

    Attributes:
        min_operands: Fewest operands in a problem (>= 2).
        max_operands: Most operands in a problem.
        p_error: Probability that a step is first written wrong (then corrected).
        p_check: Probability of a re-check line after the last step.
        backtrack_weights: Relative frequencies of " Wait", " Hmm", " Alternatively".
    """

    min_operands: int = 2
    max_operands: int = 5
    p_error: float = 0.2
    p_check: float = 0.5
    backtrack_weights: tuple[float, float, float] = (0.6, 0.25, 0.15)

    def __post_init__(self) -> None:
        if not 2 <= self.min_operands <= self.max_operands:
            raise ValueError("need 2 <= min_operands <= max_operands")
        if not (0.0 <= self.p_error <= 1.0 and 0.0 <= self.p_check <= 1.0):
            raise ValueError("probabilities must lie in [0, 1]")
        if len(self.backtrack_weights) != len(BACKTRACK_WORDS):
            raise ValueError("one weight per backtracking word")


@dataclass(frozen=True)
class ArithmeticProblem:
    """An arithmetic chain ``operands[0] ops[0] operands[1] ...``.

    Attributes:
        operands: Single-digit operands.
        ops: ``"+"`` or ``"-"``, one fewer than operands.
    """

    operands: tuple[int, ...]
    ops: tuple[str, ...]

    @property
    def expression(self) -> str:
        """The chain as text, e.g. ``"3 + 5 - 2"``."""
        parts = [str(self.operands[0])]
        for op, b in zip(self.ops, self.operands[1:]):
            parts += [op, str(b)]
        return " ".join(parts)

    @property
    def question(self) -> str:
        """The user message, e.g. ``"Compute 3 + 5 - 2."``."""
        return f"Compute {self.expression}."

    @property
    def running_totals(self) -> list[int]:
        """Correct results of each step."""
        totals, acc = [], self.operands[0]
        for op, b in zip(self.ops, self.operands[1:]):
            acc = acc + b if op == "+" else acc - b
            totals.append(acc)
        return totals

    @property
    def answer(self) -> int:
        """The correct final answer."""
        return self.running_totals[-1]


@dataclass
class StepInfo:
    """One written step ``lhs op rhs = result.`` with its ground-truth token positions.

    Attributes:
        index: Step number (0-based).
        lhs: Left operand (the running total, or the first operand).
        op: ``"+"`` or ``"-"``.
        rhs: Right operand (a question operand).
        written_result: The result as written on this line (first attempt).
        correct_result: The correct result.
        is_error: Whether ``written_result != correct_result``.
        lhs_positions: Token positions of the lhs digits.
        op_position: Token position of the operator.
        rhs_positions: Token positions of the rhs digit.
        result_positions: Token positions of the written result's digits.
        period_position: Token position of the step's final ``"."``.
        backtrack_position: Token position of the backtracking word after it, or None.
        backtrack_word: The backtracking word (with leading space), or None.
        correction: The corrected redo of the step (a StepInfo with is_error False), or None.
    """

    index: int
    lhs: int
    op: str
    rhs: int
    written_result: int
    correct_result: int
    is_error: bool
    lhs_positions: list[int] = field(default_factory=list)
    op_position: int = -1
    rhs_positions: list[int] = field(default_factory=list)
    result_positions: list[int] = field(default_factory=list)
    period_position: int = -1
    backtrack_position: int | None = None
    backtrack_word: str | None = None
    correction: StepInfo | None = None

    @property
    def operand_positions(self) -> list[int]:
        """Token positions of both operands (lhs digits then rhs digit)."""
        return self.lhs_positions + self.rhs_positions


@dataclass
class Transcript:
    """A full tokenized thinking transcript with ground truth.

    Attributes:
        problem: The problem.
        text: The full text, starting with ``<|bos|>`` and ending with ``<|end|>``.
        input_ids: Token ids of ``text`` (no extra bos is added by the tokenizer).
        steps: The steps in order (first attempts; corrections nested in ``StepInfo.correction``).
        answer: The correct final answer.
        answer_positions: For every mention of the final answer inside the thinking (last step's
            correct result, re-check result, restatement, wrap-up), its digit token positions.
        boxed_answer_positions: Digit token positions of the answer inside ``\\boxed{}``.
        backtrack_positions: Token positions of every backtracking word.
        think_open_position: Position of ``<think>``.
        think_close_position: Position of ``</think>``.
        assistant_position: Position of ``<|assistant|>`` (loss is taken on what follows).
        question_span: ``(start, end)`` token range of the question ``"Compute ... ."``.
        has_check: Whether a re-check line is present.
        wrapup_position: Position of the wrap-up word ("So") starting the last thinking line.
    """

    problem: ArithmeticProblem
    text: str
    input_ids: list[int]
    steps: list[StepInfo]
    answer: int
    answer_positions: list[list[int]]
    boxed_answer_positions: list[int]
    backtrack_positions: list[int]
    think_open_position: int
    think_close_position: int
    assistant_position: int
    question_span: tuple[int, int]
    has_check: bool
    wrapup_position: int

    @property
    def tokens(self) -> list[str]:
        """The token strings of ``input_ids``."""
        tok = build_raw_tokenizer()
        return [tok.id_to_token(i) for i in self.input_ids]


def sample_problem(rng: random.Random, config: TranscriptConfig | None = None) -> ArithmeticProblem:
    """Sample a chain whose running total stays in ``0..MAX_TOTAL``.

    Args:
        rng: Source of randomness.
        config: Generator configuration (operand count range).

    Returns:
        The problem.
    """
    config = config or TranscriptConfig()
    n = rng.randint(config.min_operands, config.max_operands)
    acc = rng.randint(0, 9)
    operands, ops = [acc], []
    for _ in range(n - 1):
        b = rng.randint(0, 9)
        choices = [op for op in "+-" if 0 <= (acc + b if op == "+" else acc - b) <= MAX_TOTAL]
        op = rng.choice(choices)
        acc = acc + b if op == "+" else acc - b
        operands.append(b)
        ops.append(op)
    return ArithmeticProblem(tuple(operands), tuple(ops))


def _wrong_result(rng: random.Random, correct: int) -> int:
    """A plausible wrong result: off by one or two, or the two digits swapped."""
    options: list[int] = []
    tens, units = divmod(correct, 10)
    if 10 <= correct and tens != units and rng.random() < 0.2:
        return units * 10 + tens
    for delta, weight in ((1, 3), (-1, 3), (2, 2), (-2, 2)):
        if correct + delta >= 0:
            options += [correct + delta] * weight
    return rng.choice(options)


class _Builder:
    """Accumulates text and named character spans."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.length = 0

    def add(self, s: str) -> tuple[int, int]:
        start = self.length
        self.parts.append(s)
        self.length += len(s)
        return (start, self.length)

    @property
    def text(self) -> str:
        return "".join(self.parts)


def prompt_text(question: str) -> str:
    """The chat-formatted prompt up to and including ``<think>\\n`` (what generation starts from).

    Args:
        question: The user message, e.g. ``"Compute 3 + 5."``.

    Returns:
        ``"<|bos|><|user|>\\n{question}\\n<|assistant|>\\n<think>\\n"``.
    """
    return f"{BOS_TOKEN}{USER_TOKEN}\n{question}\n{ASSISTANT_TOKEN}\n{THINK_OPEN}\n"


def render_transcript(
    problem: ArithmeticProblem, rng: random.Random, config: TranscriptConfig | None = None
) -> Transcript:
    """Render one problem as a full thinking transcript and record its ground truth.

    Args:
        problem: The problem.
        rng: Source of randomness for errors, backtracking words, re-check and phrasing.
        config: Generator configuration.

    Returns:
        The tokenized transcript.
    """
    config = config or TranscriptConfig()
    b = _Builder()
    # --- character spans, converted to token positions at the end
    b.add(f"{BOS_TOKEN}{USER_TOKEN}\n")
    q_span = b.add(problem.question)
    b.add("\n")
    asst_span = b.add(ASSISTANT_TOKEN)
    b.add("\n")
    open_span = b.add(THINK_OPEN)
    b.add("\n")

    step_spans: list[dict] = []
    answer_spans: list[tuple[int, int]] = []
    backtrack_spans: list[tuple[int, int]] = []

    def write_step(lhs: int, op: str, rhs: int, result: int) -> dict:
        spans = {"lhs": b.add(str(lhs))}
        b.add(" ")
        spans["op"] = b.add(op)
        b.add(" ")
        spans["rhs"] = b.add(str(rhs))
        b.add(" = ")
        spans["result"] = b.add(str(result))
        spans["period"] = b.add(".")
        return spans

    steps: list[StepInfo] = []
    acc = problem.operands[0]
    n_steps = len(problem.ops)
    for i, (op, rhs) in enumerate(zip(problem.ops, problem.operands[1:])):
        correct = acc + rhs if op == "+" else acc - rhs
        is_error = rng.random() < config.p_error
        written = _wrong_result(rng, correct) if is_error else correct
        spans = write_step(acc, op, rhs, written)
        info = StepInfo(i, acc, op, rhs, written, correct, is_error)
        spans["info"] = info
        if is_error:
            word = rng.choices(BACKTRACK_WORDS, weights=config.backtrack_weights)[0]
            spans["backtrack"] = b.add(word)
            backtrack_spans.append(spans["backtrack"])
            info.backtrack_word = word
            if word == " Hmm":
                b.add(", let me redo: ")
            else:
                b.add(", ")
            corr = write_step(acc, op, rhs, correct)
            corr["info"] = StepInfo(i, acc, op, rhs, correct, correct, False)
            info.correction = corr["info"]
            spans["correction"] = corr
            if i == n_steps - 1:
                answer_spans.append(corr["result"])
        elif i == n_steps - 1:
            answer_spans.append(spans["result"])
        b.add("\n")
        step_spans.append(spans)
        steps.append(info)
        acc = correct

    answer = acc
    has_check = rng.random() < config.p_check
    if has_check:
        b.add(f"Let me check: {problem.expression} = ")
        answer_spans.append(b.add(str(answer)))
        phrase = rng.choice(
            (" Yes, the answer is ", " So the answer is ", " Therefore, the answer is ")
        )
        b.add(f".{phrase}")
        answer_spans.append(b.add(str(answer)))
        b.add(".\n")
    wrap_span = b.add("So")
    b.add(" the answer is ")
    answer_spans.append(b.add(str(answer)))
    b.add(".\n")
    close_span = b.add(THINK_CLOSE)
    b.add("\n\nThe final answer is \\boxed{")
    boxed_span = b.add(str(answer))
    b.add("}." + EOS_TOKEN)

    text = b.text
    enc = build_raw_tokenizer().encode(text, add_special_tokens=False)
    ids = list(enc.ids)

    def positions(span: tuple[int, int]) -> list[int]:
        out = [i for i, (s, e) in enumerate(enc.offsets) if span[0] <= s and e <= span[1] and e > s]
        # a space-prefixed token may start one char before the span (e.g. " +" for "+")
        if not out or enc.offsets[out[0]][0] != span[0]:
            out = [i for i, (s, e) in enumerate(enc.offsets) if s < span[1] and e > span[0]]
        return out

    def pos1(span: tuple[int, int]) -> int:
        p = positions(span)
        if len(p) != 1:
            raise AssertionError(f"span {span} maps to tokens {p}")
        return p[0]

    def fill(info: StepInfo, spans: dict) -> None:
        info.lhs_positions = positions(spans["lhs"])
        info.op_position = pos1(spans["op"])
        info.rhs_positions = positions(spans["rhs"])
        info.result_positions = positions(spans["result"])
        info.period_position = pos1(spans["period"])

    for spans in step_spans:
        info = spans["info"]
        fill(info, spans)
        if "backtrack" in spans:
            info.backtrack_position = pos1(spans["backtrack"])
            fill(spans["correction"]["info"], spans["correction"])
    q_pos = positions(q_span)
    return Transcript(
        problem=problem,
        text=text,
        input_ids=ids,
        steps=steps,
        answer=answer,
        answer_positions=[positions(s) for s in answer_spans],
        boxed_answer_positions=positions(boxed_span),
        backtrack_positions=[pos1(s) for s in backtrack_spans],
        think_open_position=pos1(open_span),
        think_close_position=pos1(close_span),
        assistant_position=pos1(asst_span),
        question_span=(q_pos[0], q_pos[-1] + 1),
        has_check=has_check,
        wrapup_position=pos1(wrap_span),
    )


def make_transcript(rng: random.Random, config: TranscriptConfig | None = None) -> Transcript:
    """Sample a problem and render it as a transcript.

    Args:
        rng: Source of randomness (the result is deterministic given its state).
        config: Generator configuration.

    Returns:
        The transcript.
    """
    return render_transcript(sample_problem(rng, config), rng, config)


def sample_transcripts(
    n: int, seed: int | str = 0, config: TranscriptConfig | None = None
) -> list[Transcript]:
    """Sample ``n`` transcripts from ``random.Random(seed)``.

    Args:
        n: Number of transcripts.
        seed: Seed of the ``random.Random`` stream.
        config: Generator configuration.

    Returns:
        The transcripts (deterministic given seed and config).
    """
    rng = random.Random(seed)
    return [make_transcript(rng, config) for _ in range(n)]


@dataclass(frozen=True)
class StepExample:
    """A prefix ending right after a just-written step's ``"."``, with its ground truth.

    Positions index ``input_ids``. For a prefix re-rendered in another model's chat format
    (:func:`mechthink.models.organism.step_examples`) ``input_ids``/``text`` are that model's
    and the position fields (tiny-thinker's) are ``None``.

    Attributes:
        input_ids: Token ids from the BOS through the step's ".".
        is_error: The step was written wrong (the organism backtracks next).
        text: The decoded prefix.
        step_index: Which step of the transcript.
        question: The user message.
        answer: The correct final answer.
        correct_result: The step's correct result.
        written_result: The result as written (differs when ``is_error``).
        next_token_in_data: The token that followed in the generated transcript.
        step_operand_positions: Positions of the step's operands.
        step_lhs_positions: Positions of its left operand.
        step_rhs_positions: Positions of its right operand.
        step_result_positions: Positions of its written result.
        period_position: Position of the step's ".".
        question_span: ``(start, end)`` positions of the question.
    """

    input_ids: list[int]
    is_error: bool
    text: str
    step_index: int
    question: str
    answer: int
    correct_result: int
    written_result: int
    next_token_in_data: int | None
    step_operand_positions: list[int] | None = None
    step_lhs_positions: list[int] | None = None
    step_rhs_positions: list[int] | None = None
    step_result_positions: list[int] | None = None
    period_position: int | None = None
    question_span: tuple[int, int] | None = None

    @property
    def query_position(self) -> int:
        """The last position (the step's "."), where the next-token decision is read."""
        return len(self.input_ids) - 1

    def step_span(self) -> set[int]:
        """Positions of the whole written step: operands, operator, "=", the result."""
        if self.step_operand_positions is None or self.step_result_positions is None:
            raise ValueError("step_span: this example carries no tiny-thinker positions (re-rendered for another model)")
        ops, res = set(self.step_operand_positions), set(self.step_result_positions)
        return set(range(min(ops | res), max(res) + 1))


def held_out_examples(n: int, seed: int = HELD_OUT_SEED) -> list[StepExample]:
    """Prefixes ending right after a just-written step's ``"."``, half of them wrong steps.

    Even-indexed examples are errors, odd-indexed ones correct first attempts. The next token
    after each prefix is a backtracking word (errors) or ``"\\n"`` (correct steps) in the training
    distribution.

    Args:
        n: Number of examples; ``ceil(n / 2)`` are errors (exactly half for even n).
        seed: Seed of the ``random.Random`` stream (default differs from training).

    Returns:
        :class:`StepExample` records with tiny-thinker's token positions.
    """
    rng = random.Random(f"held-out-{seed}")
    config = TranscriptConfig()
    tok = build_raw_tokenizer()
    out: list[StepExample] = []
    while len(out) < n:
        want_error = len(out) % 2 == 0
        tr = make_transcript(rng, config)
        candidates = [s for s in tr.steps if s.is_error == want_error]
        if not candidates:
            continue
        step = rng.choice(candidates)
        end = step.period_position + 1
        ids = tr.input_ids[:end]
        out.append(
            StepExample(
                input_ids=ids,
                is_error=step.is_error,
                text=tok.decode(ids, skip_special_tokens=False),
                step_index=step.index,
                question=tr.problem.question,
                answer=tr.answer,
                correct_result=step.correct_result,
                written_result=step.written_result,
                next_token_in_data=tr.input_ids[end],
                step_operand_positions=step.operand_positions,
                step_lhs_positions=step.lhs_positions,
                step_rhs_positions=step.rhs_positions,
                step_result_positions=step.result_positions,
                period_position=step.period_position,
                question_span=tuple(tr.question_span),
            )
        )
    return out


def minimal_pair(example: StepExample) -> StepExample:
    """The same prefix with the wrong step's result corrected: a baseline of identical length.

    Args:
        example: A tiny-thinker :class:`StepExample` with ``is_error`` (its last step wrong).

    Returns:
        The corrected example (``is_error=False``, same positions, same token length).
    """
    if not example.is_error or example.step_result_positions is None:
        raise ValueError("minimal_pair: pass a tiny-thinker StepExample whose last step is wrong (is_error=True)")
    tok = build_raw_tokenizer()
    res = example.step_result_positions
    digits = tok.encode(str(example.correct_result), add_special_tokens=False).ids
    if len(digits) != len(res):
        raise ValueError(f"minimal_pair: the correct result {example.correct_result} has {len(digits)} tokens but the "
                         f"written {example.written_result} has {len(res)}; the pair would differ in length")
    ids = list(example.input_ids)
    ids[res[0] : res[-1] + 1] = digits
    return dataclasses.replace(example, input_ids=ids, is_error=False, written_result=example.correct_result,
                               text=tok.decode(ids, skip_special_tokens=False), next_token_in_data=None)


def minimal_pairs(n: int, seed: int = HELD_OUT_SEED) -> list[tuple[StepExample, StepExample]]:
    """``n`` pairs (wrong step, the same prefix with the step corrected) of identical token length.

    Wrong results whose digit count differs from the correct one (e.g. 9 written as 10) are
    skipped, so every pair aligns token for token.

    Args:
        n: Number of pairs.
        seed: Seed of the held-out stream (as in :func:`held_out_examples`).
    """
    out: list[tuple[StepExample, StepExample]] = []
    m = 2 * n
    while len(out) < n:
        out = [(e, minimal_pair(e)) for e in held_out_examples(m, seed=seed)
               if e.is_error and len(str(e.written_result)) == len(str(e.correct_result))][:n]
        m *= 2
    return out
