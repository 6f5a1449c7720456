"""mechthink.hooks: hook names, and gather against run_with_cache / autograd (tiny random models)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TYPE_ERRORS
from transformer_lens.utilities import get_act_name

import mechthink as mt
from mechthink.hooks import (
    HOOK_KINDS,
    ActivationCache,
    gather,
    hook_kind,
    hook_name,
    hook_names,
    is_pattern_hook,
)

ARCHS = ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Glm4ForCausalLM"]
LENGTHS = (9, 4, 13, 1)
TOL = dict(atol=1e-5, rtol=1e-5)

pytestmark = pytest.mark.usefixtures("one_thread")


def _seqs(model, lengths=LENGTHS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, int(model.cfg.d_vocab), (n,), generator=g).tolist() for n in lengths]


def _reference(model, seq, names):
    """TransformerLens' own cache of one sequence, no batching, no padding: ``name -> [pos, ...]``."""
    _, cache = model.bridge.run_with_cache(torch.tensor([seq]), names_filter=lambda n: n in names)
    return {n: cache[n][0] for n in names}


def _autograd_reference(model, seq, names, metric):
    """Gradients of ``metric`` w.r.t. hooked activations by plain autograd on one sequence."""
    acts: dict[str, torch.Tensor] = {}

    def make(name):
        def hook(act, hook):
            act = act if act.requires_grad else act.detach().requires_grad_(True)
            acts[name] = act
            return act

        return hook

    with torch.enable_grad():
        logits = model.bridge.run_with_hooks(torch.tensor([seq]), fwd_hooks=[(n, make(n)) for n in names])
        value = metric(logits)
        grads = torch.autograd.grad(value, [acts[n] for n in names])
    return float(value.detach()), {n: g[0] for n, g in zip(names, grads)}


def _causal(t: torch.Tensor, prefix: int = 0) -> torch.Tensor:
    """Zero the entries of ``[head, query, key]`` rows at keys after the query (query i = key i + prefix)."""
    q = torch.arange(t.shape[-2])[:, None] + prefix
    k = torch.arange(t.shape[-1])[None, :]
    return t.masked_fill(k > q, 0.0)


@pytest.fixture(scope="module")
def llama(tiny_loaded):
    return tiny_loaded("LlamaForCausalLM")[0]


# ----------------------------------------------------------------------------------- hook names
def test_hook_name_matches_transformer_lens_for_every_kind(llama):
    for kind in HOOK_KINDS:
        for L in range(llama.n_layers):
            name = hook_name(L, kind, llama)
            assert name == get_act_name(kind, L)
            assert name in llama.bridge.hook_dict
            assert hook_kind(name) == (L, kind)
            assert is_pattern_hook(name) == (kind in ("pattern", "attn_scores"))
    assert hook_name(3, "resid_pre") == "blocks.3.hook_resid_pre"
    assert hook_name(3, "mlp_post") == "blocks.3.mlp.hook_post"
    assert hook_name(3, "pattern") == "blocks.3.attn.hook_pattern"
    assert hook_name(-1, "z", llama) == f"blocks.{llama.n_layers - 1}.attn.hook_z"
    assert hook_names(llama, "resid_post") == [f"blocks.{L}.hook_resid_post" for L in range(llama.n_layers)]
    assert hook_names(llama, "attn_out", layers=[2, 0]) == ["blocks.2.hook_attn_out", "blocks.0.hook_attn_out"]
    assert hook_kind("ln_final.hook_scale") is None and hook_kind("blocks.0.ln1.hook_scale") is None


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: hook_name(0, "resid"), "accepted kinds: resid_pre, resid_mid"),
        (lambda m: hook_name(3, "resid_pre", m), "layer 3 is out of range for a 3-layer model"),
        (lambda m: hook_name(-4, "resid_pre", m), "out of range"),
        (lambda m: hook_name(-1, "resid_pre"), "negative; pass model="),
        (lambda m: hook_names(m, "mlp", layers=[0]), "unknown hook kind 'mlp'"),
    ],
)
def test_hook_name_errors_are_one_line(llama, call, match):
    with pytest.raises(ValueError, match=match) as err:
        call(llama)
    assert "\n" not in str(err.value)
    with pytest.raises(TYPE_ERRORS):
        hook_name(1.0, "resid_pre")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ gather
