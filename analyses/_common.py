"""Shared helpers for the analysis scripts (examples in any model's chat format)."""

from __future__ import annotations

from typing import Any

THINK_MARK = "<think>\n"


def step_examples(model: Any, n: int, seed: int | None = None) -> list[dict]:
    """tiny-thinker's held-out step examples, re-rendered in ``model``'s own chat format.

    For tiny-thinker the examples are used as they are. For any other model the question and
    the thinking written so far (steps, the last one possibly wrong) are placed after
    ``model.prompt(question, thinking="on")``, so every model sees the same planted errors.
    Each dict has ``input_ids`` (list[int], ending right after the step's ".") and
    ``is_error``, plus the organism's ground truth fields.
    """
    from mechthink.models.organism import HELD_OUT_SEED, held_out_examples

    examples = held_out_examples(n, seed=HELD_OUT_SEED if seed is None else seed)
    if model.spec.name == "tiny-thinker":
        return examples
    out = []
    for ex in examples:
        thinking = ex["text"].split(THINK_MARK, 1)[1]
        ids = model.to_tokens(model.prompt(ex["question"], thinking="on") + thinking)[0].tolist()
        out.append({**ex, "input_ids": ids, "text": model.to_string(ids)})
    return out


def arg_parser(config_cls: type) -> Any:
    """An argparse parser generated from a Config dataclass (``--field value``)."""
    import argparse
    import dataclasses

    ap = argparse.ArgumentParser(description=config_cls.__doc__)
    for f in dataclasses.fields(config_cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        kind = type(default) if default is not None and not isinstance(default, bool) else str
        if isinstance(default, bool):
            ap.add_argument("--" + f.name.replace("_", "-"), action="store_true", default=default)
        else:
            ap.add_argument("--" + f.name.replace("_", "-"), type=kind, default=default)
    return ap


def organism_questions(n: int, seed: int) -> list[dict]:
    """Held-out tiny-thinker problems as ``{"id", "question", "answer"}`` dicts (a fixed seed)."""
    from mechthink.models.organism import sample_transcripts

    return [
        {"id": f"organism-{seed}-{i}", "question": tr.problem.question, "answer": str(tr.answer)}
        for i, tr in enumerate(sample_transcripts(n, seed=f"analysis-{seed}"))
    ]


def questions_for(model: Any, n: int, seed: int, gsm8k_path: str) -> list[dict]:
    """tiny-thinker: its own held-out problems; any other model: the first n GSM8K test items."""
    if model.spec.name == "tiny-thinker":
        return organism_questions(n, seed)
    from mechthink.data import load_gsm8k

    return [{"id": p.id, "question": p.question, "answer": p.answer} for p in load_gsm8k("test", path=gsm8k_path, n=n)]
