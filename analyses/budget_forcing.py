"""Budget forcing / TTTS: accuracy vs thinking budget and vs forced " Wait" extensions.

s1 (Muennighoff et al. 2025) and Qian et al. 2025's TTTS (seed 002): cap the thinking at a
budget of tokens and force the answer (think_close + answer suffix), or, when the model tries to
close its thinking, append " Wait" instead, up to N times. Held-out problems, greedy decoding.

    mechthink budget-forcing [--model tiny-thinker] [--n-samples 40]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mechthink.config import ProblemConfig

NAME = "budget_forcing"


@dataclass
class Config(ProblemConfig):
    """Accuracy vs thinking budget and vs number of forced extensions."""

    n_samples: int = 40
    """Number of problems."""
    seed: int = 21
    """Seed of the problem sample."""
    max_new_tokens: int = 160
    """Generation budget per trace (tokens)."""
    budgets: str = "2,4,8,12,16,24,32,48"
    """Thinking budgets (tokens) after which the answer is forced (comma-separated)."""
    extensions: str = "0,1,2,4"
    """Numbers of forced extensions when the model tries to close its thinking."""
    extend_with: str = " Wait"
    """Text written instead of the think-close tag on each extension."""

    def __post_init__(self) -> None:
        super().__post_init__()
        from mechthink.config import require

        for name in ("budgets", "extensions"):
            value = getattr(self, name)
            try:
                ok = all(int(b) >= 0 for b in value.split(","))
            except ValueError:
                ok = False
            require(ok, name, value, "use comma-separated non-negative integers such as '2,4,8'")


def main(cfg: Config, loaded_model: Any = None) -> dict:
    import torch

    import mechthink as mt
    from mechthink import interventions as iv
    from mechthink import steering, traces
    from mechthink.plotting.steering import new_figure, plot_curves
    from mechthink.report import write_outputs

    from mechthink.models.organism import problems_for

    torch.set_num_threads(1)
    model = loaded_model if loaded_model is not None else mt.load_model(cfg.model)
    qs = problems_for(model, cfg.n_samples, cfg.seed, cfg.gsm8k_path)
    golds = [str(q.answer) for q in qs]

    def score(gen: list) -> dict:
        deg = [steering.degeneration(t) for t in gen]
        return {
            "accuracy": iv.accuracy([t.answer_text for t in gen], golds),
            "mean_thinking_tokens": sum(d.thinking_tokens for d in deg) / len(deg),
            "closed_rate": sum(d.closed for d in deg) / len(deg),
            "mean_repetition": sum(d.repetition for d in deg) / len(deg),
        }

    base = score(traces.generate(model, qs, max_new_tokens=cfg.max_new_tokens, batch_size=len(qs)))
    by_budget = []
    for b in [int(x) for x in cfg.budgets.split(",")]:
        with iv.budget_forcing(model, budget=b) as st:
            gen = traces.generate(model, qs, max_new_tokens=cfg.max_new_tokens, batch_size=len(qs))
        by_budget.append({"budget": b, "forced_rate": sum(st.forced_answer) / len(qs), **score(gen)})
    by_ext = []
    for n in [int(x) for x in cfg.extensions.split(",")]:
        with iv.budget_forcing(model, max_extensions=n, extend_with=cfg.extend_with) as st:
            gen = traces.generate(model, qs, max_new_tokens=cfg.max_new_tokens, batch_size=len(qs))
        by_ext.append({"max_extensions": n, "mean_extensions": sum(st.extensions) / len(qs), **score(gen)})
    numbers = {"n_samples": len(qs), "unconstrained": base, "by_budget": by_budget, "by_extensions": by_ext}
    fig = new_figure(11, 4)
    ax = fig.add_subplot(1, 2, 1)
    xb = [r["budget"] for r in by_budget]
    plot_curves(ax, xb, {"accuracy": [r["accuracy"] for r in by_budget],
                         "answer forced": [r["forced_rate"] for r in by_budget]},
                "thinking budget (tokens)", "rate",
                f"{model.spec.name}: cap thinking, force the answer (unconstrained acc {base['accuracy']:.2f})")
    ax = fig.add_subplot(1, 2, 2)
    xe = [r["max_extensions"] for r in by_ext]
    plot_curves(ax, xe, {"accuracy": [r["accuracy"] for r in by_ext],
                         "closed": [r["closed_rate"] for r in by_ext],
                         "repetition": [r["mean_repetition"] for r in by_ext]},
                f"forced '{cfg.extend_with.strip()}' extensions", "rate",
                f"{model.spec.name}: extend thinking when it tries to close")
    write_outputs(cfg.out, NAME, cfg.model, fig, numbers, cfg, fingerprint=model.fingerprint())
    return numbers


if __name__ == "__main__":
    from mechthink.cli import run_analysis

    run_analysis(NAME)