@pytest.mark.parametrize("arch", ARCHS)
def test_gather_equals_run_with_cache_for_every_kind(tiny_loaded, arch):
    """Ragged sequences batched (right padding, mask, position ids) == each run alone by TL."""
    model = tiny_loaded(arch)[0]
    seqs = _seqs(model)
    cache = gather(model, seqs, list(HOOK_KINDS), batch_size=3)
    assert set(cache.keys()) == {hook_name(L, k) for k in HOOK_KINDS for L in range(model.n_layers)}
    for i, seq in enumerate(seqs):
        ref = _reference(model, seq, cache.keys())
        for name in cache:
            torch.testing.assert_close(cache.per_sequence(name)[i], ref[name], **TOL, msg=f"{arch} {name}")


def test_one_sequence_alone_matches_run_with_cache_closely(llama):
    seq = _seqs(llama)[2]
    cache = gather(llama, seq, ["resid_pre", "resid_post", "pattern"])
    ref = _reference(llama, seq, cache.keys())
    for name in cache:
        assert cache[name].shape == (1, *ref[name].shape)
        torch.testing.assert_close(cache[name][0], ref[name], atol=1e-6, rtol=1e-6)


def test_results_do_not_depend_on_batching_or_order(llama):
    seqs = _seqs(llama, (7, 12, 3, 12, 5))
    hooks = ["resid_mid", "mlp_post", "z", "pattern"]
    one = gather(llama, seqs, hooks, batch_size=1)
    for bs in (2, 5):
        many = gather(llama, seqs, hooks, batch_size=bs)
        for name in one:
            torch.testing.assert_close(many[name], one[name], **TOL)
    rev = gather(llama, seqs[::-1], hooks, batch_size=2)
    for name in one:
        torch.testing.assert_close(rev[name].flip(0), one[name], **TOL)
    assert torch.equal(one.lengths, torch.tensor([7, 12, 3, 12, 5]))


def test_positions_subset_equals_full_then_indexed(llama):
    seqs = _seqs(llama)
    per = [[0, -1, 3], [2], [12, 5, 5], [0]]
    hooks = ["resid_pre", "q", "k", "v", "mlp_out", "pattern", "attn_scores"]
    full = gather(llama, seqs, hooks)
    sub = gather(llama, seqs, hooks, positions=per, batch_size=2)
    want = [[p % len(s) for p in ps] for ps, s in zip(per, seqs)]
    assert sub.positions.tolist() == [w + [-1] * (3 - len(w)) for w in want]
    key_len = max(max(w) for w in want) + 1
    for name in full:
        for i, w in enumerate(want):
            got, ref = sub.per_sequence(name)[i], full.per_sequence(name)[i]
            if is_pattern_hook(name):  # query rows w; keys up to the last gathered query
                ref = ref[:, w]
                torch.testing.assert_close(got[..., : ref.shape[-1]], ref, **TOL)
                fill = float("-inf") if name.endswith("scores") else 0.0
                assert got.shape[-1] == min(key_len, len(seqs[i])) and (got[..., ref.shape[-1] :] == fill).all()
            else:
                torch.testing.assert_close(got, ref[w], **TOL)
                assert (sub[name][~sub.mask] == 0).all()  # padded slots


