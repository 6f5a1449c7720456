"""mechthink.models.native: the HF model's own forward with the bridge's wrappers taken out.

Used for decode steps when nothing is hooked. Against the bridge on every architecture (prefill,
left padding, KV-cache steps); residual hook points and the steering stream tracker carried over;
refused whenever anything else is hooked (other hook points, torch hooks, fast_attention,
gradients); the wrappers are back after every call, errors included;
greedy decoding gives the same tokens as decoding through the bridge.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import mechthink as mt
from mechthink import generation, steering
from mechthink.models.fast_attention import fast_attention
from mechthink.models.native import _plan, _swaps, native_blockers, native_forward, steady_hooks

ARCHS = ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Glm4ForCausalLM"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def organism():
    return mt.load_model("tiny-thinker")


def _model(request, tiny_loaded, arch):
    return request.getfixturevalue("organism") if arch == "organism" else tiny_loaded(arch)[0]


def _wrapped(model) -> int:
    return len(_swaps(model.bridge.original_model))


@pytest.mark.parametrize("arch", [*ARCHS, "organism"])
def test_native_equals_the_bridge_prefill_and_steps(request, tiny_loaded, arch):
    model = _model(request, tiny_loaded, arch)
    b = model.bridge
    g = torch.Generator().manual_seed(0)
    x = torch.randint(5, int(b.cfg.d_vocab), (2, 20), generator=g)
    mask = torch.ones_like(x)
    mask[1, :4] = 0  # left padding
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    n_wrapped = _wrapped(model)
    with torch.inference_mode():
        assert native_blockers(b) == []
        want, kv = b(x, return_type="logits_and_cache", attention_mask=mask, position_ids=pos)
        got, kv_n = native_forward(b, x, attention_mask=mask, position_ids=pos)
        live = mask.bool()
        torch.testing.assert_close(got.log_softmax(-1)[live], want.log_softmax(-1)[live], atol=1e-4, rtol=0)
        for step in range(3):
            nxt = torch.randint(5, int(b.cfg.d_vocab), (2, 1), generator=g)
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
            pos = pos[:, -1:] + 1
            a, kv = b(nxt, return_type="logits_and_cache", attention_mask=mask, position_ids=pos, past_key_values=kv)
            c, kv_n = native_forward(b, nxt, attention_mask=mask, position_ids=pos, past_key_values=kv_n)
            torch.testing.assert_close(c.log_softmax(-1), a.log_softmax(-1), atol=1e-4, rtol=0)
            assert kv_n.get_seq_length() == kv.get_seq_length() == 21 + step
    assert _wrapped(model) == n_wrapped > 4 * model.n_layers  # every wrapper is back


def test_refused_whenever_anything_but_a_residual_point_is_hooked(organism):
    b = organism.bridge
    x = torch.tensor([[5, 6, 7]])
    with torch.inference_mode():
        assert native_forward(b, x) is not None
        for point in ("hook_z", "hook_pattern"):
            b.blocks[1].attn.get_submodule(point).add_hook(lambda a, hook: a)
            try:
                assert native_forward(b, x) is None and "hooks on" in native_blockers(b)[0]
            finally:
                b.reset_hooks()
        b.blocks[1].hook_mlp_out.add_hook(lambda a, hook: a)
        try:
            assert native_forward(b, x) is None
        finally:
            b.reset_hooks()
        h = b.blocks[0].mlp.register_forward_hook(lambda m, i, o: o)
        try:
            assert native_forward(b, x) is None
        finally:
            h.remove()
        h = b.blocks[0].register_forward_hook(lambda m, i, o: o)  # a forward (not pre-) hook on block 0
        try:
            assert native_forward(b, x) is None
        finally:
            h.remove()
        with fast_attention(organism):
            assert native_blockers(b) == ["inside fast_attention"]
        assert native_forward(b, x) is not None
    with torch.enable_grad():
        assert "gradients are recorded" in native_blockers(b)


def test_steady_hooks_rescans_whenever_a_hook_comes_or_goes(organism, monkeypatch):
    """Inside steady_hooks (a decode loop) the hook scan is kept, yet a hook registered or removed
    between two calls is seen at the next one: a blocking hook sends the call to the bridge, a
    residual hook is carried over and is no longer once removed."""
    import mechthink.models.native as N

    b = organism.bridge
    x = torch.tensor([[5, 6, 7, 8]])
    scans = []
    monkeypatch.setattr(N, "_plan", lambda *a, **k: scans.append(1) or _plan(*a, **k))
    shift = 3.0 * torch.randn(organism.d_model, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode(), steady_hooks():
        clean = native_forward(b, x)[0]
        for _ in range(3):
            assert torch.equal(native_forward(b, x)[0], clean)
        assert len(scans) == 1  # kept while nothing changed
        b.blocks[1].attn.hook_pattern.add_hook(lambda a, hook: a)
        try:
            assert native_forward(b, x) is None  # seen: the bridge must run
        finally:
            b.reset_hooks()
        assert torch.equal(native_forward(b, x)[0], clean)  # gone again
        b.blocks[2].hook_out.add_hook(lambda a, hook: a + shift)
        try:
            steered = native_forward(b, x)[0]
            assert float((steered - clean).abs().max()) > 1e-2  # carried over
            assert torch.equal(native_forward(b, x)[0], steered)  # and again, on the kept scan
        finally:
            b.reset_hooks()
        assert torch.equal(native_forward(b, x)[0], clean)  # removed: no longer carried
    n = len(scans)
    with torch.inference_mode():
        native_forward(b, x)
        native_forward(b, x)
    assert len(scans) == n + 2  # outside the block, every call scans


@pytest.mark.parametrize("point", ["hook_resid_pre", "hook_resid_post"])
def test_residual_point_hooks_are_carried_over(organism, point):
    b = organism.bridge
    x = torch.tensor([[5, 6, 7, 8, 9]])
    shift = 3.0 * torch.randn(organism.d_model, generator=torch.Generator().manual_seed(1))
    seen = []

    def hook(a, hook):
        seen.append(tuple(a.shape))
        return a + shift

    L = organism.n_layers - 2
    with torch.inference_mode():
        clean = native_forward(b, x)[0]
        b.blocks[L].get_submodule(point.replace("resid_pre", "in").replace("resid_post", "out")).add_hook(hook)
        try:
            want = b(x)
            got = native_forward(b, x)
        finally:
            b.reset_hooks()
    assert got is not None and len(seen) == 2 and seen[0] == seen[1]
    torch.testing.assert_close(got[0].log_softmax(-1), want.log_softmax(-1), atol=1e-4, rtol=0)
    assert float((clean - got[0]).abs().max()) > 1e-2  # the hook did change the output


def _decode_both(model, monkeypatch, steer_kw=None, max_new_tokens=16):
    """Greedy decoding of two prompts with every step native (checked), then with every step
    through the bridge; ``steer_kw`` steers both. Returns the two token lists and the vector."""
    import contextlib

    dec = dataclasses.replace(generation.Decoder.for_model(model), eos_ids=frozenset())
    rows = [model.to_tokens(model.prompt("Compute 3 + 5 - 2."))[0].tolist(), [5, 6, 7, 8]]
    cfg = generation.SamplingConfig(max_new_tokens=max_new_tokens)
    L = model.n_layers - 1
    vec = steering.SteeringVector(60.0 * torch.randn(1, model.d_model, generator=torch.Generator().manual_seed(0)), [L])

    def steered():
        if steer_kw is None:
            return contextlib.nullcontext()
        return steering.steer(model, vec, layers=[L], **{"coeff": 1.0, **steer_kw})

    calls = []
    real = generation.native_forward

    def counting(*a, **k):
        out = real(*a, **k)
        calls.append(out is not None)
        return out

    with monkeypatch.context() as mp:
        mp.setattr(generation, "native_forward", counting)
        with steered():
            native = [c.ids for c in generation.decode(dec, rows, cfg, batch_size=2)]
        assert calls and all(calls)
        mp.setattr(generation, "native_forward", lambda *a, **k: None)  # every step through the bridge
        with steered():
            bridge = [c.ids for c in generation.decode(dec, rows, cfg, batch_size=2)]
    plain = [c.ids for c in generation.decode(dec, rows, cfg, batch_size=2)]
    return native, bridge, plain


@pytest.mark.parametrize("kw", [{}, {"mode": "once"}, {"mode": "every_k", "k": 3}, {"thinking_only": True},
                                {"relative": True, "coeff": 0.8}, {"hook": "hook_resid_pre"}])
def test_steered_decoding_native_equals_bridge_steps(organism, monkeypatch, kw):
    """steer() hooks the residual points and pre-hooks the embedding and block 0 (its stream
    tracker): carried over, a steered native decode gives the bridge's tokens in every mode."""
    native, bridge, plain = _decode_both(organism, monkeypatch, steer_kw=kw)
    assert native == bridge
    if not kw:
        assert native != plain  # the steering is felt


