"""Thought anchors: which sentences of a reasoning trace matter, every method on the same traces.

Bogdan, Macar, Nanda & Conmy 2025 ("Thought Anchors", arXiv:2506.19143; code:
github.com/interp-reasoning/thought-anchors): counterfactual resampling importance (rollouts
from forks of one prefill of each trace), attention suppression (a sentence x sentence
dependency matrix), receiver heads (kurtosis of sentence-level vertical attention), plus
attribution patching and MI (Qian et al. 2025) aggregated per sentence; their agreement
(Spearman matrix, top-k overlaps). On tiny-thinker the traces are held-out transcripts with
planted errors and the generator's ground truth checks the methods: (a) suppressing a wrong
step should change its "Wait" sentence most, (b) resampling importance should separate the
sentences whose result feeds the final answer, (c) the rule-based taxonomy should match the
generator's labels; adaptive stopping is replayed on the full runs (same seeds).

    mechthink thought-anchors [--model tiny-thinker] [--n-samples 10]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mechthink.config import ProblemConfig, require

NAME = "thought_anchors"


@dataclass
class Config(ProblemConfig):
    """Sentence importance by resampling, attention suppression, receiver heads, AtP and MI."""

    NO_SHARD = (
        "its AtP baseline is the mean activation over all traces and its receiver heads are picked "
        "by kurtosis over all traces, so every trace's scores depend on the others; run it unsharded"
    )

    n_samples: int = 10
    """Traces every method runs on."""
    n_check_traces: int = 60
    """More tiny-thinker transcripts for the cheap ground-truth checks (taxonomy and suppression; 0 = none)."""
    n_rollouts: int = 100
    """Rollouts per prefix (before each sentence and after the last); the paper's 100."""
    batch_size: int = 100
    """Rollouts decoded together on one fork of the prefix."""
    rollout_tokens: int = 160
    """Budget per rollout (rollouts cut off before an answer count as none)."""
    temperature: float = 1.5
    """Sampling temperature of the rollouts (the paper: 0.6 on R1 models, where every importance on
    tiny-thinker is 0). 1.5, not tiny-thinker's own 1.0: resampling_kl's AUROC for the
    answer-determining sentences, 10 traces x 64 rollouts at seeds 0-3, is 0.90 / 0.87 / 0.86 /
    0.84 at 1.5, 0.83 / 0.73 / 0.78 / 0.81 at 1.0 and 0.78 (seed 0) at 2.0: at 1.0 the organism
    redoes almost every step right, so importances are mostly the trace of a stray answer."""
    top_p: float = 1.0
    """Nucleus threshold of the rollouts (the paper: 0.95)."""
    tolerance: float = 0.07
    """Adaptive stopping (replayed on the full runs): interval half-width at which a sentence is settled."""
    min_rollouts: int = 16
    """Adaptive stopping: rollouts per prefix in the first round."""
    round_size: int = 16
    """Adaptive stopping: rollouts added per prefix in each later round."""
    top_k_heads: int = 4
    """Receiver heads kept (the paper: 20 of a 14B model's 1,920 heads)."""
    proximity_ignore: int = 2
    """Sentences closer than this do not count towards a vertical attention score (the paper: 4)."""
    top_k: int = 2
    """Size of the top-sentence sets whose overlaps are reported."""

    ALLOW_ZERO = ("n_check_traces",)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.temperature > 0, "temperature", self.temperature, "use a temperature > 0 (rollouts are sampled)")
        require(0 < self.top_p <= 1, "top_p", self.top_p, "use a nucleus threshold in (0, 1]")
        require(self.tolerance > 0, "tolerance", self.tolerance, "use an interval half-width > 0")


def main(cfg: Config, loaded_model: Any = None) -> dict:
    import torch

    import mechthink as mt
    from mechthink import anchors
    from mechthink.models.organism import is_organism
    from mechthink.plotting.anchors import anchors_figure
    from mechthink.report import write_outputs

    torch.set_num_threads(1)
    model = loaded_model if loaded_model is not None else mt.load_model(cfg.model)
    items = anchors.anchor_traces(model, cfg.n_samples, cfg.seed, cfg.max_new_tokens, cfg.gsm8k_path)
    adaptive = anchors.AdaptiveStopping(cfg.tolerance, cfg.min_rollouts, cfg.round_size)
    sampling = {"n_rollouts": cfg.n_rollouts, "batch_size": cfg.batch_size, "max_new_tokens": cfg.rollout_tokens,
                "temperature": cfg.temperature, "top_p": cfg.top_p, "seed": cfg.seed}
    report = anchors.every_method(model, items, sampling, cfg.top_k_heads, cfg.proximity_ignore, cfg.top_k)
    numbers: dict[str, Any] = report.summary()
    if is_organism(model):
        numbers["organism_checks"] = anchors.organism_checks(items, report.suppression, report.resampling, adaptive)
        more = anchors.anchor_traces(model, cfg.n_check_traces, cfg.seed + 1) if cfg.n_check_traces else []
        if more:
            supp = [anchors.suppression_matrix(model, it.trace, it.sentences) for it in more]
            numbers["organism_checks_more_traces"] = anchors.organism_checks(more, supp)
    fig = anchors_figure(report, example=report.example())
    fig.suptitle(f"{model.spec.name}: thought anchors, every method on {len(items)} traces")
    write_outputs(cfg.out, NAME, cfg.model, fig, numbers, cfg, fingerprint=model.fingerprint())
    return numbers


if __name__ == "__main__":
    from mechthink.cli import run_analysis

    run_analysis(NAME)
