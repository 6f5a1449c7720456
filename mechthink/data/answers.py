"""Answer extraction and normalisation for math word problems.

Pure string functions: the GSM8K ``#### <answer>`` convention (Cobbe et al. 2021,
arXiv:2110.14168), the ``\\boxed{...}`` convention of MATH (Hendrycks et al. 2021,
arXiv:2103.03874) as used by R1-style thinking models, and a canonical numeric form so that
``"1,250"``, ``"$1250.00"`` and ``"1250"`` compare equal and ``"0.5"`` equals ``"\\frac{1}{2}"``.
"""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = [
    "answers_match",
    "extract_boxed",
    "last_number",
    "normalize_number",
    "parse_answer",
    "parse_gsm8k_answer",
]

# --------------------------------------------------------------------------------------------
# Regular expressions
# --------------------------------------------------------------------------------------------

# A plain numeric literal after cleaning: optional sign, digits with optional decimal part.
_DECIMAL_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
# Thousands-grouped integer (with optional decimals): 1,250 / 1,450,000.50
_GROUPED_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")
# a/b with optional signs and decimals in either part.
_SIGNED_NUM = r"([+-]?(?:\d+(?:\.\d+)?|\.\d+))"
_SLASH_FRAC_RE = re.compile(r"([+-]?)\(?" + _SIGNED_NUM + r"\)?/\(?" + _SIGNED_NUM + r"\)?")
# \frac{a}{b}, \dfrac{a}{b}, \tfrac{a}{b}, also the shorthand \frac12 / \frac1{2} / \frac{1}2.
_FRAC_ARG = r"(?:\{\s*([+-]?(?:\d+(?:\.\d+)?|\.\d+))\s*\}|(\d))"
_LATEX_FRAC_RE = re.compile(r"([+-]?)\\[dt]?frac\s*" + _FRAC_ARG + r"\s*" + _FRAC_ARG)

# Numbers found inside free text by ``last_number``. Order matters: LaTeX fractions, grouped
# thousands, then plain numbers with an optional ``/denominator``. A minus sign counts only when
# it is not glued to a preceding word/number (so "16-3-4=9" yields 16, 3, 4, 9, not -3, -4).
_TEXT_NUMBER_RE = re.compile(
    r"(?<![\w.\\])"
    r"(?P<sign>-\s?)?\\?\$?\s?"
    r"(?P<num>"
    r"\\[dt]?frac\s*\{\s*-?\d+(?:\.\d+)?\s*\}\s*\{\s*-?\d+(?:\.\d+)?\s*\}"
    r"|\d{1,3}(?:,\d{3})+(?:\.\d+)?"
    r"|\d+(?:\.\d+)?(?:/\d+(?:\.\d+)?)?"
    r"|\.\d+"
    r")"
    r"(?!\d)"
)
_BOX_CMD_RE = re.compile(r"\\(?:boxed|fbox|framebox)\b")
_ANSWER_IS_RE = re.compile(r"(?:final\s+answer|answer)\s*(?:is|:)\s*:?", re.IGNORECASE)
_GSM8K_MARK = "####"
# A natural-language word: 3+ letters not part of a LaTeX command.
_PROSE_WORD_RE = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{3,}")

# LaTeX spacing / markup removed before numeric parsing.
_SPACING_RE = re.compile(r"\\[!,;:> ]|\\quad|\\qquad|~")
_TEXT_WRAP_RE = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_DEGREE_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°")
_UNIT_TAIL_RE = re.compile(r"^(.*?[\d}])\s+(?:[A-Za-z]{2,}\s*){1,3}\.?$")


# --------------------------------------------------------------------------------------------
# Boxed answers
# --------------------------------------------------------------------------------------------


