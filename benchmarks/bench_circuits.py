"""EAP / the EAP-IG variants / exact edge patching cost against one plain forward + backward (tiny-thinker).

    python benchmarks/bench_circuits.py [n_pairs]

Prints seconds per sequence and the ratios, measured in one run on one thread.
"""

from __future__ import annotations

import sys
import time

import torch

import mechthink as mt
from mechthink import attribution, circuits
from mechthink.models.organism import minimal_pairs_for


def main(n: int = 5) -> None:
    torch.set_num_threads(1)
    model = mt.load_model("tiny-thinker")
    pairs = minimal_pairs_for(model, n)
    clean, base = [a.input_ids for a, _ in pairs], [b.input_ids for _, b in pairs]
    metric = attribution.logit_metric(-1, model.token_variants("Wait")[" Wait"])
    graph = circuits.build_graph(model)
    circuits.edge_attribution(model, clean[:1], metric, base[:1], graph=graph)  # warm-up

    def timed(fn) -> float:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) / n

    def fwd_bwd() -> None:
        for seq in clean:
            emb = model.bridge.embed(torch.tensor([seq])).detach().requires_grad_(True)
            out = model.bridge.run_with_hooks(torch.tensor([seq]), fwd_hooks=[("hook_embed", lambda a, hook: emb)])
            torch.autograd.grad(metric(out).sum(), emb)

    plain = timed(fwd_bwd)
    rows = {
        "eap": timed(lambda: circuits.edge_attribution(model, clean, metric, base, graph=graph)),
        **{f"{m} (5 steps)": timed(lambda m=m: circuits.edge_attribution(model, clean, metric, base, method=m, graph=graph))
           for m in circuits.EDGE_METHODS if m != "eap"},
        "exact edge patching": timed(lambda: circuits.edge_patching(model, clean, metric, base, graph=graph)),
    }
    print(f"tiny-thinker, {graph.n_edges} edges, {n} sequences; plain forward+backward {plain * 1e3:.1f} ms/seq")
    for name, t in rows.items():
        print(f"{name:26s} {t * 1e3:9.1f} ms/seq  = {t / plain:7.1f} x forward+backward")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
