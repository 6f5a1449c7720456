"""Tests for mechthink.data: answer parsing on the full GSM8K test set, loaders, errors."""

from __future__ import annotations

import dataclasses
import json

import pytest

from mechthink.data import (
    Problem,
    answers_match,
    extract_boxed,
    last_number,
    load_aime24,
    load_gsm8k,
    load_jsonl_problems,
    load_math500,
    normalize_number,
    parse_answer,
    parse_gsm8k_answer,
    read_jsonl,
)

try:
    from beartype.roar import BeartypeCallHintViolation

    _TYPE_ERRORS: tuple[type[Exception], ...] = (TypeError, BeartypeCallHintViolation)
except ImportError:  # pragma: no cover
    _TYPE_ERRORS = (TypeError,)

from conftest import SHARED

DATA = SHARED / "data"
GSM8K_TEST = DATA / "gsm8k" / "test.jsonl"
AIME24 = DATA / "aime24" / "test.jsonl"

needs_gsm8k = pytest.mark.skipif(not GSM8K_TEST.is_file(), reason="GSM8K test.jsonl not present")
needs_aime = pytest.mark.skipif(not AIME24.is_file(), reason="AIME24 test.jsonl not present")


@pytest.fixture(scope="module")
def gsm8k_rows() -> list[dict]:
    if not GSM8K_TEST.is_file():
        pytest.skip("GSM8K test.jsonl not present")
    return [json.loads(line) for line in GSM8K_TEST.read_text(encoding="utf-8").splitlines()]


def _raw_gold(answer_field: str) -> str:
    return answer_field.split("####")[-1].strip()


# --------------------------------------------------------------------------------------------
# GSM8K, every test item
# --------------------------------------------------------------------------------------------


def test_gsm8k_has_1319_items(gsm8k_rows):
    assert len(gsm8k_rows) == 1319


def test_parse_gsm8k_answer_all_items(gsm8k_rows):
    for row in gsm8k_rows:
        raw = _raw_gold(row["answer"])
        gold = parse_gsm8k_answer(row["answer"])
        assert gold == normalize_number(raw)
        # Every GSM8K gold is an integer (some negative, some written with commas).
        assert gold.lstrip("-").isdigit(), raw
        assert "," not in gold
        assert gold == str(int(raw.replace(",", "")))


def test_boxed_and_r1_style_all_items(gsm8k_rows):
    for row in gsm8k_rows:
        raw = _raw_gold(row["answer"])
        gold = parse_gsm8k_answer(row["answer"])
        assert extract_boxed(f"... \\boxed{{{raw}}}.") == raw
        r1 = (
            "<think>\nOkay, so 3 + 4 = 7. Wait, that is not it. Maybe \\boxed{999}? No.\n"
            "</think>\n\nAdding everything gives 12 first, then the rest.\n\n"
            f"The final answer is \\boxed{{{raw}}}"
        )
        assert parse_answer(r1) == gold
        assert answers_match(parse_answer(r1), gold)
        # The answer field itself ends with "#### <gold>".
        assert parse_answer(row["answer"]) == gold
        # Plain "The final answer is N." without a box.
        assert parse_answer(f"So that is it.\nThe final answer is {raw}.") == gold


def test_last_number_of_solution_mostly_gold(gsm8k_rows):
    # Measured: the last number of the worked solution (text before "####") is the gold
    # answer for 1282/1319 = 97.2% of items; the rest end with a trailing quantity such as
    # "... 15 liters out of the 24 liters." or a space-grouped "$118 000".
    agree = sum(
        last_number(row["answer"].split("####")[0]) == parse_gsm8k_answer(row["answer"])
        for row in gsm8k_rows
    )
    assert agree / len(gsm8k_rows) >= 0.96


def test_gsm8k_comma_golds_normalise(gsm8k_rows):
    comma = [_raw_gold(r["answer"]) for r in gsm8k_rows if "," in _raw_gold(r["answer"])]
    assert len(comma) >= 10  # e.g. "2,125", "1,450,000"
    for raw in comma:
        assert normalize_number(raw) == raw.replace(",", "")


# --------------------------------------------------------------------------------------------
# Answer parsing units
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1,250", "1250"),
        ("1,450,000", "1450000"),
        ("1{,}250", "1250"),
        ("$18", "18"),
        ("\\$18.00", "18"),
        ("18.0", "18"),
        ("18.00", "18"),
        ("18.", "18"),
        ("-3", "-3"),
        ("-0", "0"),
        ("+7", "7"),
        ("2.50", "2.5"),
        (".5", "0.5"),
        ("025", "25"),
        ("50\\%", "50"),
        ("50%", "50"),
        ("10\\!000", "10000"),
        ("\\frac{1}{2}", "1/2"),
        ("\\dfrac{6}{8}", "3/4"),
        ("\\tfrac{3}{4}", "3/4"),
        ("\\frac12", "1/2"),
        ("-\\frac{1}{2}", "-1/2"),
        ("\\frac{-1}{2}", "-1/2"),
        ("6/8", "3/4"),
        ("4/2", "2"),
        ("\\frac{10}{5}", "2"),
        ("90^\\circ", "90"),
        ("18 dollars", "18"),
        ("12\\text{ inches}", "12"),
        ("  7  ", "7"),
        ("x^2+1", "x^2+1"),
        ("(1, 2)", "(1, 2)"),
        ("\\frac{\\pi}{2}", "\\frac{\\pi}{2}"),
        ("  \\text{(C)} ", "\\text{(C)}"),
        ("2xy", "2xy"),
        ("1/0", "1/0"),
    ],
)
def test_normalize_number(raw, expected):
    assert normalize_number(raw) == expected


