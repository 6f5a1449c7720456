"""MI peaks along reasoning traces and the tokens at them (Qian et al. 2025, ChnQ/MI-Peaks).

Per step t of a trace, the paper's HSIC estimate of MI(h_t, h_y) between the last block's output
at the step and the representation of the solution; peaks by the IQR rule. On tiny-thinker the
traces are held-out transcripts with planted errors (teacher-forced, ground truth known) and the
"solution" is the wrap-up sentence "So the answer is N."; the peaks are compared with where the
backtracking words, wrong results and answer occurrences are. On any other model: greedy traces
on GSM8K, with the GSM8K solution text as h_y (the paper's setup).

    mechthink mi-peaks [--model tiny-thinker] [--n-samples 24]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mechthink.config import ProblemConfig

if TYPE_CHECKING:
    from mechthink.mi import MIExample

NAME = "mi_peaks"


@dataclass
class Config(ProblemConfig):
    """MI trajectories and peaks."""

    SHARDABLE = True

    n_samples: int = 60
    """Number of traces."""
    seed: int = 12345
    """Seed of the problem sample."""
    peak_method: str = "iqr"
    """Peak rule: 'iqr' (Q3 + 1.5 IQR, the paper's) or 'topk' (the 20 highest steps, the paper's notebook)."""


def _problems(model: Any, cfg: Config) -> list[Any]:
    """tiny-thinker: held-out transcripts (teacher-forced, with ground-truth events); any other
    model: GSM8K test problems (a greedy trace is generated for each)."""
    from mechthink.data import load_gsm8k, resolve_gsm8k_path
    from mechthink.models.organism import is_organism, sample_transcripts

    if is_organism(model):
        return list(sample_transcripts(cfg.n_samples, seed=f"mi-peaks-{cfg.seed}"))
    return load_gsm8k("test", path=resolve_gsm8k_path(cfg.gsm8k_path), n=cfg.n_samples)


def _examples(model: Any, cfg: Config, problems: list[Any]) -> list["MIExample"]:
    """tiny-thinker: the transcripts up to ``</think>`` with their ground-truth events and the
    wrap-up sentence as the solution; any other model: greedy GSM8K traces and their solutions."""
    from mechthink import traces
    from mechthink.mi import MIExample
    from mechthink.models.organism import is_organism, token_events
    from mechthink.report import trace_store

    if is_organism(model):
        return [
            MIExample(tr.input_ids[: tr.think_close_position + 1], tr.think_open_position + 1,
                      f"So the answer is {tr.answer}.", token_events(tr))
            for tr in problems
        ]
    store = trace_store(cfg.out, NAME, cfg.model, max_new_tokens=cfg.max_new_tokens, gsm8k=cfg.gsm8k_path)
    gen = traces.generate(model, problems, max_new_tokens=cfg.max_new_tokens, batch_size=4, store=store, progress=True)
    return [MIExample(t.ids, t.n_prompt, p.solution or p.answer) for t, p in zip(gen, problems)]


def records(cfg: Config, model: Any, problems: list[Any]) -> list[dict | None]:
    """Per trace: its MI trajectory (with peaks) and its ground-truth events."""
    from mechthink import mi, shard

    examples = _examples(model, cfg, problems)
    trajs = mi.mi_trajectories(model, examples, peak_method=cfg.peak_method)
    return [shard.pack({"trajectory": t, "events": [[p, k] for p, k in ex.events.items()]})
            for t, ex in zip(trajs, examples)]


def aggregate(cfg: Config, recs: list[dict], model_name: str) -> tuple[dict, Any]:
    """The peak summary and figure, from the per-trace records."""
    from mechthink import mi, shard
    from mechthink.plotting.mi import plot_mi_peaks

    recs = shard.unpack(recs)
    trajs = [mi.MITrajectory(**r["trajectory"]) for r in recs]
    summary = mi.peak_summary(trajs, [{int(p): k for p, k in r["events"]} for r in recs])
    return summary.numbers(top=15), plot_mi_peaks(trajs[0], summary, top=15, model_name=model_name)


def main(cfg: Config, loaded_model: Any = None) -> dict:
    import mechthink as mt
    from mechthink import shard

    model = loaded_model if loaded_model is not None else mt.load_model(cfg.model)
    return shard.run(NAME, cfg, model, _problems(model, cfg), records, aggregate)


if __name__ == "__main__":
    from mechthink.cli import run_analysis

    run_analysis(NAME)
