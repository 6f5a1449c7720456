"""mechthink.generation: continuing a cached prefix (fork_cache, decode_from_cache) against
re-prefilling it for every row (generation.decode)."""

from __future__ import annotations

import pytest
import torch

from mechthink import generation as G
from conftest import TYPE_ERRORS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def thinker():
    import mechthink as mt

    return mt.load_model("tiny-thinker")


@pytest.fixture(scope="module")
def trace_ids(thinker):
    """A full tiny-thinker transcript (prompt + thinking + answer) as token ids."""
    from mechthink.models.organism import sample_transcripts

    return next(t for t in sample_transcripts(20, seed="fork") if any(s.is_error for s in t.steps)).input_ids


def _prefill(model, ids):
    with torch.inference_mode():
        logits, kv = model.bridge(torch.tensor([ids]), return_type="logits_and_cache")
    return logits[0].float(), kv


def test_fork_cache_copies_cuts_and_repeats(thinker, trace_ids):
    _, kv = _prefill(thinker, trace_ids)
    n = len(trace_ids)
    fork = G.fork_cache(kv, 3, 10)
    assert fork.get_seq_length() == 10 and kv.get_seq_length() == n  # the original is untouched
    k0 = kv.layers[0].keys
    kf = fork.layers[0].keys
    assert kf.shape[0] == 3 and torch.equal(kf[2], k0[0, :, :10])
    assert G.fork_cache(kv, 1).get_seq_length() == n
    with pytest.raises(ValueError, match="n_rows"):
        G.fork_cache(kv, 0)
    with pytest.raises(ValueError, match="length"):
        G.fork_cache(kv, 2, n + 1)


def test_decode_from_cache_equals_reprefilled_rows(thinker, trace_ids):
    """One prefill of the whole trace, forks cut at several prefixes == decode() of each prefix
    repeated, token for token, under the same seeds and indices; batch size does not matter."""
    logits, kv = _prefill(thinker, trace_ids)
    dec = G.Decoder.for_model(thinker)
    cfg = G.SamplingConfig(max_new_tokens=60, temperature=1.0, top_p=0.95, seed=5)
    idx = [0, 1, 2, 3, 4, 5, 9]
    for p in (22, 31, 45):
        forked = G.decode_from_cache(dec, kv, logits[p - 1], cfg, idx, batch_size=4, length=p)
        again = G.decode_from_cache(dec, kv, logits[p - 1], cfg, idx, batch_size=7, length=p)
        fresh = G.decode(dec, [trace_ids[:p]] * len(idx), cfg, batch_size=3, indices=idx)
        assert forked == fresh == again
        assert len({tuple(c.ids) for c in forked}) > 1  # sampling really differs between rows
    assert kv.get_seq_length() == len(trace_ids)
    greedy = G.SamplingConfig(max_new_tokens=30)
    p = 31
    assert G.decode_from_cache(dec, kv, logits[p - 1], greedy, [0, 1], length=p) == G.decode(dec, [trace_ids[:p]] * 2, greedy)


def test_decode_from_cache_bad_input(thinker, trace_ids):
    logits, kv = _prefill(thinker, trace_ids[:20])
    dec = G.Decoder.for_model(thinker)
    cfg = G.SamplingConfig(max_new_tokens=4)
    with pytest.raises(ValueError, match="indices"):
        G.decode_from_cache(dec, kv, logits[-1], cfg, [])
    with pytest.raises(ValueError, match="batch_size"):
        G.decode_from_cache(dec, kv, logits[-1], cfg, [0], batch_size=0)
    with pytest.raises(TYPE_ERRORS, match="last_logits"):
        G.decode_from_cache(dec, kv, logits, cfg, [0])


def _widths(model, mark: bool):
    """A forward pre-hook on the embedding recording each call's batch size (marked row-independent
    or not), and its handle."""
    from mechthink.models.native import ROW_INDEPENDENT

    seen: list[int] = []

    def pre(module, args, kwargs):
        ids = args[0] if args else kwargs.get("input_ids", kwargs.get("input"))
        seen.append(int(ids.shape[0]))

    if mark:
        setattr(pre, ROW_INDEPENDENT, True)
    return seen, model.bridge.embed.register_forward_pre_hook(pre, with_kwargs=True)


def test_drop_finished_rows_same_tokens_fewer_rows(thinker, trace_ids):
    """Finished rows leaving the batch change no row's tokens (forks and fresh prefills, sampled
    and greedy); the batch really shrinks under a row-independent hook, and stays whole under any
    other hook (which may keep per-row state)."""
    logits, kv = _prefill(thinker, trace_ids)
    dec = G.Decoder.for_model(thinker)
    cfg = G.SamplingConfig(max_new_tokens=60, temperature=1.0, top_p=0.95, seed=5)
    idx = list(range(10))
    p = 31
    kept = G.decode_from_cache(dec, kv, logits[p - 1], cfg, idx, batch_size=10, length=p)
    assert len({len(c.ids) for c in kept}) > 1 and any(c.finished for c in kept)  # rows end at different steps
    seen, h = _widths(thinker, mark=True)
    try:
        dropped = G.decode_from_cache(dec, kv, logits[p - 1], cfg, idx, batch_size=10, length=p, drop_finished=True)
    finally:
        h.remove()
    assert dropped == kept and kv.get_seq_length() == len(trace_ids)
    assert seen[0] == 10 and min(seen) < 10 and seen == sorted(seen, reverse=True)
    fresh = G.decode(dec, [trace_ids[:p]] * 10, cfg, batch_size=10, indices=idx, drop_finished=True)
    assert fresh == kept
    greedy = G.SamplingConfig(max_new_tokens=30)
    assert G.decode(dec, [trace_ids[:p], trace_ids[:40]], greedy, drop_finished=True) == G.decode(dec, [trace_ids[:p], trace_ids[:40]], greedy)
    seen, h = _widths(thinker, mark=False)
    try:
        whole = G.decode_from_cache(dec, kv, logits[p - 1], cfg, idx, batch_size=10, length=p, drop_finished=True)
    finally:
        h.remove()
    assert whole == kept and set(seen) == {10}
