"""Agreement of the edge attribution estimators with exact edge patching on minimal pairs.

    python benchmarks/bench_circuits_rho.py [n_pairs] [ig_steps] [save.pt]
        [--model tiny-thinker] [--methods all] [--sample-edges 0] [--seed 0] [--batch-size 64]

For each pair every edge (or, with ``--sample-edges N``, the same N edges drawn uniformly for
every pair: the way to check a model with too many edges for exact patching, e.g. SmolLM2's
70,651) is scored by each estimator and by exact edge patching; printed: Spearman ρ of the
pair-averaged scores over the compared edges, with a 95% percentile bootstrap interval over pairs
(pairs resampled, scores re-averaged, ρ recomputed), and the same restricted to the edges whose
exact |score| is at least 1% of the largest (most edges have ~0 effect), Pearson r, plus the
seconds per pair of each estimator. One thread. ``save.pt``: the per-pair scores (torch.save).
"""

from __future__ import annotations

import argparse
import time

import torch

import mechthink as mt
from mechthink import attribution, circuits
from mechthink.models.organism import minimal_pairs_for

PER_LAYER = "eap-ig-inputs (per layer)"


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


def _sample(graph: circuits.EdgeGraph, n: int, seed: int) -> torch.Tensor | None:
    """``n`` edges drawn uniformly (one mask for every pair), or None for all."""
    if n <= 0 or n >= graph.n_edges:
        return None
    idx = graph.edges.nonzero()
    pick = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))[:n]]
    mask = torch.zeros_like(graph.edges)
    mask[pick[:, 0], pick[:, 1]] = True
    return mask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n_pairs", nargs="?", type=int, default=16)
    ap.add_argument("ig_steps", nargs="?", type=int, default=5)
    ap.add_argument("save", nargs="?", default=None)
    ap.add_argument("--model", default="tiny-thinker")
    ap.add_argument("--methods", default="all", help=f"comma-separated of {', '.join(circuits.EDGE_METHODS)}, "
                                                       f"'{PER_LAYER}' (tiny-thinker only), or 'all'")
    ap.add_argument("--sample-edges", type=int, default=0, help="compare on this many uniformly drawn edges (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64, help="edges per batched forward of exact patching (SmolLM2: 8; "
                                                                  "each row holds every sender's output per receiver)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = mt.load_model(args.model)
    pairs = minimal_pairs_for(model, args.n_pairs)
    metric = attribution.logit_metric(-1, model.token_variants("Wait")[" Wait"])
    graph = circuits.build_graph(model)
    names = [*circuits.EDGE_METHODS, PER_LAYER] if args.methods == "all" else args.methods.split(",")
    unknown = set(names) - {*circuits.EDGE_METHODS, PER_LAYER}
    if unknown:
        raise SystemExit(f"--methods: unknown {sorted(unknown)}")
    edges = _sample(graph, args.sample_edges, args.seed)
    per: dict[str, list[circuits.EdgeScores]] = {k: [] for k in [*names, "exact"]}
    secs = dict.fromkeys(per, 0.0)
    for a, b in pairs:
        clean, base = a.input_ids, b.input_ids
        for name in per:
            t = time.perf_counter()
            if name == "exact":
                s = circuits.edge_patching(model, clean, metric, base, edges=edges, graph=graph, batch_size=args.batch_size)
            elif name == PER_LAYER:
                bo = circuits.baseline_outputs(model, base, graph)
                sc, m = circuits._eap_ig_paths(model, graph, torch.tensor([clean]), bo, metric, args.ig_steps, _layer_groups(graph), 64)
                s = circuits.EdgeScores(scores=sc * graph.edges, graph=graph, method=name, baseline="tokens", metric_clean=m)
            else:
                s = circuits.edge_attribution(model, clean, metric, base, method=name, ig_steps=args.ig_steps, graph=graph)
            secs[name] += time.perf_counter() - t
            per[name].append(s)
    n = len(pairs)
    lens = sorted(len(a.input_ids) for a, _ in pairs)
    compared = graph.n_edges if edges is None else int(edges.sum())
    print(f"{args.model}, {graph.n_edges} edges ({compared} compared), {n} minimal pairs of {lens[0]}-{lens[-1]} tokens, "
          f"{args.ig_steps} IG steps")
    print(f"{'method':28s} {'rho compared edges [95% CI]':>28s} {'rho |exact|>=1% max [95% CI]':>32s} {'r':>6s} {'s/pair':>8s}")
    ex_mean = torch.stack([e.values() for e in per["exact"]]).mean(0)
    for name in names:
        r = circuits.rank_agreement(per[name], per["exact"])
        est_mean = torch.stack([e.scores[per["exact"][0].mask] for e in per[name]]).mean(0)
        pearson = float(torch.corrcoef(torch.stack([est_mean, ex_mean]))[0, 1])
        print(f"{name:28s} {r.rho:8.3f} [{r.ci[0]:6.3f}, {r.ci[1]:6.3f}]       {r.rho_large:8.3f} [{r.ci_large[0]:6.3f}, "
              f"{r.ci_large[1]:6.3f}] ({r.n_large:3d} edges) {pearson:6.3f} {secs[name] / n:8.2f}")
    print(f"{'exact':28s} {'':78s} {secs['exact'] / n:8.2f}  ({compared} edges)")
    if args.save:
        torch.save({k: [e.scores for e in v] for k, v in per.items()} | {"edges": edges}, args.save)


if __name__ == "__main__":
    main()
