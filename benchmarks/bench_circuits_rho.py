"""Agreement of EAP and the EAP-IG variants with exact edge patching on tiny-thinker's minimal pairs.

    python benchmarks/bench_circuits_rho.py [n_pairs] [ig_steps] [save.pt]

For each pair every edge is scored by each estimator and by exact edge patching; printed:
Spearman ρ of the pair-averaged scores over all edges, with a 95% percentile bootstrap interval
over pairs (pairs resampled, scores re-averaged, ρ recomputed), and the same restricted to the
edges whose exact |score| is at least 1% of the largest (most edges have ~0 effect), plus the
seconds per pair of each estimator. One thread. ``save.pt``: the per-pair scores (torch.save).
"""

from __future__ import annotations

import sys
import time

import torch

import mechthink as mt
from mechthink import attribution, circuits
from mechthink.models.organism import minimal_pairs_for


def _layer_groups(graph: circuits.EdgeGraph) -> torch.Tensor:
    """Receiver inputs interpolated a layer at a time (attention inputs, then the MLP): a cheaper grouping."""
    cols = [graph.receiver_slice(L, "q").start for L in range(graph.n_layers)]
    spans = [range(c, graph.receiver_slice(L, "v").stop) for L, c in enumerate(cols)]
    spans += [range(graph.receiver_slice(L, "mlp").start, graph.receiver_slice(L, "mlp").stop) for L in range(graph.n_layers)]
    spans.append(range(graph.logits_receiver, graph.logits_receiver + 1))
    out = []
    for sp in spans:
        sel = torch.zeros(len(graph.receivers), dtype=torch.bool)
        sel[list(sp)] = True
        out.append(graph.edges & sel[None, :])
    return torch.stack(out)


def main(n: int = 16, steps: int = 5, save: str | None = None) -> None:
    torch.set_num_threads(1)
    model = mt.load_model("tiny-thinker")
    pairs = minimal_pairs_for(model, n)
    metric = attribution.logit_metric(-1, model.token_variants("Wait")[" Wait"])
    graph = circuits.build_graph(model)
    names = [*circuits.EDGE_METHODS, "eap-ig-inputs (per layer)"]
    per: dict[str, list[circuits.EdgeScores]] = {k: [] for k in [*names, "exact"]}
    secs = dict.fromkeys(per, 0.0)
    for a, b in pairs:
        clean, base = a.input_ids, b.input_ids
        for name in per:
            t = time.perf_counter()
            if name == "exact":
                s = circuits.edge_patching(model, clean, metric, base, graph=graph)
            elif name.endswith("(per layer)"):
                bo = circuits.baseline_outputs(model, base, graph)
                sc, m = circuits._eap_ig_paths(model, graph, torch.tensor([clean]), bo, metric, steps, _layer_groups(graph), 64)
                s = circuits.EdgeScores(scores=sc * graph.edges, graph=graph, method=name, baseline="tokens", metric_clean=m)
            else:
                s = circuits.edge_attribution(model, clean, metric, base, method=name, ig_steps=steps, graph=graph)
            secs[name] += time.perf_counter() - t
            per[name].append(s)
    print(f"tiny-thinker, {graph.n_edges} edges, {n} minimal pairs, {steps} IG steps")
    print(f"{'method':28s} {'rho all edges [95% CI]':>26s} {'rho |exact|>=1% max [95% CI]':>32s} {'s/pair':>8s}")
    for name in names:
        r = circuits.rank_agreement(per[name], per["exact"])
        print(f"{name:28s} {r.rho:8.3f} [{r.ci[0]:6.3f}, {r.ci[1]:6.3f}]     {r.rho_large:8.3f} [{r.ci_large[0]:6.3f}, "
              f"{r.ci_large[1]:6.3f}] ({r.n_large:3d} edges) {secs[name] / n:8.2f}")
    print(f"{'exact':28s} {'':68s} {secs['exact'] / n:8.2f}")
    if save:
        torch.save({k: [e.scores for e in v] for k, v in per.items()}, save)


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]), *sys.argv[3:4])
