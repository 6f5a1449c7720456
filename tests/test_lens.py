"""Logit lens and value vectors: sum identity, last-layer identity, planted neurons, ablation."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import mechthink as mt
from conftest import TYPE_ERRORS
from mechthink import lens as L
from mechthink import value_vectors as vv

pytestmark = pytest.mark.usefixtures("one_thread")
ARCHS = ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Glm4ForCausalLM"]
TEXTS = ["Compute 3 + 5 - 2. First 3 + 5 = 8. Wait, let me check.", "So the answer is 42. Hmm, wait"]


def _tokens(model):
    return [model.to_tokens(model.prompt(t, thinking="on"))[0] for t in TEXTS]


@pytest.mark.parametrize("arch", ARCHS)
def test_decomposed_contributions_sum_to_logit(tiny_loaded, arch):
    model, _ = tiny_loaded(arch)
    toks = _tokens(model)
    res = L.logit_lens(model, toks, ["Wait", "So"], mode="decomposed", positions=[-1, -3, 5])
    assert res.components[0] == "embed" and res.components[-1] == f"mlp_{model.n_layers - 1}"
    assert res.target_logits.shape == (6, 1 + 2 * model.n_layers, len(res.target_ids))
    assert L.sum_check(res, model).abs().max().item() < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_accumulated_lens_last_layer_is_model_output(tiny_loaded, arch):
    model, ref = tiny_loaded(arch)
    toks = _tokens(model)
    res = L.logit_lens(model, toks, ["Wait"], mode="accumulated", positions=[-1, 2], top_k=5)
    final = res.components.index(f"resid_post_{model.n_layers - 1}")
    assert torch.allclose(res.target_logits[:, final], res.model_logits, atol=1e-4)
    # the whole distribution: lens of the last residual vs the HF model's log_softmax
    seq = toks[0]
    name = f"blocks.{model.n_layers - 1}.hook_resid_post"
    with torch.no_grad():
        _, cache = model.bridge.run_with_cache(seq[None], names_filter=lambda n: n == name)
        lens_lp = L.unembed(model, L.final_norm(model, cache[name][0])).log_softmax(-1)
        hf_lp = ref(seq[None]).logits[0].log_softmax(-1)
    assert (lens_lp - hf_lp).abs().max().item() < 1e-4
    assert res.top_ids[0, final].tolist() == hf_lp[-1].topk(5).indices.tolist()


def test_accumulated_matches_transformerlens_cache(tiny_loaded):
    """Independent reference: TL's own accumulated_resid + apply_ln_to_stack on the same cache."""
    model, _ = tiny_loaded("LlamaForCausalLM")
    seq = _tokens(model)[0]
    res = L.logit_lens(model, seq, ["Wait"], mode="accumulated")
    with torch.no_grad():
        _, cache = model.bridge.run_with_cache(seq[None])
        acc = cache.accumulated_resid(layer=None, incl_mid=False, apply_ln=True, pos_slice=-1)
        tl_logits = acc[:, 0] @ model.bridge.W_U + model.bridge.b_U
    ours = res.target_logits[0, :, 0]
    assert acc.shape[0] == len(res.components) == model.n_layers + 1
    assert torch.allclose(ours, tl_logits[:, res.target_ids[0]].float(), atol=1e-3)


def test_decomposed_recompute_and_frame(tiny_loaded):
    model, _ = tiny_loaded("Qwen2ForCausalLM")
    res = L.logit_lens(model, _tokens(model)[0], [" Wait"], mode="decomposed", norm="recompute")
    df = res.to_frame()
    assert {"component", "target", "logit", "prob", "rank"} <= set(df.columns)
    assert set(df.component) == {"embed"} | {f"{k}_{i}" for i in range(model.n_layers) for k in ("attn", "mlp")}
    assert len(df) == len(res.components) * len(res.targets)
    assert res.plot(kind="heatmap").axes and res.plot(kind="dla").axes
    assert json.loads(res.to_json())["components"] == res.components
    with pytest.raises(TYPE_ERRORS):  # the Literal check, or the ValueError naming the kinds
        res.plot(kind="bars")