def test_extract_boxed():
    assert extract_boxed("so \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert normalize_number(extract_boxed("so \\boxed{\\frac{1}{2}}.")) == "1/2"
    nested = "\\left(\\frac{1}{2}, {3}\\right)"
    assert extract_boxed(f"\\boxed{{{nested}}}") == nested
    assert extract_boxed("\\boxed{1} then \\boxed{2}") == "2"
    assert extract_boxed("\\boxed{1} then \\boxed{2}", last=False) == "1"
    assert extract_boxed("\\fbox{3}") == "3"
    assert extract_boxed("$\\framebox{204}$ minutes") == "204"
    assert extract_boxed("\\boxed 5$") == "5"
    assert extract_boxed("\\boxed{ 7 }") == "7"
    # A truncated last box is ignored in favour of the last complete one.
    assert extract_boxed("\\boxed{3} and then \\boxed{4") == "3"
    assert extract_boxed("no box here") is None
    assert extract_boxed("\\boxed{") is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("She pays $1,250 in total", "1250"),
        ("16-3-4=9 eggs", "9"),
        ("the change is -3.", "-3"),
        ("it weighs 2.5kg", "2.5"),
        ("makes $18.", "18"),
        ("-$5 off", "-5"),
        ("so 3/4 of them", "3/4"),
        ("so \\frac{3}{4} of them", "3/4"),
        ("1.50 each", "1.5"),
        ("= -7", "-7"),
        ("no number here", None),
        ("", None),
    ],
)
def test_last_number(text, expected):
    assert last_number(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>5 wait 6</think> The final answer is \\boxed{18}.", "18"),
        ("<think>\\boxed{5}</think> so the total is 7.", "7"),
        ("The answer is: 18 dollars.", "18"),
        ("The answer is that she makes $18 per day.", "18"),
        ("the answer is $\\frac{1}{2}$.", "1/2"),
        ("The final answer is 18. Next, we", "18"),
        ("answer is x^2+1", "x^2+1"),
        ("#### 1,250", "1250"),
        ("first 12 then 13", "13"),
        ("\\boxed{\\dfrac{2}{4}}", "1/2"),
        ("\\boxed{\\$1,250.00}", "1250"),
        ("nothing", None),
    ],
)
def test_parse_answer(text, expected):
    assert parse_answer(text) == expected


def test_answers_match():
    assert answers_match("0.5", "1/2")
    assert answers_match("\\frac{1}{2}", "0.5")
    assert answers_match("1,250", "1250.00")
    assert answers_match("$18", "18")
    assert answers_match("025", "25")
    assert answers_match("-3", "-3.0")
    assert not answers_match("0.33", "1/3")
    assert not answers_match("17", "18")
    assert not answers_match(None, "18")
    assert not answers_match("x", "1")
    assert answers_match("\\dfrac{\\pi}{2}", "\\frac{\\pi}{2}")
    assert answers_match("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})")
    assert not answers_match("(1,2)", "(2,1)")


def test_parse_gsm8k_answer_errors():
    assert parse_gsm8k_answer("blah\n#### 1,250") == "1250"
    with pytest.raises(ValueError, match="no '####' marker"):
        parse_gsm8k_answer("The answer is 5.")
    with pytest.raises(ValueError, match="nothing after '####'"):
        parse_gsm8k_answer("blah ####   ")
    # TypeError from our own check, or beartype's violation when the suite runs under beartype.
    with pytest.raises(_TYPE_ERRORS):
        parse_gsm8k_answer(5)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------


@needs_gsm8k
def test_load_gsm8k_local():
    problems = load_gsm8k(path=GSM8K_TEST)
    assert len(problems) == 1319
    p = problems[0]
    assert isinstance(p, Problem)
    assert (p.id, p.answer, p.source) == ("gsm8k/test/0", "18", "gsm8k")
    assert p.question.startswith("Janet")
    assert "####" not in p.solution
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.answer = "19"  # type: ignore[misc]
    assert [q.id for q in load_gsm8k(path=GSM8K_TEST, n=3)] == [p.id for p in problems[:3]]
    # A directory resolves to <split>.jsonl.
    assert load_gsm8k("test", path=GSM8K_TEST.parent, n=1) == problems[:1]


