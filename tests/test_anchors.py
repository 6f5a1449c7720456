"""mechthink.anchors: sentences and their taxonomy, counterfactual resampling from forked prefixes,
attention suppression, receiver heads, token methods per sentence, agreement (Thought Anchors)."""

from __future__ import annotations

import math

import pytest
import torch

from mechthink import anchors as A
from mechthink import generation as G
from mechthink import traces

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def thinker():
    import mechthink as mt

    return mt.load_model("tiny-thinker")


@pytest.fixture(scope="module")
def transcripts():
    from mechthink.models.organism import sample_transcripts

    return sample_transcripts(40, seed="test-anchors")


@pytest.fixture(scope="module")
def organism(thinker, transcripts):
    return [A.organism_sentences(thinker, t, id=f"t{k}") for k, t in enumerate(transcripts)]


@pytest.fixture(scope="module")
def with_error(organism):
    """A short transcript with one planted error (wrong step, then its backtracking sentence)."""
    return min((o for o in organism if o.error_pairs), key=lambda o: len(o.sentences))


# ============================================================================ sentences and taxonomy
def test_taxonomy_matches_the_generator(organism):
    pairs = [(s.label, t) for o in organism for s, t in zip(o.sentences, o.true_labels)]
    agreement = sum(a == b for a, b in pairs) / len(pairs)
    assert len(pairs) > 150 and agreement >= 0.95
    kinds = {t for _, t in pairs}
    assert {"computation", "backtrack", "check", "consolidation", "final_answer"} <= kinds


def test_classify_sentences_rules():
    texts = [
        "First, I need to find how many apples Tom has.",
        "He has 3 + 5 = 8 apples.",
        "Wait, he gave one away.",
        "Let me check: 8 - 1 = 7.",
        "Hmm, let me redo that.",
        "So the answer is 7.",
        "Therefore he keeps them.",
        "Apples are red.",
        "The final answer is \\boxed{7}.",
    ]
    assert A.classify_sentences(texts) == [
        "plan", "computation", "backtrack", "check", "backtrack", "consolidation", "consolidation", "other", "final_answer",
    ]
    assert A.classify_sentences(["So the answer is 7."]) == ["final_answer"]
    assert A.classify_sentences(["Oops, that is 7."], backtracking_words=("Oops",)) == ["backtrack"]
    assert set(A.classify_sentences(texts)) <= set(A.SENTENCE_LABELS)


def test_sentences_carry_spans(thinker, with_error):
    tr = with_error.trace
    for s in with_error.sentences:
        assert tr.text[s.char_start : s.char_end] == s.text
        assert s.text.replace(" ", "") in thinker.to_string(tr.ids[s.token_start : s.token_end]).replace(" ", "")
        assert list(s.positions) == list(range(s.token_start, s.token_end)) and s.n_tokens == s.token_end - s.token_start
    assert [s.index for s in with_error.sentences] == list(range(len(with_error.sentences)))
    w, b = with_error.error_pairs[0]
    assert b == w + 1 and with_error.true_labels[b] == "backtrack" and not with_error.answer_determining[w]


def test_sentences_bad_input(thinker):
    empty = traces.trace_from_text(thinker, "Compute 3 + 5.", "\n</think>\n\nThe final answer is \\boxed{8}.<|end|>")
    with pytest.raises(ValueError, match="no sentences"):
        A.sentences(empty)


# ============================================================================ answers and importances
def test_answer_kl_matches_the_formula():
    p = ["8"] * 3 + ["9"]
    q = ["8"] * 2 + ["7", None]
    a = 1e-9
    # support {8, 9, 7}: V = 3; p̂(8) = 3/4, p̂(9) = 1/4
    want = 0.75 * math.log(((3 + a) / (4 + 3 * a)) / ((2 + a) / (3 + 3 * a))) + 0.25 * math.log(
        ((1 + a) / (4 + 3 * a)) / ((0 + a) / (3 + 3 * a)))
    assert A.answer_kl(p, q, a) == pytest.approx(want, rel=1e-12)
    assert A.answer_kl(p, p) == 0.0 and A.answer_kl([None], q) == 0.0 and A.answer_kl(p, []) == 0.0


