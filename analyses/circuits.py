"""The circuit behind " Wait": edge attribution patching over heads and MLPs on minimal pairs.

Clean input: a prefix ending right after a wrongly written step; baseline: the same prefix with
the step corrected (a minimal pair of identical token length). Metric: the " Wait" logit at the
query position. Edges are scored by EAP (Syed, Rager & Conmy 2023) and EAP-IG (Hanna, Pezzelle &
Belinkov 2024), checked against exact edge patching (Spearman ρ on the first ``n_exact`` pairs),
pruned to top-k circuits whose faithfulness (only the circuit's edges clean) is traced against
their size; the smallest EAP-IG circuit keeping >= 80% is then ablated (its edges set to the
corrected step's values) to measure P(backtracking word) after the wrong step, against random
edge sets of the same size. Also: how much of their attention the circuit's heads put from the
query position onto the wrong step's tokens. Source: hannamw/EAP-IG (public repository).

    mechthink circuits [--model tiny-thinker] [--n-pairs 40]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mechthink.config import AnalysisConfig

NAME = "circuits"


@dataclass
class Config(AnalysisConfig):
    """Edge attribution patching at planted backtracking points (minimal pairs)."""

    n_pairs: int = 40
    """Minimal pairs (wrong step / corrected step) scored by EAP and EAP-IG."""
    n_exact: int = 8
    """Pairs also scored by exact edge patching (the reference for Spearman rho)."""
    ig_steps: int = 5
    """Interpolation steps of EAP-IG."""
    n_random: int = 20
    """Random edge sets of the circuit's size (the ablation control)."""
    target: str = " Wait"
    """The metric: this token's logit at the query position."""
    faithfulness_target: float = 0.8
    """The faithfulness the smallest reported circuit keeps."""

    ALLOW_ZERO = ("n_exact",)


def main(cfg: Config, loaded_model: Any = None) -> dict:
    import torch

    import mechthink as mt
    from mechthink import attribution, circuits, stats
    from mechthink.models.organism import BACKTRACK_WORDS, is_organism, minimal_pairs_for
    from mechthink.plotting.circuits import plot_circuits_overview
    from mechthink.report import write_outputs

    model = loaded_model if loaded_model is not None else mt.load_model(cfg.model)
    pairs = minimal_pairs_for(model, cfg.n_pairs)
    clean, base = [a.input_ids for a, _ in pairs], [b.input_ids for _, b in pairs]
    metric = attribution.logit_metric(-1, model.token_variants(cfg.target.strip())[cfg.target])
    graph = circuits.build_graph(model)
    scores = {m: circuits.edge_attribution(model, clean, metric, base, method=m, ig_steps=cfg.ig_steps, graph=graph)
              for m in circuits.EDGE_METHODS}
    rho: dict[str, Any] = {}
    if cfg.n_exact:
        sub = slice(0, cfg.n_exact)
        exact = circuits.edge_patching(model, clean[sub], metric, base[sub], graph=graph)
        top = exact.values().abs().argsort(descending=True)[:50]
        for m in circuits.EDGE_METHODS:
            est = circuits.edge_attribution(model, clean[sub], metric, base[sub], method=m, ig_steps=cfg.ig_steps, graph=graph)
            rho[m] = {"all_edges": stats.spearman(est.values(), exact.values()),
                      "top50_exact_edges": stats.spearman(est.values()[top], exact.values()[top])}
    n = graph.n_edges
    ks = sorted(set(range(1, min(n, 60) + 1)) | {round(n ** (i / 29)) for i in range(30)})
    curve = circuits.faithfulness(model, clean, metric, scores, base, ks=ks, target=cfg.faithfulness_target)
    size = curve.smallest("eap-ig") or n
    k_best = curve.k[curve.n_edges["eap-ig"].index(size)]
    circuit = circuits.prune(scores["eap-ig"], k=k_best)
    rand = [circuits.random_circuit(graph, circuit.n_edges, seed=s) for s in range(cfg.n_random)]
    masks = torch.stack([torch.zeros_like(graph.edges), circuit.edges, *rand])
    bt_ids = [model.token_variants(w.strip())[w] for w in BACKTRACK_WORDS if w in model.token_variants(w.strip())]
    p = circuits.token_probability(model, clean, masks, bt_ids, base, graph=graph)
    numbers: dict[str, Any] = {
        "n_pairs": len(pairs), "n_edges_graph": n, "metric_clean": curve.metric_clean, "metric_ablated": curve.metric_ablated,
        "spearman_vs_exact": rho, "n_exact_pairs": cfg.n_exact,
        "smallest_circuit_edges": {m: curve.smallest(m) for m in curve.faithfulness},
        "smallest_circuit_fraction": {m: (curve.smallest(m) or n) / n for m in curve.faithfulness},
        "faithfulness_curve": {"k": curve.k, "n_edges": curve.n_edges, "faithfulness": curve.faithfulness},
        "circuit_edges": circuit.labels, "circuit_heads": [f"L{L}H{h}" for L, h in circuit.heads],
        "p_backtrack_clean": float(p[:, 0].mean()), "p_backtrack_circuit_ablated": float(p[:, 1].mean()),
        "p_backtrack_random_ablated_mean": float(p[:, 2:].mean()) if cfg.n_random else None,
        "p_backtrack_random_ablated_per_set": p[:, 2:].mean(0).tolist(),
    }
    if is_organism(model) and circuit.heads:
        spans = [sorted(a.step_span()) for a, _ in pairs]
        mass = circuits.attention_mass(model, clean, circuit.heads, spans).mean(0)
        numbers["circuit_head_attention_on_wrong_step"] = dict(zip(numbers["circuit_heads"], mass.tolist()))
        numbers["circuit_heads_mostly_on_wrong_step"] = [h for h, v in zip(numbers["circuit_heads"], mass.tolist()) if v > 0.5]
    bars = {"clean": numbers["p_backtrack_clean"], "circuit": numbers["p_backtrack_circuit_ablated"]}
    if cfg.n_random:
        bars["random"] = numbers["p_backtrack_random_ablated_mean"]
    fig = plot_circuits_overview(curve, circuit, bars, model.spec.name, {"random": float(p[:, 2:].mean(0).std())} if cfg.n_random > 1 else None)
    write_outputs(cfg.out, NAME, cfg.model, fig, numbers, cfg, fingerprint=model.fingerprint())
    return numbers


if __name__ == "__main__":
    from mechthink.cli import run_analysis

    run_analysis(NAME)
