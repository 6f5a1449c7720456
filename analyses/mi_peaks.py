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

    NO_SHARD = (
        "its peak summary is not split into per-trace records yet (not implemented); run it unsharded"
    )

    n_samples: int = 60
    """Number of traces."""
    seed: int = 12345
    """Seed of the problem sample."""
    peak_method: str = "iqr"
    """Peak rule: 'iqr' (Q3 + 1.5 IQR, the paper's) or 'topk' (the 20 highest steps, the paper's notebook)."""


def _examples(model: Any, cfg: Config) -> list["MIExample"]:
    """tiny-thinker: held-out transcripts up to ``</think>`` with their ground-truth events and the
    wrap-up sentence as the solution; any other model: greedy GSM8K traces and their solutions."""
    from mechthink import traces
    from mechthink.data import load_gsm8k, resolve_gsm8k_path
    from mechthink.mi import MIExample
    from mechthink.models.organism import is_organism, sample_transcripts, token_events
    from mechthink.report import trace_store

    if is_organism(model):
        return [
            MIExample(tr.input_ids[: tr.think_close_position + 1], tr.think_open_position + 1,
                      f"So the answer is {tr.answer}.", token_events(tr))
            for tr in sample_transcripts(cfg.n_samples, seed=f"mi-peaks-{cfg.seed}")
        ]
    problems = load_gsm8k("test", path=resolve_gsm8k_path(cfg.gsm8k_path), n=cfg.n_samples)
    store = trace_store(cfg.out, NAME, cfg.model, max_new_tokens=cfg.max_new_tokens, gsm8k=cfg.gsm8k_path)
    gen = traces.generate(model, problems, max_new_tokens=cfg.max_new_tokens, batch_size=4, store=store, progress=True)
    return [MIExample(t.ids, t.n_prompt, p.solution or p.answer) for t, p in zip(gen, problems)]


def main(cfg: Config, loaded_model: Any = None) -> dict:
    import mechthink as mt
    from mechthink import mi
    from mechthink.plotting.mi import plot_mi_peaks
    from mechthink.report import write_outputs

    model = loaded_model if loaded_model is not None else mt.load_model(cfg.model)
    examples = _examples(model, cfg)
    trajs = mi.mi_trajectories(model, examples, peak_method=cfg.peak_method)
    summary = mi.peak_summary(trajs, [ex.events for ex in examples])
    numbers = summary.numbers(top=15)
    fig = plot_mi_peaks(trajs[0], summary, top=15, model_name=model.spec.name)
    write_outputs(cfg.out, NAME, cfg.model, fig, numbers, cfg, fingerprint=model.fingerprint())
    return numbers


if __name__ == "__main__":
    from mechthink.cli import run_analysis

    run_analysis(NAME)
