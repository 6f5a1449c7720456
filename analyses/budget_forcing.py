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

    NO_SHARD = (
        "its sweeps are not split into per-problem records yet (not implemented); run it unsharded"
    )

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
    from mechthink.models.organism import problems_for
    from mechthink.plotting.interventions import forcing_figure
    from mechthink.report import write_outputs
    from mechthink.results import jsonable

    torch.set_num_threads(1)
    model = loaded_model if loaded_model is not None else mt.load_model(cfg.model)
    qs = problems_for(model, cfg.n_samples, cfg.seed, cfg.gsm8k_path)
    golds = [str(q.answer) for q in qs]
    budgets = iv.forcing_sweep(model, qs, golds, "budget", [int(x) for x in cfg.budgets.split(",")],
                               max_new_tokens=cfg.max_new_tokens)
    extensions = iv.forcing_sweep(model, qs, golds, "max_extensions", [int(x) for x in cfg.extensions.split(",")],
                                  cfg.extend_with, cfg.max_new_tokens, baseline=budgets.baseline)
    numbers = {"n_samples": len(qs), "unconstrained": jsonable(budgets.baseline),
               "by_budget": budgets.rows(), "by_extensions": extensions.rows()}
    write_outputs(cfg.out, NAME, cfg.model, forcing_figure(budgets, extensions), numbers, cfg,
                  fingerprint=model.fingerprint())
    return numbers


if __name__ == "__main__":
    from mechthink.cli import run_analysis

    run_analysis(NAME)
