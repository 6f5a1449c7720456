"""Interventions: suppression, budget forcing, representation recycling, trace editing."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from mechthink import interventions as iv
from mechthink import traces

ARCH = "LlamaForCausalLM"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def thinker():
    import mechthink as mt

    return mt.load_model("tiny-thinker")


QS = ["Compute 3 + 5 - 2.", "Compute 7 - 2 + 9 + 1.", "Compute 4 + 4."]


def test_suppress_and_random_control(thinker):
    model = thinker
    so = model.token_ids(["So"])
    x = model.to_tokens(model.prompt(QS[0]))
    with torch.inference_mode():
        before = model.bridge(x).clone()
        with iv.suppress_tokens(model, so):
            gen = traces.generate(model, QS, max_new_tokens=40)
            lg = model.bridge(x)
        assert torch.isinf(lg[..., so]).all()
        assert torch.equal(before, model.bridge(x))
    assert all(not set(t.ids[t.n_prompt :]) & set(so) for t in gen)
    base = traces.generate(model, QS, max_new_tokens=40)
    assert any(set(t.ids[t.n_prompt :]) & set(so) for t in base)
    ctl = iv.random_control(model, len(so), exclude=so, seed=3)
    assert len(ctl) == len(so) and not set(ctl) & set(so)
    assert not set(ctl) & set(model.tokenizer.all_special_ids)
    assert ctl == iv.random_control(model, len(so), exclude=so, seed=3)
    digits = model.token_ids(["1", "2", "3", "4"])[:4]
    pool = [*digits, *so, *model.tokenizer.all_special_ids]
    drawn = iv.random_control(model, 3, exclude=so, seed=1, pool=pool)
    assert len(drawn) == 3 and set(drawn) <= set(digits)
    with pytest.raises(ValueError, match="only 4 are eligible"):
        iv.random_control(model, 5, exclude=so, pool=pool)


def test_continue_prefixes_sampling_is_per_row_and_reproducible(thinker):
    model = thinker
    rows = [model.to_tokens(model.prompt(q))[0].tolist() for q in QS]
    greedy = iv.continue_prefixes(model, rows, 30)
    assert greedy == iv.continue_greedy(model, rows, 30)
    a = iv.continue_prefixes(model, rows, 30, temperature=1.0, seed=3)
    b = iv.continue_prefixes(model, rows, 30, temperature=1.0, seed=3, batch_size=1)
    assert a == b  # each row has its own generator: batching does not change its draw
    assert [iv.continue_prefixes(model, [r], 30, temperature=1.0, seed=3)[0] for r in rows[:1]] == a[:1]
    runs = [iv.continue_prefixes(model, rows, 30, temperature=1.5, seed=s) for s in range(4)]
    assert len({str(r) for r in runs}) > 1  # different seeds sample differently
    # suppression applies to sampling: the suppressed token never appears
    so = model.token_ids(["So"])
    with iv.suppress_tokens(model, so):
        sup = iv.continue_prefixes(model, rows, 30, temperature=1.0, seed=3)
    assert all(not set(g) & set(so) for g in sup)
    with pytest.raises(ValueError, match="temperature"):
        iv.continue_prefixes(model, rows, 5, temperature=-1.0)


def test_budget_cap_forces_answer(thinker):
    model = thinker
    suffix = model.tokenizer(model.spec.answer_suffix, add_special_tokens=False)["input_ids"]
    with iv.budget_forcing(model, budget=6) as st:
        gen = traces.generate(model, QS, max_new_tokens=40)
    assert st.forced_answer == [True] * len(QS)
    for t in gen:
        new = t.ids[t.n_prompt :]
        assert new[6 : 6 + len(suffix)] == suffix
        assert t.think_end is not None and t.answer_text


def test_budget_extensions(thinker):
    model = thinker
    base = traces.generate(model, QS, max_new_tokens=120)
    with iv.budget_forcing(model, max_extensions=2) as st:
        gen = traces.generate(model, QS, max_new_tokens=120)
    wait = model.tokenizer(" Wait", add_special_tokens=False)["input_ids"]
    close = model.tokenizer.convert_tokens_to_ids(model.spec.think_close)
    for t, b, n in zip(gen, base, st.extensions):
        assert 1 <= n <= 2
        new, old = t.ids[t.n_prompt :], b.ids[b.n_prompt :]
        k = old.index(close)
        assert new[:k] == old[:k] and new[k : k + len(wait)] == wait  # " Wait" where it tried to close


def _manual_decode(model, prompt_ids, n_new, lens):
    """Greedy decoding with an explicit cache, recording the cache length after each step."""
    ids = list(prompt_ids)
    with torch.inference_mode():
        logits, kv = model.bridge(torch.tensor([ids]), return_type="logits_and_cache")
        lens.append((kv.get_seq_length(), len(ids)))
        for _ in range(n_new):
            ids.append(int(logits[0, -1].argmax()))
            logits, kv = model.bridge(torch.tensor([[ids[-1]]]), return_type="logits_and_cache", past_key_values=kv)
            lens.append((kv.get_seq_length(), len(ids)))
    return ids


def test_recycling_identity_block_reproduces_generation(thinker):
    model = thinker
    trig = iv.thinking_token_ids(model) + model.token_ids(["Let"])
    base = traces.generate(model, QS, max_new_tokens=50)
    with iv.recycle(model, 2, token_ids=trig, block=lambda h, **kw: h) as rs:
        gen = traces.generate(model, QS, max_new_tokens=50)
    assert [t.ids for t in gen] == [t.ids for t in base]
    assert rs.n_recycled == len(rs.events) > 0  # exactly one recycle per triggered step
    prompt = model.to_token_lists([model.prompt(QS[0])])[0]
    lens: list[tuple[int, int]] = []
    with iv.recycle(model, 2, token_ids=trig) as rs2:
        _manual_decode(model, prompt, 30, lens)
    assert rs2.n_recycled > 0
    assert all(a == b for a, b in lens)  # cache length == token count at every step


def _recycled_reference(hf, ids, layer):
    """Next-token log-probs after ``ids`` with block ``layer`` applied twice at the last position,
    computed on a separately loaded HF model by an explicit layer loop (no bridge, no hooks, no
    cache): the second pass sees the block's inputs at earlier positions and its own output at
    the last one."""
    x = torch.tensor([ids])
    h = hf.model.embed_tokens(x)
    pos = torch.arange(x.shape[1])[None]
    pe = hf.model.rotary_emb(h, pos)
    mask = torch.full((x.shape[1], x.shape[1]), torch.finfo(h.dtype).min).triu(1)[None, None]

    def run(blk, inp):
        out = blk(inp, attention_mask=mask, position_ids=pos, position_embeddings=pe)
        return out[0] if isinstance(out, tuple) else out

    for i, blk in enumerate(hf.model.layers):
        out = run(blk, h)
        if i == layer:
            again = run(blk, torch.cat([h[:, :-1], out[:, -1:]], dim=1))
            out = torch.cat([out[:, :-1], again[:, -1:]], dim=1)
        h = out
    return hf.lm_head(hf.model.norm(h))[0, -1].log_softmax(-1)


def test_recycling_matches_uncached_reference(thinker):
    """One recycled decode step equals an independent no-cache recomputation on the plain HF model."""
    from mechthink.models.organism import load_hf

    model = thinker
    hf, _ = load_hf()
    L = 1
    ids = model.to_token_lists([model.prompt(QS[1])])[0] + [9, 18]  # "<think>\n" then "1 "
    with torch.inference_mode():
        _, kv = model.bridge(torch.tensor([ids[:-1]]), return_type="logits_and_cache")
        plain = model.bridge(torch.tensor([ids[-1:]]), past_key_values=copy.deepcopy(kv))[0, -1].log_softmax(-1)
        trig = [int(plain.argmax())]  # the unrecycled step's argmax triggers the recycle
        with iv.recycle(model, L, token_ids=trig) as rs:
            got, kv = model.bridge(torch.tensor([ids[-1:]]), return_type="logits_and_cache", past_key_values=kv)
        ref = _recycled_reference(hf, ids, L)
        unrecycled_ref = hf(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
    assert rs.n_recycled == 1 and rs.events == [(len(ids) - 1, [0])]
    assert all(lay.keys.shape[-2] == len(ids) for lay in kv.layers)  # one cache entry per token, every layer
    got = got[0, -1].float().log_softmax(-1)
    torch.testing.assert_close(plain, unrecycled_ref, atol=1e-4, rtol=1e-4)  # the reference model is the model
    assert (got - plain).abs().max() > 0.1  # recycling changed the step ...
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)  # ... exactly as the reference does


def test_trace_editing_on_organism(thinker):
    model = thinker
    ex = iv.organism_mistakes(6, seed="test")
    out = iv.continue_after_edit(model, [e["input_ids"] for e in ex], [e["answer"] for e in ex],
                                 [e["mistaken_answer"] for e in ex], max_new_tokens=60)
    assert sum(o.backtracked for o in out) >= 4 and sum(o.follows_correct for o in out) >= 4
    # the planted behaviour: a noticed mistake is redone (never followed); an unnoticed one is followed
    assert all(not o.follows_mistake for o in out if o.backtracked)
    assert all(o.follows_mistake for o in out if not o.backtracked)
    assert all(o.backtrack_offset == 0 and o.continuation.startswith(" Wait") for o in out if o.backtracked)
    tr = traces.generate(model, [{"question": QS[1], "answer": "15"}], max_new_tokens=60)[0]
    assert "5 + 9 = 14.\n14 + 1 = 15." in tr.thinking
    i = tr.text.index("5 + 9 = ") + len("5 + 9 = ")
    edited = iv.edit_trace(model, tr, i, i + 2, "16", correct="15", mistaken="17", max_new_tokens=60)
    kept = iv.edit_trace(model, tr, i, i + 2, "14", correct="15", mistaken="17", max_new_tokens=60)
    # the wrong result makes the model backtrack at once and redo the step; the unedited prefix does not
    assert edited.backtracked and edited.backtrack_offset == 0
    assert edited.continuation.startswith(" Wait, 5 + 9 = 14.")
    assert edited.answer == "15" and edited.follows_correct and not edited.follows_mistake
    assert not kept.backtracked and kept.backtrack_offset is None
    assert kept.answer == "15" and kept.continuation.startswith("\n14 + 1 = 15.")
    df = iv.edit_table(out)
    assert len(df) == 6 and list(df["backtracked"]) == [o.backtracked for o in out]
    assert edited.to_frame().iloc[0]["answer"] == "15" and json.loads(edited.to_json())["backtrack_offset"] == 0
    with pytest.raises(NotImplementedError, match="edit_table"):
        edited.plot()


def test_budget_and_recycle_state_views(thinker):
    model = thinker
    with iv.budget_forcing(model, budget=6) as st:
        traces.generate(model, QS, max_new_tokens=20)
    df = st.to_frame()
    assert list(df["forced_answer"]) == [True] * len(QS) and list(df["row"]) == [0, 1, 2]
    suffix = model.tokenizer(model.spec.answer_suffix, add_special_tokens=False)["input_ids"]
    assert (df["n_forced_tokens"] == len(suffix)).all()
    assert json.loads(st.to_json())["forced_answer"] == [True] * len(QS)
    with pytest.raises(NotImplementedError, match="ForcingSweep"):
        st.plot()
    with iv.recycle(model, 2, token_ids=iv.thinking_token_ids(model) + model.token_ids(["Let"])) as rs:
        traces.generate(model, QS[:1], max_new_tokens=20)
    fr = rs.to_frame()
    assert len(fr) == len(rs.events) == rs.n_recycled > 0
    assert list(fr["cache_length"]) == [c for c, _ in rs.events] and (fr["n_rows"] == 1).all()
    assert json.loads(rs.to_json())["n_recycled"] == rs.n_recycled


def test_backtrack_pattern():
    pat = iv.backtrack_pattern(["Wait", "Hmm"])
    assert pat.search("ok. Wait, no") and pat.search("Hmm.") and not pat.search("Waiting") and not pat.search("await")
    with pytest.raises(ValueError, match="words"):
        iv.backtrack_pattern([])


def _prefixes(model, n=3):
    from mechthink.models.organism import step_examples

    ev = [e for e in step_examples(model, 4 * n, seed=7) if e.is_error][:n]
    return [e.input_ids for e in ev], [str(e.answer) for e in ev]


@pytest.fixture(scope="module")
def sweep(thinker):
    prefixes, golds = _prefixes(thinker)
    words = [*thinker.spec.backtracking_words, "But wait"]  # "But wait" is never one token here
    return iv.suppression_sweep(thinker, prefixes, golds, words=words, n_random=2, seed=5, max_new_tokens=30)


def test_suppression_sweep_against_direct_runs(thinker, sweep):
    model = thinker
    prefixes, golds = _prefixes(model)
    assert sweep.words == ["Wait", "Hmm", "Alternatively"] and "But wait" in sweep.detected
    assert sweep.cumulative == ["Wait", "Wait + Hmm", "Wait + Hmm + Alternatively"]
    assert set(sweep.sets["Wait + Hmm"]) == set(sweep.sets["Wait"]) | set(sweep.sets["Hmm"])
    assert sorted(sweep.exclude) == sorted(sweep.sets["Wait + Hmm + Alternatively"])
    pat = iv.backtrack_pattern(sweep.detected)

    def direct(ids):
        with iv.suppress_tokens(model, ids):
            texts = [model.to_string(g) for g in iv.continue_greedy(model, prefixes, 30)]
        return iv.accuracy(texts, golds), sum(bool(pat.search(t)) for t in texts) / len(texts)

    for name in ("Wait", "Wait + Hmm + Alternatively"):
        o = sweep.outcomes[name]
        assert (o.accuracy, o.backtrack_rate) == direct(sweep.sets[name]) and o.n_tokens == len(sweep.sets[name])
    base = iv.continue_greedy(model, prefixes, 30)
    assert (sweep.outcomes["none"].accuracy, sweep.outcomes["none"].backtrack_rate) == direct([])
    assert sweep.n_produced == len({t for g in base for t in g})
    # a control draw is random_control with seed + draw; its accuracy is that run's
    ctl = sweep.outcomes["random(Hmm)"]
    draw1 = iv.random_control(model, len(sweep.sets["Hmm"]), exclude=sweep.exclude, seed=6)
    assert ctl.accuracy_each[1] == direct(draw1)[0] and ctl.accuracy == sum(ctl.accuracy_each) / 2
    # never-produced tokens cannot change a greedy continuation: that control equals no suppression
    for name in sweep.sets:
        assert sweep.outcomes[f"random unused({name})"].accuracy_each == [sweep.outcomes["none"].accuracy] * 2
    assert sweep.drop("Wait", "random") == sweep.outcomes["random(Wait)"].accuracy - sweep.outcomes["Wait"].accuracy
    summary = sweep.summary()
    assert summary["suppressed_sets"]["Hmm"] == [model.to_string([i]) for i in sweep.sets["Hmm"]]
    assert summary["results"]["random(Hmm)"]["accuracy_each"] == ctl.accuracy_each
    df = sweep.to_frame()
    assert len(df) == len(sweep.outcomes) and set(df["control"].dropna()) == {"random", "random unused"}
    assert df.set_index("condition").loc["random(Hmm)", "set"] == "Hmm"
    assert json.loads(sweep.to_json())["cumulative"] == sweep.cumulative
    assert sweep.plot().axes and sweep.outcomes["Wait"].to_frame().shape == (1, 3)
    with pytest.raises(ValueError, match="single token"):
        iv.suppression_sweep(model, prefixes, golds, words=["But wait"])


def test_sampled_suppression_is_paired(thinker, sweep):
    from mechthink.plotting.interventions import suppression_figure
    from mechthink.stats import paired_change

    model = thinker
    prefixes, golds = _prefixes(model)
    s = iv.sampled_suppression(model, prefixes, golds, sweep, n_seeds=3, n_seeds_control=2, n_draws=1,
                               max_new_tokens=30, seed=5)
    assert list(s.conditions) == ["Wait", "random(Wait)", "random unused(Wait)"]
    # the "none" matrix is seed s of continue_prefixes, one column per problem
    for seed in range(3):
        texts = [model.to_string(g) for g in iv.continue_prefixes(model, prefixes, 30, temperature=1.0, seed=seed)]
        assert s.correct["none"][seed].tolist() == [iv.accuracy([t], [g]) for t, g in zip(texts, golds)]
    for name, cond in s.conditions.items():
        m = s.correct[name]
        assert m.shape == ((3 if name == "Wait" else 2), len(prefixes))
        assert cond.change == paired_change(m, s.correct["none"], seed=5)
        assert cond.accuracy == float(m.mean())
        assert cond.accuracy_none_same_seeds == float(s.correct["none"][: len(m)].mean())
    summ = s.summary()
    assert summ["Wait"]["change_ci95"] == list(s.conditions["Wait"].change.ci95)
    assert summ["none"] == {"accuracy": s.baseline_accuracy}
    assert set(summ["any_backtracking_word_rate"]) == {"none", "Wait"}
    assert list(s.to_frame()["condition"]) == ["none", *s.conditions]
    assert len(suppression_figure(sweep, s).axes) == 3
    with pytest.raises(ValueError, match="n_seeds_control"):
        iv.sampled_suppression(model, prefixes, golds, sweep, n_seeds=1, n_seeds_control=2)


def test_forcing_sweep_matches_direct_runs(thinker):
    from mechthink.plotting.interventions import forcing_figure

    model = thinker
    qs = [{"question": q, "answer": a} for q, a in zip(QS, ["6", "15", "8"])]
    golds = [q["answer"] for q in qs]
    b = iv.forcing_sweep(model, qs, golds, "budget", [3, 60], max_new_tokens=60)
    with iv.budget_forcing(model, budget=3) as st:
        direct = traces.generate(model, qs, max_new_tokens=60, batch_size=len(qs))
    assert b.scores[0] == iv.score_traces(direct, golds) and b.forced[0] == sum(st.forced_answer) / 3 == 1.0
    assert b.forced[1] == 0.0 and b.scores[1] == b.baseline  # a budget never reached changes nothing
    assert b.baseline == iv.score_traces(traces.generate(model, qs, max_new_tokens=60), golds)
    assert b.baseline.accuracy == 1.0 and b.scores[0].accuracy < 1.0
    # one forcing state per batch: batches of 2 give the same numbers
    assert iv.forcing_sweep(model, qs, golds, "budget", [3], max_new_tokens=60, batch_size=2).forced == [1.0]
    e = iv.forcing_sweep(model, qs, golds, "max_extensions", [0, 1], max_new_tokens=80, baseline=b.baseline)
    assert e.forced == [0.0, 1.0] and e.scores[0] == b.baseline and e.extend_with == " Wait"
    assert e.rows()[1]["mean_extensions"] == 1.0 and b.rows()[0]["forced_rate"] == 1.0 and "budget" in b.rows()[0]
    assert list(b.to_frame().columns[:2]) == ["budget", "forced_rate"]
    assert len(forcing_figure(b, e).axes) == 2 and b.plot().axes
    with pytest.raises(NotImplementedError, match="ForcingSweep"):
        b.baseline.plot()
    with pytest.raises(ValueError, match="parameter"):
        iv.forcing_sweep(model, qs, golds, "tokens", [1])
