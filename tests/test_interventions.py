"""Interventions: suppression, budget forcing, representation recycling, trace editing."""

from __future__ import annotations

import pytest
import torch

from mechthink import interventions as iv
from mechthink import traces
from mechthink.models.kvcache import CACHE_KWARGS

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


def test_recycling_matches_uncached_reference(thinker):
    """One recycled decode step equals a full no-cache recomputation of the recycled block."""
    model = thinker
    L = 1
    ids = model.to_token_lists([model.prompt(QS[1])])[0] + [9, 18]  # "<think>\n" then "1 "
    blk = model.bridge.blocks[L]
    with torch.inference_mode():
        _, kv = model.bridge(torch.tensor([ids[:-1]]), return_type="logits_and_cache")
        first = model.bridge(torch.tensor([ids[:-1]]))  # trigger on whatever comes next
        trig = [int(model.bridge(torch.tensor([ids]))[0, -1].argmax())]
        with iv.recycle(model, L, token_ids=trig) as rs:
            got, kv = model.bridge(torch.tensor([ids[-1:]]), return_type="logits_and_cache", past_key_values=kv)
        assert rs.n_recycled == 1 and kv.get_seq_length() == len(ids)

        def ref_hook(module, args, kwargs, output):
            x = args[0].clone()
            x[:, -1] = output[:, -1]
            kw = {k: v for k, v in kwargs.items() if k not in (*CACHE_KWARGS, "use_cache")}
            again = blk.original_component(x, use_cache=False, **kw)
            out = output.clone()
            out[:, -1] = again[:, -1]
            return out

        h = blk.register_forward_hook(ref_hook, with_kwargs=True)
        try:
            ref = model.bridge(torch.tensor([ids]))
        finally:
            h.remove()
    assert first.shape[1] == len(ids) - 1
    torch.testing.assert_close(got[0, -1].log_softmax(-1), ref[0, -1].log_softmax(-1), atol=1e-4, rtol=1e-4)


def test_trace_editing_on_organism(thinker):
    model = thinker
    ex = iv.organism_mistakes(6, seed="test")
    out = iv.continue_after_edit(model, [e["input_ids"] for e in ex], [e["answer"] for e in ex],
                                 [e["mistaken_answer"] for e in ex], max_new_tokens=60)
    assert sum(o.backtracked for o in out) >= 4
    assert all(o.follows_correct != o.follows_mistake or o.answer is None for o in out)
    tr = traces.generate(model, [{"question": QS[1], "answer": "15"}], max_new_tokens=60)[0]
    i = tr.text.index("5 + 9 = ") + len("5 + 9 = ")
    res = iv.edit_trace(model, tr, i, i + 2, "16", correct="15", mistaken="17", max_new_tokens=60)
    assert res.answer is not None and (res.follows_correct or res.follows_mistake)
    df = iv.edit_table(out)
    assert len(df) == 6 and "backtracked" in df
