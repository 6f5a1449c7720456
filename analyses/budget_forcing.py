"""Budget forcing / TTTS: accuracy vs thinking budget and vs forced " Wait" extensions.

s1 (Muennighoff et al. 2025) and Qian et al. 2025's TTTS: cap the thinking at a
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

    SHARDABLE = True

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


def records(cfg: Config, model: Any, problems: list[Any]) -> list[dict | None]:
    """Per problem: its outcome unforced, at each budget and at each number of extensions."""
    import torch

    from mechthink import interventions as iv

    torch.set_num_threads(1)
    golds = [str(q.answer) for q in problems]
    common = dict(extend_with=cfg.extend_with, max_new_tokens=cfg.max_new_tokens)
    base = iv.forcing_outcomes(model, problems, golds, "budget", None, **common)
    by_budget = [iv.forcing_outcomes(model, problems, golds, "budget", int(b), **common) for b in cfg.budgets.split(",")]
    by_ext = [iv.forcing_outcomes(model, problems, golds, "max_extensions", int(e), **common)
              for e in cfg.extensions.split(",")]
    return [{"baseline": base[i], "budget": [o[i] for o in by_budget], "max_extensions": [o[i] for o in by_ext]}
            for i in range(len(problems))]


def aggregate(cfg: Config, recs: list[dict], model_name: str) -> tuple[dict, Any]:
    """Both sweeps and their figure, from the per-problem outcomes."""
    from mechthink import interventions as iv
    from mechthink.plotting.interventions import forcing_figure
    from mechthink.results import jsonable

    base = iv.score_outcomes([iv.ForcingOutcome(**r["baseline"]) for r in recs])
    sweeps = {}
    for parameter, values in (("budget", cfg.budgets), ("max_extensions", cfg.extensions)):
        values = [int(v) for v in values.split(",")]
        outcomes = [[iv.ForcingOutcome(**r[parameter][j]) for r in recs] for j in range(len(values))]
        sweeps[parameter] = iv.sweep_from_outcomes(parameter, values, outcomes, base, cfg.extend_with, model_name)
    numbers = {"n_samples": len(recs), "unconstrained": jsonable(base), "by_budget": sweeps["budget"].rows(),
               "by_extensions": sweeps["max_extensions"].rows()}
    return numbers, forcing_figure(sweeps["budget"], sweeps["max_extensions"])


def main(cfg: Config, loaded_model: Any = None) -> dict:
    import mechthink as mt
    from mechthink import shard
    from mechthink.models.organism import problems_for

    model = loaded_model if loaded_model is not None else mt.load_model(cfg.model)
    return shard.run(NAME, cfg, model, problems_for(model, cfg.n_samples, cfg.seed, cfg.gsm8k_path), records, aggregate)


if __name__ == "__main__":
    from mechthink.cli import run_analysis

    run_analysis(NAME)
