"""Steering vectors and hooks: extraction, save/load, positions steered, model left unchanged."""

from __future__ import annotations

import pytest
import torch

from mechthink import steering, traces
from mechthink.generation import continue_greedy
from mechthink.steering import SteeringVector, steer

ARCH = "LlamaForCausalLM"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def thinker():
    import mechthink as mt

    return mt.load_model("tiny-thinker")


def _vec(model, scale: float = 1.0, seed: int = 0) -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    return SteeringVector(torch.randn(model.n_layers, model.d_model, generator=g) * scale, list(range(model.n_layers)))


def test_hooks_removed_model_bit_identical(tiny_loaded):
    model, _ = tiny_loaded(ARCH)
    x = model.to_tokens(model.prompt("Compute 3 + 5."))
    hooks_before = (dict(model.bridge._forward_pre_hooks), dict(model.bridge.blocks[0]._forward_pre_hooks))
    with torch.inference_mode():
        before = model.bridge(x).clone()
        with steer(model, _vec(model, 5.0), layers=[0, 1, 2], coeff=2.0):
            during = model.bridge(x).clone()
        after = model.bridge(x).clone()
        assert not torch.equal(before, during)
        assert torch.equal(before, after)
        with pytest.raises(RuntimeError, match="boom"):
            with steer(model, _vec(model, 5.0), layers=[1], mode="every_k", k=2, relative=True, thinking_only=True):
                model.bridge(x)
                raise RuntimeError("boom")
        assert torch.equal(before, model.bridge(x))
    # steering's hooks are gone (load_model's own context guard on block 0 stays)
    assert (dict(model.bridge._forward_pre_hooks), dict(model.bridge.blocks[0]._forward_pre_hooks)) == hooks_before


