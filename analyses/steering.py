"""Steering with a backtracking vector (ARBOR, wj210/cot_backtrack, experiment 1; difference of means).

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

    SHARDABLE = True

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


def _decision_points(model: Any, cfg: Config) -> list[tuple[str, Any]]:
    """Decision points: prefixes ending right after a wrongly written step (the organism
    backtracks there), then after a correct step (it goes on); their mix has a base rate near 0.5."""
    from mechthink.models.organism import step_examples

    held = step_examples(model, 4 * cfg.n_samples, seed=cfg.seed)
    return [(name, e) for name, wrong in (("wrong", True), ("correct", False))
            for e in [e for e in held if e.is_error == wrong][: cfg.n_samples]]


def _layer_sets(model: Any, cfg: Config) -> dict[str, list[int]]:
    sets = {"steering_layers": list(model.steering_layers)}
    if cfg.late_layers:
        sets["late_layers"] = list(range((2 * model.n_layers) // 3, model.n_layers))
    return sets


def records(cfg: Config, model: Any, problems: list[tuple[str, Any]]) -> list[dict | None]:
    """Per decision point: its group and, per layer set and coefficient, what the model does there.
    The vector comes from the same ``n_vector`` examples in every shard (recorded to check it)."""
    import torch

    from mechthink import shard, steering
    from mechthink.models.organism import step_examples

    torch.set_num_threads(1)
    train = step_examples(model, cfg.n_vector)
    vec = steering.from_positions(
        model,
        [(e.input_ids, [e.query_position]) for e in train if e.is_error],
        [(e.input_ids, [e.query_position]) for e in train if not e.is_error],
        layers=list(range(model.n_layers)),
    )
    sets = _layer_sets(model, cfg)
    groups = {g: ([e.input_ids for n, e in problems if n == g], [str(e.answer) for n, e in problems if n == g])
              for g in dict.fromkeys(n for n, _ in problems)}
    coeffs = [float(c) for c in cfg.coeffs.split(",")]
    points = {name: steering.coefficient_sweep_points(model, vec, groups, coeffs, layers=ls,
                                                      max_new_tokens=cfg.max_new_tokens, window=cfg.window)
              for name, ls in sets.items()}
    seen = dict.fromkeys(groups, 0)
    out: list[dict | None] = []
    for g, _ in problems:
        k, seen[g] = seen[g], seen[g] + 1
        out.append(shard.pack({"group": g, "layer_sets": sets, "vector_norms": dict(zip(map(str, vec.layers), vec.norms.tolist())),
                               "points": {name: [by_coeff[k] for by_coeff in pts[g]] for name, pts in points.items()}}))
    return out


def aggregate(cfg: Config, recs: list[dict], model_name: str) -> tuple[dict, Any]:
    """Both sweeps, their checks and the figure, from the per-point records."""
    from mechthink import steering
    from mechthink.plotting.steering import coefficient_sweep_figure

    sets, norms = recs[0]["layer_sets"], recs[0]["vector_norms"]
    if any(r["vector_norms"] != norms for r in recs):
        raise ValueError("steering: the shards extracted different steering vectors (other hardware or software?); "
                         "run every shard on the same setup")
    coeffs = [float(c) for c in cfg.coeffs.split(",")]
    groups = list(dict.fromkeys(r["group"] for r in recs))
    sweeps = {}
    for name, layers in sets.items():
        points = {g: [[steering.DecisionPoint(**r["points"][name][j]) for r in recs if r["group"] == g]
                      for j in range(len(coeffs))] for g in groups}
        sweeps[name] = steering.sweep_from_points(coeffs, layers, points, model_name)
    keys = [("mix", k) for k in ("p_backtrack_next", "backtrack_rate", "wait_rate", "p_wait_next")]
    numbers = {
        "layer_sets": sets,
        "vector_norms": norms,
        "n_samples_per_group": {g: sum(r["group"] == g for r in recs) for g in groups},
        "sweeps": {name: sw.rows() for name, sw in sweeps.items()},
        "monotonic": {name: {f"{g}/{k}": sw.is_monotonic(g, k) for g, k in keys} for name, sw in sweeps.items()},
        "negation_lowers_backtracking_after_wrong_steps": {
            name: sw.against_zero("wrong", "p_backtrack_next", -1) for name, sw in sweeps.items()},
        "positive_raises_backtracking_after_correct_steps": {
            name: sw.against_zero("correct", "p_backtrack_next", 1) for name, sw in sweeps.items()},
    }
    return numbers, coefficient_sweep_figure(sweeps)


def main(cfg: Config, loaded_model: Any = None) -> dict:
    import mechthink as mt
    from mechthink import shard

    model = loaded_model if loaded_model is not None else mt.load_model(cfg.model)
    return shard.run(NAME, cfg, model, _decision_points(model, cfg), records, aggregate)


if __name__ == "__main__":
    from mechthink.cli import run_analysis

    run_analysis(NAME)
