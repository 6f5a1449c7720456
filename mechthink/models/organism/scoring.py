"""Scoring token-importance vectors against tiny-thinker's planted ground truth.

At a planted wrong step the organism backtracks because the written result disagrees with the
operands, so an attribution method that finds the mechanism should rank the wrong step's operand
and result tokens at the top (the step and its positions are recorded in :class:`StepExample`).
:func:`ground_truth_hits` counts, per example, whether the top-k tokens (BOS and the query
position excluded) contain them; :func:`context_spans` gives the question / thinking regions the
context bins use. Source: this repository (mechthink tiny-thinker).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mechthink.models.organism.tasks import StepExample
from mechthink.results import Result

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["GroundTruthHits", "context_spans", "ground_truth_hits"]


@dataclass
class GroundTruthHits(Result):
    """Per example, whether an importance vector's top tokens hit the wrong step.

    Attributes:
        k: How many top tokens were checked.
        any: The top-k contain one of the step's operands or its written result.
        result: The top-k contain a result position.
        result_and_operand: The top-k contain a result position and an operand.
        top1_in_step: The top-1 token lies inside the written step (first operand through the
            result, operator, ``=`` and spaces included).
    """

    k: int
    any: Bool[Tensor, "example"]
    result: Bool[Tensor, "example"]
    result_and_operand: Bool[Tensor, "example"]
    top1_in_step: Bool[Tensor, "example"]

    @property
    def n(self) -> int:
        """Number of examples scored."""
        return int(self.any.shape[0])

    def fractions(self) -> dict[str, float]:
        """The fraction of examples with each hit, keyed by a readable name (0.0 when empty)."""
        k = self.k
        counts = {
            f"top{k}_contains_step_operand_or_result": self.any,
            f"top{k}_contains_step_result": self.result,
            f"top{k}_contains_step_result_and_an_operand": self.result_and_operand,
            "top1_within_wrong_step_span": self.top1_in_step,
        }
        return {name: int(v.sum()) / max(1, self.n) for name, v in counts.items()}

    def to_frame(self) -> "pd.DataFrame":
        """One row per example with the four hit flags."""
        import pandas as pd

        return pd.DataFrame(
            {
                "example": range(self.n),
                "any": self.any.tolist(),
                "result": self.result.tolist(),
                "result_and_operand": self.result_and_operand.tolist(),
                "top1_in_step": self.top1_in_step.tolist(),
            }
        )

    def plot(self, ax: Any = None) -> Any:
        """Bars of :meth:`fractions`."""
        from mechthink.plotting.attribution import plot_hit_fractions

        return plot_hit_fractions({"": self}, ax=ax)


def _positions(ex: StepExample) -> tuple[set[int], set[int]]:
    if ex.step_operand_positions is None or ex.step_result_positions is None:
        raise ValueError(
            "examples: ground truth needs tiny-thinker's own StepExamples (step positions are None for "
            "examples re-rendered for another model)"
        )
    return set(ex.step_operand_positions), set(ex.step_result_positions)


def ground_truth_hits(
    importances: Sequence[Float[Tensor, "_pos"]], examples: Sequence[StepExample], k: int = 3
) -> GroundTruthHits:
    """Score importance vectors (higher = more important) against the wrong steps of ``examples``.

    Position 0 (BOS) and the last position (the query) are never counted. Pairs are taken in
    order up to the shorter of the two sequences.

    Args:
        importances: One ``[pos]`` vector per example (e.g. ``token_importance(sign=-1)``).
        examples: tiny-thinker :class:`StepExample` records (their step positions are needed).
        k: How many top tokens to check.
    """
    if k < 1:
        raise ValueError(f"k={k}; use an integer >= 1")
    flags: list[tuple[bool, bool, bool, bool]] = []
    for imp, ex in zip(importances, examples):
        if imp.shape[0] != len(ex.input_ids):
            raise ValueError(f"importances: a vector of length {imp.shape[0]} for an example of {len(ex.input_ids)} tokens")
        operands, result = _positions(ex)
        cand = imp.clone()
        cand[0] = cand[-1] = -float("inf")
        top = set(cand.topk(k).indices.tolist())
        step_span = set(range(min(operands | result), max(result) + 1))
        flags.append(
            (
                bool(top & (operands | result)),
                bool(top & result),
                bool(top & result) and bool(top & operands),
                int(cand.argmax()) in step_span,
            )
        )
    cols = torch.tensor(flags, dtype=torch.bool).reshape(len(flags), 4).T
    return GroundTruthHits(k=k, any=cols[0], result=cols[1], result_and_operand=cols[2], top1_in_step=cols[3])


def context_spans(examples: Sequence[StepExample]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Per example, the question span and the thinking span (up to the query position).

    tiny-thinker's examples have their question span; examples re-rendered for another model
    have none and get ``(0, 1)``, so the thinking bins then cover everything after the first
    token. The thinking span runs from the question's end to the last position (excluded).
    """
    questions = [tuple(ex.question_span) if ex.question_span is not None else (0, 1) for ex in examples]
    thinking = [(q[1], len(ex.input_ids) - 1) for q, ex in zip(questions, examples)]
    return [(int(a), int(b)) for a, b in questions], thinking


_STEP_CALC_RE = re.compile(r"(\d+) ([+-]) (\d+) = (\d+)\.$")


def answer_determining_step(question: str, step_texts: Sequence[str]) -> int | None:
    """The index of the step after which tiny-thinker's answer is determined, or None.

    In the generator (:mod:`mechthink.models.organism.tasks`) the answer is the correct result
    of the last operation; it is determined by the first step that writes that operation with
    its correct result (a wrongly written last step is followed by a backtracking word and the
    corrected step).

    >>> answer_determining_step("Compute 3 + 5 - 2.", ["3 + 5 = 8.", "8 - 2 = 7.", "Wait, 8 - 2 = 6."])
    2
    """
    m = re.fullmatch(r"Compute (.+)\.", question.strip())
    if m is None:
        raise ValueError(f"answer_determining_step: {question!r} is not a tiny-thinker question ('Compute a + b ...')")
    parts = m.group(1).split()
    operands, ops = [int(x) for x in parts[::2]], parts[1::2]
    totals = [operands[0]]
    for op, b in zip(ops, operands[1:]):
        totals.append(totals[-1] + b if op == "+" else totals[-1] - b)
    want = (totals[-2], ops[-1], operands[-1], totals[-1])
    for i, text in enumerate(step_texts):
        c = _STEP_CALC_RE.search(text)
        if c and (int(c.group(1)), c.group(2), int(c.group(3)), int(c.group(4))) == want:
            return i
    return None