def _r(point, k, answer, sim=1.0):
    return A.Rollout(point, k, (), answer, "", sim, "eos")


def test_importance_from_rollouts_paper_definitions():
    sents = [A.Sentence(i, f"s{i}", 0, 1, 5 + 2 * i, 6 + 2 * i) for i in range(2)]
    rolls = [
        [_r(0, 0, "8", 1.0), _r(0, 1, "9", 0.2), _r(0, 2, "9", 0.5), _r(0, 3, None, 0.1)],
        [_r(1, 0, "8", 1.0), _r(1, 1, "8", 0.9), _r(1, 2, "7", 0.3)],
        [_r(2, 0, "8"), _r(2, 1, "8")],
    ]
    res = A.importance_from_rollouts(sents, [5, 7, 8], rolls, "8", n_max=4, similarity_threshold=0.8)
    before, kept = ["8", "9", "9", None], ["8", "8", "7"]
    assert float(res.metric("resampling_kl")[0]) == pytest.approx(A.answer_kl(before, kept))
    assert float(res.metric("resampling_accuracy")[0]) == pytest.approx(2 / 3 - 1 / 3)
    # counterfactual: the different resamples (similarity < 0.8) vs kept + similar
    assert float(res.metric("counterfactual_kl")[0]) == pytest.approx(A.answer_kl(["9", "9", None], kept + ["8"]))
    assert float(res.metric("counterfactual_accuracy")[0]) == pytest.approx(2 / 3 - 0.0)
    assert float(res.different_fraction[0]) == pytest.approx(3 / 4)
    assert float(res.metric("resampling_accuracy")[1]) == pytest.approx(1.0 - 2 / 3)
    assert res.n_rollouts.tolist() == [4, 3, 2] and res.rollouts_saved == 12 - 9
    assert len(res.to_frame()) == 2 and "resampling_kl" in res.to_json()
    with pytest.raises(ValueError, match="parsable"):
        A.importance_from_rollouts(sents, [5, 7, 8], [[_r(j, 0, None)] for j in range(3)], "8", n_max=1)
    with pytest.raises(ValueError, match="prefixes"):
        A.importance_from_rollouts(sents, [5, 7], rolls[:2], "8", n_max=4)


def test_auroc_counts_pairs():
    scores = [0.1, 0.4, 0.35, 0.8, 0.4, float("nan")]
    labels = [False, False, True, True, True, True]
    pos = [s for s, y in zip(scores, labels) if y and s == s]
    neg = [s for s, y in zip(scores, labels) if not y]
    want = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    assert A.auroc(scores, labels) == pytest.approx(want)
    assert math.isnan(A.auroc([1.0, 2.0], [True, True]))


# ============================================================================ resampling from forks
def test_forked_rollouts_equal_reprefilled_rollouts(thinker, with_error):
    """The resampler's rollouts == decode() re-reading each prefix, token for token, under the
    same seeds; and the batch size does not change a number."""
    tr, sents = with_error.trace, with_error.sentences
    kw = dict(n_rollouts=6, max_new_tokens=70, temperature=1.0, top_p=1.0, seed=3)
    res = A.resampling_importance(thinker, tr, sents, batch_size=4, **kw)
    dec = G.Decoder.for_model(thinker)
    for j, p in enumerate(res.points):
        cfg = G.SamplingConfig(70, 1.0, 1.0, G.seed_for(3, p))
        fresh = G.decode(dec, [tr.ids[:p]] * 6, cfg, batch_size=6, indices=range(6))
        assert [list(r.ids) for r in res.rollouts[j]] == [c.ids for c in fresh]
        assert [r.finished for r in res.rollouts[j]] == [c.finished for c in fresh]
    other = A.resampling_importance(thinker, tr, sents, batch_size=5, chunk_size=9, **kw)  # a chunked prefill too
    assert [[r.ids for r in rs] for rs in other.rollouts] == [[r.ids for r in rs] for rs in res.rollouts]
    for m in A.ResamplingImportance.METRICS:
        assert torch.equal(other.metric(m), res.metric(m))
    # every rollout is the model continuing: answers parse, resampled sentences are compared
    assert all(r.answer is not None for rs in res.rollouts for r in rs)
    identical = [r for rs in res.rollouts[:-1] for r in rs if r.similarity == 1.0]
    assert identical and all(-1.0 <= r.similarity <= 1.0 for rs in res.rollouts[:-1] for r in rs)
    assert res.reference == str(tr.gold) and res.config["prefill_tokens"] == len(tr.ids)