def test_lens_bad_input(tiny_loaded):
    model, _ = tiny_loaded("LlamaForCausalLM")
    seq = _tokens(model)[0]
    with pytest.raises(ValueError, match="outside sequence"):
        L.logit_lens(model, seq, ["Wait"], positions=[len(seq)])
    with pytest.raises(ValueError, match="never a single token"):
        L.logit_lens(model, seq, ["Supercalifragilistic"])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        L.logit_lens(model, seq, [10**7])


def test_smollm2_lens_identities(smollm2):
    model, ref = smollm2
    text = model.prompt("What is 17 + 25?", thinking="on") + "17 + 25 = 42. Wait"
    seq = model.to_tokens(text)[0]
    res = L.logit_lens(model, seq, ["Wait", "Therefore"], mode="decomposed", positions=[-2, -1])
    err = L.sum_check(res, model).abs().max().item()
    print(f"SmolLM2 DLA sum identity max error {err:.2e}")
    assert err < 1e-4
    acc = L.logit_lens(model, seq, ["Wait"], mode="accumulated", positions=[-2])
    final = acc.components.index("resid_post_29")
    with torch.no_grad():
        hf = ref(seq[None]).logits[0, -2].log_softmax(-1)
    assert acc.top_ids[0, final, 0].item() == hf.argmax().item()
    lens_lp = acc.target_probs[0, final, 0].log()
    assert abs(lens_lp.item() - hf[acc.target_ids[0]].item()) < 1e-4


