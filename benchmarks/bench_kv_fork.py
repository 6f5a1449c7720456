"""Forked-KV answer probes vs their floor and vs recomputing every prefix (SmolLM2-135M).

A 512-token trace, k evenly spaced probe positions, a ~12-token answer-forcing suffix and two
single-token choices. Timed, interleaved, medians of ``--repeats``:

  (a) ``mechthink.confidence.answer_probe``: one incremental pass over the trace with a
      DynamicCache, the suffix run on the cache at each position and cropped away, only the
      last position unembedded (``logits_to_keep=1``);
  (b) the floor: one forward over the trace plus one forward over all k × suffix tokens;
  (b') the same floor unembedding only the last position of each call (a stricter floor);
  (c) the seed's way (repeng PR #69 gather/cot.py style): each prefix + suffix from scratch;
  (c') the same, unembedding only the last position (a stronger baseline than the seeds').

Prints a/b (goal ≤ 1.3) and c/a (goal ≥ 4), both measured in this one run, and a/b', c'/a so
that the saving from skipping unneeded logits is not mistaken for the saving from the fork.

    python benchmarks/bench_kv_fork.py [--tokens 512] [--k 10] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

SUFFIX = "\nSo, is that right? So the final answer is"
TEXT = (
    "Okay, so I need to figure out how many apples Tom has. He starts with 3 apples and buys 5 more, "
    "so 3 + 5 = 8. Wait, he gave one to his sister, so 8 - 1 = 7. Hmm, let me check that again. "
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import mechthink as mt
    from mechthink.confidence import answer_probe

    model = mt.load_model("smollm2-135m", device="cpu")
    tok = model.tokenizer
    ids = model.to_token_lists([TEXT * 40])[0][: args.tokens]
    assert len(ids) == args.tokens, "trace text too short"
    suffix_ids = tok(SUFFIX, add_special_tokens=False)["input_ids"]
    step = args.tokens // args.k
    positions = [step * (i + 1) - 1 for i in range(args.k)]
    choices = {"yes": [" Yes"], "no": [" No"]}
    bridge = model.bridge

    def forked() -> None:
        answer_probe(model, ids, positions, choices, suffix=SUFFIX)

    keep = model.last_logits_kwargs()

    def floor(**kw: object) -> None:
        _, kv = bridge(torch.tensor([ids]), return_type="logits_and_cache", **kw)
        bridge(torch.tensor([suffix_ids * args.k]), past_key_values=kv, **kw)

    def recompute(**kw: object) -> None:
        for p in positions:
            bridge(torch.tensor([ids[: p + 1] + suffix_ids]), **kw)

    fns = {
        "a: forked probes": forked,
        "b: floor (trace + k*suffix)": floor,
        "b': floor, last logits only": lambda: floor(**keep),
        "c: recompute each prefix": recompute,
        "c': recompute, last logits only": lambda: recompute(**keep),
    }
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():  # warm-up
            fn()
        for _ in range(args.repeats):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    a, b, c = med["a: forked probes"], med["b: floor (trace + k*suffix)"], med["c: recompute each prefix"]
    print(f"SmolLM2-135M, {args.tokens}-token trace, k={args.k} probes, suffix {len(suffix_ids)} tokens, "
          f"2 single-token choices, torch threads {torch.get_num_threads()}, {args.repeats} interleaved repeats (medians)")
    for name, v in med.items():
        print(f"  {name:32s} {v * 1000:9.1f} ms")
    b2, c2 = med["b': floor, last logits only"], med["c': recompute, last logits only"]
    print(f"a/b  = {a / b:.2f}   (goal <= 1.3)")
    print(f"c/a  = {c / a:.2f}   (goal >= 4)")
    print(f"a/b' = {a / b2:.2f}   (against the stricter floor)")
    print(f"c'/a = {c2 / a:.2f}   (against the stronger baseline)")


if __name__ == "__main__":
    main()