def _match_brace(text: str, open_idx: int) -> int | None:
    """Return the index of the ``}`` matching the ``{`` at ``open_idx`` (None if unbalanced)."""
    depth = 0
    i = open_idx
    while i < len(text):
        ch = text[i]
        if ch == "\\":  # skip escaped characters such as \{ and \}
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _all_boxed(text: str) -> list[str]:
    """All complete ``\\boxed{...}`` / ``\\fbox{...}`` / ``\\framebox{...}`` contents, in order."""
    found: list[str] = []
    for m in _BOX_CMD_RE.finditer(text):
        i = m.end()
        # \framebox may carry optional [width][pos] arguments.
        while i < len(text) and text[i].isspace():
            i += 1
        while i < len(text) and text[i] == "[":
            close = text.find("]", i)
            if close < 0:
                break
            i = close + 1
        if i < len(text) and text[i] == "{":
            close = _match_brace(text, i)
            if close is not None:
                found.append(text[i + 1 : close].strip())
        elif i > m.end():
            # "\boxed 5" form (MATH solutions): a single token up to whitespace / $ / end.
            tok = re.match(r"[^\s$]+", text[i:])
            if tok:
                found.append(tok.group(0).rstrip(".,"))
    return found


def extract_boxed(text: str, last: bool = True) -> str | None:
    """Return the content of a ``\\boxed{...}`` (or ``\\fbox{...}``/``\\framebox{...}``).

    Nested braces are balanced, so ``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``. A box whose
    closing brace is missing (a truncated generation) is ignored.

    Args:
        text: Any text, e.g. a model completion or a MATH solution.
        last: Return the last complete box (default) or, if False, the first.

    Returns:
        The stripped box content, not normalised, or None if no complete box is present.

    Raises:
        TypeError: If ``text`` is not a string.
    """
    _check_str(text, "extract_boxed")
    boxes = _all_boxed(text)
    if not boxes:
        return None
    return boxes[-1] if last else boxes[0]


# --------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------


def _check_str(value: object, fn: str) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{fn}: expected a str, got {type(value).__name__}")


def _clean(s: str) -> str:
    """Remove currency, spacing, percent, degree and math-delimiter markup around a number."""
    t = s.strip()
    t = t.replace("\\left", "").replace("\\right", "")
    t = _SPACING_RE.sub("", t)
    t = t.replace("{,}", ",")  # LaTeX thousands separator 1{,}250
    t = _DEGREE_RE.sub("", t)
    t = t.replace("\\%", "").replace("%", "")
    t = t.replace("\\$", "").replace("$", "")
    t = t.replace("\\(", "").replace("\\)", "").replace("\\[", "").replace("\\]", "")
    t = t.strip()
    # Unwrap \text{...}: keep numeric contents, drop unit words ("18\text{ dollars}").
    t = _TEXT_WRAP_RE.sub(lambda m: m.group(1), t)
    t = t.strip().rstrip(".").strip()
    # A sentence-final period may follow closing markup.
    return t


def _parse_fraction(t: str) -> tuple[Fraction, str] | None:
    """Parse a cleaned string into (value, kind) with kind in {"int", "dec", "frac"}."""
    t = t.replace(" ", "")
    if not t:
        return None
    # Thousands separators: only accept well-formed groups.
    if "," in t:
        if not _GROUPED_RE.fullmatch(t):
            return None
        t = t.replace(",", "")
    # Strip redundant outer braces / parentheses: {5}, (5)
    while len(t) >= 2 and ((t[0], t[-1]) in {("{", "}"), ("(", ")")}):
        t = t[1:-1]
    if _DECIMAL_RE.fullmatch(t):
        value = Fraction(t.rstrip(".") if t.endswith(".") else t)
        return value, ("dec" if "." in t else "int")
    m = _LATEX_FRAC_RE.fullmatch(t)
    if m:
        sign, n1, n2, d1, d2 = m.groups()
        num, den = Fraction(n1 or n2), Fraction(d1 or d2)
        if den == 0:
            return None
        value = num / den
        return (-value if sign == "-" else value), "frac"
    m = _SLASH_FRAC_RE.fullmatch(t)
    if m:
        sign, num_s, den_s = m.groups()
        num, den = Fraction(num_s), Fraction(den_s)
        if den == 0:
            return None
        value = num / den
        return (-value if sign == "-" else value), "frac"
    return None


