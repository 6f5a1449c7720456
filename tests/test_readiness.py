"""mechthink.readiness: labels against re-running every prefix, probes split by problem, policies,
first firing against tiny-thinker's ground truth, the lens trajectory, plots and bad input."""

from __future__ import annotations

import dataclasses
import json
import re

import pandas as pd
import pytest
import torch

from mechthink import readiness as R
from mechthink import traces as T
from mechthink.data.answers import normalize_number

pytestmark = pytest.mark.usefixtures("one_thread")

WRAPUP = "\nSo the answer is "


@pytest.fixture(scope="module")
def thinker():
    import mechthink as mt

    return mt.load_model("tiny-thinker")


@pytest.fixture(scope="module")
def sampled(thinker):
    """16 sampled tiny-thinker traces (planted errors, re-checks) and their labels."""
    from mechthink.models.organism import problems_for

    qs = problems_for(thinker, 16, 5)
    gen = T.generate(thinker, qs, max_new_tokens=200, batch_size=16, temperature=1.0, seed=5)
    return gen, R.label_traces(thinker, gen, suffix=WRAPUP)


def _encode(model, text):
    return [int(i) for i in model.tokenizer(text, add_special_tokens=False)["input_ids"]]


@torch.inference_mode()
def _seq_logprob(model, prefix, seq):
    x = list(prefix) + seq
    lp = model.bridge(torch.tensor([x[:-1]])).double().log_softmax(-1)[0]
    return sum(float(lp[len(prefix) - 1 + k, t]) for k, t in enumerate(seq))


@torch.inference_mode()
def _reference_labels(model, trace, suffix, terminator, max_tokens=8):
    """Slow reference: every prefix + suffix re-run from scratch, no cache, greedy by argmax."""
    steps = T.split_steps(trace)
    bounds = [max(s.token_end - 1, n.token_start - 1) for s, n in zip(steps, steps[1:])]
    bounds.append(trace.thinking_span[1] - 1)
    c0 = trace.thinking_char_span[0]
    forced, best = [], []
    for p in bounds:
        head = trace.text[: trace.offsets[p][1]]
        suf = suffix[1:] if head.endswith("\n") and suffix.startswith("\n") else suffix
        x = list(trace.ids[: p + 1]) + _encode(model, suf)
        out: list[int] = []
        for _ in range(max_tokens):
            t = int(model.bridge(torch.tensor([x + out]))[0, -1].argmax())
            if t in model.eos_token_ids:
                break
            out.append(t)
            if terminator in model.to_string(out):
                break
        text = model.to_string(out).split(terminator)[0].strip()
        f = normalize_number(text) if text else None
        cands = set(re.findall(r"\d+", trace.question)) | set(re.findall(r"\d+", head[c0:]))
        cands |= {f} if f else set()
        forced.append(f)
        best.append(max(_seq_logprob(model, x, _encode(model, c + terminator)) for c in cands))
    return bounds, forced, best


@pytest.mark.parametrize("suffix,terminator", [(None, "}"), (WRAPUP, ".")])
def test_labels_equal_slow_reference_without_cache(thinker, sampled, suffix, terminator):
    gen, _ = sampled
    picks = [t for t in gen if T.backtracking_events(t)][:1] + [t for t in gen if "check" in t.thinking][:1]
    assert len(picks) == 2, "the sample should hold a backtracking trace and a re-checked one"
    for tr in picks:
        lab = R.readiness_labels(thinker, tr, suffix=suffix)
        bounds, forced, best = _reference_labels(thinker, tr, suffix or thinker.spec.answer_suffix, terminator)
        assert lab.positions == bounds
        assert lab.forced == forced
        torch.testing.assert_close(lab.logprob.double(), torch.tensor(best, dtype=torch.float64), atol=1e-4, rtol=0)
        final = lab.final_answer
        assert lab.ready.tolist() == [f == final for f in forced]
        assert lab.correct is not None and lab.correct.tolist() == [f == tr.gold for f in forced]


def test_final_answer_is_the_models_own(sampled):
    gen, labels = sampled
    for tr, lab in zip(gen, labels):
        assert lab.final_source == "answer"
        assert lab.final_answer == normalize_number(tr.answer_text.split("boxed{")[1].split("}")[0])
        assert lab.ready[-1]  # at the end of the thinking the forced answer is the final one