def test_adaptive_stopping_is_the_prefix_of_the_full_run(thinker, with_error):
    tr, sents = with_error.trace, with_error.sentences
    kw = dict(n_rollouts=12, batch_size=12, max_new_tokens=70, temperature=1.0, seed=1)
    full = A.resampling_importance(thinker, tr, sents, **kw)
    rule = A.AdaptiveStopping(tolerance=0.45, min_rollouts=4, round_size=4)
    live = A.resampling_importance(thinker, tr, sents, adaptive=rule, **kw)
    replay = A.replay_adaptive(full, rule)
    assert live.n_rollouts.tolist() == replay.n_rollouts.tolist()
    for j, rs in enumerate(live.rollouts):
        assert [r.ids for r in rs] == [r.ids for r in full.rollouts[j][: len(rs)]]
    for m in A.ResamplingImportance.METRICS:
        assert torch.allclose(live.metric(m), replay.metric(m))
    assert live.rollouts_saved > 0 and 0 < live.saved_fraction < 1
    assert all(4 <= n <= 12 for n in live.n_rollouts.tolist())
    with pytest.raises(ValueError, match="tolerance"):
        A.AdaptiveStopping(tolerance=0.0)
    with pytest.raises(ValueError, match="round_size"):
        A.AdaptiveStopping(round_size=0)


def test_resampling_bad_input(thinker, with_error):
    tr, sents = with_error.trace, with_error.sentences
    with pytest.raises(ValueError, match="n_rollouts"):
        A.resampling_importance(thinker, tr, sents, n_rollouts=0)
    with pytest.raises(ValueError, match="n_rollouts"):
        A.resampling_importance(thinker, tr, sents, n_rollouts=-3)
    with pytest.raises(ValueError, match="empty"):
        A.resampling_importance(thinker, tr, [])
    far = A.Sentence(0, "x", 0, 1, len(tr.ids) + 2, len(tr.ids) + 5)
    with pytest.raises(ValueError, match="outside"):
        A.resampling_importance(thinker, tr, [far])
    with pytest.raises(ValueError, match="parsable"):  # two tokens per rollout: no answer ever
        A.resampling_importance(thinker, tr, sents[-1:], n_rollouts=2, max_new_tokens=2, temperature=1.0)
    with pytest.raises(ValueError, match="similarity"):
        A.resampling_importance(thinker, tr, sents, similarity="minilm")
    with pytest.raises(ValueError, match="target"):
        A.suppression_matrix(thinker, tr, sents).strongest_source(len(sents) + 3)


def test_callable_similarity_and_first_sentence(thinker, with_error):
    tr, sents = with_error.trace, with_error.sentences
    res = A.resampling_importance(thinker, tr, sents[:2], n_rollouts=4, batch_size=4, max_new_tokens=70,
                                  temperature=1.0, similarity=lambda a, b: 0.0)
    sims = {r.similarity for rs in res.rollouts[:-1] for r in rs}
    assert sims <= {0.0, 1.0}
    ids = thinker.tokenizer("3 + 5 = 8. Wait, 3 + 5 = 9.\n", add_special_tokens=False)["input_ids"]
    text, k = A.first_sentence(thinker, ids)
    assert text == "3 + 5 = 8." and thinker.to_string(ids[:k]).strip() == "3 + 5 = 8."
    assert A.rollout_answer("So 8.\n</think>\nThe final answer is \\boxed{8", "length") is None
    assert A.rollout_answer("</think>\nThe final answer is \\boxed{8}.", "length") == "8"


