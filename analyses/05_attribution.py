"""Which tokens make the model say " Wait"? Attribution patching with mean ablation (ARBOR #22).

Metric: the " Wait" logit at the position right after a wrongly written step. Corrupted state:
the dataset-mean ``resid_pre`` per layer (over all examples and positions). Token importance =
the attribution score of largest magnitude over layers (sign: patching the token to the mean
lowers the metric → positive importance). On tiny-thinker the ground truth is known: the wrong
step's operand and result tokens should carry the decision. Also: AtP vs exact activation
patching (Spearman ρ), importance binned into question vs five 20% bins of the thinking, and a
self-contained circuitsvis HTML view of one example.

    python analyses/05_attribution.py [--model tiny-thinker] [--n-samples 40]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

NAME = "attribution"


@dataclass
class Config:
    """Attribution patching at planted backtracking points."""

    model: str = "tiny-thinker"
    out: Path = Path(__file__).resolve().parents[1] / "figures"
    n_samples: int = 200
    n_exact: int = 6
    target: str = " Wait"


def _spearman(a: Any, b: Any) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.flatten().numpy(), b.flatten().numpy()).statistic)


def main(cfg: Config, loaded_model: Any = None) -> dict:
    import torch

    import mechthink as mt
    from mechthink import attribution as atp
    from mechthink import context
    from mechthink.plotting.attribution import plot_attribution_heatmap, plot_binned, save_colored_tokens
    from mechthink.plotting.lens import new_figure
    from mechthink.report import output_paths, write_outputs

    from _common import step_examples

    model = loaded_model if loaded_model is not None else mt.load_model(cfg.model)
    examples = step_examples(model, cfg.n_samples)
    target_id = model.token_variants(cfg.target.strip())[cfg.target]
    means = atp.mean_activations(model, [e["input_ids"] for e in examples], hooks=("resid_pre",))
    errors = [e for e in examples if e["is_error"]]
    metric = atp.logit_metric(-1, target_id)

    organism = model.spec.name == "tiny-thinker"
    hits_any = hits_result = top1_in_step = 0
    importances, q_spans, t_spans, rhos = [], [], [], []
    results = []
    for i, ex in enumerate(errors):
        ids = torch.tensor(ex["input_ids"])
        res = atp.attribution_patching(model, ids, metric, baseline="mean", means=means, nodes=("resid_pre",))
        results.append(res)
        imp = res.token_importance("resid_pre", reduce="abs_max", sign=-1)
        importances.append(imp)
        n = len(ids)
        q_spans.append(tuple(ex["question_span"]) if organism else (0, 1))
        t_spans.append((q_spans[-1][1], n - 1))
        if organism:
            cand = imp.clone()
            cand[0] = cand[-1] = -float("inf")  # BOS and the query position itself
            top3 = set(cand.topk(3).indices.tolist())
            step_tokens = set(ex["step_operand_positions"]) | set(ex["step_result_positions"])
            hits_any += bool(top3 & step_tokens)
            hits_result += bool(top3 & set(ex["step_result_positions"]))
            # the whole written step: operands, operator, "=", the result and its leading space
            step_span = set(range(min(step_tokens), max(ex["step_result_positions"]) + 1))
            top1_in_step += int(cand.argmax()) in step_span
        if i < cfg.n_exact:
            exact = atp.activation_patching(model, ids, metric, baseline="mean", means=means, nodes=("resid_pre",), batch_size=64)
            rhos.append(_spearman(res.scores["resid_pre"], exact.scores["resid_pre"]))

    bins = context.binned_importance(importances, q_spans, t_spans, n_bins=5)
    numbers: dict[str, Any] = {
        "n_error_examples": len(errors),
        "atp_vs_exact_spearman_resid_pre": rhos,
        "atp_vs_exact_spearman_resid_pre_mean": sum(rhos) / max(1, len(rhos)),
        "binned_importance_labels": bins.labels,
        "binned_importance_mean": bins.mean.tolist(),
    }
    if organism:
        numbers["top3_contains_step_operand_or_result"] = hits_any / max(1, len(errors))
        numbers["top3_contains_step_result"] = hits_result / max(1, len(errors))
        numbers["top1_within_wrong_step_span"] = top1_in_step / max(1, len(errors))

    res0 = results[0]
    png, _ = output_paths(cfg.out, NAME, cfg.model)
    html = png.with_suffix(".html")
    save_colored_tokens(html, res0.str_tokens, importances[0], title=f"{model.spec.name}: importance for {cfg.target!r} (resid_pre AtP, mean ablation)")
    numbers["html_view"] = html.name

    fig = new_figure(13, 7)
    a1, a2 = fig.subplots(2, 1, height_ratios=[1.2, 1])
    plot_attribution_heatmap(res0, node="resid_pre", ax=a1)
    a1.set_title(f"AtP scores (patched − clean {cfg.target!r} logit) per layer × position, example 0")
    plot_binned(bins.labels, bins.values, ax=a2, title=f"importance by region (min-max per sample, mean over {len(errors)})")
    fig.suptitle(f"{model.spec.name}: attribution patching with mean ablation at planted errors")
    write_outputs(cfg.out, NAME, cfg.model, fig, numbers, cfg)
    return numbers


if __name__ == "__main__":
    from _common import arg_parser

    args = arg_parser(Config).parse_args()
    print(main(Config(**vars(args))))