def test_boundaries_hold_the_line_break_and_trim_the_suffix(sampled):
    gen, labels = sampled
    tr, lab = gen[0], labels[0]
    assert lab.positions[-1] == tr.thinking_span[1] - 1
    for p, suf in zip(lab.positions, lab.suffixes):
        ends_nl = tr.text[: tr.offsets[p][1]].endswith("\n")
        assert suf == (WRAPUP[1:] if ends_nl else WRAPUP)


# ============================================================================ features and probes
def test_features_are_causal_prefix_residuals(thinker, sampled):
    gen, labels = sampled
    tr, lab = gen[0], labels[0]
    data = R.build_datasets(thinker, [tr], [lab])
    hook = "blocks.2.hook_resid_pre"
    for row, (s, p) in enumerate(zip(lab.step_starts, lab.positions)):
        _, cache = thinker.bridge.run_with_cache(torch.tensor([tr.ids[: p + 1]]), names_filter=lambda n: n == hook)
        torch.testing.assert_close(data["last"].features[row, 2], cache[hook][0, -1].float(), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(data["mean"].features[row, 2], cache[hook][0, s : p + 1].float().mean(0),
                                   atol=1e-4, rtol=1e-4)
    assert data["last"].layers[-1] == f"resid_post_{thinker.n_layers - 1}"


def test_auroc_matches_pairwise_reference():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (60,), generator=g).float()  # many ties
    labels = torch.rand(60, generator=g) > 0.4
    pos, neg = scores[labels], scores[~labels]
    ref = ((pos[:, None] > neg[None]).float() + 0.5 * (pos[:, None] == neg[None]).float()).mean()
    assert R.auroc(scores, labels) == pytest.approx(float(ref), abs=1e-6)


def test_problem_folds_never_split_a_problem():
    problems = [f"p{i % 13}" for i in range(100)]
    seen = torch.zeros(100, dtype=torch.long)
    for train, test in R.problem_folds(problems, n_folds=4, seed=3):
        assert not {problems[i] for i in train.tolist()} & {problems[i] for i in test.tolist()}
        seen[test] += 1
        assert len(train) + len(test) == 100
    assert bool((seen == 1).all())


