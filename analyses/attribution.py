"""Which tokens make the model say " Wait"? Attribution patching with mean ablation.

Metric: the " Wait" logit at the position right after a wrongly written step. Corrupted state:
the dataset-mean ``resid_pre`` per layer (over all examples and positions). Token importance =
the "max over all layers" of the score (as in wj210/cot_backtrack), signed so that patching the token to the mean
lowering the metric counts as important. Three estimators side by side: plain AtP (Kramár et al. 2024),
the AtP* QK-fix, and exact activation patching (the reference; on the first ``n_exact``
examples). On tiny-thinker the ground truth is known: the wrong step's operand and result tokens
should carry the decision. Also: Spearman ρ of each estimator against exact patching (per node
type on the first examples), importance binned into question vs five 20% bins of the thinking,
the overlap of the top-10 important words with the next 100 words the model writes, the
attention of the heads that support " Wait" most (by AtP on ``hook_z``) from the query position
onto the same bins, and a self-contained circuitsvis HTML view of one example. Source: the
public repository wj210/cot_backtrack (understanding backtracking).

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

    NO_SHARD = (
        "its corrupted baseline is the mean activation over all examples, so every score depends on the "
        "other shards' examples; run it unsharded"
    )

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


def main(cfg: Config, loaded_model: Any = None) -> dict:
    import mechthink as mt
    from mechthink import attribution as atp
    from mechthink import context
    from mechthink.models.organism import context_spans, ground_truth_hits, is_organism, step_examples
    from mechthink.plotting.attribution import plot_attribution_overview, save_colored_tokens
    from mechthink.report import output_paths, write_outputs

    model = loaded_model if loaded_model is not None else mt.load_model(cfg.model)
    examples = step_examples(model, cfg.n_samples)
    target_id = model.token_variants(cfg.target.strip())[cfg.target]
    means = atp.mean_activations(model, [e.input_ids for e in examples], hooks=atp.NODE_TYPES)
    errors = [e for e in examples if e.is_error]
    seqs = [e.input_ids for e in errors]
    metric = atp.logit_metric(-1, target_id)
    comp = atp.compare_estimators(model, seqs, metric, means=means, estimators={"atp": ("resid_pre", "z"), "qkfix": ("resid_pre",)},
                                  n_exact=cfg.n_exact, exact_batch_size=64)
    per_type = atp.compare_estimators(model, seqs[: cfg.n_node_types], metric, means=means, exact_nodes=atp.NODE_TYPES,
                                      estimators=dict.fromkeys(("atp", "qkfix"), atp.NODE_TYPES), exact_batch_size=128).spearman()
    rho = comp.spearman()
    importances = {m: comp.importances(m) for m in comp.methods}  # max over layers of -score
    overlap = context.future_word_overlap(model, seqs, importances["atp"], cfg.horizon_tokens, k=10, horizon=100)
    heads = atp.rank_heads(comp.results["atp"], k=cfg.n_top_heads)
    q_spans, t_spans = context_spans(errors)
    att = context.binned_attention(model, seqs, heads.heads, q_spans, t_spans, n_bins=5)
    bins = context.binned_importance(importances["atp"], q_spans, t_spans, n_bins=5)
    bins_qk = context.binned_importance(importances["qkfix"], q_spans, t_spans, n_bins=5)
    numbers: dict[str, Any] = {
        "n_error_examples": len(errors),
        "n_exact": len(comp.results["exact"]),
        "importance": "max over layers of -score (resid_pre, mean ablation)",
        "spearman_vs_exact_resid_pre": rho.per_sample("resid_pre"),
        "spearman_vs_exact_resid_pre_mean": rho.mean("resid_pre"),
        "spearman_vs_exact_per_node_type_mean": per_type.mean(),
        "spearman_per_node_type_n_examples": per_type.n_samples,
        "binned_importance_labels": bins.labels,
        "binned_importance_mean": bins.mean.tolist(),
        "binned_importance_mean_qkfix": bins_qk.mean.tolist(),
        "top10_word_overlap_next100_mean": overlap.mean,
        "top_heads_by_atp": heads.labels,
        "top_heads_support": heads.top_support,
        "top_heads_binned_attention": dict(zip(heads.labels, att.values.tolist())),
    }
    if is_organism(model):  # the wrong step's operands and result are the known cause
        hits = {m: ground_truth_hits(importances[m], errors, k=3) for m in comp.methods}
        numbers.update({key: {m: h.fractions()[key] for m, h in hits.items()} for key in hits["atp"].fractions()})
        numbers["ground_truth_n"] = {m: h.n for m, h in hits.items()}

    html = output_paths(cfg.out, NAME, cfg.model)[0].with_suffix(".html")
    title = f"{model.spec.name}: importance for {cfg.target!r} (resid_pre AtP, mean ablation, max over layers)"
    save_colored_tokens(html, comp.results["atp"][0].str_tokens, importances["atp"][0], title=title)
    numbers["html_view"] = html.name
    fig = plot_attribution_overview(comp, bins, att, cfg.target, model.spec.name)
    write_outputs(cfg.out, NAME, cfg.model, fig, numbers, cfg, fingerprint=model.fingerprint())
    return numbers

if __name__ == "__main__":
    from mechthink.cli import run_analysis

    run_analysis(NAME)
