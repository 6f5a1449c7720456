"""MLP value vectors that promote " Wait": probes, neuron search, ablation (ARBOR #22).

Per-layer linear probes on ``resid_post`` separate positions right after a wrong step (the model
backtracks next) from positions right after a correct step (it goes on); the value vectors
(rows of W_out projected through W_U) that most promote " Wait" are listed with their top
tokens and their cosine with the probe direction; ablating the top ones (zeroing
``mlp.hook_post``) is compared with ablating as many random neurons.

    mechthink value-vectors [--model tiny-thinker] [--n-samples 64]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mechthink.config import AnalysisConfig

NAME = "value_vectors"


@dataclass
class Config(AnalysisConfig):
    """Value vectors, probes and ablation for the backtracking word."""

    n_samples: int = 200
    """Held-out step examples (half wrong steps); probes are trained on all of them."""
    target: str = "Wait"
    """The word whose value vectors are searched (all its single-token spellings)."""
    n_ablate: int = 10
    """Neurons ablated per set (top by z-score, top by DLA, random)."""


def main(cfg: Config, loaded_model: Any = None) -> dict:
    import torch

    import mechthink as mt
    from mechthink import value_vectors as vv
    from mechthink.plotting.lens import new_figure, plot_probe_accuracy
    from mechthink.report import write_outputs

    from mechthink.models.organism import step_examples

    model = loaded_model if loaded_model is not None else mt.load_model(cfg.model)
    examples = step_examples(model, cfg.n_samples)
    pairs = [(e.input_ids, e.query_position) for e in examples]
    labels = [int(e.is_error) for e in examples]
    acts = vv.collect_activations(model, pairs, hook="hook_resid_post")
    probe = vv.layer_probes(acts, labels, label_names=("continue", "backtrack"), seed=cfg.seed)
    best_layer = int(probe.layers[int(probe.accuracy.argmax())])

    hits = vv.search_neurons(model, [cfg.target], k=cfg.n_ablate, score="zscore")
    hit_frame = hits.to_frame(model, k=6)
    by_probe = vv.rank_by_probe(model, probe, layer=best_layer, k=5)

    errors = [p for p, y in zip(pairs, labels) if y == 1]
    plan: dict[int, list[int]] = {}
    for L, n in zip(hits.layers.tolist(), hits.neurons.tolist()):
        plan.setdefault(L, []).append(n)
    effect = vv.ablation_effect(model, errors, plan, [cfg.target])
    g = torch.Generator().manual_seed(cfg.seed)
    d_mlp = model.bridge.blocks[0].mlp.W_out.shape[0]
    rand_plan: dict[int, list[int]] = {}
    for L in hits.layers.tolist():
        rand_plan.setdefault(L, []).append(int(torch.randint(d_mlp, (1,), generator=g)))
    control = vv.ablation_effect(model, errors, rand_plan, [cfg.target])
    # the neurons that actually write the target at these positions (act x value-vector logit)
    dla = vv.neuron_dla(model, errors, [cfg.target], k=cfg.n_ablate)
    dla_plan: dict[int, list[int]] = {}
    for L, n in zip(dla["layer"].tolist(), dla["neuron"].tolist()):
        dla_plan.setdefault(int(L), []).append(int(n))
    by_dla = vv.ablation_effect(model, errors, dla_plan, [cfg.target])

    numbers = {
        "n_examples": len(examples),
        "probe_cv_accuracy_by_layer": dict(zip(probe.layers, probe.accuracy.tolist())),
        "best_probe_layer": best_layer,
        "top_value_vectors": hit_frame.to_dict(orient="records"),
        "value_vectors_by_probe_cosine": by_probe.to_dict(orient="records"),
        "p_target_clean_mean": float(effect.prob_clean.mean()),
        "p_target_ablated_top_mean": float(effect.prob_ablated.mean()),
        "p_target_ablated_random_mean": float(control.prob_ablated.mean()),
        "p_target_ablated_top_dla_mean": float(by_dla.prob_ablated.mean()),
        "top_dla_neurons": dla.to_dict(orient="records"),
        "ablated_neurons": plan,
        "ablated_neurons_by_dla": dla_plan,
    }

    fig = new_figure(13, 7.5)
    top_ax, bottom = fig.subfigures(2, 1, height_ratios=[1, 1.1])
    a1, a2 = top_ax.subplots(1, 2, width_ratios=[1.4, 1])
    plot_probe_accuracy(probe, ax=a1)
    a2.bar(["clean", f"top-{cfg.n_ablate}\nby z-score", f"top-{cfg.n_ablate}\nby DLA", f"random {cfg.n_ablate}"],
           [numbers["p_target_clean_mean"], numbers["p_target_ablated_top_mean"], numbers["p_target_ablated_top_dla_mean"], numbers["p_target_ablated_random_mean"]],
           color=["grey", "tab:red", "tab:orange", "tab:blue"])
    a2.set_ylabel(f"P({cfg.target!r} variants) after a wrong step")
    a2.set_title("ablating value vectors")
    tab_ax = bottom.subplots(1, 1)
    tab_ax.axis("off")
    rows = [[int(r["layer"]), int(r["neuron"]), f"{r['score']:.1f}", " ".join(repr(t) for t in r["top_tokens"])] for r in numbers["top_value_vectors"]]
    table = tab_ax.table(cellText=rows, colLabels=["layer", "neuron", "z-score", "top tokens of the value vector"], loc="center", cellLoc="left", colWidths=[0.07, 0.08, 0.08, 0.77])
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    tab_ax.set_title(f"value vectors promoting {cfg.target!r} (all variants), by z-score over the vocabulary")
    fig.suptitle(f"{model.spec.name}: MLP value vectors and the backtracking decision")
    write_outputs(cfg.out, NAME, cfg.model, fig, numbers, cfg, fingerprint=model.fingerprint())
    return numbers


if __name__ == "__main__":
    from mechthink.cli import run_analysis

    run_analysis(NAME)