def _reference_generation(model, prompt_ids, vec, layers, coeff, n_new, steer_col):
    """Greedy decoding by full forwards (no cache) adding coeff*v where steer_col(col) is True."""
    ids = list(prompt_ids)
    for _ in range(n_new):
        cols = [c for c in range(len(ids)) if steer_col(c, ids)]

        def add(act, hook, L=None):
            act = act.clone()
            act[0, cols] += coeff * vec[L]
            return act

        hooks = [(f"blocks.{L}.hook_resid_post", lambda a, hook, L=L: add(a, hook, L)) for L in layers]
        with torch.inference_mode(), model.bridge.hooks(fwd_hooks=hooks):
            ids.append(int(model.bridge(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt_ids):]


@pytest.mark.parametrize("mode,k", [("continuous", 1), ("once", 1), ("every_k", 3)])
def test_positions_match_full_forward_reference(tiny_loaded, mode, k):
    model, _ = tiny_loaded(ARCH)
    vec = _vec(model, 3.0, seed=1)
    q = "Compute 3 + 5."
    prompt_ids = model.to_token_lists([model.prompt(q)])[0]
    p_end = len(prompt_ids) - 1
    with steer(model, vec, layers=[1], coeff=1.5, mode=mode, k=k):
        got = traces.generate(model, [q], max_new_tokens=8)[0].ids[len(prompt_ids):]

    def col_ok(c, ids):
        r = c - p_end
        return r == 0 if mode == "once" else (r >= 0 and r % k == 0)

    ref = _reference_generation(model, prompt_ids, vec, [1], 1.5, len(got), col_ok)
    assert got == ref
    base = traces.generate(model, [q], max_new_tokens=8)[0].ids[len(prompt_ids):]
    assert base != got  # the steering did something


def test_thinking_only_stops_after_think_close(thinker):
    model = thinker
    vec = _vec(model, 0.02, seed=2)
    q = "Compute 3 + 5 - 2."
    prompt_ids = model.to_token_lists([model.prompt(q)])[0]
    close = model.tokenizer.convert_tokens_to_ids(model.spec.think_close)
    with steer(model, vec, layers=[1, 2], coeff=30.0, thinking_only=True) as tr:
        got = traces.generate(model, [q], max_new_tokens=40)[0].ids[len(prompt_ids):]
    assert close in got and tr.closed_at[0] is not None
    p_end = len(prompt_ids) - 1

    def col_ok(c, ids):
        return c >= p_end and close not in ids[len(prompt_ids) : c + 1]

    ref = _reference_generation(model, prompt_ids, vec, [1, 2], 30.0, len(got), col_ok)
    assert got == ref


def test_extraction_save_load_and_pca(tiny_loaded, tmp_path):
    model, _ = tiny_loaded(ARCH)
    qs = ["Compute 3 + 5.", "What is 12?", "Let me think.", "The answer is 42."]
    pos, neg = steering.contrastive_prompts(model, qs)
    assert all(p.endswith("Wait, ") for p in pos)
    v = steering.from_prompts(model, pos, neg, layers=[0, 2])
    vp = steering.from_prompts(model, pos, neg, layers=[0, 2], method="pca")
    assert v.vectors.shape == (2, model.d_model) and v.layers == [0, 2]
    cos = torch.nn.functional.cosine_similarity(v.vectors, vp.vectors)
    assert (cos > 0).all()  # sign-aligned with the mean difference
    path = v.save(tmp_path / "v.safetensors")
    w = SteeringVector.load(path)
    assert torch.equal(w.vectors, v.vectors) and w.layers == [0, 2] and w.metadata["model"] == model.spec.name
    assert w.metadata["n_positive"] == 4 and w.method == "mean_diff"
    ids = model.to_token_lists(qs)
    s = steering.from_spans(model, ids, [[(2, 4)] for _ in ids], window=2, layers=[1])
    overall = torch.cat(steering.activations_at(model, ids, [list(range(len(i))) for i in ids], [1])).mean(0)
    assert torch.allclose(s.vectors.norm(dim=-1), overall.norm(dim=-1), rtol=1e-4)
    fp = steering.from_positions(model, [(ids[0], [1, 2])], [(ids[1], [0]), (ids[2], [3])], layers=[1])
    a = steering.activations_at(model, [ids[0], ids[1], ids[2]], [[1, 2], [0], [3]], [1])
    ref = a[0].mean(0) - torch.cat(a[1:]).mean(0)
    assert torch.allclose(fp.vectors, ref, atol=1e-5)
    with pytest.raises(ValueError, match="no direction"):
        with steer(model, v, layers=[1]):
            pass


def test_degeneration_metrics(thinker):
    good = traces.trace_from_text(thinker, "Compute 3 + 5.", "3 + 5 = 8.\nSo the answer is 8.\n</think>\n\nThe final answer is \\boxed{8}.")
    bad = traces.trace_from_text(thinker, "Compute 3 + 5.", "3 3 3 3 3 3 3 3 3 3 3 3 3 3 3 3 3 3 3 3")
    g, b = steering.degeneration(good), steering.degeneration(bad)
    assert g.closed and not b.closed
    assert b.repetition > 0.8 > g.repetition
    assert b.compression < g.compression
    assert b.thinking_tokens == len(bad.ids) - bad.n_prompt
    df = steering.degeneration_table([good, bad])
    assert list(df["closed"]) == [True, False]


def test_backtracking_vector_moves_p_wait(thinker):
    from mechthink.models.organism import held_out_examples

    model = thinker
    ex = held_out_examples(16)
    v = steering.from_positions(
        model,
        [(e.input_ids, [len(e.input_ids) - 1]) for e in ex if e.is_error],
        [(e.input_ids, [len(e.input_ids) - 1]) for e in ex if not e.is_error],
        layers=[3],  # late block: at block 1 the diff-of-means effect is U-shaped (docs/steering.md)
    )
    wait = model.token_ids(["Wait"])
    correct = [e.input_ids for e in ex if not e.is_error][:4]

    def p_wait(coeff: float) -> float:
        tot = 0.0
        with steer(model, v, layers=[3], coeff=coeff), torch.inference_mode():
            for ids in correct:
                tot += float(model.bridge(torch.tensor([ids]))[0, -1].softmax(-1)[wait].sum())
        return tot / len(correct)

    p = [p_wait(c) for c in (-0.25, 0.0, 0.25, 0.5)]
    assert p[0] < p[1] < p[2] < p[3]


def test_result_views(thinker, tmp_path):
    import json

    v = _vec(thinker, 2.0, seed=3)
    df = v.to_frame()
    assert list(df["layer"]) == v.layers and torch.allclose(torch.tensor(df["norm"].to_list()), v.norms)
    assert torch.allclose(torch.tensor(json.loads(v.to_json())["vectors"]), v.vectors)
    assert len(v.plot().axes[0].patches) == len(v.layers)
    d = steering.degeneration(traces.trace_from_text(thinker, "Compute 3 + 5.", "3 3 3 3 3 3 3 3"))
    assert d.to_frame().iloc[0]["thinking_tokens"] == d.thinking_tokens and json.loads(d.to_json())["closed"] is False
    with pytest.raises(NotImplementedError, match="degeneration_table"):
        d.plot()


@pytest.fixture(scope="module")
def decision_points(thinker):
    from mechthink.models.organism import step_examples

    held = step_examples(thinker, 16, seed=7)
    pick = {"wrong": [e for e in held if e.is_error][:2], "correct": [e for e in held if not e.is_error][:2]}
    return {g: ([e.input_ids for e in exs], [str(e.answer) for e in exs]) for g, exs in pick.items()}


def test_decision_metrics_against_direct_computation(thinker, decision_points):
    model = thinker
    prefixes, golds = decision_points["wrong"]
    m = steering.decision_metrics(model, prefixes, golds, max_new_tokens=24, window=10)
    bt = model.token_ids(list(model.spec.backtracking_words))
    with torch.inference_mode():
        p = [model.bridge(torch.tensor([ids]))[0, -1].softmax(-1) for ids in prefixes]
    assert m.p_backtrack_next == pytest.approx(sum(float(q[bt].sum()) for q in p) / 2, abs=1e-6)
    assert m.p_backtrack_next > 0.5  # the organism backtracks after a wrong step
    gens = continue_greedy(model, prefixes, 24)
    firsts = [model.to_string(g[:10]) for g in gens]
    assert m.backtrack_rate == sum(any(w in t for w in model.spec.backtracking_words) for t in firsts) / 2
    assert m.closed_rate == sum(model.spec.think_close in model.to_string(g) for g in gens) / 2
    assert m.to_frame().shape == (1, 7)


def test_coefficient_sweep(thinker, decision_points):
    from mechthink.plotting.steering import coefficient_sweep_figure

    model = thinker
    ex = {g: p for g, (p, _) in decision_points.items()}
    vec = steering.from_positions(model, [(ids, [len(ids) - 1]) for ids in ex["wrong"]],
                                  [(ids, [len(ids) - 1]) for ids in ex["correct"]], layers=[2, 3])
    sw = steering.coefficient_sweep(model, vec, decision_points, [-1.0, 0.0, 1.0], layers=[2, 3],
                                    max_new_tokens=16, window=16)
    assert sw.groups == ["wrong", "correct"] and sw.layers == [2, 3] and sw.n_per_group == {"wrong": 2, "correct": 2}
    # coefficient 0 is no steering
    assert sw.metrics["wrong"][1] == steering.decision_metrics(model, *decision_points["wrong"], 16, 16)
    for k in steering.DECISION_METRICS:
        assert sw.series("mix", k) == [(a + b) / 2 for a, b in zip(sw.series("wrong", k), sw.series("correct", k))]
    # the late-block difference of means is a backtracking direction (docs/steering.md)
    assert sw.is_monotonic("mix", "p_backtrack_next")
    assert sw.against_zero("wrong", "p_backtrack_next", -1) and sw.against_zero("correct", "p_backtrack_next", 1)
    rows = sw.rows()
    assert [r["coeff"] for r in rows] == [-1.0, 0.0, 1.0] and rows[2]["mix/accuracy"] == sw.series("mix", "accuracy")[2]
    assert len(rows[0]) == 1 + 3 * len(steering.DECISION_METRICS)
    assert sw.to_frame().shape == (9, 2 + len(steering.DECISION_METRICS))
    assert len(coefficient_sweep_figure({"late": sw}).axes) == 2 and sw.plot().axes
    with pytest.raises(ValueError, match="metric"):
        sw.series("mix", "nope")
    with pytest.raises(ValueError, match="sign"):
        sw.against_zero("mix", "accuracy", 0)


def test_sweep_checks_on_known_series():
    ms = [steering.DecisionMetrics(p, 0.0, 0.0, 0.0, 0.0, round(1 - p, 6), 0.0) for p in (0.1, 0.3, 0.2)]
    sw = steering.CoefficientSweep([-1.0, 0.0, 1.0], [1], {"g": ms, "mix": ms}, {"g": 1})
    assert not sw.is_monotonic("g", "p_backtrack_next") and sw.series("g", "accuracy") == [0.9, 0.7, 0.8]
    assert sw.against_zero("g", "p_backtrack_next", -1) and not sw.against_zero("g", "p_backtrack_next", 1)
    no_zero = steering.CoefficientSweep([1.0, 2.0], [1], {"g": ms[:2], "mix": ms[:2]}, {"g": 1})
    assert no_zero.against_zero("g", "p_backtrack_next", -1)  # vacuous without a 0 coefficient
