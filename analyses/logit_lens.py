"""Logit lens at backtracking points: where does " Wait" come from?

At positions right after a wrongly written step (the next token is a backtracking word in
tiny-thinker's data), follow the " Wait" logit through the accumulated residual stream
(nostalgebraist 2020), decompose the final logit into embed + attention + MLP direct
contributions, and compare a tuned lens (Belrose et al. 2023) with the plain one on held-out
positions. Source: the public repository wj210/cot_backtrack (logit lens of backtracking).

    mechthink logit-lens [--model tiny-thinker] [--n-samples 64]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mechthink.config import AnalysisConfig

NAME = "logit_lens"


@dataclass
class Config(AnalysisConfig):
    """Logit lens at backtracking points."""

    NO_SHARD = (
        "its tuned lens is trained on half of all examples (a shard would train another lens); run it unsharded"
    )

    n_samples: int = 200
    """Held-out step examples drawn (half of them wrong steps, which are analysed)."""
    target: str = " Wait"
    """The token followed through the layers (one token, spelled as the model writes it)."""
    top_k: int = 5
    """Top tokens kept per layer."""
    tuned_steps: int = 100
    """Training steps of a tuned lens on half of the examples (0: skip the tuned lens)."""

    ALLOW_ZERO = ("tuned_steps",)


def main(cfg: Config, loaded_model: Any = None) -> dict:
    import mechthink as mt
    from mechthink import lens
    from mechthink.models.organism import step_examples
    from mechthink.plotting.lens import plot_logit_lens_overview
    from mechthink.report import write_outputs

    model = loaded_model if loaded_model is not None else mt.load_model(cfg.model)
    examples = [e for e in step_examples(model, cfg.n_samples) if e.is_error]
    variants = model.token_variants(cfg.target)
    if cfg.target not in variants:
        raise ValueError(f"{cfg.target!r} is not a single token for {model.spec.name}")
    target_id = variants[cfg.target]
    seqs = [e.input_ids for e in examples]
    acc = lens.logit_lens(model, seqs, [target_id], mode="accumulated", top_k=cfg.top_k)
    dec = lens.logit_lens(model, seqs, [target_id], mode="decomposed", top_k=cfg.top_k)
    summary = lens.summarize_lens(model, acc, dec)
    numbers: dict[str, Any] = {
        "n_positions": summary.n_positions,
        "target": cfg.target,
        "p_target_final_mean": summary.p_target_final_mean,
        "top1_fraction_by_layer": dict(zip(summary.components, summary.top1_fraction.tolist())),
        "first_top1_component_counts": summary.first_top1_counts,
        "mean_dla_by_component": dict(zip(summary.dla_components, summary.mean_dla.tolist())),
        "top_dla_components": summary.top_dla_components,
        "dla_sum_identity_max_error": summary.dla_sum_error,
    }
    if cfg.tuned_steps > 0:
        tuned = lens.compare_tuned_lens(model, seqs, [target_id], steps=cfg.tuned_steps, lr=3e-3, batch_size=4)
        numbers["tuned_lens_heldout_kl_plain"] = tuned.kl_plain.tolist()
        numbers["tuned_lens_heldout_kl_tuned"] = tuned.kl_tuned.tolist()
        numbers["tuned_top1_fraction_by_layer"] = dict(zip(tuned.components, tuned.top1_fraction.tolist()))

    title = f"{model.spec.name}: logit lens and DLA to {cfg.target!r} after a wrong step (n={len(examples)})"
    fig = plot_logit_lens_overview(acc, dec, title)
    write_outputs(cfg.out, NAME, cfg.model, fig, numbers, cfg, fingerprint=model.fingerprint())
    return numbers

if __name__ == "__main__":
    from mechthink.cli import run_analysis

    run_analysis(NAME)
