"""Which tokens make the model say " Wait"? Attribution patching with mean ablation (ARBOR #22).

Metric: the " Wait" logit at the position right after a wrongly written step. Corrupted state:
the dataset-mean ``resid_pre`` per layer (over all examples and positions). Token importance =
the seed's "max over all layers" of the score, signed so that patching the token to the mean
lowering the metric counts as important. Three estimators side by side: plain AtP (the seed's),
the AtP* QK-fix, and exact activation patching (the reference; on the first ``n_exact``
examples). On tiny-thinker the ground truth is known: the wrong step's operand and result tokens
should carry the decision. Also: Spearman ρ of each estimator against exact patching (per node
type on the first examples), importance binned into question vs five 20% bins of the thinking,
the overlap of the top-10 important words with the next 100 words the model writes, the
attention of the heads that support " Wait" most (by AtP on ``hook_z``) from the query position
onto the same bins, and a self-contained circuitsvis HTML view of one example.

    mechthink attribution [--model tiny-thinker] [--n-samples 40]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mechthink.config import AnalysisConfig

NAME = "attribution"


@dataclass
class Config(AnalysisConfig):
    """Attribution patching at planted backtracking points."""

    n_samples: int = 200
    """Held-out step examples (the mean baseline is taken over all; the wrong steps are scored)."""
    n_exact: int = 100
    """Wrong-step examples also scored by exact activation patching (the reference)."""
    n_node_types: int = 10
    """Examples on which every node type is compared with exact patching (Spearman rho)."""
    n_top_heads: int = 3
    """Heads (ranked by AtP on hook_z) whose attention from the query position is binned."""
    horizon_tokens: int = 120
    """Tokens generated after the query position for the top-word overlap."""
    target: str = " Wait"
    """The metric: this token's logit at the query position."""

    ALLOW_ZERO = ("n_exact", "n_node_types")


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

    from mechthink.models.organism import is_organism, step_examples

    model = loaded_model if loaded_model is not None else mt.load_model(cfg.model)
    examples = step_examples(model, cfg.n_samples)
    target_id = model.token_variants(cfg.target.strip())[cfg.target]
    means = atp.mean_activations(model, [e.input_ids for e in examples], hooks=atp.NODE_TYPES)
    errors = [e for e in examples if e.is_error]
    metric = atp.logit_metric(-1, target_id)

    organism = is_organism(model)
    methods = ("atp", "qkfix", "exact")
    hits = {k: {"any": 0, "result": 0, "result_and_operand": 0, "top1_in_step": 0, "n": 0} for k in methods}
    importances: dict[str, list] = {k: [] for k in methods}
    q_spans, t_spans = [], []
    rhos: dict[str, list[float]] = {"atp": [], "qkfix": []}
    results = []
    for i, ex in enumerate(errors):
        ids = torch.tensor(ex.input_ids)
        res = {
            "atp": atp.attribution_patching(model, ids, metric, baseline="mean", means=means, nodes=("resid_pre", "z")),
            "qkfix": atp.attribution_patching(
                model, ids, metric, baseline="mean", means=means, nodes=("resid_pre",), qk_fix=True
            ),
        }
        if i < cfg.n_exact:
            res["exact"] = atp.activation_patching(
                model, ids, metric, baseline="mean", means=means, nodes=("resid_pre",), batch_size=64
            )
            for k in rhos:
                rhos[k].append(_spearman(res[k].scores["resid_pre"], res["exact"].scores["resid_pre"]))
        results.append(res)
        n = len(ids)
        q_spans.append(tuple(ex.question_span) if organism else (0, 1))
        t_spans.append((q_spans[-1][1], n - 1))
        for k, r in res.items():
            # the seed's definition: max over layers of the score, signed so that a token whose
            # ablation lowers the " Wait" logit is important
            imp = r.token_importance("resid_pre", reduce="max", sign=-1)
            importances[k].append(imp)
            if not organism:
                continue
            cand = imp.clone()
            cand[0] = cand[-1] = -float("inf")  # BOS and the query position itself
            top3 = set(cand.topk(3).indices.tolist())
            operands, result = set(ex.step_operand_positions), set(ex.step_result_positions)
            h = hits[k]
            h["n"] += 1
            h["any"] += bool(top3 & (operands | result))
            h["result"] += bool(top3 & result)
            h["result_and_operand"] += bool(top3 & result) and bool(top3 & operands)
            # the whole written step: operands, operator, "=", the result and its leading space
            step_span = set(range(min(operands | result), max(result) + 1))
            h["top1_in_step"] += int(cand.argmax()) in step_span

    # Spearman ρ against exact patching per node type, AtP and QK-fix
    all_nodes = atp.NODE_TYPES
    node_means = means
    per_type: dict[str, list[float]] = {}
    for ex in errors[: cfg.n_node_types]:
        ids = torch.tensor(ex.input_ids)
        a = atp.attribution_patching(model, ids, metric, baseline="mean", means=node_means, nodes=all_nodes)
        q = atp.attribution_patching(model, ids, metric, baseline="mean", means=node_means, nodes=all_nodes, qk_fix=True)
        x = atp.activation_patching(model, ids, metric, baseline="mean", means=node_means, nodes=all_nodes, batch_size=128)
        for n in all_nodes:
            per_type.setdefault(f"atp/{n}", []).append(_spearman(a.scores[n], x.scores[n]))
            per_type.setdefault(f"qkfix/{n}", []).append(_spearman(q.scores[n], x.scores[n]))

    # Top-10 important words (AtP importance summed into words, stopwords removed) vs the next
    # 100 words the model writes after the query position (ARBOR #22: ≈ 41%)
    from mechthink import interventions as iv

    futures = iv.continue_greedy(model, [e.input_ids for e in errors], cfg.horizon_tokens)
    overlaps = []
    for e, imp, fut in zip(errors, importances["atp"], futures):
        ws = context.word_scores(model.tokenizer, e.input_ids, imp)
        overlaps.append(context.top_word_overlap(ws, None, model.to_string(fut), k=10, horizon=100).overlap)

    # Heads that support the " Wait" logit most (AtP on hook_z, summed over positions; negative =
    # ablating the head lowers the logit) and where they attend from the query position
    head_support = -torch.stack([r["atp"].scores["z"].sum(1) for r in results]).mean(0)  # [layer, head]
    order = head_support.flatten().argsort(descending=True)[: cfg.n_top_heads].tolist()
    n_heads = head_support.shape[1]
    top_heads = [(i // n_heads, i % n_heads) for i in order]
    att = torch.stack(
        [
            context.binned_attention(model, e.input_ids, top_heads, q_spans[i], t_spans[i], n_bins=5).values
            for i, e in enumerate(errors)
        ]
    ).mean(0)  # [head, bin]

    bins = context.binned_importance(importances["atp"], q_spans, t_spans, n_bins=5)
    bins_qk = context.binned_importance(importances["qkfix"], q_spans, t_spans, n_bins=5)
    mean = lambda v: sum(v) / max(1, len(v))  # noqa: E731
    numbers: dict[str, Any] = {
        "n_error_examples": len(errors),
        "n_exact": min(cfg.n_exact, len(errors)),
        "importance": "max over layers of -score (resid_pre, mean ablation)",
        "spearman_vs_exact_resid_pre": {k: v for k, v in rhos.items()},
        "spearman_vs_exact_resid_pre_mean": {k: mean(v) for k, v in rhos.items()},
        "spearman_vs_exact_per_node_type_mean": {k: mean(v) for k, v in per_type.items()},
        "spearman_per_node_type_n_examples": min(cfg.n_node_types, len(errors)),
        "binned_importance_labels": bins.labels,
        "binned_importance_mean": bins.mean.tolist(),
        "binned_importance_mean_qkfix": bins_qk.mean.tolist(),
        "top10_word_overlap_next100_mean": sum(overlaps) / max(1, len(overlaps)),
        "top_heads_by_atp": [f"L{L}H{h}" for L, h in top_heads],
        "top_heads_support": [float(head_support[L, h]) for L, h in top_heads],
        "top_heads_binned_attention": {f"L{L}H{h}": att[i].tolist() for i, (L, h) in enumerate(top_heads)},
    }
    if organism:
        for what in ("any", "result", "result_and_operand", "top1_in_step"):
            key = {
                "any": "top3_contains_step_operand_or_result",
                "result": "top3_contains_step_result",
                "result_and_operand": "top3_contains_step_result_and_an_operand",
                "top1_in_step": "top1_within_wrong_step_span",
            }[what]
            numbers[key] = {k: hits[k][what] / max(1, hits[k]["n"]) for k in methods}
        numbers["ground_truth_n"] = {k: hits[k]["n"] for k in methods}

    res0 = results[0]
    png, _ = output_paths(cfg.out, NAME, cfg.model)
    html = png.with_suffix(".html")
    save_colored_tokens(
        html,
        res0["atp"].str_tokens,
        importances["atp"][0],
        title=f"{model.spec.name}: importance for {cfg.target!r} (resid_pre AtP, mean ablation, max over layers)",
    )
    numbers["html_view"] = html.name

    panels = [k for k in methods if k in res0]
    fig = new_figure(13, 3.2 * len(panels) + 4.0)
    grid = fig.add_gridspec(len(panels) + 1, 2, height_ratios=[1.0] * len(panels) + [1.2])
    names = {"atp": "AtP", "qkfix": "AtP* QK-fix", "exact": "exact patching"}
    for i, k in enumerate(panels):
        ax = fig.add_subplot(grid[i, :])
        plot_attribution_heatmap(res0[k], node="resid_pre", ax=ax)
        ax.set_title(f"{names[k]}: patched − clean {cfg.target!r} logit per layer × position, example 0")
    plot_binned(
        bins.labels,
        bins.values,
        ax=fig.add_subplot(grid[-1, 0]),
        title=f"AtP importance by region (min-max per sample, mean over {len(errors)})",
    )
    plot_binned(
        bins.labels,
        att,
        ylabel="attention",
        row_labels=[f"L{L}H{h}" for L, h in top_heads],
        ax=fig.add_subplot(grid[-1, 1]),
        title=f"attention of the top-{len(top_heads)} heads (by AtP) from the query position",
    )
    fig.suptitle(f"{model.spec.name}: attribution patching with mean ablation at planted errors")
    write_outputs(cfg.out, NAME, cfg.model, fig, numbers, cfg, fingerprint=model.fingerprint())
    return numbers


if __name__ == "__main__":
    from mechthink.cli import run_analysis

    run_analysis(NAME)
