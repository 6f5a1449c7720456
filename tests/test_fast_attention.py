"""mechthink.models.fast_attention: the fused-kernel forward against the bridge's exact forward.

Every hook the exact path fires (except the pattern and the scores) fires on the fast path with
the same value up to float rounding, on each real architecture's tiny random model and on the
trained organism; a hooked pattern or score (forward or backward, attached before or inside the
block) sends its layer to the exact path; KV-cache prefill, steps, forks and left-padded
generation agree with the exact path; the model is restored on exit.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TYPE_ERRORS

import mechthink as mt
from mechthink.generation import continue_greedy
from mechthink.hooks import gather, hook_name
from mechthink.models import kvcache
from mechthink.models.fast_attention import (
    PATTERN_HOOKS,
    _boolean_mask,
    attention_reduce,
    attention_rows,
    fast_attention,
    fast_path_blockers,
)

ARCHS = ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Glm4ForCausalLM"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def organism():
    return mt.load_model("tiny-thinker")


def _model(request, tiny_loaded, arch):
    return request.getfixturevalue("organism") if arch == "organism" else tiny_loaded(arch)[0]


def _close(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest difference as a share of max(1, the reference's largest entry) (float32 spacing
    scales with it); infinite where the two disagree on which entries are infinite (masked scores)."""
    finite = want.isfinite()
    if not torch.equal(finite, got.isfinite()) or not torch.equal(got[~finite], want[~finite]):
        return float("inf")
    got, want = got[finite], want[finite]
    return float((got - want).abs().max()) / max(1.0, float(want.abs().max())) if want.numel() else 0.0


def _not_pattern(name: str) -> bool:
    return not name.endswith(PATTERN_HOOKS)


def _ids(model, rows=2, n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, int(model.bridge.cfg.d_vocab), (rows, n), generator=g)


@pytest.mark.parametrize("arch", [*ARCHS, "organism"])
@pytest.mark.parametrize("padded", [False, True])
def test_every_hook_fires_with_the_exact_value(request, tiny_loaded, arch, padded):
    model = _model(request, tiny_loaded, arch)
    ids = _ids(model)
    kw = {}
    valid = torch.ones_like(ids, dtype=torch.bool)
    if padded:
        valid[1, 17:] = False
        kw["attention_mask"] = valid.long()
    with torch.inference_mode():
        lg0, exact = model.bridge.run_with_cache(ids, names_filter=_not_pattern, **kw)
        with fast_attention(model, min_scores=0) as fa:
            lg1, fast = model.bridge.run_with_cache(ids, names_filter=_not_pattern, **kw)
    assert (fa.layers, fa.fast_calls, fa.exact_calls) == (model.n_layers, model.n_layers, 0)
    assert set(fast) == set(exact) and len(exact) > 10 * model.n_layers
    assert {f"blocks.0.attn.{h}" for h in ("hook_z", "hook_q", "hook_k", "hook_v", "hook_rot_q")} <= set(fast)
    for name, want in exact.items():
        got = fast[name]
        if got.dim() >= 2 and got.shape[:2] == ids.shape:  # [batch, pos, ...]: padded positions are not compared
            got, want = got[valid], want[valid]
        assert _close(got, want) <= 1e-5, name
    lp0, lp1 = lg0.log_softmax(-1)[valid], lg1.log_softmax(-1)[valid]
    assert float((lp0 - lp1).abs().max()) <= 1e-4


@pytest.mark.parametrize("kind", ["pattern", "attn_scores"])
def test_a_requested_pattern_sends_its_layer_to_the_exact_path(tiny_loaded, kind):
    model = tiny_loaded("Qwen3ForCausalLM")[0]
    seq = _ids(model, 1, 15)[0].tolist()
    hooks = [hook_name(1, kind), "resid_post"]
    want = gather(model, seq, hooks, fast=False)
    with fast_attention(model, min_scores=0) as fa:
        got = gather(model, seq, hooks)
    assert (fa.fast_calls, fa.exact_calls) == (model.n_layers - 1, 1)
    for name in want:
        assert _close(got[name], want[name]) <= 1e-5, name
    assert got[hook_name(1, kind)].shape[-1] == len(seq)


def test_hooks_attached_inside_the_block_and_backward_hooks_count(tiny_loaded):
    model = tiny_loaded("LlamaForCausalLM")[0]
    ids = _ids(model, 1, 12)
    seen = []
    with fast_attention(model, min_scores=0) as fa:
        with model.bridge.hooks(fwd_hooks=[("blocks.2.attn.hook_pattern", lambda a, hook: seen.append(a.shape))]):
            model.bridge(ids)
        assert seen and fa.exact_calls == 1
        pattern = model.bridge.blocks[0].attn.hook_pattern
        handle = pattern.register_full_backward_hook(lambda *a: None)
        try:
            assert fast_path_blockers(model.bridge.blocks[0].attn) == ["hook_pattern is hooked"]
            model.bridge(ids)
        finally:
            handle.remove()
        assert fa.exact_calls == 2
        assert fast_path_blockers(model.bridge.blocks[0].attn) == []


