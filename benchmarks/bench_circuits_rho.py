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
from mechthink import attribution, circuits, stats
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


def _rho_ci(est: torch.Tensor, ex: torch.Tensor, keep: torch.Tensor | None, n_boot: int = 1000) -> tuple[float, float, float]:
    """ρ of the pair means (on ``keep`` edges) and its bootstrap interval over pairs."""
    def rho(idx: torch.Tensor) -> float:
        a, b = est[idx].mean(0), ex[idx].mean(0)
        return stats.spearman(a if keep is None else a[keep], b if keep is None else b[keep])

    n = est.shape[0]
    g = torch.Generator().manual_seed(0)
    boots = sorted(rho(torch.randint(n, (n,), generator=g)) for _ in range(n_boot))
    return rho(torch.arange(n)), boots[int(0.025 * n_boot)], boots[int(0.975 * n_boot) - 1]


def main(n: int = 16, steps: int = 5, save: str | None = None) -> None:
    torch.set_num_threads(1)
    model = mt.load_model("tiny-thinker")
    pairs = minimal_pairs_for(model, n)
    metric = attribution.logit_metric(-1, model.token_variants("Wait")[" Wait"])
    graph = circuits.build_graph(model)
    names = [*circuits.EDGE_METHODS, "eap-ig-inputs (per layer)"]
    per: dict[str, list[torch.Tensor]] = {k: [] for k in [*names, "exact"]}
    secs = dict.fromkeys(per, 0.0)
    for a, b in pairs:
        clean, base = a.input_ids, b.input_ids
        for name in per:
            t = time.perf_counter()
            if name == "exact":
                s = circuits.edge_patching(model, clean, metric, base, graph=graph).values()
            elif name.endswith("(per layer)"):
                row = torch.tensor([clean])
                bo = circuits.baseline_outputs(model, base, graph)
                s = circuits._eap_ig_paths(model, graph, row, bo, metric, steps, _layer_groups(graph), 64)[0][graph.edges]
            else:
                s = circuits.edge_attribution(model, clean, metric, base, method=name, ig_steps=steps, graph=graph).values()
            secs[name] += time.perf_counter() - t
            per[name].append(s)
    ex = torch.stack(per["exact"])
    big = ex.mean(0).abs() >= 0.01 * ex.mean(0).abs().max()
    print(f"tiny-thinker, {graph.n_edges} edges, {n} minimal pairs, {steps} IG steps; "
          f"{int(big.sum())} edges with exact |score| >= 1% of the largest")
    print(f"{'method':28s} {'rho all edges [95% CI]':>28s} {'rho |exact|>=1% max [95% CI]':>30s} {'s/pair':>8s}")
    for name in names:
        est = torch.stack(per[name])
        r, lo, hi = _rho_ci(est, ex, None)
        rb, lob, hib = _rho_ci(est, ex, big)
        print(f"{name:28s} {r:8.3f} [{lo:6.3f}, {hi:6.3f}]       {rb:8.3f} [{lob:6.3f}, {hib:6.3f}] {secs[name] / n:8.2f}")
    print(f"{'exact':28s} {'':58s} {secs['exact'] / n:8.2f}")
    if save:
        torch.save(per, save)


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]), *sys.argv[3:4])
