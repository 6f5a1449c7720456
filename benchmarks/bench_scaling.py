"""How time and memory grow with the trace length T, per technique, against raw HF in one run.

For each technique and T, a fresh worker process loads the model, warms up on 64 tokens and
then runs the technique once on T random tokens; it reports the wall time and the extra peak
resident memory over the warmed-up process (the ``VmHWM`` high-water mark, reset after the
warm-up through ``/proc/self/clear_refs``, so every transient tensor counts and the peak of
loading the model does not hide them; ``ru_maxrss`` where that is unavailable).
A worker that needs more than ``--mem-limit-gb`` of address space fails and is reported as
over the limit. The summary prints each figure, the growth exponent (log-log slope of time and
of extra memory over T) and each technique's time relative to the HF model's own default
attention (sdpa) forward at the same T, measured in the same run.

    python benchmarks/bench_scaling.py [--model smollm2-135m] [--Ts 512,1024,2048,4096]
        [--only hooked_forward,atp,...] [--threads 1] [--mem-limit-gb 16] [--json out.json]

Generation is measured separately (``--gen``) at one prompt length (``--gen-prompt``): tokens per
second of greedy, sampled and steered generation of ``--gen-tokens`` tokens per row at batch 1
and 8 (``--batches``), against HF ``generate`` (sdpa) on the same weights, steered there by one
forward hook on the decoder layer (the raw floor):

    python benchmarks/bench_scaling.py --gen [--gen-prompt 256] [--gen-tokens 256] [--batches 1,8]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.abspath(__file__)


# ============================================================================ techniques
def _tokens(T: int, vocab: int, seed: int = 0) -> Any:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, min(vocab, 40000), (T,), generator=g)


def _names(model: Any, kinds: tuple[str, ...]) -> set[str]:
    return {f"blocks.{L}.hook_{k}" for L in range(model.n_layers) for k in kinds}


def t_hooked_forward(model: Any, ids: Any, ctx: dict) -> None:
    names = _names(model, ("resid_pre", "attn_out", "mlp_out"))
    model.bridge.run_with_cache(ids[None], names_filter=lambda n: n in names)


def t_hooked_fast(model: Any, ids: Any, ctx: dict) -> None:
    from mechthink.models.fast_attention import fast_attention

    names = _names(model, ("resid_pre", "attn_out", "mlp_out"))
    with fast_attention(model):
        model.bridge.run_with_cache(ids[None], names_filter=lambda n: n in names)


def t_gather(model: Any, ids: Any, ctx: dict) -> None:
    from mechthink.hooks import gather

    gather(model, ids, ["resid_pre", "attn_out", "mlp_out"])


def t_hf_sdpa(model: Any, ids: Any, ctx: dict) -> None:
    ctx["hf"]("sdpa")(ids[None])


def t_hf_eager(model: Any, ids: Any, ctx: dict) -> None:
    ctx["hf"]("eager")(ids[None])


def t_lens_dla(model: Any, ids: Any, ctx: dict) -> None:
    from mechthink import lens

    lens.logit_lens(model, [ids.tolist()], [ctx["target"]], mode="accumulated")
    lens.logit_lens(model, [ids.tolist()], [ctx["target"]], mode="decomposed")


def _atp(model: Any, ids: Any, ctx: dict, **kw: Any) -> None:
    import torch

    from mechthink import attribution as atp

    with torch.enable_grad():
        atp.attribution_patching(model, ids, atp.logit_metric(-1, ctx["target"]), baseline="zero", **kw)


def t_atp(model: Any, ids: Any, ctx: dict) -> None:
    _atp(model, ids, ctx, nodes=("resid_pre", "attn_out", "mlp_out", "z"))


def t_atp_exact(model: Any, ids: Any, ctx: dict) -> None:
    _atp(model, ids, ctx, nodes=("resid_pre", "attn_out", "mlp_out", "z"), fast=False)


def t_qkfix(model: Any, ids: Any, ctx: dict) -> None:
    _atp(model, ids, ctx, nodes=("resid_pre",), estimator="qkfix")


def _eap(model: Any, ids: Any, ctx: dict, method: str) -> None:
    import torch

    from mechthink import attribution as atp
    from mechthink import circuits

    with torch.enable_grad():
        circuits.edge_attribution(model, ids, atp.logit_metric(-1, ctx["target"]), baseline="zero", method=method, ig_steps=5)


def t_eap(model: Any, ids: Any, ctx: dict) -> None:
    _eap(model, ids, ctx, "eap")


def t_eap_ig(model: Any, ids: Any, ctx: dict) -> None:
    _eap(model, ids, ctx, "eap-ig")


def t_eap_qkfix(model: Any, ids: Any, ctx: dict) -> None:
    _eap(model, ids, ctx, "eap-qkfix")


def t_exact_per_node(model: Any, ids: Any, ctx: dict) -> None:
    from mechthink import attribution as atp

    L = model.n_layers // 2
    atp.activation_patching(model, ids, atp.logit_metric(-1, ctx["target"]), baseline="zero", nodes=("resid_pre",),
                            positions=[len(ids) // 2], layers=[L], batch_size=1)


def t_fork_probes16(model: Any, ids: Any, ctx: dict) -> None:
    from mechthink import confidence

    T = len(ids)
    positions = [int((k + 1) * (T - 1) / 16) for k in range(16)]
    confidence.answer_probe(model, ids, positions, {str(v): [f"{v}}}"] for v in range(10)}, suffix="\nThe answer is \\boxed{")


def _fork_rollouts(model: Any, ids: Any, share: bool, rows: int = 32, tokens: int = 32) -> None:
    """One prefill of the T-token prefix, then ``rows`` sampled rows of ``tokens`` tokens from
    its cache (``generation.decode_from_cache``): the rows on one shared prefix, or each on a copy."""
    import dataclasses

    from mechthink import generation as G
    from mechthink.models.native import native_forward

    out = native_forward(model.bridge, ids[None], **model.last_logits_kwargs())
    logits, kv = out if out is not None else model.bridge(ids[None], return_type="logits_and_cache")
    dec = dataclasses.replace(G.Decoder.for_model(model), eos_ids=frozenset())
    cfg = G.SamplingConfig(max_new_tokens=tokens, temperature=1.0, top_p=1.0, seed=0)
    conts = G.decode_from_cache(dec, kv, logits[0, -1].float(), cfg, range(rows), rows, share_prefix=share)
    assert all(len(c.ids) == tokens for c in conts)


def t_fork_rollouts32(model: Any, ids: Any, ctx: dict) -> None:
    _fork_rollouts(model, ids, True)


def t_fork_rollouts32_copied(model: Any, ids: Any, ctx: dict) -> None:
    _fork_rollouts(model, ids, False)


def t_binned_attention(model: Any, ids: Any, ctx: dict) -> None:
    from mechthink import context

    T = len(ids)
    heads = [(L, 0) for L in range(0, model.n_layers, max(1, model.n_layers // 4))]
    context.binned_attention(model, ids, heads, (1, T // 10), (T // 10, T - 1), n_bins=5)


def t_mi_trajectory(model: Any, ids: Any, ctx: dict) -> None:
    from mechthink import mi

    mi.mi_trajectory(model, ids, ids[-8:], start=len(ids) // 10)


# ---------------------------------------------------------------------------- generation
# ``ids`` is the prompt; ``ctx["gen"]`` holds batch size, new tokens and the sampling mode. Both
# sides generate exactly ``gen_tokens`` tokens per row (no end-of-sequence stop), from the same
# ``batch`` prompts, on the same weights.
def _prompts(ids: Any, batch: int) -> Any:
    import torch

    return torch.stack([ids.roll(17 * b) for b in range(batch)])


def _sampling(mode: str) -> dict:
    return {"temperature": 0.6, "top_p": 0.95} if mode == "sampled" else {"temperature": 0.0}


def _steering_vector(model: Any) -> Any:
    import torch

    from mechthink import steering

    L = (list(model.steering_layers) or [model.n_layers // 2])[0]
    v = torch.randn(1, model.bridge.cfg.d_model, generator=torch.Generator().manual_seed(0))
    return steering.SteeringVector(v / v.norm() * 4.0, [L])


def _gen_ours(model: Any, ids: Any, ctx: dict, mode: str) -> None:
    import contextlib
    import dataclasses

    from mechthink import generation, steering

    g = ctx["gen"]
    rows = _prompts(ids, g["batch"]).tolist()
    dec = dataclasses.replace(generation.Decoder.for_model(model), eos_ids=frozenset())
    samp = _sampling("sampled" if mode == "sampled" else "greedy")
    cfg = generation.SamplingConfig(max_new_tokens=g["tokens"], **samp)
    cm = steering.steer(model, _steering_vector(model)) if mode == "steered" else contextlib.nullcontext()
    with cm:
        out = generation.decode(dec, rows, cfg, batch_size=g["batch"])
    assert all(len(c.ids) == g["tokens"] for c in out)


def _gen_hf(model: Any, ids: Any, ctx: dict, mode: str) -> None:
    import torch

    g = ctx["gen"]
    hf = ctx["hf"]("sdpa")
    x = _prompts(ids, g["batch"]).to(next(hf.parameters()).device)
    handle = None
    if mode == "steered":  # the raw floor of steering: one forward hook adding the vector
        sv = _steering_vector(model)
        vec = sv.vectors[0].to(x.device)

        def add(module: Any, args: Any, out: Any) -> Any:
            if isinstance(out, tuple):
                return (out[0] + vec, *out[1:])
            return out + vec

        handle = hf.model.layers[sv.layers[0]].register_forward_hook(add)
    try:
        samp = _sampling("sampled" if mode == "sampled" else "greedy")
        kw = {"do_sample": True, "temperature": samp["temperature"], "top_p": samp["top_p"], "top_k": None} if mode == "sampled" else {"do_sample": False}
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=g["tokens"], min_new_tokens=g["tokens"],
                          pad_token_id=0, **kw)
    finally:
        if handle is not None:
            handle.remove()
    assert out.shape[1] == x.shape[1] + g["tokens"]


GEN_MODES = ("greedy", "sampled", "steered")
GEN = {f"{side}_{mode}": (lambda m, i, c, _f=fn, _m=mode: _f(m, i, c, _m))
       for side, fn in (("gen", _gen_ours), ("hfgen", _gen_hf)) for mode in GEN_MODES}


TECHNIQUES: dict[str, Callable[[Any, Any, dict], None]] = {
    "hf_sdpa": t_hf_sdpa,
    "hf_eager": t_hf_eager,
    "hooked_forward": t_hooked_forward,
    "hooked_fast": t_hooked_fast,
    "gather": t_gather,
    "lens_dla": t_lens_dla,
    "atp": t_atp,
    "atp_exact": t_atp_exact,
    "qkfix": t_qkfix,
    "eap": t_eap,
    "eap_ig": t_eap_ig,
    "eap_qkfix": t_eap_qkfix,
    "exact_per_node": t_exact_per_node,
    "fork_probes16": t_fork_probes16,
    "fork_rollouts32": t_fork_rollouts32,
    "fork_rollouts32_copied": t_fork_rollouts32_copied,
    "binned_attention": t_binned_attention,
    "mi_trajectory": t_mi_trajectory,
    **GEN,
}


# ============================================================================ worker
def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _reset_peak() -> float:
    """Reset the resident-memory high-water mark (Linux ``clear_refs``); the current RSS in MB.

    Without it the peak of loading the model (compatibility mode folds weights at ~5x the model
    size) hides every smaller transient of the technique.
    """
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return _status_mb("VmRSS") or 0.0


def _peak_mb() -> float:
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _context(model: Any, device: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    cache: dict[str, Any] = {}

    def hf(impl: str) -> Any:
        if impl not in cache:
            src = model.spec.name
            from mechthink.models.loading import smollm2_hf_dir

            path = smollm2_hf_dir() if src == "smollm2-135m" else None
            if path is None:
                from mechthink.models.organism import WEIGHTS_DIR

                path = WEIGHTS_DIR
            cache[impl] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=impl).to(device).eval()
        return cache[impl]

    ids = model.token_ids(["Wait"])
    return {"hf": hf, "target": ids[0]}


def worker(tech: str, T: int, model_name: str, threads: int, device: str, batch: int = 1, gen_tokens: int = 0) -> dict:
    import torch

    torch.set_num_threads(threads)
    import mechthink as mt

    model = mt.load_model(model_name, device=device)
    ctx = _context(model, device)
    fn = TECHNIQUES[tech]
    vocab = int(model.bridge.cfg.d_vocab)
    grad = tech in ("atp", "atp_exact", "qkfix", "eap", "eap_ig", "eap_qkfix")
    with torch.inference_mode(mode=not grad):
        ctx["gen"] = {"batch": batch, "tokens": 8}
        fn(model, _tokens(64, vocab, 1), ctx)  # warm-up (and lazy loads, e.g. the HF copy)
        ctx["gen"] = {"batch": batch, "tokens": gen_tokens}
        base = _reset_peak()
        t0 = time.perf_counter()
        fn(model, _tokens(T, vocab), ctx)
        dt = time.perf_counter() - t0
    row = {"technique": tech, "T": T, "seconds": dt, "extra_peak_mb": _peak_mb() - base}
    if tech in GEN:
        row.update(batch=batch, gen_tokens=gen_tokens, tokens_per_s=batch * gen_tokens / dt)
    return row


def _run_worker(tech: str, T: int, args: argparse.Namespace, batch: int = 1) -> dict:
    cmd = [sys.executable, HERE, "--worker", tech, "--T", str(T), "--model", args.model, "--threads", str(args.threads),
           "--device", args.device, "--batch", str(batch), "--gen-tokens", str(args.gen_tokens)]
    limit = int(args.mem_limit_gb * 2**30)

    def cap() -> None:  # the worker's address space, so an O(T^2) technique fails instead of swapping
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MECHTHINK_PROGRESS": "0"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, preexec_fn=cap, timeout=args.timeout)
    for line in done.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            return json.loads(line)
    tail = (done.stderr.strip().splitlines() or ["?"])[-1][:160]
    over = "memory" in done.stderr.lower() or "alloc" in done.stderr.lower() or done.returncode < 0
    return {"technique": tech, "T": T, "seconds": None, "extra_peak_mb": None,
            "error": f"over {args.mem_limit_gb:g} GB" if over else tail}


def _slope(xs: list[float], ys: list[float]) -> float | None:
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if y is not None and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den else None


def gen_main(args: argparse.Namespace) -> None:
    """Tokens/s of our decode loop (greedy, sampled, steered) vs HF ``generate``, per batch size."""
    modes = [m for m in (args.only.split(",") if args.only else GEN_MODES) if m]
    if set(modes) - set(GEN_MODES):
        raise SystemExit(f"--gen --only takes modes from {', '.join(GEN_MODES)}, got {args.only!r}")
    rows = []
    print(f"{args.model}, {args.threads} thread(s), {args.device}; prompt {args.gen_prompt} tokens, "
          f"{args.gen_tokens} new tokens per row")
    for b in [int(x) for x in args.batches.split(",")]:
        for mode in modes:
            pair = [_run_worker(f"{side}_{mode}", args.gen_prompt, args, batch=b) for side in ("gen", "hfgen")]
            rows += pair
            ours, hf = (r.get("tokens_per_s") for r in pair)
            ratio = f"{ours / hf:.2f}x HF" if ours and hf else " ".join(r.get("error", "") for r in pair)
            fmt = lambda v: "—" if v is None else f"{v:7.1f} tok/s"  # noqa: E731
            print(f"batch {b:2d} {mode:8s} mechthink {fmt(ours):>13s}   HF generate {fmt(hf):>13s}   {ratio}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"model": args.model, "threads": args.threads, "rows": rows}, fh, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--Ts", default="512,1024,2048,4096")
    ap.add_argument("--only", default="", help="comma-separated techniques (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mem-limit-gb", type=float, default=16.0)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--json", default="")
    ap.add_argument("--gen", action="store_true", help="measure generation (tokens/s vs HF generate) instead")
    ap.add_argument("--gen-prompt", type=int, default=256, help="prompt length for --gen")
    ap.add_argument("--gen-tokens", type=int, default=256, help="new tokens per row for --gen")
    ap.add_argument("--batches", default="1,8", help="batch sizes for --gen")
    ap.add_argument("--worker", default="")
    ap.add_argument("--T", type=int, default=0)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.T, args.model, args.threads, args.device, args.batch, args.gen_tokens)),
              flush=True)
        return
    if args.gen:
        return gen_main(args)
    Ts = [int(t) for t in args.Ts.split(",")]
    techs = [t for t in (args.only.split(",") if args.only else [t for t in TECHNIQUES if t not in GEN]) if t]
    unknown = set(techs) - set(TECHNIQUES)
    if unknown:
        raise SystemExit(f"unknown techniques {sorted(unknown)}; available: {', '.join(TECHNIQUES)}")
    if "hf_sdpa" not in techs:
        techs = ["hf_sdpa", *techs]
    rows = []
    for T in Ts:
        for tech in techs:
            r = _run_worker(tech, T, args)
            rows.append(r)
            sec = "—" if r["seconds"] is None else f"{r['seconds']:8.2f} s"
            mem = "—" if r["extra_peak_mb"] is None else f"{r['extra_peak_mb'] / 1024:7.2f} GB"
            print(f"T={T:5d} {tech:18s} {sec:>11s} {mem:>10s} {r.get('error', '')}", flush=True)
    sdpa = {r["T"]: r["seconds"] for r in rows if r["technique"] == "hf_sdpa"}
    print(f"\n{args.model}, {args.threads} thread(s), {args.device}; extra peak memory over the warmed-up process")
    print(f"{'technique':18s} " + " ".join(f"{'T=' + str(T):>22s}" for T in Ts) + "   slope(time) slope(mem)")
    summary = {}
    for tech in techs:
        mine = {r["T"]: r for r in rows if r["technique"] == tech}
        cells = []
        for T in Ts:
            r = mine[T]
            if r["seconds"] is None:
                cells.append(f"{r.get('error', 'failed')[:22]:>22s}")
            else:
                rel = f"{r['seconds'] / sdpa[T]:.2f}x" if sdpa.get(T) else "?"
                cells.append(f"{r['seconds']:6.1f}s {r['extra_peak_mb'] / 1024:5.2f}GB {rel:>7s}")
        st = _slope([T for T in Ts if mine[T]["seconds"]], [mine[T]["seconds"] for T in Ts if mine[T]["seconds"]])
        sm = _slope([T for T in Ts if mine[T]["extra_peak_mb"]], [mine[T]["extra_peak_mb"] for T in Ts if mine[T]["extra_peak_mb"]])
        summary[tech] = {"slope_time": st, "slope_mem": sm}
        fmt = lambda v: "   —  " if v is None else f"{v:6.2f}"  # noqa: E731
        print(f"{tech:18s} " + " ".join(cells) + f"   {fmt(st)}      {fmt(sm)}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"model": args.model, "threads": args.threads, "rows": rows, "summary": summary}, fh, indent=1)


if __name__ == "__main__":
    main()
