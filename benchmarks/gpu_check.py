"""The GPU check: every scaling technique at real sizes on one GPU, and CUDA against CPU.

Builds *randomly initialised* models of the real DeepSeek-R1-Distill-Qwen-1.5B and
R1-Distill-Llama-8B configurations in bf16 (no weights needed; the Llama model uses the Qwen
tokenizer's vocabulary, 152,064 rows instead of 128,256, since only the R1-Distill-Qwen
tokenizer ships offline), loads them through ``mechthink.load_model(hf_model=...)``, and runs
the techniques of ``bench_scaling.py`` at 2,048 and 4,096 tokens, printing time and peak GPU
memory per technique. Then tiny-thinker on CUDA vs CPU: forward log-probs, a forked probe,
the logit lens and AtP must agree within bf16/fp32 tolerances.

    python benchmarks/gpu_check.py --tokenizer ../shared/data/tokenizers/r1-distill-qwen
    python benchmarks/gpu_check.py --dry-run        # tiny sizes on CPU (what the tests run)

Not part of the test suite except for its ``--dry-run``. Meant to finish in under 8 minutes
on one H100/H200-class GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

#: The real configurations (hidden sizes, depths, heads) of the two models.
CONFIGS: dict[str, dict[str, Any]] = {
    "r1-distill-qwen-1.5b": dict(arch="Qwen2ForCausalLM", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                 num_attention_heads=12, num_key_value_heads=2, rope_theta=10000.0,
                                 max_position_embeddings=131072, tie_word_embeddings=False),
    "r1-distill-llama-8b": dict(arch="LlamaForCausalLM", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                                max_position_embeddings=131072, tie_word_embeddings=False),
}
#: Tiny stand-ins for --dry-run (same architectures, CPU, seconds).
DRY: dict[str, dict[str, Any]] = {
    name: {**cfg, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2}
    for name, cfg in CONFIGS.items()
}


def build(name: str, cfg: dict[str, Any], tokenizer: Any, device: str, dtype: Any) -> tuple[Any, Any]:
    """``(ThinkingModel, plain HF copy with sdpa attention)`` of one random configuration."""
    import copy

    import torch
    import transformers

    import mechthink as mt

    kw = {k: v for k, v in cfg.items() if k != "arch"}
    config = getattr(transformers, cfg["arch"].replace("ForCausalLM", "Config"))(vocab_size=len(tokenizer), **kw)
    config.architectures = [cfg["arch"]]
    torch.manual_seed(0)
    with torch.device(device):
        hf = getattr(transformers, cfg["arch"])(config).to(dtype).eval()
    sdpa = copy.deepcopy(hf)  # before load_model folds weights into hf in place
    sdpa.config._attn_implementation = "sdpa"
    return mt.load_model(name, hf_model=hf, tokenizer=tokenizer, device=device, dtype=dtype), sdpa


def run_techniques(model: Any, sdpa: Any, Ts: list[int], only: list[str], device: str,
                   gen_tokens: int = 64) -> list[dict[str, Any]]:
    import torch

    from bench_scaling import GEN, TECHNIQUES, _tokens

    # generation techniques: batch 8, ``gen_tokens`` new tokens per row after a T-token prompt
    ctx = {"target": model.token_ids(["Wait"])[0], "hf": lambda impl: sdpa, "gen": {"batch": 8, "tokens": gen_tokens}}
    rows = []
    vocab = int(model.bridge.cfg.d_vocab)
    for T in Ts:
        for tech in only:
            fn = TECHNIQUES[tech]
            ids = _tokens(T, vocab).to(device)
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            err = ""
            try:
                with torch.inference_mode(mode=tech not in ("atp", "qkfix", "eap", "eap_ig", "eap_qkfix")):
                    fn(model, ids, ctx)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
            except Exception as exc:  # report and go on: one technique's failure is a result too
                err = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"
            dt = time.perf_counter() - t0
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device.startswith("cuda") else float("nan")
            rows.append({"T": T, "technique": tech, "seconds": None if err else dt, "extra_peak_gb": None if err else peak,
                         "error": err})
            shown = err or f"{dt:8.2f} s  {peak:7.2f} GB"
            if tech in GEN and not err:
                rows[-1]["tokens_per_s"] = 8 * gen_tokens / dt
                shown += f"  {8 * gen_tokens / dt:8.1f} tok/s (batch 8)"
            print(f"  T={T:5d} {tech:18s} {shown}", flush=True)
    return rows


def cuda_vs_cpu(device: str) -> dict[str, float]:
    """tiny-thinker on ``device`` vs CPU fp32: max |Δ| of log-probs, a forked probe, the lens, AtP."""
    import torch

    import mechthink as mt
    from mechthink import attribution, confidence, lens

    out: dict[str, float] = {}
    models = {d: mt.load_model("tiny-thinker", device=d) for d in ("cpu", device)}
    text = models["cpu"].prompt("Compute 3 + 5 - 2.") + "3 + 5 = 8. 8 - 2 = 7. Wait"
    results: dict[str, dict[str, Any]] = {}
    for d, m in models.items():
        x = m.to_tokens(text)
        target = m.token_ids(["Wait"])[0]
        r: dict[str, Any] = {"logp": m.log_probs(x)[0].float().cpu()}
        r["probe"] = confidence.answer_probe(m, x[0], [x.shape[1] // 2, x.shape[1] - 1], {"6": ["6}"], "7": ["7}"]}).logprobs.float().cpu()
        r["lens"] = lens.logit_lens(m, [x[0].tolist()], [target], mode="decomposed").target_logits.float().cpu()
        with torch.enable_grad():
            r["atp"] = attribution.attribution_patching(m, x[0], attribution.logit_metric(-1, target), baseline="zero",
                                                        nodes=("resid_pre",)).scores["resid_pre"].float().cpu()
        results[d] = r
    for k in results["cpu"]:
        out[k] = float((results["cpu"][k] - results[device][k]).abs().max())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", default=os.path.join(HERE, "..", "..", "shared", "data", "tokenizers", "r1-distill-qwen"))
    ap.add_argument("--Ts", default="2048,4096")
    ap.add_argument("--only", default="hf_sdpa,hooked_forward,hooked_fast,lens_dla,atp,qkfix,eap,exact_per_node,fork_probes16,"
                                      "fork_rollouts32,fork_rollouts32_copied,"
                                      "binned_attention,mi_trajectory,gen_greedy,hfgen_greedy,gen_steered")
    ap.add_argument("--models", default=",".join(CONFIGS))
    ap.add_argument("--dry-run", action="store_true", help="tiny configs on CPU, short inputs (for the tests)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; run with --dry-run for the CPU check of the script itself")
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    Ts = [64, 128] if args.dry_run else [int(t) for t in args.Ts.split(",")]
    configs = DRY if args.dry_run else CONFIGS
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "dtype": str(dtype),
                              "models": {}}
    print(f"gpu_check on {report['device']} ({dtype})", flush=True)
    for name in args.models.split(","):
        t0 = time.perf_counter()
        model, sdpa = build(name, configs[name], tok, device, dtype)
        print(f"{name}: built and loaded in {time.perf_counter() - t0:.1f} s "
              f"({sum(p.numel() for p in model.bridge.original_model.parameters()) / 1e9:.2f} B parameters)", flush=True)
        report["models"][name] = run_techniques(model, sdpa, Ts, [t for t in args.only.split(",") if t], device,
                                                gen_tokens=4 if args.dry_run else 64)
        del model, sdpa
        if device == "cuda":
            torch.cuda.empty_cache()
    if device == "cuda":
        report["cuda_vs_cpu_max_abs_diff"] = cuda_vs_cpu(device)
        print("tiny-thinker CUDA vs CPU, max |Δ|:", report["cuda_vs_cpu_max_abs_diff"], flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
