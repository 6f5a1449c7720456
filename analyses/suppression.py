"""Thinking-token suppression on traces that must backtrack (Qian et al. 2025).

Held-out problems whose thinking is prefilled up to a wrongly written step (so the model has to
backtrack to get the answer right) are continued greedily while the logits of " Wait", " Hmm",
" Alternatively" (all single-token spellings) are set to −inf — one word at a time and
cumulatively (1, 2, 3 kinds) — against two random control sets of the same size: uniform over
the vocabulary, and uniform over the tokens the model never produced unsuppressed (the analog
of Qian et al.'s random tokens from a 150k vocabulary, almost none of which a model ever
produces; in a 234-token vocabulary a uniform draw often hits digits and operators. Under
greedy decoding suppressing never-produced tokens cannot change the continuation, so that
control equals the unsuppressed run by construction — as a 150k-vocabulary random draw does in
practice). Reports final accuracy and how often any backtracking word still appears.

Greedy decoding hides a single word's role: when " Wait" is suppressed the argmax moves to the
next backtracking word. So " Wait" alone is also measured under sampling (temperature 1,
``n_seeds`` seeds per problem, the same per-row generator streams in every condition, i.e.
paired), against both random controls (``n_random_sampled`` draws on the first
``n_seeds_control`` seeds), with 95% bootstrap intervals over problems for the accuracy change.

    mechthink suppression [--model tiny-thinker] [--n-samples 100]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mechthink.config import AnalysisConfig

NAME = "suppression"


@dataclass
class Config(AnalysisConfig):
    """Accuracy under thinking-token suppression vs random suppression."""

    NO_SHARD = (
        "its 'never produced' random control is drawn from what the model wrote on all problems, which "
        "couples the shards; run it unsharded"
    )

    n_samples: int = 100
    """Problems prefilled up to a wrongly written step."""
    seed: int = 7
    """Seed of the held-out prefixes and of the random control sets."""
    max_new_tokens: int = 80
    """Continuation length after the prefilled wrong step."""
    n_random: int = 6
    """Random control sets drawn per size (greedy)."""
    n_seeds: int = 30
    """Sampling seeds per problem for " Wait" alone (paired across conditions)."""
    temperature: float = 1.0
    """Sampling temperature of the paired comparison."""
    n_random_sampled: int = 2
    """Random control sets under sampling."""
    n_seeds_control: int = 4
    """Seeds per problem for the sampled random controls (the first of n_seeds)."""


def main(cfg: Config, loaded_model: Any = None) -> dict:
    import torch

    import mechthink as mt
    from mechthink import interventions as iv
    from mechthink.models.organism import step_examples
    from mechthink.plotting.interventions import suppression_figure
    from mechthink.report import write_outputs

    torch.set_num_threads(1)
    model = loaded_model if loaded_model is not None else mt.load_model(cfg.model)
    evals = [e for e in step_examples(model, 4 * cfg.n_samples, seed=cfg.seed) if e.is_error][: cfg.n_samples]
    prefixes, golds = [e.input_ids for e in evals], [str(e.answer) for e in evals]
    sweep = iv.suppression_sweep(model, prefixes, golds, n_random=cfg.n_random, seed=cfg.seed,
                                 max_new_tokens=cfg.max_new_tokens)
    sampled = iv.sampled_suppression(
        model, prefixes, golds, sweep, n_seeds=cfg.n_seeds, n_seeds_control=cfg.n_seeds_control,
        n_draws=cfg.n_random_sampled, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
    )
    numbers = {"n_samples": len(prefixes), **sweep.summary(), "sampled": sampled.summary()}
    fig = suppression_figure(sweep, sampled)
    write_outputs(cfg.out, NAME, cfg.model, fig, numbers, cfg, fingerprint=model.fingerprint())
    return numbers


if __name__ == "__main__":
    from mechthink.cli import run_analysis

    run_analysis(NAME)
