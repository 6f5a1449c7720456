"""Logit lens at backtracking points: where does " Wait" come from? (ARBOR #22, logit lens).

At positions right after a wrongly written step (the next token is a backtracking word in
tiny-thinker's data), follow the " Wait" logit through the accumulated residual stream and
decompose the final logit into embed + attention + MLP direct contributions.

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
    from mechthink.plotting.lens import new_figure, plot_dla, plot_lens_heatmap
    from mechthink.report import write_outputs

    from mechthink.models.organism import step_examples

    model = loaded_model if loaded_model is not None else mt.load_model(cfg.model)
    examples = [e for e in step_examples(model, cfg.n_samples) if e.is_error]
    variants = model.token_variants(cfg.target)
    if cfg.target not in variants:
        raise ValueError(f"{cfg.target!r} is not a single token for {model.spec.name}")
    target_id = variants[cfg.target]
    seqs = [e.input_ids for e in examples]
    acc = lens.logit_lens(model, seqs, [target_id], mode="accumulated", top_k=cfg.top_k)
    dec = lens.logit_lens(model, seqs, [target_id], mode="decomposed", top_k=cfg.top_k)

    tuned_numbers: dict[str, Any] = {}
    if cfg.tuned_steps > 0:
        half = len(seqs) // 2
        tuned = lens.train_tuned_lens(model, seqs[:half], steps=cfg.tuned_steps, lr=3e-3, batch_size=4)
        tl = lens.logit_lens(model, seqs[half:], [target_id], mode="accumulated", tuned=tuned)
        tuned_numbers = {
            "tuned_lens_heldout_kl_plain": lens.tuned_lens_kl(model, None, seqs[half:]).tolist(),
            "tuned_lens_heldout_kl_tuned": lens.tuned_lens_kl(model, tuned, seqs[half:]).tolist(),
            "tuned_top1_fraction_by_layer": dict(zip(tl.components, (tl.target_ranks[:, :, 0] == 0).float().mean(0).tolist())),
        }

    top1_frac = (acc.target_ranks[:, :, 0] == 0).float().mean(0)  # per component
    first = acc.first_top1_component(0)
    mean_dla = dec.target_logits[:, :, 0].mean(0)
    order = mean_dla.argsort(descending=True)
    numbers = {
        "n_positions": len(examples),
        "target": cfg.target,
        "p_target_final_mean": float(acc.target_probs[:, -1, 0].mean()),
        "top1_fraction_by_layer": dict(zip(acc.components, top1_frac.tolist())),
        "first_top1_component_counts": {str(k): first.count(k) for k in sorted(set(first), key=str)},
        "mean_dla_by_component": dict(zip(dec.components, mean_dla.tolist())),
        "top_dla_components": [dec.components[i] for i in order[:5].tolist()],
        "dla_sum_identity_max_error": float(lens.sum_check(dec, model).abs().max()),
        **tuned_numbers,
    }

    fig = new_figure(13, 7.5)
    axes = fig.subplots(3, 1, height_ratios=[1.0, 1.6, 2.0])
    plot_lens_heatmap(acc, row=0, ax=axes[0])
    plot_lens_heatmap(dec, row=0, ax=axes[1])
    plot_dla(dec, ax=axes[2])
    fig.suptitle(f"{model.spec.name}: logit lens and DLA to {cfg.target!r} after a wrong step (n={len(examples)})")
    write_outputs(cfg.out, NAME, cfg.model, fig, numbers, cfg, fingerprint=model.fingerprint())
    return numbers


if __name__ == "__main__":
    from mechthink.cli import run_analysis

    run_analysis(NAME)
