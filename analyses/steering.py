"""Steering with a backtracking vector (ARBOR #22 experiment 1; difference of means).

The vector is the difference of mean ``resid_post`` at the end of wrongly written steps and at
the end of correct steps (tiny-thinker's held-out examples, re-rendered for other models). It is
added continuously (every generated token) at the default steering layers and at the late
layers, with coefficients from negative to positive. At decision points — prefixes ending right
after a wrong step (base rate of backtracking ≈ 1) and after a correct step (≈ 0), and their
even mix — we measure P(backtracking word) as the next token, the rate of backtracking words in
greedy continuations, final accuracy and whether thinking closes.

    mechthink steering [--model tiny-thinker] [--n-samples 40]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mechthink.config import AnalysisConfig

NAME = "steering"


@dataclass
class Config(AnalysisConfig):
    """Backtracking-vector coefficient sweep."""

    n_samples: int = 40
    """Decision points per group (prefixes after a wrong step, and after a correct step)."""
    seed: int = 7
    """Seed of the held-out decision points."""
    n_vector: int = 64
    """Step examples the vector is extracted from (wrong-step minus correct-step residuals)."""
    max_new_tokens: int = 64
    """Greedy continuation length at each decision point."""
    coeffs: str = "-1,-0.5,-0.25,0,0.25,0.5,1"
    """Steering coefficients swept (comma-separated)."""
    window: int = 64
    """Tokens of each continuation in which backtracking words are counted."""
    late_layers: bool = True
    """Also sweep the last third of the blocks (2n/3 .. n-1)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        from mechthink.config import require

        require(self.n_vector >= 2, "n_vector", self.n_vector, "use at least 2 examples")
        try:
            [float(c) for c in self.coeffs.split(",")]
        except ValueError:
            require(False, "coeffs", self.coeffs, "use comma-separated numbers such as '-1,0,1'")


