"""The KV cache through the bridge: never empty, equal to recomputation, and a self-check that refuses.

transformers 5.24 passes the cache to attention modules as ``cache=``; TransformerLens 4.3's
bridge reads only ``past_key_values``. These tests fail on any installed version where the
cache comes back empty or a cached step differs from a full forward.
"""

from __future__ import annotations

import copy

import pytest
import torch

import mechthink as mt
from mechthink.models import kvcache

ARCHS = ["Qwen2ForCausalLM", "LlamaForCausalLM", "Qwen3ForCausalLM", "Glm4ForCausalLM"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("arch", ARCHS)
def test_cache_is_filled_and_cached_steps_equal_recomputation(tiny_loaded, arch):
    model, ref = tiny_loaded(arch)
    ids = model.to_tokens(model.prompt("Compute 3 + 5 - 2 + 7.") + "3 + 5 = 8. Wait")
    T = ids.shape[1]
    with torch.inference_mode():
        full = model.bridge(ids).float().log_softmax(-1)
        _, kv = model.bridge(ids[:, : T - 3], return_type="logits_and_cache")
        assert kv is not None and kv.get_seq_length() == T - 3  # the bug: 0
        for t in range(T - 3, T):
            lp = model.bridge(ids[:, t : t + 1], past_key_values=kv).float().log_softmax(-1)
            assert kv.get_seq_length() == t + 1
            assert (lp[0, -1] - full[0, t]).abs().max().item() < 1e-4
        hf = ref(ids).logits.log_softmax(-1)
    assert (full - hf).abs().max().item() < 1e-4


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen3ForCausalLM"])
def test_self_check_passes_and_is_idempotent(tiny_loaded, arch):
    model, _ = tiny_loaded(arch)
    n = kvcache.install_cache_adapter(model.bridge)
    assert n == model.n_layers  # one attention component per block
    assert kvcache.install_cache_adapter(model.bridge) == n
    assert kvcache.check_kv_cache(model) < 1e-4


def test_self_check_refuses_an_empty_cache(tiny_hf, monkeypatch):
    """Simulate the transformers 5.24 / TL 4.3 mismatch: the bridge never writes the cache."""
    ref, tok = tiny_hf("LlamaForCausalLM")
    model = mt.load_model("broken-cache", hf_model=copy.deepcopy(ref), tokenizer=tok, device="cpu")
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    monkeypatch.setattr(AttentionBridge, "_update_kv_cache", lambda self, k, v, **kw: (k, v))
    with pytest.raises(kvcache.KVCacheError, match=r"holds 0 positions.*transformers .* \(supported"):
        kvcache.check_kv_cache(model)
    with pytest.raises(kvcache.KVCacheError):
        mt.load_model("broken-cache", hf_model=copy.deepcopy(ref), tokenizer=tok, device="cpu")


def test_self_check_refuses_a_wrong_cache(tiny_hf, monkeypatch):
    """A cache of the right length holding the wrong keys is caught by the logit comparison."""
    ref, tok = tiny_hf("LlamaForCausalLM")
    model = mt.load_model("wrong-cache", hf_model=copy.deepcopy(ref), tokenizer=tok, device="cpu")
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    original = AttentionBridge._update_kv_cache

    def scrambled(self, k, v, **kw):
        k2, v2 = original(self, k, v, **kw)
        return k2, v2.flip(-2)  # same length, values in the wrong order

    monkeypatch.setattr(AttentionBridge, "_update_kv_cache", scrambled)
    with pytest.raises(kvcache.KVCacheError, match="differs from a full forward"):
        kvcache.check_kv_cache(model)


def test_cache_from_kwargs_reads_every_name():
    marker = object()
    for key in kvcache.CACHE_KWARGS:
        assert kvcache.cache_from_kwargs({key: marker}) is marker
    assert kvcache.cache_from_kwargs({"use_cache": True}) is None


def test_declared_bounds_admit_the_installed_versions():
    """pyproject's bounds, the lock and SUPPORTED_VERSIONS say the same and admit what runs here."""
    import tomllib
    from pathlib import Path

    from packaging.requirements import Requirement
    from packaging.version import Version

    root = Path(__file__).resolve().parents[1]
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    declared = {Requirement(d).name: Requirement(d).specifier for d in deps}
    have = kvcache.installed_versions()
    for pkg, rng in kvcache.SUPPORTED_VERSIONS.items():
        assert str(declared[pkg]) == str(Requirement(f"{pkg}{rng}").specifier), pkg
        assert declared[pkg].contains(Version(have[pkg].split("+")[0])), (pkg, have[pkg])
        assert "<" in str(declared[pkg]), f"{pkg} needs an upper bound"
    lock = {
        line.split("==")[0].strip().lower(): line.split("==")[1].strip()
        for line in (root / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    for pkg in ("transformers", "transformer-lens"):
        assert declared[pkg].contains(Version(lock[pkg])), (pkg, lock[pkg])


# ============================================================================ reserve_cache
def _filled(batch: int = 3, length: int = 5, layers: int = 2, seed: int = 0):
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(seed)
    kv = DynamicCache()
    for layer in range(layers):
        kv.update(torch.randn(batch, 2, length, 4, generator=g), torch.randn(batch, 2, length, 4, generator=g), layer)
    return kv, g


def _same(a, b) -> bool:
    return all(torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values) for x, y in zip(a.layers, b.layers))


@pytest.mark.parametrize("extra", [0, 3, 300])
def test_reserved_updates_equal_concatenation_through_growth(extra):
    """Steps past the initial room (extra=0: every step regrows; 3: a few; 300: none) give the
    concatenating cache's tensors bit for bit, and the returned views are the cache's."""
    plain, _ = _filled()
    fast = copy.deepcopy(plain)
    assert kvcache.reserve_cache(fast, extra) == 2
    g = torch.Generator().manual_seed(1)
    for step in range(200):
        m = 1 + step % 3
        for layer in range(2):
            k, v = torch.randn(3, 2, m, 4, generator=g), torch.randn(3, 2, m, 4, generator=g)
            want = plain.update(k, v, layer)
            got = fast.update(k.clone(), v.clone(), layer)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert _same(plain, fast) and fast.get_seq_length() == plain.get_seq_length()
    assert type(fast.layers[0]).__name__ == "_ReservedLayer" and fast.layers[0]._is_prefix_view()


def test_reserved_writes_never_touch_a_view_handed_out():
    """A crop, or keys set to a shorter view while the longer one is kept (what representation
    recycling does for its second pass), then an update: every tensor handed out before keeps
    its values, as with the concatenating layer."""
    kv, _ = _filled()
    kvcache.reserve_cache(kv, 50)
    lay = kv.layers[0]
    before_k, before_v = lay.keys, lay.values
    saved = before_k.clone(), before_v.clone()
    lay.keys, lay.values = lay.keys[..., :-1, :], lay.values[..., :-1, :]
    new = torch.full((3, 2, 1, 4), 7.0)
    k, v = kv.update(new, new, 0)
    assert torch.equal(before_k, saved[0]) and torch.equal(before_v, saved[1])
    assert torch.equal(k[..., -1:, :], new) and torch.equal(k[..., :-1, :], saved[0][..., :-1, :])
    lay.keys, lay.values = before_k, before_v  # restored: no longer a view of the new buffers
    k2, _ = kv.update(new, new, 0)  # falls back to concatenation, still right
    assert torch.equal(k2, torch.cat([saved[0], new], dim=-2))
    kv.crop(-2)
    held = kv.layers[1].keys.clone()
    kv.update(torch.zeros(3, 2, 1, 4), torch.zeros(3, 2, 1, 4), 1)
    assert torch.equal(kv.layers[1].keys[..., :-1, :], held)


def test_reserved_cache_batch_ops_and_copies():
    plain, _ = _filled(batch=4)
    fast = copy.deepcopy(plain)
    kvcache.reserve_cache(fast, 20)
    sel = torch.tensor([0, 2, 3])
    plain.batch_select_indices(sel)
    fast.batch_select_indices(sel)
    assert _same(plain, fast) and fast.layers[0]._is_prefix_view()
    twin = copy.deepcopy(fast)
    step = torch.ones(3, 2, 1, 4)
    for c in (plain, fast):
        c.update(step, step, 0)
    assert _same(plain, fast) and twin.get_seq_length() == 5  # the copy is independent
    fast.batch_repeat_interleave(2)
    plain.batch_repeat_interleave(2)
    step = torch.full((6, 2, 1, 4), 2.0)
    for c in (plain, fast):
        c.update(step, step, 0)
    assert _same(plain, fast)
    assert kvcache.reserve_cache(fast, 5) == 2 and fast.layers[0]._is_prefix_view()
    with pytest.raises(ValueError, match="extra must be an int >= 0"):
        kvcache.reserve_cache(fast, -1)


def test_reserve_leaves_other_layer_types_alone():
    from transformers.cache_utils import DynamicSlidingWindowLayer

    kv, _ = _filled()
    kv.layers[1].__class__ = DynamicSlidingWindowLayer
    assert kvcache.reserve_cache(kv, 10) == 1
    assert type(kv.layers[1]) is DynamicSlidingWindowLayer
    assert kvcache.reserve_cache(object(), 10) == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_decoding_with_reserved_cache_equals_concatenation(tiny_loaded, monkeypatch, arch):
    """The decode loop with its reserved cache gives the tokens of the concatenating cache, and
    the logits of every step bit for bit (sampled, left-padded, rows dropping out; GQA layouts)."""
    from mechthink import generation as G

    model, _ = tiny_loaded(arch)
    rows = [model.to_tokens(model.prompt(q))[0].tolist() for q in ("Compute 3 + 5.", "Compute 2 + 9 - 4 + 1.")]
    cfg = G.SamplingConfig(24, 1.0, 0.9, 3)
    dec = G.Decoder.for_model(model)

    def recording(seen):
        def forward(*args):
            logits, kv = dec.forward(*args)
            seen.append(logits[:, -1].clone())
            return logits, kv

        return G.Decoder(forward, dec.eos_ids, dec.pad_id, dec.device, dec.rows_droppable)

    seen_fast, seen_slow = [], []
    fast = G.decode(recording(seen_fast), rows * 3, cfg, batch_size=6, drop_finished=True)
    monkeypatch.setattr(G, "reserve_cache", lambda kv, extra: 0)
    slow = G.decode(recording(seen_slow), rows * 3, cfg, batch_size=6, drop_finished=True)
    assert [c.ids for c in fast] == [c.ids for c in slow] and [c.finished for c in fast] == [c.finished for c in slow]
    assert len(seen_fast) == len(seen_slow) > 10
    assert all(torch.equal(a, b) for a, b in zip(seen_fast, seen_slow))
