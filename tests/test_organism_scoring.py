"""Ground-truth scoring of importance vectors against tiny-thinker's planted wrong steps."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from mechthink.models.organism import (
    GroundTruthHits,
    StepExample,
    context_spans,
    ground_truth_hits,
    held_out_examples,
)


pytestmark = pytest.mark.usefixtures("one_thread")

def _example(n: int = 12, operands=(3, 5), result=(7,), question=(1, 3)) -> StepExample:
    return StepExample(
        input_ids=list(range(n)), is_error=True, text="", step_index=0, question="q", answer=0, correct_result=8,
        written_result=9, next_token_in_data=None, step_operand_positions=list(operands), step_result_positions=list(result),
        question_span=question,
    )


def _imp(n: int, high: dict[int, float]) -> torch.Tensor:
    v = torch.zeros(n)
    for p, x in high.items():
        v[p] = x
    return v


def test_hits_by_hand():
    ex = _example()  # operands 3, 5; result 7; the step spans 3..7
    cases = [
        # top-3 = {3, 5, 7}: everything hits
        (_imp(12, {3: 3.0, 5: 2.0, 7: 1.0}), (True, True, True, True)),
        # BOS and the query position are never counted, however high; top-3 = {9, 10, 4}
        (_imp(12, {0: 9.0, 11: 9.0, 9: 3.0, 10: 2.0, 4: 1.0}), (False, False, False, False)),
        # top-1 = 4 (the operator, inside the step) but no operand/result in the top-3
        (_imp(12, {4: 3.0, 9: 2.0, 10: 1.0}), (False, False, False, True)),
        # the result in the top-3 but no operand; top-1 outside the step
        (_imp(12, {9: 3.0, 7: 2.0, 10: 1.0}), (True, True, False, False)),
    ]
    hits = ground_truth_hits([c[0] for c in cases], [ex] * len(cases), k=3)
    for i, (_, want) in enumerate(cases):
        got = (bool(hits.any[i]), bool(hits.result[i]), bool(hits.result_and_operand[i]), bool(hits.top1_in_step[i]))
        assert got == want, (i, got)
    assert hits.n == 4
    assert hits.fractions() == {
        "top3_contains_step_operand_or_result": 0.5,
        "top3_contains_step_result": 0.5,
        "top3_contains_step_result_and_an_operand": 0.25,
        "top1_within_wrong_step_span": 0.5,
    }
    one = ground_truth_hits([cases[2][0]], [ex], k=1)
    assert list(one.fractions())[0] == "top1_contains_step_operand_or_result" and not bool(one.any[0])
    assert len(hits.to_frame()) == 4 and hits.plot().axes
    assert json.loads(hits.to_json())["k"] == 3


def test_hits_pair_up_to_the_shorter_and_empty():
    ex = _example()
    hits = ground_truth_hits([_imp(12, {3: 1.0})], [ex, ex])
    assert hits.n == 1
    empty = ground_truth_hits([], [])
    assert isinstance(empty, GroundTruthHits) and empty.n == 0
    assert set(empty.fractions().values()) == {0.0}


def test_hits_bad_input():
    ex = _example()
    with pytest.raises(ValueError, match="length 5 for an example of 12"):
        ground_truth_hits([torch.zeros(5)], [ex])
    with pytest.raises(ValueError, match="step positions are None"):
        ground_truth_hits([torch.zeros(12)], [dataclasses.replace(ex, step_operand_positions=None)])
    with pytest.raises(ValueError, match="k=0"):
        ground_truth_hits([torch.zeros(12)], [ex], k=0)


def test_context_spans_and_real_examples():
    real = held_out_examples(4)
    qs, ts = context_spans(real)
    for ex, q, t in zip(real, qs, ts):
        assert q == tuple(ex.question_span) and t == (q[1], len(ex.input_ids) - 1)
    other = [dataclasses.replace(real[0], question_span=None)]
    assert context_spans(other) == ([(0, 1)], [(1, len(real[0].input_ids) - 1)])
    # the planted wrong step's own positions score as hits
    err = next(e for e in real if e.is_error)
    imp = _imp(len(err.input_ids), {p: 1.0 + i for i, p in enumerate(err.step_operand_positions + err.step_result_positions)})
    h = ground_truth_hits([imp], [err])
    assert bool(h.any[0]) and bool(h.result[0]) and bool(h.top1_in_step[0])