def test_load_gsm8k_bad_args():
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        load_gsm8k(split="validation", path="x.jsonl")
    with pytest.raises(ValueError, match="n must be None or a non-negative int"):
        load_gsm8k(path="x.jsonl", n=-1)
    with pytest.raises(FileNotFoundError, match="JSONL file not found"):
        load_gsm8k(path="/nonexistent/gsm8k.jsonl")


def test_load_gsm8k_offline_message(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError) as exc:
        load_gsm8k(path=None)
    msg = str(exc.value)
    assert "\n" not in msg
    assert "openai/gsm8k" in msg and "pass path=" in msg and "local JSONL" in msg
    with pytest.raises(RuntimeError, match="HuggingFaceH4/aime_2024.*local JSONL"):
        load_aime24()
    with pytest.raises(RuntimeError, match="HuggingFaceH4/MATH-500.*local JSONL"):
        load_math500()


def test_load_gsm8k_from_hub_rows(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake(*args, **kwargs):
        calls.append((args, kwargs))
        return [{"question": "q?", "answer": "work\n#### 1,000"}]

    monkeypatch.setattr(datasets, "load_dataset", fake)
    (p,) = load_gsm8k(split="train")
    assert calls == [(("openai/gsm8k", "main"), {"split": "train"})]
    assert (p.id, p.answer, p.solution) == ("gsm8k/train/0", "1000", "work")


@needs_aime
def test_load_aime24_local():
    problems = load_aime24(path=AIME24)
    assert len(problems) == 30
    assert len({p.id for p in problems}) == 30
    for p in problems:
        assert p.source == "aime24"
        assert p.answer.isdigit() and 0 <= int(p.answer) <= 999
        assert p.answer == str(int(p.answer))  # "025" in the file -> "25"
        assert p.question and p.solution
        # The first box in each AoPS solution is the gold answer.
        assert answers_match(normalize_number(extract_boxed(p.solution, last=False)), p.answer)
    assert len(load_aime24(path=AIME24, n=5)) == 5


def test_load_math500_and_aime_column_variants(tmp_path, monkeypatch):
    f = tmp_path / "math500.jsonl"
    rows = [
        {"problem": "p1", "solution": "s \\boxed{\\frac{14}{3}}", "answer": "\\frac{14}{3}",
         "unique_id": "test/algebra/1.json"},
        {"problem": "p2", "solution": "s", "answer": "\\left( 3, \\frac{\\pi}{2} \\right)",
         "unique_id": "test/precalc/2.json"},
    ]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    probs = load_math500(path=f)
    assert [p.answer for p in probs] == ["14/3", "\\left( 3, \\frac{\\pi}{2} \\right)"]
    assert probs[0].id == "math500/test/algebra/1.json" and probs[0].solution.startswith("s")

    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(
        datasets, "load_dataset",
        lambda *a, **k: [{"ID": "2024-I-1", "Problem": "q", "Solution": "s", "Answer": 204}],
    )
    (p,) = load_aime24()
    assert (p.id, p.question, p.answer, p.solution) == ("aime24/2024-I-1", "q", "204", "s")


def test_torn_jsonl_line(tmp_path):
    f = tmp_path / "torn.jsonl"
    good = json.dumps({"question": "q", "answer": "x\n#### 3"})
    f.write_text(good + "\n" + good + "\n" + good[: len(good) // 2] + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"torn\.jsonl:3: invalid JSON") as exc:
        load_gsm8k(path=f)
    assert "\n" not in str(exc.value)
    for loader in (load_aime24, load_math500, read_jsonl):
        with pytest.raises(ValueError, match=r"torn\.jsonl:3: invalid JSON"):
            loader(f)
    g = tmp_path / "list.jsonl"
    g.write_text("[1, 2]\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"list\.jsonl:1: expected a JSON object"):
        read_jsonl(g)


def test_missing_fields_named(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"q": "a", "a": 1}\n\n{"q": "b"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"p\.jsonl:3: no answer field.*\['q'\]"):
        load_jsonl_problems(f, question_key="q", answer_key="a")
    with pytest.raises(ValueError, match=r"p\.jsonl:1: parse_gsm8k_answer: no '####' marker"):
        load_jsonl_problems(f, "q", "a", answer_parser=parse_gsm8k_answer)
    with pytest.raises(ValueError, match=r"p\.jsonl:1: no question field"):
        load_aime24(path=f)


def test_load_jsonl_problems(tmp_path):
    f = tmp_path / "mine.jsonl"
    rows = [{"q": "one?", "a": 1.50, "sol": "s1", "key": "k1"}, {"q": "two?", "a": "1,000"}]
    f.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    probs = load_jsonl_problems(f, question_key="q", answer_key="a", solution_key="sol",
                                id_key="key")
    assert probs[0] == Problem(id="mine/k1", question="one?", answer="1.5", solution="s1",
                               source="mine")
    assert probs[1] == Problem(id="mine/1", question="two?", answer="1000", solution=None,
                               source="mine")
    assert load_jsonl_problems(f, "q", "a", source="x", n=1)[0].id == "x/0"
    with pytest.raises(ValueError, match="question_key must be a non-empty str"):
        load_jsonl_problems(f, question_key="")