def test_shared_positions_and_single_int(llama):
    seqs = _seqs(llama, (6, 8))
    a = gather(llama, seqs, "resid_post", positions=-1)
    b = gather(llama, seqs, "resid_post", positions=[[5], [7]])
    c = gather(llama, seqs, "resid_post", positions=[-1])
    for name in a:
        assert a[name].shape == (2, 1, llama.d_model)
        torch.testing.assert_close(a[name], b[name], **TOL)
        torch.testing.assert_close(a[name], c[name], **TOL)
    # a [batch, pos] tensor is a batch of rows; a 1-D tensor one sequence
    t = torch.tensor([seqs[1][:6], seqs[0]])
    d = gather(llama, t, "resid_post", positions=torch.tensor([1, 2]))
    assert d["blocks.0.hook_resid_post"].shape == (2, 2, llama.d_model)
    e = gather(llama, torch.tensor(seqs[0]), "resid_post", positions=[1, 2])
    torch.testing.assert_close(e["blocks.1.hook_resid_post"][0], d["blocks.1.hook_resid_post"][1], **TOL)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("chunk", [1, 4])
def test_chunked_prefill_equals_unchunked(tiny_loaded, arch, chunk):
    model = tiny_loaded(arch)[0]
    seqs = _seqs(model)
    hooks = ["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z"]
    whole = gather(model, seqs, hooks + ["pattern"], batch_size=2)
    chunked = gather(model, seqs, hooks, chunk_size=chunk, batch_size=2)
    for name in chunked:
        assert float((chunked[name] - whole[name]).abs().max()) <= 1e-5, name
    # attention-pattern rows of some queries through the cache (keys so far, per chunk)
    per = [[8, 1], [3], [12, 0], [0]]
    rows = gather(model, seqs, "pattern", positions=per, chunk_size=chunk, batch_size=3)
    for name in rows:
        for i, ps in enumerate(per):
            ref = whole.per_sequence(name)[i][:, ps]
            got = rows.per_sequence(name)[i]
            torch.testing.assert_close(got, ref[..., : got.shape[-1]], **TOL)


def test_chunked_prefill_of_the_organism(one_thread):
    """The trained organism's residuals reach |x| ~ 300, where float32's spacing is 3e-5, so the
    bound is relative: at most 1e-5 of the largest residual entry."""
    model = mt.load_model("tiny-thinker")
    seq = model.to_token_lists(["Compute 3 + 5 - 2 + 7. First 3 + 5 = 8. Then 8 - 2 = 6. So 6 + 7 = 13."])[0]
    ref = _reference(model, seq, hook_names(model, "resid_post"))
    got = gather(model, seq, "resid_post", chunk_size=8)
    for name, r in ref.items():
        assert float((got[name][0] - r).abs().max()) <= 1e-5 * float(r.abs().max())


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen3ForCausalLM"])
def test_metric_gradients_equal_autograd(tiny_loaded, arch):
    model = tiny_loaded(arch)[0]
    seqs = _seqs(model, (9, 4, 13))
    target = 7

    def metric(logits):
        return logits[0, -1].log_softmax(-1)[target]

    hooks = ["resid_pre", "attn_out", "z", "pattern", "mlp_post"]
    names = [hook_name(L, k) for k in hooks for L in range(model.n_layers)]
    refs = [_autograd_reference(model, s, names, metric) for s in seqs]
    for kw in ({}, {"chunk_size": 5, "batch_size": 2}):
        cache = gather(model, seqs, hooks, metric=metric, **kw)
        assert cache.grads is not None and cache.metric is not None
        for i, (value, ref) in enumerate(refs):
            assert float(cache.metric[i]) == pytest.approx(value, abs=1e-5)
            for name in names:
                got, want = cache.per_sequence(name, grads=True)[i], ref[name]
                if is_pattern_hook(name):  # keys after the query are structurally 0: gradient 0
                    assert (got == _causal(got)).all()
                    want = _causal(want)
                torch.testing.assert_close(got, want, **TOL, msg=f"{kw} {name}")
            assert not cache["blocks.0.hook_resid_pre"].requires_grad
    assert all(p.grad is None for p in model.bridge.parameters())