def _format(value: Fraction, kind: str) -> str:
    """Canonical string: integers as digits, fractions as reduced a/b, decimals trimmed."""
    if value.denominator == 1:
        return str(value.numerator)
    if kind == "frac":
        return f"{value.numerator}/{value.denominator}"
    # A terminating decimal (its denominator has only factors 2 and 5): print exactly.
    den = value.denominator
    for p in (2, 5):
        while den % p == 0:
            den //= p
    if den != 1:  # e.g. 0.1/0.3 given as decimals -> keep a reduced fraction
        return f"{value.numerator}/{value.denominator}"
    sign = "-" if value < 0 else ""
    a = abs(value)
    digits = 0
    while (a * 10**digits).denominator != 1:
        digits += 1
    scaled = int(a * 10**digits)
    int_part, frac_part = divmod(scaled, 10**digits)
    return f"{sign}{int_part}.{frac_part:0{digits}d}".rstrip("0").rstrip(".")


def _numeric_value(s: str) -> tuple[Fraction, str] | None:
    """Value and kind of ``s`` if it reads as a number (possibly with units/markup)."""
    t = _clean(s)
    parsed = _parse_fraction(t)
    if parsed is not None:
        return parsed
    # Trailing unit words: "18 dollars", "5 cm", "12\text{ inches}" (unwrapped above).
    m = _UNIT_TAIL_RE.match(t)
    if m:
        return _parse_fraction(m.group(1).rstrip("."))
    return None


def normalize_number(s: str) -> str:
    """Canonicalise a numeric answer string.

    Strips whitespace, ``$``/``\\$``, thousands commas (``1,250`` and ``1{,}250``), ``%``/``\\%``,
    degree marks, LaTeX spacing (``\\!``, ``\\,``), ``\\text{...}`` wrappers and trailing unit
    words, and a trailing period. Integers come out as plain digits (``"18.00"`` -> ``"18"``,
    ``"025"`` -> ``"25"``, ``"-0"`` -> ``"0"``), fractions (``\\frac{a}{b}``, ``\\dfrac``,
    ``\\tfrac``, ``a/b``) as the reduced ``"a/b"`` with the sign in front, and decimals without
    trailing zeros (``"2.50"`` -> ``"2.5"``).

    Anything that does not read as a single number (``"x^2+1"``, ``"(1, 2)"``, ``"\\text{(C)}"``)
    is returned stripped of surrounding whitespace and otherwise unchanged.

    Args:
        s: The answer string.

    Returns:
        The canonical form.

    Raises:
        TypeError: If ``s`` is not a string.
    """
    _check_str(s, "normalize_number")
    parsed = _numeric_value(s)
    if parsed is None:
        return s.strip()
    return _format(*parsed)


def last_number(text: str) -> str | None:
    """Return the last number in free text, normalised (see :func:`normalize_number`).

    Recognises ``1,250``, ``-3``, ``2.5``, ``$18``, ``-$5``, ``3/4`` and ``\\frac{3}{4}``. A
    hyphen directly after a word or digit is read as a dash, not a sign (``"16-3"`` gives ``3``).

    Args:
        text: Any text.

    Returns:
        The normalised last number, or None if the text contains no number.

    Raises:
        TypeError: If ``text`` is not a string.
    """
    _check_str(text, "last_number")
    matches = list(_TEXT_NUMBER_RE.finditer(text))
    if not matches:
        return None
    m = matches[-1]
    sign = "-" if m.group("sign") else ""
    return normalize_number(sign + m.group("num"))


def _first_number(text: str) -> str | None:
    m = _TEXT_NUMBER_RE.search(text)
    if not m:
        return None
    return normalize_number(("-" if m.group("sign") else "") + m.group("num"))


# --------------------------------------------------------------------------------------------
# Whole-answer parsing
# --------------------------------------------------------------------------------------------


def parse_gsm8k_answer(text: str) -> str:
    """Return the normalised gold answer after ``####`` in a GSM8K ``answer`` field.

    Args:
        text: A GSM8K solution such as ``"... so she makes $18.\\n#### 18"``.

    Returns:
        The normalised answer, e.g. ``"18"``; ``"#### 1,250"`` gives ``"1250"``.

    Raises:
        TypeError: If ``text`` is not a string.
        ValueError: If there is no ``####`` marker or nothing after it.
    """
    _check_str(text, "parse_gsm8k_answer")
    idx = text.rfind(_GSM8K_MARK)
    if idx < 0:
        snippet = text[-60:].replace("\n", " ")
        raise ValueError(
            f"parse_gsm8k_answer: no '####' marker in text (expected GSM8K format "
            f"'<solution>\\n#### <answer>'); text ends with {snippet!r}"
        )
    tail = text[idx + len(_GSM8K_MARK) :].strip()
    if not tail:
        raise ValueError("parse_gsm8k_answer: nothing after '####' (expected '#### <answer>')")
    first = tail.splitlines()[0]
    if _numeric_value(first) is None:
        raise ValueError(f"parse_gsm8k_answer: the answer after '####' is {first!r}, not a number "
                         "(GSM8K answers are numbers, e.g. '#### 18')")
    return normalize_number(first)


