"""Attribution patching vs exact activation patching on SmolLM2-135M (ARBOR #22 setting).

AtP scores the full resid_pre grid (n_layers x 128 positions) from one forward + one backward;
exact patching needs one forward per node. Exact patching is timed on a subset of the grid
(batched, ``--exact-nodes`` nodes) and extrapolated linearly to the full grid; the output says so.
The AtP* QK-fix estimator (``estimator="qkfix"``) is timed on the same grid and its Spearman ρ against
exact patching reported on the same measured nodes (``--no-qkfix`` skips it).
Run: ``python benchmarks/bench_attribution.py [--tokens 128] [--exact-nodes 64] [--batch 16]``.
"""

from __future__ import annotations

import argparse
import time

import torch

import mechthink as mt
from mechthink import attribution as A


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--exact-nodes", type=int, default=64, help="nodes actually patched exactly (rest extrapolated)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--no-qkfix", action="store_true", help="skip the QK-fix estimator")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    model = mt.load_model(args.model, device=args.device)
    text = (
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "How many clips did Natalia sell altogether in April and May? Let me think. In April she sold 48. "
        "In May she sold half of 48, which is 24. So altogether she sold 48 + 24 = 72 clips. "
    ) * 4
    toks = model.to_tokens(text)[0][: args.tokens]
    T, L = len(toks), model.n_layers
    metric = A.logit_metric(-1, model.token_ids("Wait"))
    means = A.mean_activations(model, [toks], hooks="resid_pre")

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    A.attribution_patching(model, toks[:16], metric, "mean", nodes=("resid_pre",), means=means)  # warm-up
    sync()
    t0 = time.perf_counter()
    atp = A.attribution_patching(model, toks, metric, "mean", nodes=("resid_pre",), means=means)
    sync()
    t_atp = time.perf_counter() - t0

    t_qk = float("nan")
    if not args.no_qkfix:
        sync()
        t0 = time.perf_counter()
        qk = A.attribution_patching(model, toks, metric, "mean", nodes=("resid_pre",), means=means, estimator="qkfix")
        sync()
        t_qk = time.perf_counter() - t0

    # exact: a subset of the grid spread over layers and positions, batched
    n_sub = min(args.exact_nodes, L * T)
    flat = torch.linspace(0, L * T - 1, n_sub).round().long().tolist()
    cells = sorted({(i // T, i % T) for i in flat})
    layers = sorted({c[0] for c in cells})
    t_exact = 0.0
    n_done = 0
    pairs_a, pairs_e, pairs_q = [], [], []
    for layer in layers:
        pos = [p for (l_, p) in cells if l_ == layer]
        sync()
        t0 = time.perf_counter()
        ex = A.activation_patching(
            model, toks, metric, "mean", nodes=("resid_pre",), means=means, layers=[layer], positions=pos, batch_size=args.batch
        )
        sync()
        t_exact += time.perf_counter() - t0
        n_done += len(pos)
        for p in pos:
            pairs_a.append(float(atp["resid_pre"][layer, p]))
            pairs_e.append(float(ex["resid_pre"][layer, p]))
            if not args.no_qkfix:
                pairs_q.append(float(qk["resid_pre"][layer, p]))
    per_node = t_exact / n_done
    t_exact_full = per_node * L * T
    from scipy.stats import spearmanr

    rho = spearmanr(pairs_a, pairs_e)[0]
    print(f"model={args.model} device={args.device} tokens={T} grid=resid_pre {L} layers x {T} positions = {L * T} nodes")
    print(f"AtP (1 forward + 1 backward, whole grid): {t_atp:.2f} s")
    print(
        f"exact patching: {n_done} nodes measured in {t_exact:.1f} s (batch {args.batch}) = {per_node * 1e3:.0f} ms/node; "
        f"EXTRAPOLATED linearly to {L * T} nodes: {t_exact_full:.0f} s"
    )
    print(f"speed ratio exact/AtP = {t_exact_full / t_atp:.0f}x (goal >= 300x)")
    print(f"Spearman rho AtP vs exact on the {n_done} measured nodes: {rho:.3f}")
    if not args.no_qkfix:
        print(f"AtP* QK-fix, whole grid: {t_qk:.2f} s; speed ratio exact/QK-fix = {t_exact_full / t_qk:.0f}x")
        print(f"Spearman rho QK-fix vs exact on the {n_done} measured nodes: {spearmanr(pairs_q, pairs_e)[0]:.3f}")


if __name__ == "__main__":
    main()
