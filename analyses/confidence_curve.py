"""Answer confidence during thinking, from a forked KV cache (repeng PR #69 / llm-moral-foundations2).

At evenly spaced points through each trace's thinking, fork the KV cache, append the model's
answer-forcing suffix (``\\n</think>\\n\\nThe final answer is \\boxed{``) and read log p of every
candidate answer (scored as whole token sequences closed by ``}``); the probability mass on all candidates is the
sanity monitor. One line per trace: log p(gold), with ``</think>`` marked.

    mechthink confidence-curve [--model tiny-thinker] [--n-samples 12]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mechthink.config import ProblemConfig

NAME = "confidence_curve"


@dataclass
class Config(ProblemConfig):
    """Confidence in the gold answer through the thinking."""

    n_samples: int = 16
    """Number of problems (one greedy trace each)."""
    seed: int = 7
    """Seed of the problem sample."""
    n_points: int = 16
    """Probe points, evenly spaced through each trace's thinking."""


def main(cfg: Config, loaded_model: Any = None) -> dict:
    import mechthink as mt
    from mechthink import confidence, traces
    from mechthink.models.organism import problems_for
    from mechthink.report import trace_store, write_outputs

    model = loaded_model if loaded_model is not None else mt.load_model(cfg.model)
    qs = problems_for(model, cfg.n_samples, cfg.seed, cfg.gsm8k_path)
    store = trace_store(cfg.out, NAME, cfg.model, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, gsm8k=cfg.gsm8k_path)
    gen = traces.generate(model, qs, max_new_tokens=cfg.max_new_tokens, batch_size=8, store=store, progress=True)
    curves = confidence.gold_confidence_curves(model, gen, [q.answer for q in qs], n_points=cfg.n_points)
    numbers = curves.numbers()
    fig = curves.plot(model_name=model.spec.name)
    write_outputs(cfg.out, NAME, cfg.model, fig, numbers, cfg, fingerprint=model.fingerprint())
    return numbers


if __name__ == "__main__":
    from mechthink.cli import run_analysis

    run_analysis(NAME)