def test_metric_gradients_at_positions_and_under_inference_mode(llama):
    seqs = _seqs(llama, (9, 13))

    def metric(logits):
        return logits[0, -2:, 3].sum()

    names = hook_names(llama, "resid_post")
    per = [[8, 2], [0, 12, 6]]
    with torch.inference_mode():
        cache = gather(llama, seqs, "resid_post", positions=per, metric=metric, batch_size=2)
    for i, s in enumerate(seqs):
        _, ref = _autograd_reference(llama, s, names, metric)
        for name in names:
            torch.testing.assert_close(cache.per_sequence(name, grads=True)[i], ref[name][per[i]], **TOL)
    assert cache.stack("resid_post", grads=True).shape == (llama.n_layers, 2, 3, llama.d_model)


def test_prefix_cache_fork_equals_full_sequences(llama):
    prefix, *sufs = _seqs(llama, (6, 3, 5))
    with torch.inference_mode():
        _, kv = llama.bridge(torch.tensor([prefix]), return_type="logits_and_cache")
    before = [t.clone() for t in kv.layers[0].keys]
    hooks = ["resid_post", "pattern"]
    forked = gather(llama, sufs, hooks, positions=[-1, 0], past_key_values=kv, logits=True)
    full = gather(llama, [prefix + s for s in sufs], hooks, positions=[[8, 6], [10, 6]], logits=True)
    assert kv.get_seq_length() == 6 and torch.equal(kv.layers[0].keys[0], before[0])
    assert forked.prefix_len == 6
    for name in forked:
        torch.testing.assert_close(forked[name], full[name], **TOL)
    torch.testing.assert_close(forked.logits, full.logits, **TOL)

    def metric(logits):  # the last token's logit of id 3: the same token in both runs
        return logits[0, -1, 3]

    fg = gather(llama, sufs, "resid_pre", past_key_values=kv, metric=metric)
    ref = gather(llama, [prefix + s for s in sufs], "resid_pre", positions=[[6, 7, 8], [6, 7, 8, 9, 10]], metric=metric)
    torch.testing.assert_close(fg.metric, ref.metric, **TOL)
    for name in fg:
        torch.testing.assert_close(fg.grads[name], ref.grads[name], **TOL)


def test_logits_at_positions(llama):
    seqs = _seqs(llama, (5, 8))
    cache = gather(llama, seqs, "resid_pre", positions=[[4, 0], [7]], logits=True, chunk_size=3)
    for i, ps in enumerate([[4, 0], [7]]):
        ref = llama.bridge(torch.tensor([seqs[i]]))[0, ps]
        torch.testing.assert_close(cache.logits[i, : len(ps)], ref, **TOL)
    assert cache.logits.shape == (2, 2, llama.cfg.d_vocab)


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_reduce_over_positions(llama, reduce):
    seqs = _seqs(llama, (5, 9))
    per = [[1, 2, 3, 4], [0, 8]]
    red = gather(llama, seqs, ["resid_pre", "pattern"], positions=per, reduce=reduce, chunk_size=2, dtype=torch.float64)
    full = gather(llama, seqs, ["resid_pre", "pattern"], positions=per)
    for name in red:
        assert red[name].dtype == torch.float64
        for i in range(2):
            rows = full.per_sequence(name)[i].double()
            ref = getattr(rows, reduce)(dim=-2 if is_pattern_hook(name) else 0)
            torch.testing.assert_close(red.per_sequence(name)[i], ref, **TOL)
    assert red["blocks.0.hook_resid_pre"].shape == (2, llama.d_model)