def _memorisable(n_prob=40, rows=5):
    """Features that name the problem, labels that are a coin flip per problem."""
    g = torch.Generator().manual_seed(1)
    coin = torch.rand(n_prob, generator=g) > 0.5
    problems = [f"p{i}" for i in range(n_prob) for _ in range(rows)]
    feats = torch.zeros(n_prob * rows, 2, n_prob)
    for r in range(n_prob * rows):
        feats[r, :, r // rows] = 1.0
    ready = coin.repeat_interleave(rows)
    return R.ReadinessDataset(feats, ready, ready, problems, [r % rows for r in range(n_prob * rows)], ["a", "b"], "last")


def test_cross_validation_fails_if_a_problem_lands_on_both_sides(monkeypatch):
    ds = _memorisable()
    honest = R.cross_validate(ds, n_folds=5, n_boot=20)
    assert float(honest.auroc.max()) < 0.75  # a probe that never saw the problem can only guess

    def by_row(problems, n_folds=5, seed=0):  # the leak this test exists to catch
        folds = torch.arange(len(problems)) % n_folds
        return [((folds != k).nonzero().flatten(), (folds == k).nonzero().flatten()) for k in range(n_folds)]

    monkeypatch.setattr(R, "problem_folds", by_row)
    leaky = R.cross_validate(ds, n_folds=5, n_boot=20)
    assert float(leaky.auroc.min()) > 0.95


def _planted(n=300, d=12, layer=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, d, generator=g)
    v = torch.randn(d, generator=g)
    ready = (x[:, layer] @ v) > 0
    problems = [f"p{i // 3}" for i in range(n)]
    return R.ReadinessDataset(x, ready, ready, problems, [i % 3 for i in range(n)], ["L0", "L1", "L2"], "last")


def test_probe_finds_the_planted_layer_and_round_trips(tmp_path):
    ds = _planted()
    cv = R.cross_validate(ds, n_folds=4, n_boot=100)
    assert cv.best_layer == 1 and float(cv.auroc[1]) > 0.95
    assert all(0.3 < float(cv.auroc[k]) < 0.7 for k in (0, 2))
    lo, hi = cv.ci[1].tolist()
    assert lo <= float(cv.auroc[1]) <= hi
    probe = R.train_probe(ds, layer=cv.best_layer)
    path = tmp_path / "probe.safetensors"
    probe.save(path)
    back = R.ReadinessProbe.load(path)
    assert back.layers == probe.layers and back.layer == 1 and back.pool == "last"
    torch.testing.assert_close(back.predict(ds.features), probe.predict(ds.features))
    assert ((probe.predict(ds.features) > 0.5) == ds.ready).float().mean() > 0.95


# ============================================================================ policies
def _state(step, tokens, probe=None, conf=0.5, answers=0, backtrack=False, forced="1"):
    return R.ExitState(step=step, position=10 + tokens, n_thinking_tokens=tokens, text="", forced_answer=forced,
                       confidence=conf, probe=probe, answers_written=answers, backtrack_next=backtrack)


def _episode(gold="7"):
    states = [_state(0, 5, 0.1, 0.99, 1, True, "3"), _state(1, 10, 0.6, 0.5, 1, False, "7"),
              _state(2, 15, 0.9, 0.999, 2, True, "7"), _state(3, 20, 0.95, 0.9999, 3, False, "7")]
    return R.Episode("e", states, "7", gold, 20)


def test_policies_exit_where_their_rule_says():
    ep = _episode()
    assert R.run_policy(R.ProbeThreshold(0.5), ep) == R.ExitOutcome(1, "7", 10, 10)
    assert R.run_policy(R.ConfidenceThreshold(0.999), ep).step == 2
    assert R.run_policy(R.AnswerRepeated(2), ep).step == 2
    assert R.run_policy(R.BacktrackAfterAnswer(1), ep).step == 0
    assert R.run_policy(R.BacktrackAfterAnswer(2), ep).step == 2
    assert R.run_policy(R.TokenBudget(12), ep).step == 2
    assert R.run_policy(R.ProbeThreshold(1.0), ep) == R.ExitOutcome(None, "7", 20, 0)


def test_policies_are_deterministic_and_pure():
    eps = [_episode(), _episode("3")]
    grid = R.policy_grid(budgets=(4, 12))
    for pol in grid:
        assert isinstance(pol, R.ExitPolicy)
        assert [pol.should_exit(s) for s in eps[0].states] == [pol.should_exit(s) for s in eps[0].states]
    a, b = R.evaluate_policies(eps, grid), R.evaluate_policies(list(eps), grid)
    assert a.rows == b.rows
    row = next(r for r in a.rows if r["policy"] == "probe" and r["param"] == 0.5)
    assert row["saved"] == pytest.approx(20 / 40) and row["accuracy"] == 0.5 and a.baseline_accuracy == 0.5


def test_pareto_picks_settings_on_calibration():
    cal = R.ParetoResult([{"policy": "p", "param": 0.5, "saved": 0.4, "accuracy": 0.9, "loss": 0.1, "exited": 1.0},
                          {"policy": "p", "param": 0.9, "saved": 0.3, "accuracy": 1.0, "loss": 0.0, "exited": 1.0}],
                         1.0, 10, 100)
    ev = R.ParetoResult([{"policy": "p", "param": 0.5, "saved": 0.5, "accuracy": 1.0, "loss": 0.0, "exited": 1.0},
                         {"policy": "p", "param": 0.9, "saved": 0.2, "accuracy": 1.0, "loss": 0.0, "exited": 1.0}],
                        1.0, 10, 100)
    assert cal.best_within(0.01)["p"]["param"] == 0.9
    assert ev.choose(cal, 0.01)["p"]["saved"] == 0.2  # the held-out row at the calibrated setting
    assert ev.best_within(0.01)["p"]["saved"] == 0.5


def test_answers_written_counts_repeated_sentence_final_numbers():
    texts = ["3 + 4 = 7.", "7 - 2 = 5.", "Let me check: 3 + 4 - 2 = 5.", "Yes, the answer is \\boxed{5}.", "Hmm."]
    assert R._answers_written(texts) == [1, 1, 2, 3, 3]


# ============================================================================ ground truth and trajectory
def test_organism_answer_step_is_the_generator_ground_truth(thinker):
    from mechthink.models.organism import prompt_text, sample_transcripts

    found_error = False
    for tr in sample_transcripts(40, seed="readiness-gt"):
        last = tr.steps[-1]
        found_error |= last.is_error
        q = tr.problem.question
        trace = T.trace_from_text(thinker, q, tr.text[len(prompt_text(q)):], gold=str(tr.answer))
        lab = R.readiness_labels(thinker, trace, suffix=WRAPUP)
        pos = tr.answer_positions[0][0]  # the first mention of the answer: the last step's correct result
        want = next(k for k, (s, p) in enumerate(zip(lab.step_starts, lab.positions)) if s <= pos <= p)
        assert R.organism_answer_step(trace, lab) == want
        if found_error and last.is_error:
            break
    assert found_error


@torch.inference_mode()
def test_trajectory_last_layer_is_the_models_own_distribution(thinker, sampled):
    gen, labels = sampled
    tr, lab = gen[1], labels[1]
    traj = R.confidence_trajectory(thinker, tr, lab)
    first = _encode(thinker, lab.final_answer)[0]
    for b, (p, suf) in enumerate(zip(lab.positions, lab.suffixes)):
        x = torch.tensor([list(tr.ids[: p + 1]) + _encode(thinker, suf)])
        ref = thinker.bridge(x)[0, -1].float().log_softmax(-1)[first]
        assert float(traj.logp[b, -1]) == pytest.approx(max(float(ref), -69.0776), abs=1e-4)


def test_identity_tuned_lens_equals_logit_lens(thinker, sampled):
    from mechthink.lens import TunedLens

    gen, labels = sampled
    plain = R.confidence_trajectory(thinker, gen[2], labels[2])
    tuned = R.confidence_trajectory(thinker, gen[2], labels[2], tuned=TunedLens.identity(thinker.n_layers, thinker.d_model))
    torch.testing.assert_close(plain.logp, tuned.logp, atol=1e-5, rtol=0)
    assert tuned.lens == "tuned"


def test_average_trajectories_aligns_on_first_firing():
    a = R.Trajectory("a", torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]), ["x", "y"], "logit", "1")
    b = R.Trajectory("b", torch.tensor([[10.0, 11.0], [12.0, 13.0]]), ["x", "y"], "logit", "1")
    m = R.average_trajectories([a, b], [1, 0], align="first_fire")
    assert m.offsets == [-1, 0, 1] and m.count.tolist() == [1, 2, 2] and m.mark == 0.0
    torch.testing.assert_close(m.mean[:, 1], torch.tensor([6.0, 7.0]))  # offset 0, both layers
    s = R.average_trajectories([a, b], [1, None], align="start")
    assert s.offsets == [0, 1, 2] and s.mark == 1.0


