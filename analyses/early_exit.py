"""Early exit at each answer-reaching instance (ARBOR #22, R1-Distill-Llama-8B / GSM8K).

Wherever the thinking has reached the gold answer (each occurrence, ending at the next
``. ? ! ; \\n``) force ``</think> The final answer is \\boxed{`` and read the gold's log-prob and
mean logit and the greedy-decoded answer. Aggregated by instance index (1st, 2nd, …): the seed
found the logit rising 14.75 → 27.61 while accuracy was ≈ 0.9 already at the first instance.

    mechthink early-exit [--model tiny-thinker] [--n-samples 40]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mechthink.config import TraceConfig

NAME = "early_exit"


@dataclass
class Config(TraceConfig):
    """Early-exit confidence and accuracy by answer instance."""

    SHARDABLE = True

    n_samples: int = 100
    """Number of problems (one greedy trace each)."""
    seed: int = 11
    """Seed of the problem sample."""
    max_instances: int = 6
    """Answer instances reported (1st .. k-th)."""


def records(cfg: Config, model: Any, problems: list[Any]) -> list[dict | None]:
    """Per problem: the forced answer at each answer instance of its trace (None: no thinking)."""
    from dataclasses import asdict

    from mechthink import confidence
    from mechthink.report import problem_traces

    out: list[dict | None] = []
    for tr, q in zip(problem_traces(model, problems, cfg, NAME), problems):
        if tr.think_start is None:
            out.append(None)
            continue
        res = confidence.early_exit(model, tr, gold=q.answer)
        out.append({"trace_id": res.trace_id, "gold": res.gold, "suffix": res.suffix, "rows": [asdict(r) for r in res.rows]})
    return out


def aggregate(cfg: Config, recs: list[dict], model_name: str) -> tuple[dict, Any]:
    """The table by instance number and its figure, from the per-problem records."""
    from mechthink import confidence

    results = [confidence.EarlyExitResult(r["trace_id"], r["gold"], r["suffix"],
                                          [confidence.EarlyExitRow(**row) for row in r["rows"]], None) for r in recs]
    summary = confidence.early_exit_summary(results, max_instances=cfg.max_instances)
    return summary.numbers(), summary.plot(model_name=model_name)


def main(cfg: Config, loaded_model: Any = None) -> dict:
    import mechthink as mt
    from mechthink import shard
    from mechthink.models.organism import problems_for

    model = loaded_model if loaded_model is not None else mt.load_model(cfg.model)
    qs = problems_for(model, cfg.n_samples, cfg.seed, cfg.gsm8k_path)
    return shard.run(NAME, cfg, model, qs, records, aggregate)


if __name__ == "__main__":
    from mechthink.cli import run_analysis

    run_analysis(NAME)