# ------------------------------------------------------------------ value vectors
@pytest.fixture(scope="module")
def planted(tiny_hf):
    """A tiny Llama whose layer-1 neuron 7 writes the " Wait" unembedding direction."""
    ref, tok = tiny_hf("LlamaForCausalLM")
    hf = copy.deepcopy(ref)
    wait = tok(" Wait", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        u = hf.lm_head.weight[wait] - hf.lm_head.weight.mean(0)
        hf.model.layers[1].mlp.down_proj.weight[:, 7] = 20.0 * u / u.norm()
    model = mt.load_model(hf_model=hf, tokenizer=tok, device="cpu")
    return model, wait


def test_value_vector_top_tokens_and_search(planted):
    model, wait = planted
    df = vv.top_tokens(model, 1, [7], k=5)
    assert df.iloc[0]["token_id"] == wait
    manual = (model.bridge.blocks[1].mlp.W_out[7] @ model.bridge.W_U).topk(5).indices.tolist()
    assert list(df["token_id"]) == manual
    hits = vv.search_neurons(model, [" Wait"], k=3)
    assert (int(hits.layers[0]), int(hits.neurons[0])) == (1, 7)
    frame = hits.to_frame(model, k=3)
    assert frame.iloc[0]["top_tokens"][0] == " Wait"


def test_probe_separates_and_ranks(planted):
    model, _ = planted
    tok = model.tokenizer
    pos_texts = [f"Now {a} + {b} = {a + b}. Wait" for a in range(1, 7) for b in range(1, 4)]
    neg_texts = [f"Now {a} + {b} = {a + b}. So" for a in range(1, 7) for b in range(1, 4)]
    examples = [(model.to_tokens(t)[0], -1) for t in neg_texts + pos_texts]
    labels = [0] * len(neg_texts) + [1] * len(pos_texts)
    acts = vv.collect_activations(model, examples)
    assert acts.shape == (len(examples), model.n_layers, model.d_model)
    probe = vv.layer_probes(acts, labels, folds=4)
    assert probe.accuracy.min().item() >= 0.95  # the last token differs: trivially separable
    ranked = vv.rank_by_probe(model, probe, layer=1, k=5)
    assert len(ranked) == 5 and ranked["cosine"].is_monotonic_decreasing
    assert isinstance(probe, vv.LayerProbeResult) and not hasattr(vv, "ProbeResult")
    assert probe.plot().axes and len(probe.to_frame()) == model.n_layers
    assert json.loads(probe.to_json())["folds"] == 4
    assert len(tok.decode(examples[0][0])) > 0


def test_ablation_is_exact_at_last_layer_and_leaves_model_unchanged(tiny_loaded):
    model, _ = tiny_loaded("LlamaForCausalLM")
    seq = _tokens(model)[0]
    last = model.n_layers - 1
    neurons = [3, 11, 40]
    names = {f"blocks.{last}.mlp.hook_post", f"blocks.{last}.hook_resid_post"}
    with torch.no_grad():
        clean_logits, cache = model.bridge.run_with_cache(seq[None], names_filter=lambda n: n in names)
        post = cache[f"blocks.{last}.mlp.hook_post"][0]
        delta = post[:, neurons] @ model.bridge.blocks[last].mlp.W_out[neurons]
        expected = L.unembed(model, L.final_norm(model, cache[f"blocks.{last}.hook_resid_post"][0] - delta))
        with vv.ablate_neurons(model, {last: neurons}):
            ablated = model.bridge(seq[None])[0]
        after = model.bridge(seq[None])
    assert (ablated - expected).abs().max().item() < 1e-4
    assert torch.equal(after, clean_logits)  # hooks removed, model untouched
    with pytest.raises(RuntimeError):
        with vv.ablate_neurons(model, {last: neurons}):
            raise RuntimeError("boom")
    assert torch.equal(model.bridge(seq[None]), clean_logits)


def test_ablation_effect_of_planted_neuron(planted):
    model, wait = planted
    examples = [(model.to_tokens(f"Now {a} + 1 = {a + 1}.")[0], -1) for a in range(1, 8)]
    acts = vv.collect_activations(model, examples, hook="mlp.hook_post", layers=[1])[:, 0, 7]
    eff = vv.ablation_effect(model, examples, {1: [7]}, [" Wait"])
    assert eff.prob_clean.shape == (7,)
    # removing a neuron that writes +Wait lowers P(Wait) where it fires positively, raises it
    # where its (SiLU-gated) activation is negative
    drop = eff.prob_clean - eff.prob_ablated
    strong = acts.abs() > 0.05
    assert strong.any()
    assert (torch.sign(drop[strong]) == torch.sign(acts[strong])).all()
    assert eff.plot().axes and len(eff.to_frame()) == 7


def test_compare_ablations_plans(planted):
    """compare_ablations = ablation_effect per plan on the same examples; plans from hits, from
    layer/neuron lists and a seeded random control."""
    model, _ = planted
    examples = [(model.to_tokens(f"Now {a} + 1 = {a + 1}.")[0], -1) for a in range(1, 5)]
    hits = vv.search_neurons(model, [" Wait"], k=3)
    assert hits.plan() == vv.neuron_plan(hits.layers.tolist(), hits.neurons.tolist())
    assert vv.neuron_plan([1, 0, 1], [7, 2, 9]) == {1: [7, 9], 0: [2]}
    rand = vv.random_plan(model, [1, 0, 1], seed=3)
    assert rand == vv.random_plan(model, [1, 0, 1], seed=3) and sorted(rand) == [0, 1] and len(rand[1]) == 2
    d_mlp = model.bridge.blocks[0].mlp.W_out.shape[0]
    assert all(0 <= n < d_mlp for ns in rand.values() for n in ns)
    plans = {"top": hits.plan(), "random": rand}
    comp = vv.compare_ablations(model, examples, plans, [" Wait"])
    for name, plan in plans.items():
        ref = vv.ablation_effect(model, examples, plan, [" Wait"])
        torch.testing.assert_close(comp.prob_clean, ref.prob_clean)
        torch.testing.assert_close(comp.prob_ablated[name], ref.prob_ablated)
    means = comp.mean_prob()
    assert list(means) == ["clean", "top", "random"]
    assert means["top"] == pytest.approx(float(comp.prob_ablated["top"].mean()))
    assert len(comp.to_frame()) == 2 * len(examples) and comp.plot().axes and hits.plot().axes
    with pytest.raises(ValueError, match="one layer per neuron"):
        vv.neuron_plan([1, 2], [3])
    with pytest.raises(ValueError, match="plan='x'"):
        comp.effect("x")


def test_neuron_dla_sums_to_component_dla(tiny_loaded):
    """Σ over a layer's neurons of their DLA = that layer's mlp_out DLA from the lens (bias-free)."""
    model, _ = tiny_loaded("LlamaForCausalLM")
    seqs = _tokens(model)
    examples = [(s, -1) for s in seqs]
    d_mlp = model.bridge.blocks[0].mlp.W_out.shape[0]
    frame = vv.neuron_dla(model, examples, ["Wait"], k=d_mlp * model.n_layers)
    res = L.logit_lens(model, seqs, ["Wait"], mode="decomposed")
    for layer in range(model.n_layers):
        lens_val = res.target_logits[:, res.components.index(f"mlp_{layer}")].mean().item()
        ours = frame[frame.layer == layer]["dla"].sum()
        assert abs(ours - lens_val) < 1e-3


def test_tuned_lens_identity_training_and_roundtrip(tmp_path):
    from mechthink.models.organism import sample_transcripts

    model = mt.load_model("tiny-thinker")
    trs = sample_transcripts(24, seed="tuned-lens-test")
    train, held = [t.input_ids for t in trs[:16]], [t.input_ids for t in trs[16:]]
    ident = L.TunedLens.identity(model.n_layers, model.d_model)
    plain = L.logit_lens(model, held[:2], ["Wait"], positions=[-3])
    same = L.logit_lens(model, held[:2], ["Wait"], positions=[-3], tuned=ident)
    assert torch.allclose(plain.target_logits, same.target_logits, atol=1e-5)
    tuned = L.train_tuned_lens(model, train, steps=60, lr=3e-3, batch_size=4)
    kl_plain = L.tuned_lens_kl(model, None, held)
    kl_tuned = L.tuned_lens_kl(model, tuned, held)
    print("held-out KL per layer, plain vs tuned:", kl_plain.tolist(), kl_tuned.tolist())
    assert (kl_tuned[1:] < kl_plain[1:]).all() and kl_tuned.mean() < 0.8 * kl_plain.mean()
    path = tmp_path / "tuned.safetensors"
    tuned.save(path)
    back = L.TunedLens.load(path)
    assert torch.equal(back.weight, tuned.weight) and back.model_name == "tiny-thinker" and back.meta["steps"] == 60
    res = L.logit_lens(model, held[:2], ["Wait"], tuned=back)
    assert res.mode == "tuned"
    assert all(p.grad is None for p in model.bridge.parameters())
    assert len(back.to_frame()) == model.n_layers and back.plot().axes
    assert json.loads(back.to_json())["meta"]["steps"] == 60


def test_summarize_lens_and_compare_tuned_lens(tiny_loaded):
    model, _ = tiny_loaded("LlamaForCausalLM")
    seqs = _tokens(model) + [model.to_tokens(model.prompt("What is 2 + 2?", thinking="on"))[0]]
    acc = L.logit_lens(model, seqs, ["Wait"], mode="accumulated")
    dec = L.logit_lens(model, seqs, ["Wait"], mode="decomposed")
    summ = L.summarize_lens(model, acc, dec, n_top=3)
    torch.testing.assert_close(summ.mean_dla, dec.target_logits[:, :, 0].mean(0))
    assert summ.top_dla_components == [dec.components[i] for i in dec.target_logits[:, :, 0].mean(0).topk(3).indices]
    assert sum(summ.first_top1_counts.values()) == len(seqs) and summ.n_positions == len(seqs)
    assert summ.top1_fraction[-1] == pytest.approx(float((acc.target_ranks[:, -1, 0] == 0).float().mean()))
    assert summ.dla_sum_error < 1e-4 and summ.p_target_final_mean == pytest.approx(float(acc.target_probs[:, -1, 0].mean()))
    assert len(summ.to_frame()) == len(dec.components) and summ.plot().axes
    with pytest.raises(ValueError, match="accumulated and a decomposed"):
        L.summarize_lens(model, dec, acc)
    cmp = L.compare_tuned_lens(model, seqs, ["Wait"], steps=3, batch_size=2, n_train=1)
    torch.testing.assert_close(cmp.kl_plain, L.tuned_lens_kl(model, None, seqs[1:]))
    torch.testing.assert_close(cmp.kl_tuned, L.tuned_lens_kl(model, cmp.tuned, seqs[1:]))
    tl = L.logit_lens(model, seqs[1:], ["Wait"], tuned=cmp.tuned)
    torch.testing.assert_close(cmp.top1_fraction, (tl.target_ranks[:, :, 0] == 0).float().mean(0))
    assert (cmp.n_train, cmp.n_heldout) == (1, 2) and cmp.plot().axes and len(cmp.to_frame()) == model.n_layers
    with pytest.raises(ValueError, match="n_train=3"):
        L.compare_tuned_lens(model, seqs, ["Wait"], steps=1, n_train=3)