# ============================================================================ the study, results, plots
@pytest.fixture(scope="module")
def study(thinker, sampled):
    from mechthink.lens import TunedLens

    gen, _ = sampled
    return R.readiness_study(thinker, gen[:8], gen[8:], n_folds=2, budgets=(8, 32), suffix=WRAPUP, ground_truth=True,
                             tuned=TunedLens.identity(thinker.n_layers, thinker.d_model))


def test_study_numbers(study):
    num = study.numbers()
    for key in ("best_layer_auroc", "policies", "probe_first_fire_within_1_step", "goals", "pareto", "held_out_auroc"):
        assert key in num
    assert set(num["policies"]) == {"probe", "confidence", "answer_k", "backtrack", "budget"}
    assert 0.0 <= num["best_layer_auroc"] <= 1.0 and study.agreement is not None and study.agreement.n == 8
    assert json.loads(study.to_json())["n_test"] == 8
    torch.testing.assert_close(study.maps["logit"].mean, study.maps["tuned"].mean, atol=1e-5, rtol=0)


def test_every_result_has_frame_json_and_plot(study, sampled, thinker):
    from mechthink.plotting.checks import layout_problems
    from mechthink.results import Result

    gen, labels = sampled
    data = R.build_datasets(thinker, gen[:4], labels[:4])
    results = [labels[0], data["last"], study.probe, study.cv["last"], study.evaluation, study.agreement,
               R.confidence_trajectory(thinker, gen[0], labels[0]), study.maps["logit"], study]
    for res in results:
        assert isinstance(res, Result)
        frame = res.to_frame()
        assert isinstance(frame, pd.DataFrame) and len(frame) > 0, type(res).__name__
        json.loads(res.to_json())
        fig = res.plot()
        assert layout_problems(fig) == [], type(res).__name__


