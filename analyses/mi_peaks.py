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

from collections import Counter
from dataclasses import dataclass
from typing import Any

from mechthink.config import ProblemConfig

NAME = "mi_peaks"


@dataclass
class Config(ProblemConfig):
    """MI trajectories and peaks."""

    n_samples: int = 60
    """Number of traces."""
    seed: int = 12345
    """Seed of the problem sample."""
    peak_method: str = "iqr"
    """Peak rule: 'iqr' (Q3 + 1.5 IQR, the paper's) or 'zscore'."""


def _organism_traces(model: Any, cfg: Config) -> list[dict]:
    from mechthink.models.organism import sample_transcripts

    out = []
    for tr in sample_transcripts(cfg.n_samples, seed=f"mi-peaks-{cfg.seed}"):
        events: dict[int, str] = {}
        for s in tr.steps:
            for p in s.result_positions:
                events[p] = "wrong result" if s.is_error else "step result"
            if s.backtrack_position is not None:
                events[s.backtrack_position] = "backtrack word"
        for occ in tr.answer_positions:
            for p in occ:
                events.setdefault(p, "answer occurrence")
        if tr.wrapup_position >= 0:
            events[tr.wrapup_position] = "wrap-up"
        out.append(
            {
                "ids": tr.input_ids[: tr.think_close_position + 1],
                "start": tr.think_open_position + 1,
                "solution": f"So the answer is {tr.answer}.",
                "events": events,
            }
        )
    return out


def _generated_traces(model: Any, cfg: Config) -> list[dict]:
    from mechthink import traces
    from mechthink.data import load_gsm8k, resolve_gsm8k_path

    problems = load_gsm8k("test", path=resolve_gsm8k_path(cfg.gsm8k_path), n=cfg.n_samples)
    gen = traces.generate(model, problems, max_new_tokens=cfg.max_new_tokens, batch_size=4)
    return [
        {"ids": t.ids, "start": t.n_prompt, "solution": p.solution or p.answer, "events": {}}
        for t, p in zip(gen, problems)
    ]


def main(cfg: Config, loaded_model: Any = None) -> dict:
    import torch

    import mechthink as mt
    from mechthink import mi
    from mechthink.plotting.lens import new_figure
    from mechthink.plotting.mi import plot_mi_trajectory
    from mechthink.models.organism import is_organism
    from mechthink.report import write_outputs

    model = loaded_model if loaded_model is not None else mt.load_model(cfg.model)
    items = _organism_traces(model, cfg) if is_organism(model) else _generated_traces(model, cfg)
    trajs = []
    peak_events: Counter[str] = Counter()
    base_events: Counter[str] = Counter()
    n_steps = n_peaks = 0
    for it in items:
        toks = torch.tensor(it["ids"], device=model.device)
        ans = torch.tensor(model.tokenizer(it["solution"], add_special_tokens=False)["input_ids"], device=model.device)
        traj = mi.mi_trajectory(model, toks, ans, start=it["start"], peak_method=cfg.peak_method)
        trajs.append(traj)
        pos = traj.positions.tolist()
        peak_pos = {pos[i] for i in traj.peaks.tolist()}
        for p in pos:
            kind = it["events"].get(p, "other")
            base_events[kind] += 1
            if p in peak_pos:
                peak_events[kind] += 1
        n_steps += len(pos)
        n_peaks += len(peak_pos)
    stats = [t.stats() for t in trajs]
    enrichment = {
        k: {
            "share_of_peaks": peak_events[k] / max(1, n_peaks),
            "share_of_steps": base_events[k] / max(1, n_steps),
            "peak_rate": peak_events[k] / max(1, base_events[k]),
        }
        for k in sorted(base_events)
    }
    counts = mi.peak_token_counts(trajs, strip=False)
    numbers = {
        "n_traces": len(trajs),
        "n_steps": n_steps,
        "n_peaks": n_peaks,
        "peak_ratio": n_peaks / max(1, n_steps),
        "mean_peaks_per_trace": n_peaks / max(1, len(trajs)),
        "mean_mi": float(sum(s["mean_mi"] for s in stats) / max(1, len(stats))),
        "events_at_peaks": enrichment,
        "top_peak_tokens": {str(k): int(v) for k, v in counts.head(15).items()},
    }
    fig = new_figure(13, 7)
    a1, a2 = fig.subplots(2, 1, height_ratios=[1.3, 1])
    plot_mi_trajectory(trajs[0], ax=a1)
    top = counts.head(15)
    a2.bar([repr(str(t)) for t in top.index], top.values)
    a2.set_ylabel("count at MI peaks")
    a2.tick_params(axis="x", rotation=60, labelsize=8)
    a2.set_title(f"tokens at MI peaks over {len(trajs)} traces ({cfg.peak_method} rule); peak ratio {numbers['peak_ratio']:.3f}")
    fig.suptitle(f"{model.spec.name}: MI(h_t, h_solution) along the thinking (paper's HSIC estimator, sigma=50)")
    write_outputs(cfg.out, NAME, cfg.model, fig, numbers, cfg, fingerprint=model.fingerprint())
    return numbers


if __name__ == "__main__":
    from mechthink.cli import run_analysis

    run_analysis(NAME)