def _after_marker(text: str) -> str | None:
    """Answer text after the last "####" or "(final) answer is" marker, or None."""
    candidates: list[tuple[int, int]] = []
    idx = text.rfind(_GSM8K_MARK)
    if idx >= 0:
        candidates.append((idx, idx + len(_GSM8K_MARK)))
    ms = list(_ANSWER_IS_RE.finditer(text))
    if ms:
        candidates.append((ms[-1].start(), ms[-1].end()))
    if not candidates:
        return None
    _, end = max(candidates)
    segment = text[end:].strip()
    if not segment:
        return None
    segment = segment.splitlines()[0].strip()
    segment = re.split(r"(?<=[^\d\s])\.\s|\.\s+(?=[A-Z])", segment, maxsplit=1)[0].strip()
    whole = normalize_number(segment)
    if _numeric_value(whole) is not None:
        return whole
    if _PROSE_WORD_RE.search(segment):
        # Natural language ("that she makes $18 per day"): take its first number.
        num = _first_number(segment)
        if num is not None:
            return num
    # A symbolic answer ("x^2+1", "$\\frac{\\pi}{2}$"): keep it, minus math delimiters.
    return segment.strip().rstrip(".").strip().strip("$").strip() or None


def _parse_section(text: str) -> str | None:
    box = extract_boxed(text)
    if box is not None:
        return normalize_number(box)
    marked = _after_marker(text)
    if marked is not None:
        return marked
    return last_number(text)


def parse_answer(text: str) -> str | None:
    """Extract and normalise the final answer of a model completion.

    Order of preference: the last ``\\boxed{}``; else the text after the last ``####`` or
    "The final answer is"/"answer is"/"answer:" (the whole line if it is a number, else its
    first number, else the line); else the last number in the text. If the text has a
    ``</think>`` tag, the part after it is tried first and the whole text only if that part
    yields nothing.

    Args:
        text: A completion, e.g. ``"<think>...</think> The final answer is \\boxed{18}."``.

    Returns:
        The normalised answer, or None if nothing answer-like is found.

    Raises:
        TypeError: If ``text`` is not a string.
    """
    _check_str(text, "parse_answer")
    if "</think>" in text:
        tail = text.rsplit("</think>", 1)[1]
        found = _parse_section(tail)
        if found is not None:
            return found
    return _parse_section(text)


def _canonical_text(s: str) -> str:
    """Loose canonical form for non-numeric answers: whitespace, \\left/\\right, \\dfrac."""
    t = _clean(s)
    t = re.sub(r"\\[dt]frac", r"\\frac", t)
    return re.sub(r"\s+", "", t)


def answers_match(pred: str | None, gold: str) -> bool:
    """Whether a predicted answer equals the gold answer.

    Both are normalised; if both read as numbers they are compared by exact value (so
    ``"0.5"`` matches ``"1/2"`` and ``"\\frac{1}{2}"``, and ``"1,250"`` matches ``"1250.00"``).
    Otherwise the strings are compared after removing whitespace, ``\\left``/``\\right``, ``$``
    and mapping ``\\dfrac``/``\\tfrac`` to ``\\frac``.

    Args:
        pred: The model's answer (None, e.g. from a failed parse, never matches).
        gold: The reference answer.

    Returns:
        True if they match.

    Raises:
        TypeError: If ``gold`` is not a string or ``pred`` is neither a string nor None.
    """
    _check_str(gold, "answers_match (gold)")
    if pred is None:
        return False
    _check_str(pred, "answers_match (pred)")
    p, g = _numeric_value(pred), _numeric_value(gold)
    if p is not None and g is not None:
        return p[0] == g[0]
    if p is not None or g is not None:
        return False
    return _canonical_text(pred) == _canonical_text(gold)
