"""Thinking-token suppression on traces that must backtrack (Qian et al. 2025, seed 002).

Held-out problems whose thinking is prefilled up to a wrongly written step (so the model has to
backtrack to get the answer right) are continued greedily while the logits of " Wait", " Hmm",
" Alternatively" (all single-token spellings) are set to −inf — one word at a time and
cumulatively (1, 2, 3 kinds) — against two random control sets of the same size: uniform over
the vocabulary, and uniform over the tokens the model never produced unsuppressed (the analog
of Qian et al.'s random tokens from a 150k vocabulary, almost none of which a model ever
produces; in a 234-token vocabulary a uniform draw often hits digits and operators. Under
greedy decoding suppressing never-produced tokens cannot change the continuation, so that
control equals the unsuppressed run by construction — as a 150k-vocabulary random draw does in
practice). Reports final accuracy and how often any backtracking word still appears.

Greedy decoding hides a single word's role: when " Wait" is suppressed the argmax moves to the
next backtracking word. So " Wait" alone is also measured under sampling (temperature 1,
``n_seeds`` seeds per problem, the same per-row generator streams in every condition, i.e.
paired), against both random controls (``n_random_sampled`` draws on the first
``n_seeds_control`` seeds), with 95% bootstrap intervals over problems for the accuracy change.

    mechthink suppression [--model tiny-thinker] [--n-samples 100]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mechthink.config import AnalysisConfig

NAME = "suppression"


@dataclass
class Config(AnalysisConfig):
    """Accuracy under thinking-token suppression vs random suppression."""

    n_samples: int = 100
    """Problems prefilled up to a wrongly written step."""
    seed: int = 7
    """Seed of the held-out prefixes and of the random control sets."""
    max_new_tokens: int = 80
    """Continuation length after the prefilled wrong step."""
    n_random: int = 6
    """Random control sets drawn per size (greedy)."""
    n_seeds: int = 30
    """Sampling seeds per problem for " Wait" alone (paired across conditions)."""
    temperature: float = 1.0
    """Sampling temperature of the paired comparison."""
    n_random_sampled: int = 2
    """Random control sets under sampling."""
    n_seeds_control: int = 4
    """Seeds per problem for the sampled random controls (the first of n_seeds)."""


def main(cfg: Config, loaded_model: Any = None) -> dict:
    import re
    import statistics

    import torch

    import mechthink as mt
    from mechthink import interventions as iv
    from mechthink.plotting.steering import new_figure, plot_bars, plot_curves
    from mechthink.report import write_outputs

    from mechthink.models.organism import step_examples

    torch.set_num_threads(1)
    model = loaded_model if loaded_model is not None else mt.load_model(cfg.model)
    evals = [e for e in step_examples(model, 4 * cfg.n_samples, seed=cfg.seed) if e.is_error][: cfg.n_samples]
    prefixes = [e.input_ids for e in evals]
    golds = [str(e.answer) for e in evals]
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

    base_gens = iv.continue_greedy(model, prefixes, cfg.max_new_tokens)
    produced = {int(t) for g in base_gens for t in g}
    # Singles, then cumulative sets in the spec's order (1, 2, ... kinds suppressed).
    # Suppression needs one id per kind: words that are never one token ("But wait" on R1 and
    # Qwen3) are still detected in the text (pat) but cannot be suppressed as a kind.
    words = [w for w in words if model.token_variants(w)]
    sets: dict[str, list[int]] = {w: model.token_ids([w]) for w in words}
    cumulative = [" + ".join(words[: k + 1]) for k in range(len(words))]
    for k, name in enumerate(cumulative):
        sets.setdefault(name, model.token_ids(words[: k + 1]))
    all_ids = model.token_ids(words)
    # Tokens the model never produced unsuppressed: the analog of a random draw from a 150k
    # vocabulary (Qian et al.), where almost no random token is ever produced in math reasoning.
    unused = [i for i in range(int(model.bridge.cfg.d_vocab)) if i not in produced]
    results: dict[str, Any] = {"none": run(None)}
    controls = {"random": None, "random unused": unused}

    def control(n: int, pool: list[int] | None) -> dict:
        ctl = [run(iv.random_control(model, n, exclude=all_ids, seed=cfg.seed + s, pool=pool)) for s in range(cfg.n_random)]
        accs = [c["accuracy"] for c in ctl]
        return {
            "accuracy": statistics.mean(accs),
            "accuracy_sd": statistics.pstdev(accs),
            "accuracy_median": statistics.median(accs),
            "accuracy_each": accs,
            "backtrack_rate": statistics.mean(c["backtrack_rate"] for c in ctl),
            "n_tokens": n,
        }

    for name, ids in sets.items():
        results[name] = run(ids)
        for cname, pool in controls.items():
            results[f"{cname}({name})"] = control(len(ids), pool)

    # --- " Wait" alone under sampling, paired over (seed, problem)
    backtracked: dict[str, float] = {}

    def correct_matrix(ids: list[int] | None, n_seeds: int, label: str = "") -> torch.Tensor:
        """[n_seeds, n_problems] 1.0 where the sampled continuation ends in the right answer."""
        rows, bt = [], []
        for s in range(n_seeds):
            if ids:
                with iv.suppress_tokens(model, ids):
                    gens = iv.continue_prefixes(model, prefixes, cfg.max_new_tokens, temperature=cfg.temperature, seed=s)
            else:
                gens = iv.continue_prefixes(model, prefixes, cfg.max_new_tokens, temperature=cfg.temperature, seed=s)
            texts = [model.to_string(g) for g in gens]
            rows.append([iv.accuracy([t], [gold]) for t, gold in zip(texts, golds)])
            bt += [bool(pat.search(t)) for t in texts]
        if label:
            backtracked[label] = sum(bt) / len(bt)
        return torch.tensor(rows, dtype=torch.float64)

    def change_ci(delta: torch.Tensor) -> list[float]:
        """95% bootstrap interval over problems of the mean accuracy change (delta [seeds, problems])."""
        per_problem = delta.mean(0)
        g = torch.Generator().manual_seed(cfg.seed)
        idx = torch.randint(len(per_problem), (2000, len(per_problem)), generator=g)
        boots = per_problem[idx].mean(1).sort().values
        return [float(boots[49]), float(boots[1949])]

    wait_ids = sets[words[0]]
    base_m = correct_matrix(None, cfg.n_seeds, "none")
    sampled: dict[str, Any] = {"none": {"accuracy": float(base_m.mean())}}
    cond = {words[0]: correct_matrix(wait_ids, cfg.n_seeds, words[0])}
    for cname, pool in controls.items():
        draws = [
            # the first draws of the greedy controls above (same seeds), so the panels are comparable
            correct_matrix(
                iv.random_control(model, len(wait_ids), exclude=all_ids, seed=cfg.seed + d, pool=pool), cfg.n_seeds_control
            )
            for d in range(cfg.n_random_sampled)
        ]
        cond[f"{cname}({words[0]})"] = torch.stack(draws).mean(0)
    for name, m in cond.items():
        d = m - base_m[: len(m)]  # the controls run on the first n_seeds_control seeds, paired
        sampled[name] = {
            "n_seeds": len(m),
            "accuracy": float(m.mean()),
            "accuracy_none_same_seeds": float(base_m[: len(m)].mean()),
            "change_vs_none": float(d.mean()),
            "change_ci95": change_ci(d),
            "problem_seed_pairs_lost": int((d < 0).sum()),
            "problem_seed_pairs_gained": int((d > 0).sum()),
        }
    numbers = {
        "n_samples": len(prefixes),
        "suppressed_sets": {k: [model.to_string([i]) for i in v] for k, v in sets.items()},
        "n_vocab_tokens_produced_unsuppressed": len(produced),
        "n_unused_pool": len([i for i in unused if i not in all_ids]),
        "results": results,
        "cumulative_sets": cumulative,
        "drop_wait_vs_random": results[f"random({words[0]})"]["accuracy"] - results[words[0]]["accuracy"],
        "drop_wait_vs_random_unused": results[f"random unused({words[0]})"]["accuracy"] - results[words[0]]["accuracy"],
        "drop_all_vs_random": results[f"random({cumulative[-1]})"]["accuracy"] - results[cumulative[-1]]["accuracy"],
        "drop_all_vs_random_unused": (
            results[f"random unused({cumulative[-1]})"]["accuracy"] - results[cumulative[-1]]["accuracy"]),
        "sampled": {"temperature": cfg.temperature, "n_seeds": cfg.n_seeds, "n_random_draws": cfg.n_random_sampled}
        | sampled
        | {"any_backtracking_word_rate": backtracked},
    }
    fig = new_figure(20, 4.8)
    ax1 = fig.add_subplot(1, 3, 1)
    ks = list(range(len(cumulative) + 1))
    plot_curves(
        ax1, ks,
        {"thinking tokens": [results["none"]["accuracy"]] + [results[c]["accuracy"] for c in cumulative]}
        | {f"{cname} (same size)": [results["none"]["accuracy"]] + [results[f"{cname}({c})"]["accuracy"] for c in cumulative]
           for cname in controls},
        "thinking-token kinds suppressed", "final accuracy",
        f"{model.spec.name}: accuracy after a prefilled wrong step ({len(prefixes)} problems)",
        xticklabels=["none"] + [c.replace(" + ", "+").replace(" ", "") for c in cumulative],
    )
    ax2 = fig.add_subplot(1, 3, 2)
    labels = ["none"] + [k for name in words for k in (name, *(f"{c}({name})" for c in controls))]
    plot_bars(
        ax2, labels, [results[k]["accuracy"] for k in labels], "final accuracy",
        "one word at a time vs random controls of the same size (mean ± sd over draws)",
        errors=[results[k].get("accuracy_sd", 0.0) for k in labels],
        colors=["grey"] + ["tab:blue" if k.startswith("random(") else "tab:green" if k.startswith("random unused") else "tab:red"
                           for k in labels[1:]],
    )
    ax2.tick_params(axis="x", labelrotation=35, labelsize=7)
    for lbl in ax2.get_xticklabels():
        lbl.set_horizontalalignment("right")
    ax3 = fig.add_subplot(1, 3, 3)
    slabels = ["none", *cond]
    svals = [sampled[k]["accuracy"] for k in slabels]
    lo_hi = [sampled[k].get("change_ci95") for k in slabels]
    plot_bars(
        ax3, [k.replace("random unused", "never-produced random") for k in slabels], svals, "final accuracy",
        f"sampled, T={cfg.temperature:g}, {len(prefixes)} problems × {cfg.n_seeds} seeds "
        f"(controls {cfg.n_seeds_control}), paired\n(bars: accuracy; black: 95% CI of the change vs none)",
        colors=["grey", "tab:red", "tab:blue", "tab:green"][: len(slabels)],
    )
    for x, (v, ci) in enumerate(zip(svals, lo_hi)):
        if ci is not None:  # the 95% interval of the change, drawn around this bar's value
            ax3.plot([x, x], [svals[0] + ci[0], svals[0] + ci[1]], color="black", lw=1.5)
    ax3.tick_params(axis="x", labelrotation=20, labelsize=7)
    fig.subplots_adjust(bottom=0.3, wspace=0.25)
    write_outputs(cfg.out, NAME, cfg.model, fig, numbers, cfg, fingerprint=model.fingerprint())
    return numbers


if __name__ == "__main__":
    from mechthink.cli import run_analysis

    run_analysis(NAME)