# ============================================================================ attention suppression
def _hf_reference(hf, ids, span, layers=None, heads=None):
    """Plain HF eager forward with the attention mask edited: the keys of ``span`` removed for the
    queries after it, in ``layers`` (all) and ``heads`` (all)."""
    T = len(ids)
    allowed = torch.tril(torch.ones(T, T, dtype=torch.bool))
    n_heads = hf.config.num_attention_heads
    edited = allowed[None].repeat(n_heads, 1, 1)
    for h in range(n_heads) if heads is None else heads:
        edited[h, span[1] :, span[0] : span[1]] = False

    def additive(m):
        return torch.zeros(m.shape).masked_fill(~m, float("-inf"))[None]

    plain, custom = additive(allowed[None]), additive(edited)
    chosen = set(range(hf.config.num_hidden_layers) if layers is None else layers)
    handles = []
    for L, layer in enumerate(hf.model.layers):
        def pre(module, args, kwargs, L=L):
            kwargs["attention_mask"] = custom if L in chosen else plain
            return args, kwargs

        handles.append(layer.self_attn.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            return hf(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
    finally:
        for h in handles:
            h.remove()


@pytest.fixture(scope="module")
def organism_eager():
    from mechthink.models.organism import load_hf

    hf, _ = load_hf()
    hf.config._attn_implementation = "eager"
    return hf


def test_suppressing_nothing_is_bit_identical(thinker, with_error):
    x = torch.tensor([with_error.trace.ids])
    with torch.no_grad():
        base = thinker.bridge(x)
        s = with_error.sentences[1]
        with A.suppress_attention(thinker, (s.token_start, s.token_start)):  # an empty span
            same = thinker.bridge(x)
        with A.suppress_attention(thinker, (s.token_start, s.token_end), layers=[]):  # no layer
            same2 = thinker.bridge(x)
    assert torch.equal(base, same) and torch.equal(base, same2)


def test_suppression_equals_deleting_the_keys(thinker, with_error, organism_eager):
    ids = with_error.trace.ids
    x = torch.tensor([ids])
    s = with_error.sentences[0]
    span = (s.token_start, s.token_end)
    T = len(ids)
    with torch.no_grad():
        with A.suppress_attention(thinker, span):
            got = thinker.bridge(x).log_softmax(-1)[0]
        # the bridge's own path for a 4-D mask with those keys removed: the same numbers exactly
        allowed = torch.tril(torch.ones(T, T, dtype=torch.bool))
        allowed[span[1] :, span[0] : span[1]] = False
        via_mask = thinker.bridge(x, attention_mask=allowed[None, None]).log_softmax(-1)[0]
        base = thinker.bridge(x).log_softmax(-1)[0]
    assert torch.equal(got, via_mask)
    ref = _hf_reference(organism_eager, ids, span)
    assert (got - ref).abs().max() < 1e-4
    assert (got - base)[span[1] :].abs().max() > 0.1  # it matters after the span ...
    assert torch.equal(got[: span[1]], base[: span[1]])  # ... and nothing changes before its end
    # chosen layers and heads, against the mask edited in those layers and heads only
    with torch.no_grad(), A.suppress_attention(thinker, span, layers=[1, 3], heads=[0, 2]):
        part = thinker.bridge(x).log_softmax(-1)[0]
    assert (part - _hf_reference(organism_eager, ids, span, layers=[1, 3], heads=[0, 2])).abs().max() < 1e-4
    assert (part - got).abs().max() > 1e-3


def test_suppression_with_a_cache_and_per_row_spans(thinker, with_error):
    ids = with_error.trace.ids
    a, b = with_error.sentences[0], with_error.sentences[1]
    x = torch.tensor([ids])
    with torch.no_grad():
        with A.suppress_attention(thinker, (a.token_start, a.token_end)):
            full = thinker.bridge(x).log_softmax(-1)[0, -1]
            _, kv = thinker.bridge(x[:, :-1], return_type="logits_and_cache")
            step = thinker.bridge(x[:, -1:], past_key_values=kv).log_softmax(-1)[0, -1]
        assert (full - step).abs().max() < 1e-4  # columns are absolute: a cache before the call counts
        with A.suppress_attention(thinker, [(a.token_start, a.token_end), (b.token_start, b.token_end)]):
            both = thinker.bridge(x.expand(2, -1)).log_softmax(-1)
        with A.suppress_attention(thinker, (b.token_start, b.token_end)):
            only_b = thinker.bridge(x).log_softmax(-1)[0]
    assert (both[0, -1] - full).abs().max() < 1e-5 and (both[1] - only_b).abs().max() < 1e-5


def test_suppression_hooks_are_removed_on_error(thinker):
    count = lambda: sum(len(hp.fwd_hooks) for hp in thinker.bridge.hook_dict.values())  # noqa: E731
    before = count()
    with pytest.raises(RuntimeError, match="boom"):
        with A.suppress_attention(thinker, (3, 5)):
            assert count() == before + thinker.n_layers
            raise RuntimeError("boom")
    assert count() == before
    with pytest.raises(ValueError, match="layers"):
        with A.suppress_attention(thinker, (3, 5), layers=[9]):
            pass
    with pytest.raises(ValueError, match="start <= end"):
        with A.suppress_attention(thinker, (5, 3)):
            pass


def test_suppression_matrix_entries(thinker, with_error):
    tr, sents = with_error.trace, with_error.sentences
    m = A.suppression_matrix(thinker, tr, sents, batch_size=2)
    n = len(sents)
    upper = torch.triu_indices(n, n)
    assert m.matrix.shape == (n, n) and torch.isnan(m.matrix[upper[0], upper[1]]).all()
    i, j = 0, n - 1
    x = torch.tensor([tr.ids])
    with torch.no_grad():
        base = thinker.bridge(x)[0].log_softmax(-1)
        with A.suppress_attention(thinker, (sents[i].token_start, sents[i].token_end)):
            sup = thinker.bridge(x)[0].log_softmax(-1)
    kl = (base.exp() * (base - sup)).sum(-1)[sents[j].token_start : sents[j].token_end].mean()
    assert float(m.matrix[j, i]) == pytest.approx(float(kl), rel=1e-3, abs=1e-7)
    logged = A.suppression_matrix(thinker, tr, sents, log=True, temperature=0.6)
    direct = torch.log(logged.token_kl[0, sents[1].token_start : sents[1].token_end] + 1e-9).mean()
    assert logged.log and float(logged.matrix[1, 0]) == pytest.approx(float(direct))
    eff = m.effect()
    assert torch.isnan(eff[-1]) and float(eff[0]) == pytest.approx(float(m.matrix[1:, 0].mean()))
    assert len(m.to_frame()) == n * (n - 1) // 2


def test_suppressing_the_wrong_step_moves_its_wait_most(thinker, organism):
    """Ground truth (a): the planted wrong step is the strongest source of its backtracking sentence."""
    items = [A.AnchorTrace(o.trace, o.sentences, o) for o in organism]
    mats = [A.suppression_matrix(thinker, o.trace, o.sentences) for o in organism]
    checks = A.organism_checks(items, suppression=mats)
    assert checks["n_planted_errors"] >= 10
    assert checks["suppression_wrong_step_strongest"] >= 0.9
    assert checks["taxonomy_agreement"] >= 0.95


# ============================================================================ receiver heads
def test_sentence_attention_and_vertical_scores(thinker, with_error):
    tr, sents = with_error.trace, with_error.sentences
    avg = A.sentence_attention(thinker, tr, sents)
    _, cache = thinker.bridge.run_with_cache(torch.tensor([tr.ids]), names_filter=lambda n: n.endswith("hook_pattern"))
    L, h, i, j = 2, 1, len(sents) - 1, 0
    pat = cache[f"blocks.{L}.attn.hook_pattern"][0, h]
    region = pat[sents[i].token_start : sents[i].token_end, sents[j].token_start : sents[j].token_end]
    assert float(avg[L, h, i, j]) == pytest.approx(float(region.mean()), rel=1e-5)
    assert avg.shape == (thinker.n_layers, thinker.cfg.n_heads, len(sents), len(sents))
    a = A._assignment(sents, len(tr.ids))  # every layer and head: the streamed rows equal the whole pattern
    ref = torch.stack([torch.einsum("iq,hqk,jk->hij", a, cache[f"blocks.{L}.attn.hook_pattern"][0].float(), a)
                       for L in range(thinker.n_layers)])
    torch.testing.assert_close(avg, ref, atol=1e-6, rtol=1e-5)
    m = torch.arange(16.0).reshape(4, 4)
    v = A.vertical_scores(m, proximity_ignore=2)
    assert v[0] == pytest.approx((8.0 + 12.0) / 2) and v[1] == pytest.approx(13.0) and torch.isnan(v[2:]).all()


def test_receiver_heads_rank_by_kurtosis(thinker, organism):
    from scipy.stats import kurtosis

    items = organism[:6]
    rec = A.receiver_heads(thinker, [o.trace for o in items], [o.sentences for o in items], top_k=3, proximity_ignore=1)
    v0 = A.vertical_scores(A.sentence_attention(thinker, items[0].trace, items[0].sentences), 1)
    k0 = kurtosis(v0[0, 0].double().numpy(), fisher=True, bias=True, nan_policy="omit")
    per = [kurtosis(A.vertical_scores(A.sentence_attention(thinker, o.trace, o.sentences), 1)[0, 0].double().numpy(),
                    fisher=True, bias=True, nan_policy="omit") for o in items]
    finite = [k for k in per if k == k]  # a trace too short for a vertical score has none
    assert float(rec.kurtosis[0, 0]) == pytest.approx(sum(finite) / len(finite)) and per[0] == pytest.approx(k0, nan_ok=True)
    flat = rec.kurtosis.flatten()
    assert float(flat[rec.top_heads[0][0] * thinker.cfg.n_heads + rec.top_heads[0][1]]) == pytest.approx(float(flat.max()))
    assert len(rec.top_heads) == 3 and len(rec.scores) == 6 and all(len(t) <= 3 for t in rec.top_sentences)
    assert rec.to_frame()["top"].sum() == 3
    with pytest.raises(ValueError, match="one sentence list per trace"):
        A.receiver_heads(thinker, [items[0].trace], [])


def test_per_trace_kurtosis_is_context_receiver_heads(thinker, organism):
    """On one trace, the kurtosis of the sentence vertical scores equals mechthink.context's
    receiver heads with the sentences as units (the BOS unit kept)."""
    from mechthink import context

    o = max(organism, key=lambda o: len(o.sentences))
    units = [(s.token_start, s.token_end) for s in o.sentences]
    ref = context.receiver_heads(thinker, o.trace.ids, units=units, proximity_ignore=2, skip_first=False)
    mine = A.receiver_heads(thinker, [o.trace], [o.sentences], top_k=1, proximity_ignore=2)
    assert torch.allclose(mine.kurtosis.float(), ref.kurtosis.float(), atol=1e-4)


# ============================================================================ token methods, agreement
def test_sentence_scores_and_token_methods(thinker, with_error):
    sents = with_error.sentences
    n = len(with_error.trace.ids)
    vals = torch.arange(float(n))
    vals[sents[0].token_start] = float("nan")
    sc = A.sentence_scores(vals, sents, "pos")
    s0 = sents[0]
    assert float(sc.sum[0]) == pytest.approx(sum(range(s0.token_start + 1, s0.token_end)))
    assert float(sc.max[1]) == sents[1].token_end - 1

    class FakeAttribution:
        def token_importance(self, node, reduce, sign):
            return sign * torch.ones(n)

    at = A.sentence_attribution(FakeAttribution(), sents)
    assert float(at.sum[0]) == -s0.n_tokens
    traj = type("T", (), {"positions": torch.tensor([s0.token_start, s0.token_start + 1]), "mi": torch.tensor([0.5, 2.0]),
                          "peaks": torch.tensor([1])})()
    assert float(A.sentence_mi(traj, sents, n).max[0]) == 2.0 and float(A.sentence_mi(traj, sents, n, peaks=True).sum[0]) == 1.0
    pos = A.final_answer_positions(with_error.trace)
    assert thinker.to_string(with_error.trace.ids[pos[0] : pos[-1] + 1]).strip() == str(with_error.trace.gold)
    metric = A.answer_logprob_metric(with_error.trace.ids, pos)
    with torch.no_grad():
        lg = thinker.bridge(torch.tensor([with_error.trace.ids]))
    lp = lg[0].log_softmax(-1)
    assert float(metric(lg)[0]) == pytest.approx(sum(float(lp[p - 1, with_error.trace.ids[p]]) for p in pos), rel=1e-5)
    with pytest.raises(ValueError, match="outside"):
        A.sentence_scores(torch.zeros(3), sents)


def test_method_agreement():
    a = [torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([3.0, 1.0, 2.0])]
    rev = [-v for v in a]
    ag = A.method_agreement({"a": a, "b": [v * 2 for v in a], "rev": rev}, k=1)
    assert ag.spearman[0, 1] == pytest.approx(1.0) and ag.spearman[0, 2] == pytest.approx(-1.0)
    assert ag.top_k_overlap[0, 1] == 1.0 and ag.top_k_overlap[0, 2] == 0.0 and ag.n_traces == 2
    assert len(ag.to_frame()) == 9
    with pytest.raises(ValueError, match="same traces"):
        A.method_agreement({"a": a, "b": a[:1]})
    with pytest.raises(ValueError, match="empty"):
        A.method_agreement({})


# ============================================================================ every method, views
@pytest.mark.slow
def test_every_method_on_organism_traces(thinker, organism):
    items = [A.AnchorTrace(o.trace, o.sentences, o) for o in organism[:3]]
    rep = A.every_method(thinker, items, {"n_rollouts": 8, "batch_size": 8, "max_new_tokens": 100}, top_k_heads=2)
    assert set(rep.scores) == set(A.METHODS) and rep.agreement.methods == list(A.METHODS)
    frame = rep.to_frame()
    assert len(frame) == sum(len(it.sentences) for it in items) and frame["true_label"].notna().all()
    summary = rep.summary()
    assert summary["rollouts_drawn"] == sum(8 * (len(it.sentences) + 1) for it in items)
    checks = A.organism_checks(items, rep.suppression, rep.resampling, A.AdaptiveStopping(min_rollouts=4, round_size=4))
    for m in A.ResamplingImportance.METRICS:
        assert 0.0 <= checks["resampling_auroc"][m] <= 1.0 or math.isnan(checks["resampling_auroc"][m])
    # the planted-error view: the same AUROC over the sentences outside every (wrong step, backtrack) pair
    keep = [(k, i) for k, it in enumerate(items) for i in range(len(it.sentences))
            if i not in {j for p in it.truth.error_pairs for j in p}]
    assert any(it.truth.error_pairs for it in items) and len(keep) < sum(len(it.sentences) for it in items)
    for m in A.ResamplingImportance.METRICS:
        want = A.auroc([float(rep.resampling[k].metric(m)[i]) for k, i in keep],
                       [items[k].truth.answer_determining[i] for k, i in keep])
        got = checks["resampling_auroc_without_error_pairs"][m]
        assert got == pytest.approx(want, nan_ok=True)
    assert 0.0 <= checks["adaptive_saved_fraction"] < 1.0
    fig = rep.plot()
    assert len(fig.axes) >= 3
    for res in (rep.resampling[0], rep.suppression[0], rep.receivers, rep.atp[0], rep.agreement):
        assert len(res.to_frame()) > 0 and res.to_json() and res.plot() is not None
