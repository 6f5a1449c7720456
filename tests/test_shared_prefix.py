"""mechthink.models.shared_prefix: many rows continuing one cached prefix held once.

Against a forked cache (the prefix copied for every row, ordinary SDPA attention) on every
architecture (GQA, Qwen3's q/k norms, GLM-4's partial rotary): decode steps, a multi-token
right-padded suffix, rows dropped mid-way; the prefix is never copied; refused where it would be
wrong (hooks, left padding, masked prefix, crop); decode_from_cache gives the same tokens either
way and on the plain HF decoder.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import mechthink as mt
from mechthink import generation as G
from mechthink.models.native import native_forward
from mechthink.models.shared_prefix import SharedPrefixCache, config_supports_shared_prefix, supports_shared_prefix

ARCHS = ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Glm4ForCausalLM"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def organism():
    return mt.load_model("tiny-thinker")


def _prefill(model, ids):
    with torch.inference_mode():
        logits, kv = native_forward(model.bridge, torch.tensor([ids]))
    return logits[0].float(), kv


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_prefix_equals_a_forked_cache(tiny_loaded, arch):
    model = tiny_loaded(arch)[0]
    b = model.bridge
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, int(b.cfg.d_vocab), (30,), generator=g).tolist()
    _, kv = _prefill(model, ids)
    p, n = 21, 5
    shared = SharedPrefixCache(kv, n, p, room=2)  # tiny room: the buffers grow on the way
    fork = G.fork_cache(kv, n, p)
    assert shared.get_seq_length() == fork.get_seq_length() == p
    assert shared.layers[0].prefix_keys.data_ptr() == kv.layers[0].keys.data_ptr()  # a view, not a copy
    with torch.inference_mode():
        # a right-padded multi-token suffix (rows of 4, 2, 3, 4, 1 real tokens), then decode steps
        x = torch.randint(5, int(b.cfg.d_vocab), (n, 4), generator=g)
        m = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
        mask = torch.cat([torch.ones(n, p, dtype=torch.long), m], 1)
        pos = p + torch.arange(4).expand(n, 4)
        a, fork = native_forward(b, x, attention_mask=mask, position_ids=pos, past_key_values=fork)
        c, shared = native_forward(b, x, attention_mask=mask, position_ids=pos, past_key_values=shared)
        live = m.bool()
        torch.testing.assert_close(c[live], a[live], atol=1e-4, rtol=1e-4)
        # a step after that padding would have to skip the pad columns (holes): refused
        step_mask = torch.cat([mask, torch.ones(n, 1, dtype=torch.long)], 1)
        with pytest.raises(ValueError, match="holes"):
            native_forward(b, x[:, :1], attention_mask=step_mask, position_ids=pos[:, -1:] + 1, past_key_values=shared)
        # an unpadded suffix, then decode steps
        shared, fork = SharedPrefixCache(kv, n, p, room=2), G.fork_cache(kv, n, p)
        mask = torch.ones(n, p + 4, dtype=torch.long)
        a, fork = native_forward(b, x, attention_mask=mask, position_ids=pos, past_key_values=fork)
        c, shared = native_forward(b, x, attention_mask=mask, position_ids=pos, past_key_values=shared)
        torch.testing.assert_close(c, a, atol=1e-4, rtol=1e-4)
        rows = torch.arange(n)
        for step in range(6):
            if step == 3:  # rows leave the batch
                keep = torch.tensor([0, 2, 3])
                fork.batch_select_indices(keep)
                shared.batch_select_indices(keep)
                mask, pos, rows = mask[keep], pos[keep], rows[keep]
            nxt = torch.randint(5, int(b.cfg.d_vocab), (len(rows), 1), generator=g)
            mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=torch.long)], 1)
            pos = pos[:, -1:] + 1
            a, fork = native_forward(b, nxt, attention_mask=mask, position_ids=pos, past_key_values=fork)
            c, shared = native_forward(b, nxt, attention_mask=mask, position_ids=pos, past_key_values=shared)
            torch.testing.assert_close(c, a, atol=1e-4, rtol=1e-4)
            assert shared.get_seq_length() == fork.get_seq_length() == p + 5 + step
    assert kv.get_seq_length() == len(ids)  # the prefilled cache is untouched
    assert config_supports_shared_prefix(b.original_model.config) and not supports_shared_prefix(b.original_model)


@pytest.mark.parametrize("arch", ARCHS)
def test_slot_cache_rows_at_their_own_lengths_equal_full_recomputation(tiny_loaded, arch):
    """A slot cache (rows on different prefixes, at different own lengths, a finished row's slot
    handed to a new one mid-way, a row on its own prompt read apart with no shared prefix, rows
    leaving): every row's logits at every step equal a fresh forward of that row's whole sequence."""
    model = tiny_loaded(arch)[0]
    b = model.bridge
    g = torch.Generator().manual_seed(2)
    vocab = int(b.cfg.d_vocab)
    ids = torch.randint(5, vocab, (30,), generator=g).tolist()
    _, kv = _prefill(model, ids)
    own_prompt = torch.randint(5, vocab, (6,), generator=g).tolist()

    def own(prompt):  # the prompt read apart: its keys / values per layer, [kv_heads, m, d]
        with torch.inference_mode():
            logits, c = native_forward(b, torch.tensor([prompt]))
        return logits[0, -1].float(), [(la.keys[0], la.values[0]) for la in c.layers]

    def fresh(seq):  # the reference: the whole sequence from scratch
        with torch.inference_mode():
            return native_forward(b, torch.tensor([seq]))[0][0, -1].float()

    with torch.inference_mode():
        cache = SharedPrefixCache(kv, 4, [21, 5, 30, 0], room=2, slots=True)  # room 2: the buffers grow
        seqs = [ids[:21], ids[:5], ids[:30], []]
        cache.start_row(3, 0, own(own_prompt)[1])
        seqs[3] = list(own_prompt)
        for step in range(7):
            if step == 2:  # row 1 finished: its slot continues another prefix, from nothing of its own
                cache.start_row(1, 12)
                seqs[1] = ids[:12]
            if step == 4:  # row 3 finished: its slot takes a new prompt read apart
                prompt = torch.randint(5, vocab, (3,), generator=g).tolist()
                cache.start_row(3, 0, own(prompt)[1])
                seqs[3] = prompt
            if step == 5:  # a row leaves
                keep = torch.tensor([0, 2, 3])
                cache.batch_select_indices(keep)
                seqs = [seqs[i] for i in keep.tolist()]
            nxt = torch.randint(5, vocab, (len(seqs), 1), generator=g)
            cache.prepare()
            pos = cache.positions()[:, None]
            assert pos[:, 0].tolist() == [len(sq) for sq in seqs]
            got, cache = native_forward(b, nxt, attention_mask=None, position_ids=pos, past_key_values=cache)
            cache.advance()
            for r, sq in enumerate(seqs):
                sq.append(int(nxt[r, 0]))
                torch.testing.assert_close(got[r, -1].float(), fresh(sq), atol=1e-4, rtol=1e-4)
        with pytest.raises(ValueError, match="one new position per row and step|one position per row and step"):
            native_forward(b, torch.tensor([[5, 6]] * 3), attention_mask=None, position_ids=torch.tensor([[40, 41]] * 3),
                           past_key_values=cache)
        with pytest.raises(ValueError, match="pass attention_mask=None"):
            native_forward(b, nxt, attention_mask=torch.ones(3, 40, dtype=torch.long), position_ids=pos, past_key_values=cache)
        with pytest.raises(ValueError, match="outside the cache's 0..30"):
            cache.start_row(0, 31)
        with pytest.raises(RuntimeError, match="without slots=True"):
            SharedPrefixCache(kv, 2, 10).start_row(0, 3)
    assert kv.get_seq_length() == len(ids)  # the prefilled cache is untouched


def test_decode_from_cache_shared_equals_forked(organism):
    from mechthink.models.organism import sample_transcripts

    ids = next(t for t in sample_transcripts(10, seed="shared") if any(s.is_error for s in t.steps)).input_ids
    logits, kv = _prefill(organism, ids)
    dec = G.Decoder.for_model(organism)
    assert not dec.shares_prefix()  # gradients are recorded out here: the bridge would run
    with torch.inference_mode():
        assert dec.shares_prefix()
    cfg = G.SamplingConfig(max_new_tokens=40, temperature=1.0, top_p=0.95, seed=3)
    idx = list(range(9))
    for p in (20, 37):
        shared = G.decode_from_cache(dec, kv, logits[p - 1], cfg, idx, batch_size=4, length=p, share_prefix=True,
                                     drop_finished=True)
        forked = G.decode_from_cache(dec, kv, logits[p - 1], cfg, idx, batch_size=9, length=p, share_prefix=False)
        assert shared == forked  # continuous batching on slots of the shared prefix
        assert G.decode_from_cache(dec, kv, logits[p - 1], cfg, idx, batch_size=4, length=p, share_prefix=True) == forked
        assert len({tuple(c.ids) for c in shared}) > 1
    # the bridge's own HF module is wrapped: calling it directly on a shared prefix would be wrong
    assert not G.Decoder.for_hf(organism.bridge.original_model, organism.tokenizer).shares_prefix()


def test_plain_hf_decoder_shares_the_prefix(tiny_hf):
    ref, tok = tiny_hf("Qwen2ForCausalLM")
    hf = G.Decoder.for_hf(ref, tok)
    assert hf.shares_prefix() and supports_shared_prefix(ref)
    ids = torch.randint(5, len(tok), (1, 25), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        out = ref(input_ids=ids, use_cache=True)
    kv = getattr(out, "cache", None) or out.past_key_values
    cfg = G.SamplingConfig(max_new_tokens=12, temperature=1.0, seed=4)
    for p in (10, 25):
        lg = out.logits[0, p - 1].float()
        want = G.decode_from_cache(hf, kv, lg, cfg, range(6), batch_size=6, length=p, share_prefix=False)
        assert G.decode_from_cache(hf, kv, lg, cfg, range(6), batch_size=4, length=p, share_prefix=True) == want
        # slots (a finished row's place taken by the next index), greedy rows too
        assert G.decode_from_cache(hf, kv, lg, cfg, range(6), batch_size=4, length=p, drop_finished=True) == want
        greedy = G.SamplingConfig(max_new_tokens=12)
        assert (G.decode_from_cache(hf, kv, lg, greedy, range(3), batch_size=2, length=p, drop_finished=True)
                == G.decode_from_cache(hf, kv, lg, greedy, range(3), batch_size=3, length=p, share_prefix=False))


def test_shared_prefix_refused_where_it_would_be_wrong(organism):
    b = organism.bridge
    ids = list(range(5, 25))
    logits, kv = _prefill(organism, ids)
    dec = G.Decoder.for_model(organism)
    x = torch.tensor([[7], [8]])
    ones = torch.ones(2, 21, dtype=torch.long)
    pos = torch.full((2, 1), 20)
    with torch.inference_mode():
        with b.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", lambda a, hook: a)]):
            assert not dec.shares_prefix()
            with pytest.raises(ValueError, match="share_prefix=True"):
                G.decode_from_cache(dec, kv, logits[-1], G.SamplingConfig(max_new_tokens=3), [0], share_prefix=True)
            with pytest.raises(RuntimeError, match="SharedPrefixCache runs only on the HF model's own forward"):
                native_forward(b, x, attention_mask=ones, position_ids=pos, past_key_values=SharedPrefixCache(kv, 2))
            # and with the hook, the default forks: same tokens as without it
            cfg = G.SamplingConfig(max_new_tokens=8, temperature=1.0, seed=0)
            hooked = G.decode_from_cache(dec, kv, logits[-1], cfg, [0, 1])
        assert hooked == G.decode_from_cache(dec, kv, logits[-1], cfg, [0, 1])
        masked = ones.clone()
        masked[0, 3] = 0
        with pytest.raises(ValueError, match="masks prefix positions"):
            native_forward(b, x, attention_mask=masked, position_ids=pos, past_key_values=SharedPrefixCache(kv, 2))
        left = torch.cat([torch.ones(2, 20, dtype=torch.long), torch.tensor([[0, 1], [1, 1]])], 1)
        with pytest.raises(ValueError, match="left-padded"):
            native_forward(b, torch.tensor([[7, 8], [8, 9]]), attention_mask=left, position_ids=pos.expand(2, 2),
                           past_key_values=SharedPrefixCache(kv, 2))
    s = SharedPrefixCache(kv, 2, 10)
    with pytest.raises(NotImplementedError, match="fork the cache"):
        s.crop(-1)
    with pytest.raises(ValueError, match="outside the cache's 1..20"):
        SharedPrefixCache(kv, 2, 21)
    with pytest.raises(ValueError, match="n_rows"):
        SharedPrefixCache(kv, 0)
    with pytest.raises(ValueError, match="one row"):
        SharedPrefixCache(G.fork_cache(kv, 2), 2)


def test_configs_it_cannot_compute_exactly_are_refused():
    import transformers

    assert config_supports_shared_prefix(transformers.LlamaConfig())
    assert not config_supports_shared_prefix(transformers.Qwen2Config(use_sliding_window=True, sliding_window=64,
                                                                        max_window_layers=0))
    assert not config_supports_shared_prefix(transformers.Gemma2Config())  # soft-capping, sliding windows
    assert not config_supports_shared_prefix(None)


def test_rows_of_different_prefixes_decoded_together(organism):
    """decode_from_prefixes (rows of several prefixes in one batch, each masked to its own
    prefix) == decode_from_cache of each prefix, token for token; shared and forked alike."""
    from mechthink.models.organism import sample_transcripts

    ids = next(t for t in sample_transcripts(10, seed="ragged") if any(s.is_error for s in t.steps)).input_ids
    logits, kv = _prefill(organism, ids)
    dec = G.Decoder.for_model(organism)
    cfg = G.SamplingConfig(max_new_tokens=30, temperature=1.0, top_p=0.95, seed=0)
    plan = [(18, 3), (27, 5), (33, 2), (len(ids), 4)]  # (prefix length, rows)
    lengths = [p for p, k in plan for _ in range(k)]
    indices = [i for _, k in plan for i in range(k)]
    seeds = [G.seed_for(7, p) for p in lengths]
    lg = [logits[p - 1] for p in lengths]
    want = []
    for p, k in plan:
        want += G.decode_from_cache(dec, kv, logits[p - 1], dataclasses.replace(cfg, seed=G.seed_for(7, p)), range(k),
                                    length=p, share_prefix=False)
    for bs in (5, 14):  # batches mixing prefixes, rows leaving them
        got = G.decode_from_prefixes(dec, kv, lg, lengths, seeds, indices, cfg, batch_size=bs, drop_finished=True)
        assert got == want
    with organism.bridge.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", lambda a, hook: a)]):  # forks, a prefix at a time
        assert G.decode_from_prefixes(dec, kv, lg, lengths, seeds, indices, cfg, batch_size=5) == want
    with pytest.raises(ValueError, match="one logits row, length, seed and index per row"):
        G.decode_from_prefixes(dec, kv, lg[:2], lengths, seeds, indices, cfg)
    with pytest.raises(ValueError, match="outside the cache"):
        G.decode_from_prefixes(dec, kv, lg[:1], [len(ids) + 1], [0], [0], cfg)
    with torch.inference_mode():  # a mask that disagrees with the rows' prefix lengths is refused
        s = SharedPrefixCache(kv, 2, [10, 20])
        bad = torch.ones(2, 21, dtype=torch.long)
        with pytest.raises(ValueError, match="own prefix length exactly"):
            native_forward(organism.bridge, torch.tensor([[7], [8]]), attention_mask=bad,
                           position_ids=torch.tensor([[10], [20]]), past_key_values=s)
