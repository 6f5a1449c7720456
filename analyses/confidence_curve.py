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

from mechthink.config import TraceConfig

NAME = "confidence_curve"


@dataclass
class Config(TraceConfig):
    """Confidence in the gold answer through the thinking."""

    SHARDABLE = True

    n_samples: int = 16
    """Number of problems (one greedy trace each)."""
    seed: int = 7
    """Seed of the problem sample."""
    n_points: int = 16
    """Probe points, evenly spaced through each trace's thinking."""


def records(cfg: Config, model: Any, problems: list[Any]) -> list[dict | None]:
    """Per problem: its trace's probe (log p of each candidate at each point) and summary row."""
    from mechthink import confidence, shard
    from mechthink.report import problem_traces

    out: list[dict | None] = []
    for tr, q in zip(problem_traces(model, problems, cfg, NAME), problems):
        curves = confidence.gold_confidence_curves(model, [tr], [q.answer], n_points=cfg.n_points)
        out.append(shard.pack({"curve": curves.curves[0], "row": curves.rows[0]}) if curves.rows else None)
    return out


def aggregate(cfg: Config, recs: list[dict], model_name: str) -> tuple[dict, Any]:
    """Means over traces and the figure, from the per-problem records."""
    from mechthink import confidence, shard

    recs = shard.unpack(recs)
    curves = confidence.GoldConfidenceCurves([confidence.AnswerProbeResult(**r["curve"]) for r in recs],
                                             [confidence.GoldConfidenceRow(**r["row"]) for r in recs])
    return curves.numbers(), curves.plot(model_name=model_name)


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
