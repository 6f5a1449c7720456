"""Thinking-token suppression on traces that must backtrack (Qian et al. 2025, seed 002).

Held-out problems whose thinking is prefilled up to a wrongly written step (so the model has to
backtrack to get the answer right) are continued greedily while the logits of " Wait", " Hmm",
" Alternatively" (all single-token spellings) are set to −inf, one word at a time and all
together, against random control sets of the same size. Reports final accuracy and how often
any backtracking word still appears.

    python analyses/07_suppression.py [--model tiny-thinker] [--n-samples 40]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

NAME = "suppression"


@dataclass
class Config:
    """Accuracy under thinking-token suppression vs random suppression."""

    model: str = "tiny-thinker"
    out: Path = Path(__file__).resolve().parents[1] / "figures"
    n_samples: int = 40
    max_new_tokens: int = 80
    n_random: int = 8
    seed: int = 7

    def __post_init__(self) -> None:
        if self.n_samples < 1 or self.n_random < 1:
            raise ValueError("n_samples and n_random must be >= 1")


def main(cfg: Config, loaded_model: Any = None) -> dict:
    import re
    import statistics

    import torch

    import mechthink as mt
    from mechthink import interventions as iv
    from mechthink.plotting.steering import new_figure, plot_bars
    from mechthink.report import write_outputs

    from _common import step_examples

    torch.set_num_threads(1)
    model = loaded_model if loaded_model is not None else mt.load_model(cfg.model)
    evals = [e for e in step_examples(model, 2 * cfg.n_samples, seed=cfg.seed) if e["is_error"]][: cfg.n_samples]
    prefixes = [e["input_ids"] for e in evals]
    golds = [str(e["answer"]) for e in evals]
    words = list(model.spec.backtracking_words)
    pat = re.compile(r"(?<![A-Za-z])(?:" + "|".join(re.escape(w) for w in words) + r")(?![A-Za-z])")

    def run(ids: list[int] | None) -> dict:
        if ids:
            with iv.suppress_tokens(model, ids):
                gens = iv.continue_greedy(model, prefixes, cfg.max_new_tokens)
        else:
            gens = iv.continue_greedy(model, prefixes, cfg.max_new_tokens)
        texts = [model.to_string(g) for g in gens]
        return {"accuracy": iv.accuracy(texts, golds),
                "backtrack_rate": sum(bool(pat.search(t)) for t in texts) / len(texts),
                "n_tokens": len(ids or [])}

    sets: dict[str, list[int]] = {w: model.token_ids([w]) for w in words}
    sets["all"] = model.token_ids(words)
    results: dict[str, Any] = {"none": run(None)}
    for name, ids in sets.items():
        results[name] = run(ids)
        ctl = [run(iv.random_control(model, len(ids), exclude=sets["all"], seed=cfg.seed + s)) for s in range(cfg.n_random)]
        accs = [c["accuracy"] for c in ctl]
        results[f"random({name})"] = {
            "accuracy": statistics.mean(accs),
            "accuracy_sd": statistics.pstdev(accs),
            "accuracy_median": statistics.median(accs),
            "accuracy_each": accs,
            "backtrack_rate": statistics.mean(c["backtrack_rate"] for c in ctl),
            "n_tokens": len(ids),
        }
    numbers = {
        "n_samples": len(prefixes),
        "suppressed_sets": {k: [model.to_string([i]) for i in v] for k, v in sets.items()},
        "results": results,
        "drop_wait_vs_random": results["random(Wait)"]["accuracy"] - results["Wait"]["accuracy"],
        "drop_all_vs_random": results["random(all)"]["accuracy"] - results["all"]["accuracy"],
    }
    labels = ["none"] + [k for name in sets for k in (name, f"random({name})")]
    fig = new_figure(9, 4)
    ax = fig.add_subplot(1, 1, 1)
    plot_bars(
        ax, labels, [results[k]["accuracy"] for k in labels], "final accuracy",
        f"{model.spec.name}: accuracy after a prefilled wrong step ({len(prefixes)} problems), suppressing tokens",
        errors=[results[k].get("accuracy_sd", 0.0) for k in labels],
        colors=["grey"] + ["tab:red" if not k.startswith("random") else "tab:blue" for k in labels[1:]],
    )
    write_outputs(cfg.out, NAME, cfg.model, fig, numbers, cfg)
    return numbers


if __name__ == "__main__":
    from _common import arg_parser

    args = arg_parser(Config).parse_args()
    print(main(Config(**vars(args))))
