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
