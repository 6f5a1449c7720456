"""Early exit at each answer-reaching instance (ARBOR #22, R1-Distill-Llama-8B / GSM8K).

Wherever the thinking has reached the gold answer (each occurrence, ending at the next
``. ? ! ; \\n``) force ``</think> The final answer is \\boxed{`` and read the gold's log-prob and
mean logit and the greedy-decoded answer. Aggregated by instance index (1st, 2nd, …): the seed
found the logit rising 14.75 → 27.61 while accuracy was ≈ 0.9 already at the first instance.

    mechthink early-exit [--model tiny-thinker] [--n-samples 40]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mechthink.config import ProblemConfig

NAME = "early_exit"


@dataclass
class Config(ProblemConfig):
    """Early-exit confidence and accuracy by answer instance."""

    n_samples: int = 100
    """Number of problems (one greedy trace each)."""
    seed: int = 11
    """Seed of the problem sample."""
    max_instances: int = 6
    """Answer instances reported (1st .. k-th)."""


def main(cfg: Config, loaded_model: Any = None) -> dict:
    import mechthink as mt
    from mechthink import confidence, traces
    from mechthink.models.organism import problems_for
    from mechthink.report import trace_store, write_outputs

    model = loaded_model if loaded_model is not None else mt.load_model(cfg.model)
    qs = problems_for(model, cfg.n_samples, cfg.seed, cfg.gsm8k_path)
    store = trace_store(cfg.out, NAME, cfg.model, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, gsm8k=cfg.gsm8k_path)
    gen = traces.generate(model, qs, max_new_tokens=cfg.max_new_tokens, batch_size=8, store=store, progress=True)
    results = [confidence.early_exit(model, tr, gold=q.answer) for tr, q in zip(gen, qs) if tr.think_start is not None]
    summary = confidence.early_exit_summary(results, max_instances=cfg.max_instances)
    numbers = summary.numbers()
    fig = summary.plot(model_name=model.spec.name)
    write_outputs(cfg.out, NAME, cfg.model, fig, numbers, cfg, fingerprint=model.fingerprint())
    return numbers


if __name__ == "__main__":
    from mechthink.cli import run_analysis

    run_analysis(NAME)
