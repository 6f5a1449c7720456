"""Hooked forward vs raw HF forward on SmolLM2-135M, 256 tokens (issue 2).

Hooked = ``bridge.run_with_cache`` in compatibility mode caching resid_pre, attn_out and mlp_out
of every layer, on the bridge's own attention and inside ``fast_attention`` (the fused SDPA
kernel; ``min_scores=0`` so it applies at any length), and ``mechthink.hooks.gather`` of the
same hooks. Raw = the same HF model's forward (eager attention, which the bridge's own attention
reproduces; sdpa, which the fast path uses). Runs are interleaved and the median of each is
reported, so the printed ratios are measured in one run under the same machine load.

    python benchmarks/bench_hooked_forward.py [--tokens 256] [--repeats 15] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 gives stable ratios on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import mechthink as mt
    from mechthink.hooks import gather
    from mechthink.models.fast_attention import fast_attention
    from mechthink.models.loading import smollm2_hf_dir
    from transformers import AutoModelForCausalLM

    model = mt.load_model("smollm2-135m", device="cpu")
    eager = AutoModelForCausalLM.from_pretrained(smollm2_hf_dir(), dtype=torch.float32, attn_implementation="eager").eval()
    sdpa = AutoModelForCausalLM.from_pretrained(smollm2_hf_dir(), dtype=torch.float32, attn_implementation="sdpa").eval()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(100, 40000, (1, args.tokens), generator=g)
    names = {f"blocks.{L}.{h}" for L in range(model.n_layers) for h in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out")}

    def hooked() -> None:
        model.bridge.run_with_cache(tokens, names_filter=lambda n: n in names)

    def hooked_fast() -> None:
        with fast_attention(model, min_scores=0):
            model.bridge.run_with_cache(tokens, names_filter=lambda n: n in names)

    def gathered() -> None:
        gather(model, tokens[0], ["resid_pre", "attn_out", "mlp_out"])

    def bridge_plain() -> None:
        model.bridge(tokens)

    def raw_eager() -> None:
        eager(tokens)

    def raw_sdpa() -> None:
        sdpa(tokens)

    fns = {
        "hooked (3 hooks x 30 layers cached)": hooked,
        "hooked, fast_attention": hooked_fast,
        "gather (same hooks)": gathered,
        "bridge forward, no cache": bridge_plain,
        "HF eager": raw_eager,
        "HF sdpa": raw_sdpa,
    }
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():  # warm-up
            fn()
        for _ in range(args.repeats):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["HF eager"]
    print(f"SmolLM2-135M, {args.tokens} tokens, {args.repeats} interleaved repeats, {torch.get_num_threads()} threads")
    for k, v in med.items():
        print(f"  {k:40s} {v * 1e3:8.1f} ms   ratio to HF eager {v / base:5.2f}x")
    print(f"RATIO hooked/raw_hf_eager = {med['hooked (3 hooks x 30 layers cached)'] / base:.3f} (goal <= 1.15)")
    sdpa_t = med["HF sdpa"]
    for k in ("hooked, fast_attention", "gather (same hooks)"):
        print(f"RATIO {k}/raw_hf_sdpa = {med[k] / sdpa_t:.3f} (goal <= 1.2 at 2048 tokens)")


if __name__ == "__main__":
    main()
