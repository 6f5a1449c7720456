"""Plain AtP vs the QK-fix variants vs exact mean-patching of resid_pre on tiny-thinker.

Six planted-error examples (the first six of 60 held-out step examples), metric = the " Wait"
logit at the last position, baseline = the per-layer dataset-mean resid_pre. Prints Spearman ρ
of each estimator against the library's exact ``activation_patching`` over the full
(layer × position) grid, and per-example times. About 1 minute on one core.

    python experiments/atp_qkfix/run.py
"""

import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "analyses"))

from _common import step_examples
from qkfix import DT, Fn, estimators, spearman, v3_scores

import mechthink as mt
from mechthink import attribution as atp

torch.set_num_threads(1)
model = mt.load_model("tiny-thinker")
ex = step_examples(model, 60)
tid = model.token_variants("Wait")[" Wait"]
means = atp.mean_activations(model, [e["input_ids"] for e in ex], hooks=("resid_pre",))
errs = [e for e in ex if e["is_error"]][:6]
metric = atp.logit_metric(-1, tid)
fn = Fn(model)
mu = torch.stack([means[f"blocks.{L}.hook_resid_pre"].to(DT) for L in range(fn.nL)])
rhos: dict[str, list[float]] = {}
for i, e in enumerate(errs):
    ids = e["input_ids"]
    t0 = time.perf_counter()
    a = atp.attribution_patching(model, torch.tensor(ids), metric, baseline="mean", means=means,
                                 nodes=("resid_pre",)).scores["resid_pre"]
    ta = time.perf_counter() - t0
    t0 = time.perf_counter()
    x = atp.activation_patching(model, torch.tensor(ids), metric, baseline="mean", means=means,
                                nodes=("resid_pre",), batch_size=64).scores["resid_pre"]
    tx = time.perf_counter() - t0
    m0, res, times, C, G = estimators(fn, ids, mu, tid)
    t0 = time.perf_counter()
    res["v3"] = v3_scores(fn, ids, mu, tid)
    times["v3"] = time.perf_counter() - t0
    row = {"library AtP": spearman(a, x)} | {k: spearman(v, x) for k, v in res.items()}
    for k, v in row.items():
        rhos.setdefault(k, []).append(v)
    print(f"example {i} ({len(ids)} tokens):", {k: round(v, 3) for k, v in row.items()},
          f"| s: library AtP {ta:.3f}, exact {tx:.3f},", {k: round(v, 3) for k, v in times.items()}, flush=True)
print("mean Spearman rho vs exact:", {k: round(statistics.mean(v), 3) for k, v in rhos.items()})
