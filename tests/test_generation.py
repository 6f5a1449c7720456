"""mechthink.generation: the one decode loop (bridge and plain HF models), per-row seeded sampling,
left padding and the StreamTracker."""

from __future__ import annotations

import pytest
import torch

from mechthink import generation as G
from mechthink import interventions as iv
from mechthink import steering, traces

pytestmark = pytest.mark.usefixtures("one_thread")

QS = ["Compute 3 + 5 - 2.", "Compute 7 - 2 + 9 + 1.", "Compute 4 + 4.", "Compute 9 - 1 + 2 + 3 - 4."]


@pytest.fixture(scope="module")
def thinker():
    import mechthink as mt

    return mt.load_model("tiny-thinker")


@pytest.fixture(scope="module")
def organism_hf():
    from mechthink.models.organism import load_hf

    return load_hf()


def _rows(model, qs=QS):
    return model.to_token_lists([model.prompt(q) for q in qs])


# ---------------------------------------------------------------- sampling primitives
def test_seed_for_is_pinned():
    # stored traces record (seed, index); the derived seeds must never change
    assert G.seed_for(0, 0) == 2530503059389361219
    assert G.seed_for(7, 3) == 5696088171538031335
    assert G.seed_for(-1, 2**40) == 2098195212855688976
    a, b = G.row_generator(7, 3), G.row_generator(7, 3)
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


def test_sample_token_matches_the_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    g = torch.Generator().manual_seed(0)
    n = 20000
    counts = torch.bincount(torch.tensor([G.sample_token(logits, 1.0, 1.0, g) for _ in range(n)]), minlength=5)
    freq = counts.double() / n
    exact = torch.softmax(logits.double(), -1)
    assert (freq - exact).abs().max() < 4 * (exact * (1 - exact) / n).sqrt().max()
    # top-p keeps the smallest prefix of the sorted distribution reaching p: here {0, 1}
    kept = {G.sample_token(logits, 1.0, 0.7, g) for _ in range(500)}
    assert kept == {0, 1}
    assert {G.sample_token(logits, 1.0, 1e-6, g) for _ in range(50)} == {0}  # the argmax only
    hot = torch.bincount(torch.tensor([G.sample_token(logits, 0.25, 1.0, g) for _ in range(2000)]), minlength=5)
    assert hot[0] / 2000 > freq[0]  # a lower temperature sharpens


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.6, 0.95), (1.5, 0.5), (0.25, 1e-6)])
def test_sample_tokens_equals_sample_token_row_by_row(temperature, top_p):
    """The batched sampler the decode loop uses draws exactly the per-row tokens, from the same
    generator states (ties and a vocabulary of repeated logits included)."""
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(5)) * 3
    logits[3] = 0.0  # all tied
    logits[7, :10] = logits[7].max()
    one = [G.row_generator(11, i) for i in range(64)]
    many = [G.row_generator(11, i) for i in range(64)]
    for _ in range(5):
        want = [G.sample_token(logits[i], temperature, top_p, one[i]) for i in range(64)]
        assert G.sample_tokens(logits, temperature, top_p, many) == want
    with pytest.raises(ValueError, match="one generator per row"):
        G.sample_tokens(logits, 1.0, 1.0, many[:3])


def test_left_pad_and_config_errors(thinker):
    ids, mask = G.left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="rows"):
        G.left_pad([], 0)
    with pytest.raises(ValueError, match="temperature"):
        G.SamplingConfig(temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        G.SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        G.SamplingConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="batch_size"):
        list(G.decode_batches(G.Decoder.for_model(thinker), [[1]], G.SamplingConfig(), batch_size=0))
    with pytest.raises(ValueError, match="indices"):
        list(G.decode_batches(G.Decoder.for_model(thinker), [[1]], G.SamplingConfig(), batch_size=1, indices=[0, 1]))


# ---------------------------------------------------------------- the decode loop
def test_hf_decoder_equals_hf_generate(organism_hf):
    """The organism evaluator's greedy loop (now generation.decode) == transformers' generate."""
    from mechthink.models.organism.evaluate import greedy_generate

    model, tok = organism_hf
    rows = [tok(f"<|bos|><|user|>\nCompute {q}\n<|assistant|>\n<think>\n").input_ids
            for q in ("3 + 5.", "7 - 2 + 9 + 1.", "4 + 4 + 1 - 3 + 2.")]
    ids, mask = G.left_pad(rows, tok.pad_token_id)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=40, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    eos = tok.eos_token_id
    want = [r[: r.index(eos) + 1] if eos in r else r for r in out[:, ids.shape[1] :].tolist()]
    assert greedy_generate(model, tok, rows, max_new_tokens=40) == want
    assert greedy_generate(model, tok, rows, max_new_tokens=40, batch_size=1) == want
    assert any(r[-1] == eos for r in want)


