"""The circuit behind " Wait": edge attribution patching over heads and MLPs on minimal pairs.

Clean input: a prefix ending right after a wrongly written step; baseline: the same prefix with
the step corrected (a minimal pair of identical token length). Metric: the " Wait" logit at the
query position. Edges are scored by EAP (Syed, Rager & Conmy 2023), by EAP-IG (Hanna, Pezzelle &
Belinkov 2024) with the token embeddings, each receiver's input or each sender's output
interpolated, and by EAP with the AtP* QK-fix (Kramár et al. 2024; exact along the query position's
own stream), checked against exact edge patching (Spearman ρ on the first ``n_exact`` pairs with a
bootstrap interval over those pairs, over all edges and over the edges with a non-negligible exact
effect), pruned to top-k circuits whose faithfulness (only the circuit's edges clean) is traced
against their size; the smallest circuit of ``circuit_method`` keeping >= 80% is then ablated (its
edges set to the corrected step's values) to measure P(backtracking word) after the wrong step,
against random edge sets of the same size, and written as an interactive HTML view (a head's
attention from the query position on hover). Also: how much of their attention the circuit's heads
put from the query position onto the wrong step's tokens. Source: hannamw/EAP-IG (public repository).

    mechthink circuits [--model tiny-thinker] [--n-samples 40]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mechthink.config import AnalysisConfig

NAME = "circuits"


@dataclass
class Config(AnalysisConfig):
    """Edge attribution patching at planted backtracking points (minimal pairs)."""

    n_samples: int = 40
    """Minimal pairs (wrong step / corrected step) scored by every method (``--n-samples`` of reproduce sets it)."""
    n_exact: int = 8
    """Pairs also scored by exact edge patching (the reference for Spearman rho, bootstrapped over these pairs)."""
    methods: str = "eap,eap-ig,eap-ig-inputs,eap-ig-outputs,eap-qkfix"
    """Edge scoring methods compared (comma-separated; eap-ig-inputs costs receivers x ig_steps rows per pair)."""
    circuit_method: str = "eap-qkfix"
    """The method whose smallest faithful circuit is ablated, drawn and written as HTML (one of methods)."""
    ig_steps: int = 5
    """Interpolation steps of the EAP-IG variants."""
    n_random: int = 20
    """Random edge sets of the circuit's size (the ablation control)."""
    target: str = " Wait"
    """The metric: this token's logit at the query position."""
    faithfulness_target: float = 0.8
    """The faithfulness the smallest reported circuit keeps."""

    ALLOW_ZERO = ("n_exact",)
    NO_SHARD = (
        "its circuit is pruned from edge scores averaged over all pairs and its faithfulness curve and "
        "ablation use that one circuit, so a shard's numbers depend on the other shards' pairs; run it unsharded"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        from mechthink.circuits import EDGE_METHODS
        from mechthink.config import require

        names = self.methods.split(",")
        require(bool(names) and all(m in EDGE_METHODS for m in names) and len(set(names)) == len(names), "methods",
                self.methods, f"use distinct comma-separated methods of {','.join(EDGE_METHODS)}")
        require(self.circuit_method in names, "circuit_method", self.circuit_method, f"use one of methods ({self.methods})")


def main(cfg: Config, loaded_model: Any = None) -> dict:
    import torch

    import mechthink as mt
    from mechthink import attribution, circuits
    from mechthink.models.organism import BACKTRACK_WORDS, is_organism, minimal_pairs_for
    from mechthink.plotting.circuits import METHOD_NAMES, plot_circuits_overview
    from mechthink.report import output_paths, write_outputs

    model = loaded_model if loaded_model is not None else mt.load_model(cfg.model)
    pairs = minimal_pairs_for(model, cfg.n_samples)
    clean, base = [a.input_ids for a, _ in pairs], [b.input_ids for _, b in pairs]
    metric = attribution.logit_metric(-1, model.token_variants(cfg.target.strip())[cfg.target])
    graph = circuits.build_graph(model)
    methods = cfg.methods.split(",")
    n_ex = min(cfg.n_exact, len(pairs))

    def score(m: str, sub: slice) -> circuits.EdgeScores:
        return circuits.edge_attribution(model, clean[sub], metric, base[sub], method=m, ig_steps=cfg.ig_steps, graph=graph)

    # the first n_exact pairs one by one (their per-pair scores give rho's bootstrap interval), the rest at once
    per_pair = {m: [score(m, slice(i, i + 1)) for i in range(n_ex)] for m in methods}
    rest = {m: [score(m, slice(n_ex, None))] if len(pairs) > n_ex else [] for m in methods}
    scores = {m: circuits.mean_scores(per_pair[m] + rest[m]) for m in methods}
    rho: dict[str, Any] = {}
    if n_ex:
        exact = [circuits.edge_patching(model, clean[i], metric, base[i], graph=graph) for i in range(n_ex)]
        for m in methods:
            r = circuits.rank_agreement(per_pair[m], exact)
            rho[m] = {"all_edges": r.rho, "all_edges_ci95": list(r.ci), "large_edges": r.rho_large,
                      "large_edges_ci95": list(r.ci_large), "n_large_edges": r.n_large, "large_edges_min_fraction": r.min_fraction}
    n = graph.n_edges
    # every size up to 60 edges on a small graph; on a large one (SmolLM2: ~10^4 edges) the first 10
    # and geometric steps, so the curve costs ~40 ablated forwards per method and pair
    ks = sorted(set(range(1, min(n, 60 if n <= 2000 else 10) + 1)) | {round(n ** (i / 29)) for i in range(30)})
    curve = circuits.faithfulness(model, clean, metric, scores, base, ks=ks, target=cfg.faithfulness_target)
    size = curve.smallest(cfg.circuit_method) or n
    k_best = curve.k[curve.n_edges[cfg.circuit_method].index(size)]
    circuit = circuits.prune(scores[cfg.circuit_method], k=k_best)
    rand = [circuits.random_circuit(graph, circuit.n_edges, seed=s) for s in range(cfg.n_random)]
    masks = torch.stack([torch.zeros_like(graph.edges), circuit.edges, *rand])
    bt_ids = [model.token_variants(w.strip())[w] for w in BACKTRACK_WORDS if w in model.token_variants(w.strip())]
    p = circuits.token_probability(model, clean, masks, bt_ids, base, graph=graph)
    numbers: dict[str, Any] = {
        "n_pairs": len(pairs), "n_edges_graph": n, "metric_clean": curve.metric_clean, "metric_ablated": curve.metric_ablated,
        "spearman_vs_exact": rho, "n_exact_pairs": n_ex, "circuit_method": cfg.circuit_method,
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
    html = output_paths(cfg.out, NAME, cfg.model)[0].with_suffix(".html")
    title = (f"{model.spec.name}: the {METHOD_NAMES.get(cfg.circuit_method, cfg.circuit_method)} circuit behind "
             f"{cfg.target!r} ({circuit.n_edges} edges); attention shown on the first minimal pair")
    circuit.to_html(html, model.to_str_tokens(clean[0]), circuits.query_attention(model, clean[0]), title=title)
    numbers["html_view"] = html.name
    fig = plot_circuits_overview(curve, circuit, bars, model.spec.name, {"random": float(p[:, 2:].mean(0).std())} if cfg.n_random > 1 else None)
    write_outputs(cfg.out, NAME, cfg.model, fig, numbers, cfg, fingerprint=model.fingerprint())
    return numbers


if __name__ == "__main__":
    from mechthink.cli import run_analysis

    run_analysis(NAME)