def test_configuration_the_fast_forward_does_not_cover_runs_exact(tiny_loaded):
    model = tiny_loaded("LlamaForCausalLM")[0]
    ids = _ids(model, 1, 10)
    model.bridge.set_use_attn_result(True)
    try:
        with fast_attention(model, min_scores=0) as fa:
            _, cache = model.bridge.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_result"))
        assert fa.fast_calls == 0 and fa.exact_calls == model.n_layers
        assert "blocks.0.attn.hook_result" in cache
    finally:
        model.bridge.set_use_attn_result(False)
    assert "config use_attn_result" not in fast_path_blockers(model.bridge.blocks[0].attn)


def test_masks():
    eager = torch.zeros(1, 1, 3, 3).masked_fill(torch.ones(3, 3, dtype=torch.bool).triu(1), torch.finfo(torch.float32).min)
    assert torch.equal(_boolean_mask(eager), torch.ones(3, 3, dtype=torch.bool).tril()[None, None])
    with pytest.raises(ValueError, match="additive bias"):
        _boolean_mask(eager + 0.5)
    assert _boolean_mask(None) is None


def test_model_restored_after_the_block_and_on_error(tiny_loaded):
    model = tiny_loaded("Qwen2ForCausalLM")[0]
    config = model.bridge.original_model.config
    impl = config._attn_implementation
    with pytest.raises(RuntimeError, match="inside"):
        with fast_attention(model):
            assert "forward" in model.bridge.blocks[0].attn.__dict__ and config._attn_implementation == "sdpa"
            raise RuntimeError("inside")
    assert config._attn_implementation == impl
    assert all("forward" not in b.attn.__dict__ for b in model.bridge.blocks)
    assert "_mechthink_fast_attention" not in model.bridge.__dict__


def test_nested_blocks_follow_the_outer_one(tiny_loaded):
    model = tiny_loaded("Qwen2ForCausalLM")[0]
    seq = _ids(model, 1, 11)[0].tolist()
    exact = gather(model, seq, "resid_post", fast=False)
    with fast_attention(model, enabled=False) as outer:
        inner = gather(model, seq, "resid_post")  # gather's own (fast) block is nested: stays exact
        assert "forward" not in model.bridge.blocks[0].attn.__dict__
    assert not outer.enabled and outer.fast_calls == 0
    for name in exact:
        assert torch.equal(inner[name], exact[name])
    with fast_attention(model, min_scores=0) as a, fast_attention(model) as b:
        assert a is b and b.min_scores == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_cache_prefill_steps_and_forks(tiny_loaded, arch):
    model = tiny_loaded(arch)[0]
    ids = _ids(model, 1, 14)
    with torch.inference_mode():
        full = model.bridge(ids).float().log_softmax(-1)
        with fast_attention(model, min_scores=0) as fa:
            assert kvcache.check_kv_cache(model) < 1e-4
            _, kv = model.bridge(ids[:, :8], return_type="logits_and_cache")
            assert kv.get_seq_length() == 8
            fork = copy.deepcopy(kv)
            for t in range(8, 11):  # one token at a time
                lp = model.bridge(ids[:, t : t + 1], past_key_values=kv).float().log_softmax(-1)
                assert float((lp[0, -1] - full[0, t]).abs().max()) < 1e-4
            # a batch of right-padded suffixes on a fork (q > 1 on a cache, boolean mask)
            fork.batch_repeat_interleave(2)
            suffix = torch.stack([ids[0, 8:14], torch.cat([ids[0, 8:11], torch.zeros(3, dtype=torch.long)])])
            mask = torch.ones(2, 14, dtype=torch.long)
            mask[1, 11:] = 0
            lp = model.bridge(suffix, past_key_values=fork, attention_mask=mask).float().log_softmax(-1)
        assert fa.exact_calls == 0 and fa.fast_calls > 0
    assert float((lp[0] - full[0, 8:14]).abs().max()) < 1e-4
    assert float((lp[1, :3] - full[0, 8:11]).abs().max()) < 1e-4


def test_left_padded_greedy_generation_is_unchanged(organism):
    rows = organism.to_token_lists(["Compute 3 + 5 - 2 + 7.", "Compute 2 + 2."])
    want = continue_greedy(organism, rows, max_new_tokens=12)
    with fast_attention(organism, min_scores=0) as fa:
        got = continue_greedy(organism, rows, max_new_tokens=12)
    assert got == want and fa.fast_calls > 0 and fa.exact_calls == 0


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen3ForCausalLM"])
def test_gather_gradients_fast_equal_exact(tiny_loaded, arch):
    model = tiny_loaded(arch)[0]
    seqs = [_ids(model, 1, n, seed=n)[0].tolist() for n in (13, 6)]

    def metric(logits):
        return logits[0, -1].log_softmax(-1)[7]

    hooks = ["resid_pre", "attn_out", "mlp_out", "z", "q", "k", "v"]
    want = gather(model, seqs, hooks, metric=metric, batch_size=2, fast=False)
    with fast_attention(model, min_scores=0) as fa:
        got = gather(model, seqs, hooks, metric=metric, batch_size=2)
    assert fa.fast_calls == model.n_layers and fa.exact_calls == 0
    torch.testing.assert_close(got.metric, want.metric, atol=1e-5, rtol=1e-5)
    for name in want:
        assert _close(got[name], want[name]) <= 1e-5, name
        assert _close(got.grads[name], want.grads[name]) <= 1e-4, name


