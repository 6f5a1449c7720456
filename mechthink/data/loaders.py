"""Loaders for math reasoning benchmarks as lists of :class:`Problem`.

GSM8K (Cobbe et al. 2021, arXiv:2110.14168; hub ``openai/gsm8k``), AIME 2024 (AoPS wiki via
``HuggingFaceH4/aime_2024``) and MATH-500 (Lightman et al. 2023, arXiv:2305.20050; hub
``HuggingFaceH4/MATH-500``). Each loader reads a local JSONL file when given one, else the
Hugging Face hub through ``datasets``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mechthink.data.answers import normalize_number, parse_gsm8k_answer

__all__ = [
    "Problem",
    "load_aime24",
    "load_gsm8k",
    "load_jsonl_problems",
    "load_math500",
    "read_jsonl",
]

logger = logging.getLogger(__name__)

_QUESTION_KEYS = ("question", "problem", "Question", "Problem")
_ANSWER_KEYS = ("answer", "Answer", "expected_answer", "final_answer")
_SOLUTION_KEYS = ("solution", "Solution")
_ID_KEYS = ("id", "ID", "unique_id", "problem_id", "url")


@dataclass(frozen=True)
class Problem:
    """One benchmark problem.

    Attributes:
        id: Stable identifier, e.g. ``"gsm8k/test/0"`` or the dataset's own id.
        question: The problem statement.
        answer: The gold answer, normalised with :func:`~mechthink.data.normalize_number`.
        solution: A reference solution if the dataset has one (GSM8K: the worked solution
            without the ``#### answer`` line), else None.
        source: Dataset name (``"gsm8k"``, ``"aime24"``, ``"math500"`` or user-given).
    """

    id: str
    question: str
    answer: str
    solution: str | None
    source: str


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _check_n(n: int | None) -> None:
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise ValueError(f"n must be None or a non-negative int, got {n!r}")


def _take(items: Sequence[Any] | Iterable[Any], n: int | None) -> list[Any]:
    out = []
    for i, item in enumerate(items):
        if n is not None and i >= n:
            break
        out.append(item)
    return out


def _read_numbered(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """Rows of a JSONL file, each with its location ``"<file>:<line>"`` for error messages."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"JSONL file not found: {p} (expected a path to a .jsonl file)")
    rows: list[tuple[str, dict[str, Any]]] = []
    with p.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{p}:{lineno}: not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                    "save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{p}:{lineno}: invalid JSON ({e.msg} at column {e.colno}); "
                    f"expected one JSON object per line"
                ) from None
            if not isinstance(obj, dict):
                raise ValueError(
                    f"{p}:{lineno}: expected a JSON object per line, got {type(obj).__name__}"
                )
            rows.append((f"{p}:{lineno}", obj))
    logger.debug("read %d rows from %s", len(rows), p)
    return rows


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL file of JSON objects, skipping blank lines.

    Args:
        path: The file.

    Returns:
        One dict per non-blank line.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If a line is not valid JSON or not a JSON object; the message names the
            file and the 1-based line number.
    """
    return [row for _, row in _read_numbered(path)]


def _hub_rows(
    name: str, config: str | None, split: str, loader: str
) -> list[tuple[str, dict[str, Any]]]:
    rows = _hub_load(name, config, split, loader)
    return [(f"{name}[{split}][{i}]", r) for i, r in enumerate(rows)]


def _pick(
    row: Mapping[str, Any], keys: Sequence[str], what: str, where: str, required: bool
) -> Any:
    for k in keys:
        if k in row and row[k] is not None:
            return row[k]
    if required:
        raise ValueError(
            f"{where}: no {what} field (tried {', '.join(repr(k) for k in keys)}; "
            f"row has {sorted(row)})"
        )
    return None


def _hub_load(name: str, config: str | None, split: str, loader: str) -> list[dict[str, Any]]:
    """Load a hub dataset split as a list of dicts; turn any failure into a one-line error."""
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"{loader}(path=None) needs the 'datasets' package (pip install mechthink[data]); "
            f"or pass path= a local JSONL file"
        ) from None
    try:
        args = (name, config) if config else (name,)
        ds = datasets.load_dataset(*args, split=split)
    except Exception as e:  # offline, missing split, hub errors: all reported the same way
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise RuntimeError(
            f"{loader}: could not load {name!r} split {split!r} from the Hugging Face hub "
            f"({type(e).__name__}: {first}); if offline, pass path= a local JSONL file"
        ) from e
    return [dict(r) for r in ds]


def _answer_str(value: Any) -> str:
    if isinstance(value, bool):
        raise ValueError(f"answer must be a string or number, got bool {value!r}")
    return normalize_number(str(value))


# --------------------------------------------------------------------------------------------
# GSM8K
# --------------------------------------------------------------------------------------------


def _gsm8k_problem(row: Mapping[str, Any], idx: int, split: str, where: str) -> Problem:
    question = _pick(row, ("question",), "question", where, True)
    raw = _pick(row, ("answer",), "answer", where, True)
    try:
        answer = parse_gsm8k_answer(str(raw))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    solution = str(raw).rsplit("####", 1)[0].strip()
    return Problem(
        id=f"gsm8k/{split}/{idx}",
        question=str(question),
        answer=answer,
        solution=solution or None,
        source="gsm8k",
    )


def load_gsm8k(
    split: str = "test", path: str | Path | None = None, n: int | None = None
) -> list[Problem]:
    """Load GSM8K.

    Args:
        split: ``"test"`` (1319 problems) or ``"train"`` (7473). Used for the hub split, the
            file name when ``path`` is a directory, and the problem ids.
        path: A local JSONL file with the official ``question``/``answer`` fields, or a
            directory holding ``<split>.jsonl``; None loads ``openai/gsm8k`` (config ``main``)
            with ``datasets``.
        n: Keep only the first ``n`` problems.

    Returns:
        Problems with ids ``gsm8k/<split>/<index>``; ``answer`` is the normalised number after
        ``####`` and ``solution`` the worked solution before it.

    Raises:
        ValueError: Bad ``split``/``n``, a malformed line, or a row without ``####``.
        FileNotFoundError: ``path`` does not exist.
        RuntimeError: ``path`` is None and the hub cannot be reached.
    """
    if split not in ("train", "test"):
        raise ValueError(f"load_gsm8k: split must be 'train' or 'test', got {split!r}")
    _check_n(n)
    if path is None:
        rows = _hub_rows("openai/gsm8k", "main", split, "load_gsm8k")
    else:
        p = Path(path)
        if p.is_dir():
            p = p / f"{split}.jsonl"
        rows = _read_numbered(p)
    rows = _take(rows, n)
    problems = [_gsm8k_problem(r, i, split, where) for i, (where, r) in enumerate(rows)]
    logger.info("loaded %d GSM8K %s problems", len(problems), split)
    return problems


# --------------------------------------------------------------------------------------------
# AIME 2024 / MATH-500 / generic
# --------------------------------------------------------------------------------------------


def _generic_problem(
    row: Mapping[str, Any],
    idx: int,
    where: str,
    source: str,
    question_keys: Sequence[str],
    answer_keys: Sequence[str],
    solution_keys: Sequence[str],
    id_keys: Sequence[str],
    answer_parser: Callable[[str], str],
) -> Problem:
    question = _pick(row, question_keys, "question", where, True)
    raw = _pick(row, answer_keys, "answer", where, True)
    solution = _pick(row, solution_keys, "solution", where, False) if solution_keys else None
    rid = _pick(row, id_keys, "id", where, False) if id_keys else None
    try:
        answer = answer_parser(str(raw)) if not isinstance(raw, bool) else _answer_str(raw)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return Problem(
        id=f"{source}/{rid if rid is not None else idx}",
        question=str(question),
        answer=answer,
        solution=None if solution is None else str(solution),
        source=source,
    )


def _load_benchmark(
    path: str | Path | None,
    n: int | None,
    hub: tuple[str, str | None, str],
    source: str,
    loader: str,
) -> list[Problem]:
    _check_n(n)
    rows = _hub_rows(*hub, loader=loader) if path is None else _read_numbered(path)
    rows = _take(rows, n)
    problems = [
        _generic_problem(
            r, i, where, source, _QUESTION_KEYS, _ANSWER_KEYS, _SOLUTION_KEYS,
            _ID_KEYS, normalize_number,
        )
        for i, (where, r) in enumerate(rows)
    ]
    logger.info("loaded %d %s problems", len(problems), source)
    return problems


def load_aime24(path: str | Path | None = None, n: int | None = None) -> list[Problem]:
    """Load the 30 AIME 2024 problems (I and II).

    Args:
        path: A local JSONL file (fields ``problem`` or ``question``, ``answer``, optional
            ``solution`` and ``id``); None loads ``HuggingFaceH4/aime_2024`` (split ``train``)
            with ``datasets``.
        n: Keep only the first ``n`` problems.

    Returns:
        Problems with ids ``aime24/<dataset id>``; answers are integers 0-999 as plain digits
        (the leading zeros of e.g. ``"025"`` are dropped).

    Raises:
        ValueError: Bad ``n`` or a malformed/missing field (the message names file and line).
        FileNotFoundError: ``path`` does not exist.
        RuntimeError: ``path`` is None and the hub cannot be reached.
    """
    return _load_benchmark(
        path, n, ("HuggingFaceH4/aime_2024", None, "train"), "aime24", "load_aime24"
    )


def load_math500(path: str | Path | None = None, n: int | None = None) -> list[Problem]:
    """Load MATH-500, the 500-problem MATH test subset of Lightman et al. (2023).

    Args:
        path: A local JSONL file with ``problem``, ``answer`` and ``solution`` fields (and
            optionally ``unique_id``); None loads ``HuggingFaceH4/MATH-500`` (split ``test``).
        n: Keep only the first ``n`` problems.

    Returns:
        Problems; numeric answers are normalised (``"\\frac{14}{3}"`` -> ``"14/3"``), symbolic
        ones (``"\\frac{\\pi}{2}"``, ``"(3, \\frac{\\pi}{2})"``) are kept as given, stripped.

    Raises:
        ValueError: Bad ``n`` or a malformed/missing field (the message names file and line).
        FileNotFoundError: ``path`` does not exist.
        RuntimeError: ``path`` is None and the hub cannot be reached.
    """
    return _load_benchmark(
        path, n, ("HuggingFaceH4/MATH-500", None, "test"), "math500", "load_math500"
    )


def load_jsonl_problems(
    path: str | Path,
    question_key: str = "question",
    answer_key: str = "answer",
    *,
    solution_key: str | None = None,
    id_key: str | None = None,
    source: str | None = None,
    answer_parser: Callable[[str], str] | None = None,
    n: int | None = None,
) -> list[Problem]:
    """Load problems from any JSONL file with named question/answer fields.

    Args:
        path: The JSONL file.
        question_key: Field holding the question.
        answer_key: Field holding the gold answer (string or number).
        solution_key: Optional field holding a reference solution.
        id_key: Optional field holding an id; else the row index is used.
        source: Name stored in ``Problem.source`` and used as id prefix; default: file stem.
        answer_parser: Maps the raw answer string to the gold answer; default
            :func:`~mechthink.data.normalize_number`. Use
            :func:`~mechthink.data.parse_gsm8k_answer` for GSM8K-style ``#### x`` answers.
        n: Keep only the first ``n`` problems.

    Returns:
        Problems with ids ``<source>/<id or index>``.

    Raises:
        ValueError: Bad ``n``, a malformed line, or a row missing ``question_key`` /
            ``answer_key`` (the message names file, row and the keys present).
        FileNotFoundError: ``path`` does not exist.
    """
    for name, key in (("question_key", question_key), ("answer_key", answer_key)):
        if not isinstance(key, str) or not key:
            raise ValueError(f"load_jsonl_problems: {name} must be a non-empty str, got {key!r}")
    _check_n(n)
    p = Path(path)
    rows = _take(_read_numbered(p), n)
    src = source if source is not None else p.stem
    parser = answer_parser if answer_parser is not None else normalize_number
    return [
        _generic_problem(
            r, i, where, src, (question_key,), (answer_key,),
            (solution_key,) if solution_key else (), (id_key,) if id_key else (), parser,
        )
        for i, (where, r) in enumerate(rows)
    ]


def default_data_dir() -> Path | None:
    """Where local benchmark files live: ``$MECHTHINK_DATA``, else ``shared/data`` beside a
    mechthink checkout (``<checkout>/../shared/data``), else None (load from the hub)."""
    env = os.environ.get("MECHTHINK_DATA")
    if env:
        return Path(env)
    beside = Path(__file__).resolve().parents[3] / "shared" / "data"
    return beside if beside.is_dir() else None


def resolve_gsm8k_path(path: str | Path | None) -> Path | None:
    """``path`` if given (non-empty), else the GSM8K test file under :func:`default_data_dir`
    if it exists, else None (``load_gsm8k`` then uses the hub)."""
    if path:
        return Path(path)
    root = default_data_dir()
    if root is not None and (root / "gsm8k" / "test.jsonl").exists():
        return root / "gsm8k" / "test.jsonl"
    return None