def test_plots_stay_legible_with_many_layers():
    from mechthink.plotting.checks import layout_problems
    from mechthink.plotting.readiness import plot_auroc, plot_trajectory_map

    layers = [f"resid_pre_{k}" for k in range(30)] + ["resid_post_29"]
    g = torch.Generator().manual_seed(0)
    auc = torch.rand(31, generator=g) * 0.6 + 0.2
    cv = R.ProbeCV(auc, torch.stack([auc - 0.2, auc + 0.1], 1), torch.zeros(4, 31), ["a"] * 4, [0, 1, 2, 3], layers,
                   "last", 2)
    tmap = R.TrajectoryMap(-torch.rand(31, 9, generator=g) * 60, torch.ones(9, dtype=torch.long), list(range(-4, 5)),
                           layers, "logit", "first_fire", 0.0)
    for fig in (plot_auroc([cv]), plot_trajectory_map(tmap)):
        assert layout_problems(fig) == []


# ============================================================================ bad input
def _one_line(fn, *needles):
    with pytest.raises(ValueError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg


def test_bad_input_is_one_line_value_error(thinker, sampled):
    gen, labels = sampled
    tr = gen[0]
    no_think = dataclasses.replace(tr, think_start=None)
    empty = T.trace_from_text(thinker, "Compute 1 + 1.", "</think>\n\nThe final answer is \\boxed{2}.<|end|>")
    probe = R.train_probe(_planted())
    _one_line(lambda: R.readiness_labels(thinker, no_think), "no thinking")
    _one_line(lambda: R.readiness_labels(thinker, empty), "no step boundaries")
    _one_line(lambda: R.readiness_labels(thinker, tr, max_answer_tokens=0), "max_answer_tokens")
    _one_line(lambda: R.ProbeThreshold(1.5), "outside [0, 1]")
    _one_line(lambda: R.ConfidenceThreshold(-0.1), "outside [0, 1]")
    _one_line(lambda: R.first_firing([0.2, 0.9], threshold=1.2), "outside [0, 1]")
    _one_line(lambda: probe.predict(torch.zeros(4, 3, 7)), "width")
    _one_line(lambda: R.problem_folds(["a", "b"], n_folds=3), "n_folds")
    _one_line(lambda: R.AnswerRepeated(0), "k=0")
    _one_line(lambda: R.make_episode(tr, labels[0], probe_scores=[0.5]), "probe scores")
    _one_line(lambda: R.make_episode(gen[1], labels[0]), "paired")
    _one_line(lambda: R.ProbeThreshold(0.5).should_exit(_state(0, 1)), "no probe score")
    _one_line(lambda: R.evaluate_policies([_episode(gold=None)], [R.TokenBudget(1)]), "no gold")
    _one_line(lambda: R.train_probe(dataclasses.replace(_planted(), ready=torch.ones(300, dtype=torch.bool))),
              "both ready and not-ready")
    _one_line(lambda: R.average_trajectories([], None), "no trajectories")


# ============================================================================ the analysis
def test_analysis_runs_small(thinker, tmp_path):
    from analyses import readiness as A
    from mechthink.config import ConfigError

    numbers = A.main(A.Config(out=tmp_path, n_samples=12, n_folds=2, n_lens_steps=2, budgets="8,32"), loaded_model=thinker)
    meta = json.loads((tmp_path / "readiness" / "tiny-thinker.json").read_text())
    assert meta["complete"] and meta["numbers"]["n_test"] == numbers["n_test"] == 6
    assert (tmp_path / "readiness" / "tiny-thinker.png").exists()
    for bad in (dict(fire_threshold=1.5), dict(max_loss=-0.1), dict(n_folds=1), dict(budgets="8,x"), dict(temperature=-1.0)):
        with pytest.raises(ConfigError):
            A.Config(**bad)