def test_bridge_decoder_equals_hf_decoder(thinker, organism_hf):
    hf, tok = organism_hf
    rows = _rows(thinker)
    cfg = G.SamplingConfig(max_new_tokens=30)
    via_bridge = G.decode(G.Decoder.for_model(thinker), rows, cfg)
    via_hf = G.decode(G.Decoder.for_hf(hf, tok), rows, cfg)
    assert via_bridge == via_hf
    assert {c.finished for c in via_bridge} <= {"eos", "length"}
    assert all(c.finished == "eos" and c.ids[-1] in thinker.eos_token_ids for c in via_bridge if len(c.ids) < 30)


def test_per_row_seeding_is_independent_of_the_batch(thinker):
    rows = _rows(thinker)
    dec = G.Decoder.for_model(thinker)
    cfg = G.SamplingConfig(max_new_tokens=25, temperature=1.5, top_p=0.95, seed=11)
    together = G.decode(dec, rows, cfg, batch_size=4)
    assert G.decode(dec, rows, cfg, batch_size=1) == together
    assert G.decode(dec, rows, cfg, batch_size=3) == together
    # a row's draw depends on its index, not on its neighbours: rows 2 and 3 alone, indexed 2 and 3
    assert G.decode(dec, rows[2:], cfg, indices=[2, 3]) == together[2:]
    assert G.decode(dec, rows[2:], cfg) != together[2:]  # indexed 0 and 1 instead: other streams
    other = G.decode(dec, rows, G.SamplingConfig(max_new_tokens=25, temperature=1.5, top_p=0.95, seed=12))
    assert other != together
    batches = list(G.decode_batches(dec, rows, cfg, batch_size=3, indices=[10, 11, 12, 13]))
    assert [b for b, _ in batches] == [[10, 11, 12], [13]]


def test_one_loop_behind_every_entry_point(thinker):
    rows = _rows(thinker)
    want = [c.ids for c in G.decode(G.Decoder.for_model(thinker), rows, G.SamplingConfig(max_new_tokens=20))]
    assert iv.continue_prefixes is G.continue_prefixes and iv.continue_greedy is G.continue_greedy
    assert G.continue_greedy(thinker, rows, 20) == want
    got = traces.generate(thinker, QS, max_new_tokens=20, batch_size=2)
    assert [t.generated_ids for t in got] == want
    sampled = traces.generate(thinker, QS, max_new_tokens=20, temperature=1.0, seed=3)
    assert [t.generated_ids for t in sampled] == G.continue_prefixes(thinker, rows, 20, temperature=1.0, seed=3)


# ---------------------------------------------------------------- StreamTracker
def test_stream_tracker_updates(thinker):
    tr = G.StreamTracker(thinker)
    c, o = tr.close_ids[0], tr.open_ids[0]
    tr.update(torch.tensor([[1, o, 9]]), 0, 3)  # a prefill: a new stream
    assert tr.new_stream and tr.prompt_end == 2 and tr.closed_at == [None] and tr.n_generated(0) == 0
    tr.update(torch.tensor([[c]]), 3, 1)
    assert tr.closed_at == [3] and tr.is_closed(0, 3) and not tr.is_closed(0, 2)
    assert list(tr.columns()) == [3] and tr.n_generated(0) == 1
    tr.update(torch.tensor([[9]]), 3, 1)  # the cache was cropped and column 3 redone
    assert tr.history == [[1, o, 9, 9]] and tr.closed_at == [None]
    tr.update(torch.tensor([[5], [c]]), 4, 1)  # a fork of the batch-1 cache into two rows
    assert tr.history == [[1, o, 9, 9, 5], [1, o, 9, 9, c]] and tr.closed_at == [None, 4]
    tr.update(torch.tensor([[c, o, 2], [3, 3, 3]]), 0, 3)  # a prefill again: the state restarts
    assert tr.history == [[c, o, 2], [3, 3, 3]] and tr.closed_at == [None, None] and tr.prompt_end == 2
    assert not tr.is_closed(5, 0) and tr.n_generated(5) == 0


def test_stream_tracker_follows_a_generation(thinker):
    close = thinker.tokenizer.convert_tokens_to_ids(thinker.spec.think_close)
    rows = _rows(thinker, QS[:2])
    tracker = G.StreamTracker(thinker)
    before = (dict(thinker.bridge.embed._forward_pre_hooks), dict(thinker.bridge.blocks[0]._forward_pre_hooks))
    with pytest.raises(RuntimeError, match="boom"):
        with tracker.attached():
            gens = G.continue_greedy(thinker, rows, 60)
            raise RuntimeError("boom")
    # the tracker's hooks are gone again (load_model's own context guard on block 0 stays)
    assert (dict(thinker.bridge.embed._forward_pre_hooks), dict(thinker.bridge.blocks[0]._forward_pre_hooks)) == before
    width = max(len(r) for r in rows)
    for r, (row, gen) in enumerate(zip(rows, gens)):
        h = tracker.history[r]
        assert h[width - len(row) : width] == row  # left padding, then the prompt
        assert h[width : width + len(gen) - 1] == gen[:-1]  # generated tokens fed back (the last may not be)
        assert close in gen[:-1] and tracker.closed_at[r] == width + gen.index(close)
    assert steering.StreamTracker is G.StreamTracker
