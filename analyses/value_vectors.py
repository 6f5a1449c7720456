"""MLP value vectors that promote " Wait": probes, neuron search, ablation.

Per-layer linear probes on ``resid_post`` separate positions right after a wrong step (the model
backtracks next) from positions right after a correct step (it goes on); the value vectors
(rows of W_out projected through W_U) that most promote " Wait" are listed with their top
tokens and their cosine with the probe direction (Geva et al. 2022); ablating the top ones by
z-score and by direct logit attribution (zeroing ``mlp.hook_post``) is compared with ablating
as many random neurons. Source: the public repository wj210/cot_backtrack (value vectors of
backtracking).

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

    NO_SHARD = (
        "its probes are trained with cross-validation over all examples (a shard would train other probes); "
        "run it unsharded"
    )

    n_samples: int = 200
    """Held-out step examples (half wrong steps); probes are trained on all of them."""
    target: str = "Wait"
    """The word whose value vectors are searched (all its single-token spellings)."""
    n_ablate: int = 10
    """Neurons ablated per set (top by z-score, top by DLA, random)."""


def main(cfg: Config, loaded_model: Any = None) -> dict:
    import mechthink as mt
    from mechthink import value_vectors as vv
    from mechthink.models.organism import step_examples
    from mechthink.plotting.value_vectors import plot_value_vector_overview
    from mechthink.report import write_outputs

    model = loaded_model if loaded_model is not None else mt.load_model(cfg.model)
    examples = step_examples(model, cfg.n_samples)
    pairs = [(e.input_ids, e.query_position) for e in examples]
    labels = [int(e.is_error) for e in examples]
    acts = vv.collect_activations(model, pairs, hook="hook_resid_post")
    probe = vv.layer_probes(acts, labels, label_names=("continue", "backtrack"), seed=cfg.seed)
    best_layer = int(probe.layers[int(probe.accuracy.argmax())])

    hits = vv.search_neurons(model, [cfg.target], k=cfg.n_ablate, score="zscore")
    hit_records = hits.to_frame(model, k=6).to_dict(orient="records")
    by_probe = vv.rank_by_probe(model, probe, layer=best_layer, k=5)
    errors = [p for p, y in zip(pairs, labels) if y == 1]
    # the neurons that actually write the target at these positions (act x value-vector logit)
    dla = vv.neuron_dla(model, errors, [cfg.target], k=cfg.n_ablate)
    plans = {
        "zscore": hits.plan(),
        "dla": vv.neuron_plan(dla["layer"].tolist(), dla["neuron"].tolist()),
        "random": vv.random_plan(model, hits.layers, seed=cfg.seed),
    }
    ablations = vv.compare_ablations(model, errors, plans, [cfg.target])
    p = ablations.mean_prob()

    numbers = {
        "n_examples": len(examples),
        "probe_cv_accuracy_by_layer": dict(zip(probe.layers, probe.accuracy.tolist())),
        "best_probe_layer": best_layer,
        "top_value_vectors": hit_records,
        "value_vectors_by_probe_cosine": by_probe.to_dict(orient="records"),
        "p_target_clean_mean": p["clean"],
        "p_target_ablated_top_mean": p["zscore"],
        "p_target_ablated_random_mean": p["random"],
        "p_target_ablated_top_dla_mean": p["dla"],
        "top_dla_neurons": dla.to_dict(orient="records"),
        "ablated_neurons": plans["zscore"],
        "ablated_neurons_by_dla": plans["dla"],
    }
    n = cfg.n_ablate
    bar_labels = {"zscore": f"top-{n}\nby z-score", "dla": f"top-{n}\nby DLA", "random": f"random {n}"}
    fig = plot_value_vector_overview(probe, ablations, hit_records, cfg.target, model.spec.name, labels=bar_labels)
    write_outputs(cfg.out, NAME, cfg.model, fig, numbers, cfg, fingerprint=model.fingerprint())
    return numbers

if __name__ == "__main__":
    from mechthink.cli import run_analysis

    run_analysis(NAME)