def test_wrappers_restored_after_an_error(organism):
    n, impl = _wrapped(organism), organism.bridge.original_model.config._attn_implementation
    with torch.inference_mode(), pytest.raises(IndexError):
        native_forward(organism.bridge, torch.tensor([[10**9]]))  # an id past the vocabulary
    assert _wrapped(organism) == n and organism.bridge.original_model.config._attn_implementation == impl


def test_greedy_decoding_native_equals_bridge_steps(organism, monkeypatch):
    native, bridge, _ = _decode_both(organism, monkeypatch, max_new_tokens=24)
    assert native == bridge


def test_wrapper_list_is_reused_only_while_it_holds(organism):
    """``_swaps`` keeps its scan on the HF model and reuses it while every entry still holds; a
    wrapper replaced under its parent makes it scan again (never swapping a stale module)."""
    from mechthink.models.native import _scan_swaps

    hf = organism.bridge.original_model
    first = _swaps(hf)
    assert _swaps(hf) is first and first == _scan_swaps(hf)
    parent, name, wrapper, orig = first[0]
    parent._modules[name] = orig  # what a native call does for its duration
    try:
        inside = _swaps(hf)
        assert inside is not first and len(inside) == len(first) - 1
        assert all(p._modules[n] is w for p, n, w, _ in inside)
    finally:
        parent._modules[name] = wrapper
    again = _swaps(hf)
    assert again == _scan_swaps(hf) and len(again) == len(first)
