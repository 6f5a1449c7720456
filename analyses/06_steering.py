"""Steering with a backtracking vector (ARBOR #22 experiment 1; difference of means).

The vector is the difference of mean ``resid_post`` at the end of wrongly written steps and at
the end of correct steps (tiny-thinker's held-out examples, re-rendered for other models). It is
added continuously (every generated token) at the default steering layers with coefficients
from negative to positive; from correct-step prefixes we measure the rate of backtracking words
in greedy continuations, P(" Wait") as the next token, accuracy and degeneration.

    python analyses/06_steering.py [--model tiny-thinker] [--n-samples 40]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

NAME = "steering"


@dataclass
class Config:
    """Backtracking-vector coefficient sweep."""

    model: str = "tiny-thinker"
    out: Path = Path(__file__).resolve().parents[1] / "figures"
    n_vector: int = 64
    n_samples: int = 40
    max_new_tokens: int = 64
    coeffs: str = "-1,-0.5,-0.25,0,0.25,0.5,1"
    window: int = 64
    seed: int = 7
    late_layers: bool = True  # also sweep the last third of the blocks (2n/3 .. n-1)

    def __post_init__(self) -> None:
        if self.n_vector < 2 or self.n_samples < 2:
            raise ValueError("n_vector and n_samples must be >= 2")
        [float(c) for c in self.coeffs.split(",")]


def main(cfg: Config, loaded_model: Any = None) -> dict:
    import re

    import torch

    import mechthink as mt
    from mechthink import interventions as iv
    from mechthink import steering
    from mechthink.plotting.steering import new_figure, plot_curves
    from mechthink.report import write_outputs

    from _common import step_examples

    torch.set_num_threads(1)
    model = loaded_model if loaded_model is not None else mt.load_model(cfg.model)
    train = step_examples(model, cfg.n_vector)
    vec = steering.from_positions(
        model,
        [(e["input_ids"], [len(e["input_ids"]) - 1]) for e in train if e["is_error"]],
        [(e["input_ids"], [len(e["input_ids"]) - 1]) for e in train if not e["is_error"]],
        layers=list(range(model.n_layers)),
    )
    evals = [e for e in step_examples(model, 2 * cfg.n_samples, seed=cfg.seed) if not e["is_error"]][: cfg.n_samples]
    prefixes = [e["input_ids"] for e in evals]
    golds = [str(e["answer"]) for e in evals]
    words = list(model.spec.backtracking_words)
    pat = re.compile(r"(?<![A-Za-z])(?:" + "|".join(re.escape(w) for w in words) + r")(?![A-Za-z])")
    wait_ids = model.token_ids(["Wait"])
    close = model.spec.think_close
    coeffs = [float(c) for c in cfg.coeffs.split(",")]
    def sweep(layers: list[int]) -> list[dict]:
        rows = []
        for c in coeffs:
            with steering.steer(model, vec, layers=layers, coeff=c, mode="continuous"):
                gens = iv.continue_greedy(model, prefixes, cfg.max_new_tokens)
                with torch.inference_mode():
                    p_wait = sum(float(iv.logits_at_last(model, p).exp()[wait_ids].sum()) for p in prefixes) / len(prefixes)
            texts = [model.to_string(g) for g in gens]
            firsts = [model.to_string(g[: cfg.window]) for g in gens]
            n_tok = sum(min(len(g), cfg.window) for g in gens)
            rows.append({
                "coeff": c,
                "backtrack_rate": sum(bool(pat.search(t)) for t in firsts) / len(firsts),
                "wait_rate": sum(" Wait" in t or t.startswith("Wait") for t in firsts) / len(firsts),
                "backtrack_words_per_100_tokens": 100.0 * sum(len(pat.findall(t)) for t in firsts) / max(n_tok, 1),
                "p_wait_next": p_wait,
                "accuracy": iv.accuracy(texts, golds),
                "closed_rate": sum(close in t for t in texts) / len(texts),
            })
        return rows

    def monotonic(rows: list[dict], key: str) -> bool:
        return all(a[key] <= b[key] for a, b in zip(rows, rows[1:]))

    sets = {"steering_layers": list(model.steering_layers)}
    if cfg.late_layers:
        sets["late_layers"] = list(range((2 * model.n_layers) // 3, model.n_layers))
    sweeps = {name: sweep(ls) for name, ls in sets.items()}
    numbers = {
        "layer_sets": sets,
        "vector_norms": dict(zip(map(str, vec.layers), vec.norms.tolist())),
        "n_samples": len(prefixes),
        "sweeps": sweeps,
        "monotonic": {name: {k: monotonic(rows, k) for k in ("wait_rate", "p_wait_next", "backtrack_rate")}
                      for name, rows in sweeps.items()},
        "monotonic_nonnegative_coeffs": {
            name: {k: monotonic([r for r in rows if r["coeff"] >= 0], k) for k in ("wait_rate", "p_wait_next")}
            for name, rows in sweeps.items()},
        "negation_lowers_p_wait": {
            name: all(r["p_wait_next"] < z["p_wait_next"] for r in rows if r["coeff"] < 0
                      for z in rows if z["coeff"] == 0) for name, rows in sweeps.items()},
    }
    fig = new_figure(6 * len(sweeps), 4)
    for j, (name, rows) in enumerate(sweeps.items()):
        ax = fig.add_subplot(1, len(sweeps), j + 1)
        plot_curves(
            ax, coeffs,
            {k: [r[k] for r in rows] for k in ("wait_rate", "backtrack_rate", "p_wait_next", "accuracy", "closed_rate")},
            "steering coefficient", "rate / probability",
            f"{model.spec.name}: backtracking vector at layers {sets[name]}\n(greedy from {len(prefixes)} correct-step prefixes)",
        )
    write_outputs(cfg.out, NAME, cfg.model, fig, numbers, cfg)
    return numbers


if __name__ == "__main__":
    from _common import arg_parser

    args = arg_parser(Config).parse_args()
    print(main(Config(**vars(args))))
