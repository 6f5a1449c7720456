"""Knowing when it knows: readiness probes and early exit without the gold answer.

At every step boundary the answer is forced; a boundary is *ready* when the forced answer
equals the model's final answer. Per-layer linear probes on the residual at the boundary
(cross-validated by problem) predict readiness (Zhang et al. 2025, arXiv:2504.05419); no-gold
early-exit policies (the probe, forced-answer confidence, the answer written k times, a
backtracking word after an answer, token budgets) are compared on held-out problems as a
Pareto curve; log p(final answer) through the logit and tuned lens, layer x step, aligned on
the probe's first firing. On tiny-thinker the answer-determining step is known.

    mechthink readiness [--model tiny-thinker] [--n-samples 120]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from mechthink.config import ProblemConfig, require

NAME = "readiness"


@dataclass
class Config(ProblemConfig):
    """Readiness probes, no-gold early-exit policies and the confidence trajectory."""

    NO_SHARD = (
        "its probes, tuned lens and policy settings are fitted on the first half of all problems and tested "
        "on the rest; run it unsharded"
    )

    n_samples: int = 120
    """Number of problems (one sampled trace each); the first half trains the probes, the tuned
    lens and picks each policy's setting, the second half is held out."""
    seed: int = 31
    """Seed of the problem sample, of sampling and of the folds."""
    max_new_tokens: int = 200
    """Generation budget per trace (tokens); raise it for real models (e.g. 2048)."""
    temperature: float = 1.0
    """Sampling temperature of the traces (1.0 = the organism's own distribution, with its
    planted errors and re-checks; 0 = greedy)."""
    suffix: str = "\nSo the answer is "
    """Answer-forcing text appended at each boundary; the default stays inside the thinking
    (the organism's own wrap-up); '' = the model's answer suffix (e.g. '\\n</think>\\n\\nThe final
    answer is \\boxed{')."""
    n_folds: int = 5
    """Cross-validation folds (split by problem) on the training half."""
    n_lens_steps: int = 60
    """Tuned-lens training steps on the training traces (0 = logit lens only)."""
    budgets: str = "8,16,24,32,48,64"
    """Thinking-token budgets of the budget-forcing policy (comma-separated)."""
    fire_threshold: float = 0.5
    """Probe P(ready) at which it 'fires' (for the first-firing agreement and the heatmap)."""
    max_loss: float = 0.01
    """Accuracy loss allowed when reporting tokens saved (0.01 = one point)."""

    ALLOW_ZERO: ClassVar[tuple[str, ...]] = ("n_lens_steps",)

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            ok = all(int(b) >= 0 for b in self.budgets.split(","))
        except ValueError:
            ok = False
        require(ok, "budgets", self.budgets, "use comma-separated non-negative integers such as '8,16,32'")
        require(self.temperature >= 0, "temperature", self.temperature, "use a number >= 0 (0 = greedy)")
        require(self.n_folds >= 2, "n_folds", self.n_folds, "use an integer >= 2")
        for name in ("fire_threshold", "max_loss"):
            require(0 <= getattr(self, name) <= 1, name, getattr(self, name), "use a number in [0, 1]")


def main(cfg: Config, loaded_model: Any = None) -> dict:
    import mechthink as mt
    from mechthink import readiness, traces
    from mechthink.lens import train_tuned_lens
    from mechthink.models.organism import is_organism, problems_for
    from mechthink.report import write_outputs

    model = loaded_model if loaded_model is not None else mt.load_model(cfg.model)
    qs = problems_for(model, cfg.n_samples, cfg.seed, cfg.gsm8k_path)
    gen = traces.generate(model, qs, max_new_tokens=cfg.max_new_tokens, batch_size=16,
                          temperature=cfg.temperature, seed=cfg.seed)
    usable = [t for t in gen if t.think_start is not None and traces.split_steps(t)]
    half = len(usable) // 2
    train, test = usable[:half], usable[half:]
    tuned = (train_tuned_lens(model, [t.ids for t in train], steps=cfg.n_lens_steps, seed=cfg.seed)
             if cfg.n_lens_steps else None)
    study = readiness.readiness_study(
        model, train, test, n_folds=cfg.n_folds, budgets=[int(b) for b in cfg.budgets.split(",")], tuned=tuned,
        fire_threshold=cfg.fire_threshold, max_loss=cfg.max_loss, seed=cfg.seed, ground_truth=is_organism(model),
        suffix=cfg.suffix or None,
    )
    numbers = {"n_traces": len(gen), "n_usable": len(usable), **study.numbers()}
    fig = study.plot(title=f"{model.spec.name}: knowing when it knows ({len(train)} train / {len(test)} held out)")
    write_outputs(cfg.out, NAME, cfg.model, fig, numbers, cfg, fingerprint=model.fingerprint())
    return numbers


if __name__ == "__main__":
    from mechthink.cli import run_analysis

    run_analysis(NAME)
