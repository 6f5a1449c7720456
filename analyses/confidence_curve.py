"""Answer confidence during thinking, from a forked KV cache (repeng PR #69 / llm-moral-foundations2).

At evenly spaced points through each trace's thinking, fork the KV cache, append the model's
answer-forcing suffix (``\\n</think>\\n\\nThe final answer is \\boxed{``) and read log p of every
candidate answer (scored as whole token sequences closed by ``}``); the probability mass on all candidates is the
sanity monitor. One line per trace: log p(gold), with ``</think>`` marked.

    mechthink confidence-curve [--model tiny-thinker] [--n-samples 12]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mechthink.config import ProblemConfig

NAME = "confidence_curve"


@dataclass
class Config(ProblemConfig):
    """Confidence in the gold answer through the thinking."""

    n_samples: int = 16
    """Number of problems (one greedy trace each)."""
    seed: int = 7
    """Seed of the problem sample."""
    n_points: int = 16
    """Probe points, evenly spaced through each trace's thinking."""


def main(cfg: Config, loaded_model: Any = None) -> dict:
    import mechthink as mt
    from mechthink import confidence, traces
    from mechthink.plotting.confidence import plot_confidence_curves
    from mechthink.plotting.lens import new_figure
    from mechthink.report import write_outputs

    from mechthink.models.organism import problems_for

    model = loaded_model if loaded_model is not None else mt.load_model(cfg.model)
    qs = problems_for(model, cfg.n_samples, cfg.seed, cfg.gsm8k_path)
    gen = traces.generate(model, qs, max_new_tokens=cfg.max_new_tokens, batch_size=8)
    results, golds, rows = [], [], []
    for tr, q in zip(gen, qs):
        if tr.think_start is None:
            continue
        gold = q.answer
        # candidates: the gold and numbers near it (whole sequences), so the mass is meaningful
        g = int(float(gold)) if gold.lstrip("-").replace(".", "", 1).isdigit() else None
        cands = sorted({gold} | ({str(v) for v in range(max(0, g - 10), g + 11)} if g is not None else set()))
        # "}" closes \boxed{: each choice is a whole answer, so "1}" does not include "12}"
        res = confidence.confidence_curve(model, tr, {c: [c + "}"] for c in cands}, n_points=cfg.n_points)
        results.append(res)
        golds.append(gold)
        c = res.choice_names.index(gold)
        rows.append(
            {
                "id": tr.id,
                "gold": gold,
                "think_closed": tr.think_end is not None,
                "logp_gold_first": float(res.logprobs[0, c]),
                "logp_gold_last": float(res.logprobs[-1, c]),
                "mass_mean": float(res.mass.mean()),
                "mass_min": float(res.mass.min()),
            }
        )
    n = max(1, len(rows))
    numbers = {
        "n_traces": len(rows),
        "mean_logp_gold_first_point": sum(r["logp_gold_first"] for r in rows) / n,
        "mean_logp_gold_last_point": sum(r["logp_gold_last"] for r in rows) / n,
        "mean_mass_on_candidates": sum(r["mass_mean"] for r in rows) / n,
        "traces": rows,
    }
    fig = new_figure(10, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    plot_confidence_curves(results, golds, ax=ax, title=f"{model.spec.name}: log p(gold) after forcing an answer, {len(rows)} traces (mean mass on candidates {numbers['mean_mass_on_candidates']:.2f})")
    write_outputs(cfg.out, NAME, cfg.model, fig, numbers, cfg, fingerprint=model.fingerprint())
    return numbers


if __name__ == "__main__":
    from mechthink.cli import run_analysis

    run_analysis(NAME)
