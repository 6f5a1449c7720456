"""tiny-thinker's problems and planted-error prefixes, for any model.

The analyses run the same problems on every model: tiny-thinker's held-out arithmetic (where
the ground truth is known) re-rendered in the model's own chat format, or GSM8K for questions
a real model answers. Source: this repository (mechthink tiny-thinker).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from mechthink.data import Problem
from mechthink.models.organism.tasks import HELD_OUT_SEED, StepExample, held_out_examples, minimal_pairs, sample_transcripts

if TYPE_CHECKING:
    from mechthink.models.thinking_model import ThinkingModel

__all__ = ["is_organism", "minimal_pairs_for", "organism_problems", "problems_for", "step_examples"]

_THINK_MARK = "<think>\n"


def is_organism(model: "ThinkingModel") -> bool:
    """Whether ``model`` is tiny-thinker (its ground truth applies token for token)."""
    return model.spec.source == "organism"


def step_examples(model: "ThinkingModel", n: int, seed: int | None = None) -> list[StepExample]:
    """tiny-thinker's held-out step examples, in ``model``'s own chat format.

    For tiny-thinker the examples are used as they are. For any other model the question and
    the thinking written so far (steps, the last one possibly wrong) are placed after
    ``model.prompt(question, thinking="on")``, so every model sees the same planted errors; the
    token-position fields (tiny-thinker's) are then ``None``.
    """
    examples = held_out_examples(n, seed=HELD_OUT_SEED if seed is None else seed)
    if is_organism(model):
        return examples
    return [_rerender(model, ex) for ex in examples]


def _rerender(model: "ThinkingModel", ex: StepExample) -> StepExample:
    """A tiny-thinker example in another model's chat format (position fields dropped)."""
    thinking = ex.text.split(_THINK_MARK, 1)[1]
    ids = model.to_tokens(model.prompt(ex.question, thinking="on") + thinking)[0].tolist()
    return dataclasses.replace(
        ex, input_ids=ids, text=model.to_string(ids), next_token_in_data=None, step_operand_positions=None,
        step_lhs_positions=None, step_rhs_positions=None, step_result_positions=None, period_position=None,
        question_span=None,
    )


def minimal_pairs_for(model: "ThinkingModel", n: int, seed: int | None = None) -> list[tuple[StepExample, StepExample]]:
    """:func:`~mechthink.models.organism.tasks.minimal_pairs` in ``model``'s own chat format.

    For tiny-thinker the pairs are used as they are; for any other model both members are
    re-rendered and only pairs that still have the same token length are kept (up to ``n``).
    """
    pairs = minimal_pairs(n, seed=HELD_OUT_SEED if seed is None else seed)
    if is_organism(model):
        return pairs
    out = [(_rerender(model, a), _rerender(model, b)) for a, b in minimal_pairs(2 * n, seed=HELD_OUT_SEED if seed is None else seed)]
    return [(a, b) for a, b in out if len(a.input_ids) == len(b.input_ids)][:n]


def organism_problems(n: int, seed: int) -> list[Problem]:
    """``n`` held-out tiny-thinker problems (a fixed stream per seed)."""
    return [
        Problem(id=f"organism-{seed}-{i}", question=tr.problem.question, answer=str(tr.answer), solution=None,
                source="tiny-thinker")
        for i, tr in enumerate(sample_transcripts(n, seed=f"analysis-{seed}"))
    ]


def problems_for(model: "ThinkingModel", n: int, seed: int, gsm8k_path: str | Path | None = None) -> list[Problem]:
    """tiny-thinker: its own held-out problems; any other model: the first ``n`` GSM8K test items."""
    if is_organism(model):
        return organism_problems(n, seed)
    from mechthink.data import load_gsm8k, resolve_gsm8k_path

    return load_gsm8k("test", path=resolve_gsm8k_path(gsm8k_path), n=n)