def test_cache_views(llama):
    seqs = _seqs(llama, (4, 6))
    cache = gather(llama, seqs, ["resid_pre", "z"], layers=[0, 2])
    assert isinstance(cache, ActivationCache) and len(cache) == 4
    assert "blocks.2.attn.hook_z" in cache and "blocks.1.attn.hook_z" not in cache
    assert cache.layers("z") == [0, 2]
    st = cache.stack("resid_pre")
    assert st.shape == (2, 2, 6, llama.d_model)
    torch.testing.assert_close(st[1], cache["blocks.2.hook_resid_pre"])
    assert cache.stack("z", layers=[2]).shape == (1, 2, 6, llama.cfg.n_heads, llama.cfg.d_head)
    assert cache.mask.tolist() == [[True] * 4 + [False] * 2, [True] * 6]
    assert [t.shape[0] for t in cache.per_sequence("blocks.0.hook_resid_pre")] == [4, 6]
    moved = cache.to("meta")
    assert moved["blocks.0.hook_resid_pre"].device.type == "meta" and cache["blocks.0.hook_resid_pre"].device.type == "cpu"
    frame = cache.to_frame()
    assert list(frame.columns) == ["hook", "layer", "kind", "sequence", "n_positions", "mean_norm"]
    assert len(frame) == 8 and set(frame.kind) == {"resid_pre", "z"}
    info = json.loads(cache.to_json())
    assert info["hooks"]["blocks.0.hook_resid_pre"] == [2, 6, llama.d_model] and info["lengths"] == [4, 6]
    with pytest.raises(KeyError, match="was not gathered"):
        cache["blocks.1.hook_resid_pre"]
    with pytest.raises(ValueError, match="gathered at layers"):
        cache.stack("resid_pre", layers=[1])
    with pytest.raises(ValueError, match="no gradients"):
        cache.stack("resid_pre", grads=True)
    half = gather(llama, seqs, "resid_pre", dtype=torch.float16)
    assert half["blocks.0.hook_resid_pre"].dtype == torch.float16


def test_model_hooks_left_clean(llama):
    def n_hooks():
        return sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in llama.bridge.hook_dict.values())

    before = n_hooks()
    gather(llama, _seqs(llama), ["resid_pre", "pattern"], chunk_size=3)

    def broken(logits):
        raise RuntimeError("metric failed")

    with pytest.raises(RuntimeError, match="metric failed"):
        gather(llama, _seqs(llama), "resid_pre", metric=broken)
    assert n_hooks() == before


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tokens": []}, "tokens is empty"),
        ({"tokens": [[5, 6], []]}, r"tokens\[1\] is an empty sequence"),
        ({"tokens": [[5, 10**6]]}, "outside the vocabulary"),
        ({"hooks": "resid"}, "unknown hook 'resid'.*resid_pre, resid_mid"),
        ({"hooks": "blocks.7.hook_resid_pre"}, "layer out of range for a 3-layer model"),
        ({"hooks": []}, "hooks is empty"),
        ({"layers": [3]}, "layer 3 is out of range"),
        ({"positions": [9]}, r"position 9 is outside sequence 0 \(length 4\)"),
        ({"positions": [[0], [-6]]}, r"position -6 is outside sequence 1 \(length 5\)"),
        ({"positions": [[0], [1], [2]]}, "3 lists for 2 sequences"),
        ({"positions": [[], []]}, "selects no position"),
        ({"batch_size": 0}, "batch_size must be a positive int"),
        ({"chunk_size": 0}, "chunk_size must be None or a positive int"),
        ({"reduce": "sum", "metric": lambda lg: lg.sum()}, "reduce and metric are exclusive"),
        ({"metric": lambda lg: lg[0, -1]}, "metric must return one value per sequence"),
        ({"past_key_values": object()}, "past_key_values must be a transformers DynamicCache"),
    ],
)
def test_bad_input_is_one_line(llama, kwargs, match):
    args = {"tokens": [[5, 6, 7, 8], [9, 10, 11, 12, 13]], "hooks": "resid_pre", **kwargs}
    with pytest.raises(ValueError, match=match) as err:
        gather(llama, args.pop("tokens"), args.pop("hooks"), **args)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs", [{"tokens": torch.zeros(3)}, {"reduce": "max"}, {"positions": 1.5}])
def test_bad_types_are_refused(llama, kwargs):
    """Our ValueError, or the runtime type checker's error when tests run with it."""
    args = {"tokens": [[5, 6, 7, 8]], "hooks": "resid_pre", **kwargs}
    with pytest.raises(TYPE_ERRORS) as err:
        gather(llama, args.pop("tokens"), args.pop("hooks"), **args)
    assert "\n" not in str(err.value) or not isinstance(err.value, ValueError)