def main(cfg: Config, loaded_model: Any = None) -> dict:
    import re

    import torch

    import mechthink as mt
    from mechthink import interventions as iv
    from mechthink import steering
    from mechthink.plotting.steering import new_figure, plot_curves
    from mechthink.report import write_outputs

    from mechthink.models.organism import step_examples

    torch.set_num_threads(1)
    model = loaded_model if loaded_model is not None else mt.load_model(cfg.model)
    train = step_examples(model, cfg.n_vector)
    vec = steering.from_positions(
        model,
        [(e.input_ids, [e.query_position]) for e in train if e.is_error],
        [(e.input_ids, [e.query_position]) for e in train if not e.is_error],
        layers=list(range(model.n_layers)),
    )
    held = step_examples(model, 4 * cfg.n_samples, seed=cfg.seed)
    # Decision points: prefixes ending right after a wrongly written step (the organism
    # backtracks there) and after a correct step (it goes on); the mix has a base rate near 0.5.
    groups = {
        "wrong": [e for e in held if e.is_error][: cfg.n_samples],
        "correct": [e for e in held if not e.is_error][: cfg.n_samples],
    }
    words = list(model.spec.backtracking_words)
    pat = re.compile(r"(?<![A-Za-z])(?:" + "|".join(re.escape(w) for w in words) + r")(?![A-Za-z])")
    bt_ids = model.token_ids(words)
    wait_ids = model.token_ids(["Wait"])
    close = model.spec.think_close
    coeffs = [float(c) for c in cfg.coeffs.split(",")]

    def measure(exs: list, layers: list[int], c: float) -> dict:
        prefixes = [e.input_ids for e in exs]
        with steering.steer(model, vec, layers=layers, coeff=c, mode="continuous"):
            with torch.inference_mode():
                nxt = [iv.logits_at_last(model, p).exp() for p in prefixes]
            gens = iv.continue_greedy(model, prefixes, cfg.max_new_tokens)
        texts = [model.to_string(g) for g in gens]
        firsts = [model.to_string(g[: cfg.window]) for g in gens]
        n_tok = sum(min(len(g), cfg.window) for g in gens)
        return {
            "p_backtrack_next": sum(float(q[bt_ids].sum()) for q in nxt) / len(nxt),
            "p_wait_next": sum(float(q[wait_ids].sum()) for q in nxt) / len(nxt),
            "backtrack_rate": sum(bool(pat.search(t)) for t in firsts) / len(firsts),
            "wait_rate": sum(" Wait" in t or t.startswith("Wait") for t in firsts) / len(firsts),
            "backtrack_words_per_100_tokens": 100.0 * sum(len(pat.findall(t)) for t in firsts) / max(n_tok, 1),
            "accuracy": iv.accuracy(texts, [str(e.answer) for e in exs]),
            "closed_rate": sum(close in t for t in texts) / len(texts),
        }

    def sweep(layers: list[int]) -> list[dict]:
        rows = []
        for c in coeffs:
            row: dict[str, Any] = {"coeff": c}
            per = {g: measure(exs, layers, c) for g, exs in groups.items()}
            for g, m in per.items():
                row.update({f"{g}/{k}": v for k, v in m.items()})
            for k in per["wrong"]:  # the mix: both groups weighted equally
                row[f"mix/{k}"] = (per["wrong"][k] + per["correct"][k]) / 2
            rows.append(row)
        return rows

    def monotonic(rows: list[dict], key: str) -> bool:
        return all(a[key] <= b[key] for a, b in zip(rows, rows[1:]))

    sets = {"steering_layers": list(model.steering_layers)}
    if cfg.late_layers:
        sets["late_layers"] = list(range((2 * model.n_layers) // 3, model.n_layers))
    sweeps = {name: sweep(ls) for name, ls in sets.items()}
    keys = ("mix/p_backtrack_next", "mix/backtrack_rate", "mix/wait_rate", "mix/p_wait_next")
    numbers = {
        "layer_sets": sets,
        "vector_norms": dict(zip(map(str, vec.layers), vec.norms.tolist())),
        "n_samples_per_group": {g: len(v) for g, v in groups.items()},
        "sweeps": sweeps,
        "monotonic": {name: {k: monotonic(rows, k) for k in keys} for name, rows in sweeps.items()},
        "negation_lowers_backtracking_after_wrong_steps": {
            name: all(r["wrong/p_backtrack_next"] < z["wrong/p_backtrack_next"] for r in rows if r["coeff"] < 0
                      for z in rows if z["coeff"] == 0) for name, rows in sweeps.items()},
        "positive_raises_backtracking_after_correct_steps": {
            name: all(r["correct/p_backtrack_next"] > z["correct/p_backtrack_next"] for r in rows if r["coeff"] > 0
                      for z in rows if z["coeff"] == 0) for name, rows in sweeps.items()},
    }
    fig = new_figure(6 * len(sweeps), 8)
    for j, (name, rows) in enumerate(sweeps.items()):
        ax = fig.add_subplot(2, len(sweeps), j + 1)
        plot_curves(
            ax, coeffs,
            {f"P(backtrack word next), {g}": [r[f"{g}/p_backtrack_next"] for r in rows] for g in ("mix", "wrong", "correct")}
            | {"greedy backtrack rate, mix": [r["mix/backtrack_rate"] for r in rows]},
            "steering coefficient", "rate / probability",
            f"{model.spec.name}: backtracking vector at layers {sets[name]}\n"
            f"({len(groups['wrong'])} wrong-step + {len(groups['correct'])} correct-step prefixes)",
        )
        ax2 = fig.add_subplot(2, len(sweeps), len(sweeps) + j + 1)
        plot_curves(
            ax2, coeffs,
            {f"{k}, {g}": [r[f"{g}/{k}"] for r in rows] for k in ("accuracy", "closed_rate") for g in ("wrong", "correct")},
            "steering coefficient", "rate", "greedy continuation: final accuracy and </think> produced",
        )
    fig.subplots_adjust(hspace=0.45, wspace=0.25)
    write_outputs(cfg.out, NAME, cfg.model, fig, numbers, cfg, fingerprint=model.fingerprint())
    return numbers


if __name__ == "__main__":
    from mechthink.cli import run_analysis

    run_analysis(NAME)