def test_short_attention_stays_exact_bit_for_bit(tiny_loaded):
    model = tiny_loaded("Qwen2ForCausalLM")[0]
    ids = _ids(model, 1, 30)
    with torch.inference_mode():
        want = model.bridge(ids)
        with fast_attention(model) as fa:  # 30 x 30 < MIN_SCORES
            got = model.bridge(ids)
        with fast_attention(model, min_scores=30 * 30) as at:
            model.bridge(ids)
        with fast_attention(model, min_scores=30 * 30 + 1) as above:
            model.bridge(ids)
    assert torch.equal(got, want) and fa.short_calls == model.n_layers and fa.fast_calls == 0
    assert at.fast_calls == model.n_layers and above.short_calls == model.n_layers


def test_bad_input(tiny_loaded):
    model = tiny_loaded("LlamaForCausalLM")[0]
    with pytest.raises(ValueError, match="ThinkingModel or a TransformerBridge"):
        with fast_attention(object()):
            pass
    with pytest.raises(ValueError, match="min_scores must be a non-negative int"):
        with fast_attention(model, min_scores=-1):
            pass
    with pytest.raises(TYPE_ERRORS):
        gather(model, [1, 2, 3], "resid_pre", fast="yes")


# ------------------------------------------------------------------ pattern rows without [pos, pos]
@pytest.mark.parametrize("arch", [*ARCHS, "organism"])
@pytest.mark.parametrize("padded", [False, True])
def test_attention_rows_equal_the_exact_pattern(request, tiny_loaded, arch, padded):
    model = _model(request, tiny_loaded, arch)
    ids = _ids(model, 2, 24)
    kw = {}
    if padded:  # left padding, as batched generation pads
        valid = torch.ones_like(ids)
        valid[1, :6] = 0
        kw["attention_mask"] = valid
    layers = list(range(model.n_layers))
    names = [hook_name(L, "pattern") for L in layers]
    with torch.inference_mode():
        _, exact = model.bridge.run_with_cache(ids, names_filter=lambda n: n in names, **kw)
        rows = attention_rows(model, ids, layers, [-1, 3, 10], **kw)
    assert set(rows) == set(layers)
    for L in layers:
        want = exact[names[L]][:, :, [23, 3, 10]].float()
        assert rows[L].shape == want.shape
        assert _close(rows[L], want) < 1e-5, (arch, L)


def test_attention_reduce_streams_every_row_in_chunks(tiny_loaded):
    model = tiny_loaded("Qwen3ForCausalLM")[0]
    ids = _ids(model, 1, 30)
    full = {L: torch.zeros(1, int(model.cfg.n_heads), 30, 30) for L in range(model.n_layers)}
    seen = []

    def reduce(L, r, p):
        seen.append((L, len(r)))
        full[L][:, :, r] = p.cpu()

    with torch.inference_mode():
        missing = attention_reduce(model, ids, range(model.n_layers), reduce, chunk=7)
        _, exact = model.bridge.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_pattern"))
    assert missing == [] and seen[:5] == [(0, 7), (0, 7), (0, 7), (0, 7), (0, 2)]
    for L in range(model.n_layers):
        assert _close(full[L], exact[hook_name(L, "pattern")].float()) < 1e-5
    assert not _has_capture(model)


def _has_capture(model) -> bool:
    return any("_mechthink_pattern_rows" in m.__dict__ for m in model.bridge.modules())


def test_attention_rows_fall_back_where_the_fast_path_does_not_cover(tiny_loaded):
    model = tiny_loaded("LlamaForCausalLM")[0]
    ids = _ids(model, 1, 10)
    model.bridge.set_use_attn_result(True)
    try:
        assert attention_rows(model, ids, [0, 1], [-1]) == {}
    finally:
        model.bridge.set_use_attn_result(False)
    assert not _has_capture(model)


def test_attention_rows_bad_input(tiny_loaded):
    model = tiny_loaded("LlamaForCausalLM")[0]
    ids = _ids(model, 1, 10)
    with pytest.raises(ValueError, match=r"query positions \[10\] are not in \[-10, 10\)"):
        attention_rows(model, ids, [0], [10])
    with pytest.raises(ValueError, match="layers .* must be in"):
        attention_rows(model, ids, [99], [0])
    with pytest.raises(ValueError, match=r"tokens must be a \[batch, pos\] tensor"):
        attention_rows(model, ids[0], [0], [0])
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        attention_reduce(model, ids, [0], lambda *a: None, chunk=0)
    assert not _has_capture(model)
