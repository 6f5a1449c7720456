"""Edge attribution patching (EAP, EAP-IG) vs exact edge patching; graph, circuits, faithfulness."""

from __future__ import annotations

import pytest
import torch

from mechthink import attribution as A
from mechthink import circuits as C

pytestmark = pytest.mark.usefixtures("one_thread")
ARCHS = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Glm4ForCausalLM")
TEXT = "Hmm, the answer is 12. Alternatively"


def _setup(model):
    clean = model.to_tokens(TEXT)[0]
    corrupt = clean.clone()
    corrupt[3:6] = torch.tensor([50, 60, 70])
    return clean, corrupt, A.logit_metric(-1, model.token_ids("Wait"))


@pytest.mark.parametrize("arch", ARCHS)
def test_graph_and_sender_sums(tiny_loaded, arch):
    """The senders sum to every residual stream; no ablation = clean, all edges ablated = corrupted."""
    model = tiny_loaded(arch)[0]
    g = C.build_graph(model)
    H, G, L = g.n_heads, g.n_kv_heads, g.n_layers
    assert len(g.senders) == 1 + L * (H + 1) and len(g.receivers) == L * (H + 2 * G + 1) + 1
    assert g.attn_post_norm == (arch == "Glm4ForCausalLM")
    assert g.edges[g.head_sender(0, 0), g.receiver_slice(0, "mlp")].all()  # attn -> mlp in a layer
    assert not g.edges[g.head_sender(0, 0), g.receiver_slice(0, "q")].any()
    assert not g.edges[g.mlp_sender(0), g.receiver_slice(0, "mlp")].any()
    assert g.edges[:, g.logits_receiver].all()
    clean, corrupt, _ = _setup(model)
    acts = C.baseline_outputs(model, clean, g)[0]
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(L)] + ["ln_final.hook_in"]
    _, cache = model.bridge.run_with_cache(clean[None], names_filter=names)
    for v, name in zip([g.receiver_slice(layer, "q").start for layer in range(L)] + [g.logits_receiver], names):
        torch.testing.assert_close(acts[:, : g.n_upstream(v)].sum(1), cache[name][0], atol=2e-5, rtol=1e-4)
    with torch.no_grad():
        lc, lb = model.bridge(clean[None]), model.bridge(corrupt[None])
    both = torch.stack([torch.zeros_like(g.edges), g.edges])
    out = C.run_with_ablated_edges(model, clean, both, corrupt, graph=g)
    torch.testing.assert_close(out[0], lc[0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out[1], lb[0], atol=2e-5, rtol=1e-4)
    assert not model.bridge.cfg.use_split_qkv_input and not model.bridge.cfg.use_attn_result  # flags restored


@pytest.mark.parametrize("arch", ARCHS)
def test_eap_is_exact_where_linear(tiny_loaded, arch):
    """With the final norm's scale frozen the logits are linear in their input: EAP scores of the
    edges into the logits equal exact edge patching, for every baseline."""
    model = tiny_loaded(arch)[0]
    clean, corrupt, metric = _setup(model)
    means = C.sender_means(model, [clean, corrupt])
    with torch.no_grad():
        _, cache = model.bridge.run_with_cache(clean[None], names_filter=["ln_final.hook_scale"])
    scale = cache["ln_final.hook_scale"].detach()
    g = C.build_graph(model)
    edges = torch.zeros_like(g.edges)
    edges[:, g.logits_receiver] = True
    with model.bridge.hooks(fwd_hooks=[("ln_final.hook_scale", lambda act, hook: scale.expand_as(act))]):
        for baseline in ("zero", "mean", corrupt):
            eap = C.edge_attribution(model, clean, metric, baseline, means=means, graph=g)
            ex = C.edge_patching(model, clean, metric, baseline, means=means, edges=edges, graph=g)
            torch.testing.assert_close(eap.values(edges), ex.values(), atol=1e-4, rtol=1e-3)


def _split_input_eap(model, g, clean, base, metric, ig_steps):
    """The reference: every receiver's own (split) input kept, ``Σ_pos Δ_u · ∂m/∂x_v``."""
    row = clean[None]
    b = C._baseline(model, g, row, base, None)
    with torch.inference_mode(False), torch.enable_grad():
        eng = C._Engine(model, g, keep_inputs=True)
        m = A._per_row(metric, eng.run(row))
        acts = eng.senders().detach()
        if ig_steps:
            e_c, e_b = acts[:, :, 0], b[:, :, 0].expand_as(acts[:, :, 0])
            alpha = ((torch.arange(ig_steps) + 0.5) / ig_steps)[:, None, None]
            eng = C._Engine(model, g, keep_inputs=True, embed=(e_b + alpha * (e_c - e_b)).requires_grad_(True))
            m = A._per_row(metric, eng.run(row.expand(ig_steps, -1)))
        grad = eng.receiver_grads(m.sum()).mean(0)
    delta = (b[0] - acts[0]).expand_as(acts[0])
    return torch.einsum("pud,prd->ur", delta, grad) * g.edges


@pytest.mark.parametrize("arch", ARCHS)
def test_eap_without_split_inputs_equals_split_input_gradients(tiny_loaded, arch, monkeypatch):
    """EAP and EAP-IG run one ordinary forward + backward (no split q/k/v inputs, the fused
    attention kernel — forced on here with ``min_scores=0`` — and per-head vector-Jacobian
    products at each layer's norm input); their scores equal the split-input reference, also
    with EAP-IG's rows one per gradient pass."""
    from mechthink.models.fast_attention import fast_attention

    model = tiny_loaded(arch)[0]
    clean, corrupt, metric = _setup(model)
    g = C.build_graph(model)
    for base, steps in (("zero", 0), (corrupt, 0), (corrupt, 3)):
        ref = _split_input_eap(model, g, clean, base, metric, steps)
        with fast_attention(model, min_scores=0) as fa:
            est = C.edge_attribution(model, clean, metric, base, method="eap-ig" if steps else "eap", ig_steps=steps or None, graph=g)
        assert fa.fast_calls >= g.n_layers and fa.exact_calls == 0
        torch.testing.assert_close(est.scores, ref, atol=2e-6 * float(ref.abs().max()), rtol=0)
    monkeypatch.setattr(C, "IG_TOKENS_PER_PASS", 1)
    one = C.edge_attribution(model, clean, metric, corrupt, method="eap-ig", ig_steps=3, graph=g)
    torch.testing.assert_close(one.scores, ref, atol=2e-6 * float(ref.abs().max()), rtol=0)
    assert not model.bridge.cfg.use_split_qkv_input and not model.bridge.cfg.use_hook_mlp_in


@pytest.mark.parametrize("arch", ARCHS)
def test_compact_delta_equals_full_buffer(tiny_loaded, arch, monkeypatch):
    """The heads' Δ kept before ``W_O`` (rebuilt per layer, the default) equals the full
    ``[sender, pos, d_model]`` buffer for every kind of baseline, gives the same EAP / EAP-IG
    scores, also when the gradients are contracted a receiver chunk at a time; a per-position
    sender tensor falls back to the full buffer."""
    model = tiny_loaded(arch)[0]
    clean, corrupt, metric = _setup(model)
    g = C.build_graph(model)
    row = clean[None]
    means = C.sender_means(model, [clean, corrupt])
    torch.manual_seed(0)
    const = torch.randn(1, len(g.senders), int(model.cfg.d_model))
    per_pos = C.baseline_outputs(model, corrupt, g)[0]
    for base in ("zero", "mean", corrupt, const):
        full = C._delta_buffer(model, g, row, base, means, torch.float32, compact=False)
        small = C._delta_buffer(model, g, row, base, means, torch.float32, compact=True)
        assert small.compact and not full.compact and small.nbytes < full.nbytes
        torch.testing.assert_close(small.full(), full.full(), atol=1e-6, rtol=1e-5)
        for steps in (0, 2):
            a = C._eap_lean(model, g, row, base, means, metric, steps, compact=False)[0]
            b = C._eap_lean(model, g, row, base, means, metric, steps, compact=True)[0]
            torch.testing.assert_close(b, a, atol=2e-6 * float(a.abs().max()), rtol=0)
    assert not C._delta_buffer(model, g, row, per_pos, None, torch.float32, compact=True).compact
    ref = C._eap_lean(model, g, row, corrupt, None, metric, 0)[0]
    monkeypatch.setattr(C, "_gradient_group_bytes", lambda delta: 1)  # each receiver chunk on its own
    one = C._eap_lean(model, g, row, corrupt, None, metric, 0)[0]
    torch.testing.assert_close(one, ref, atol=2e-6 * float(ref.abs().max()), rtol=0)


@pytest.mark.parametrize("arch", ("LlamaForCausalLM", "Glm4ForCausalLM"))
def test_eap_is_first_order_exact(tiny_loaded, arch):
    """Baseline = clean outputs + a small perturbation: EAP equals exact patching on every edge
    (q, k, v, MLP, logits receivers) to first order; EAP-IG too."""
    model = tiny_loaded(arch)[0]
    clean, _, metric = _setup(model)
    g = C.build_graph(model)
    torch.manual_seed(0)
    acts = C.baseline_outputs(model, clean, g)[0]
    pert = acts + 1e-4 * torch.randn_like(acts)
    ex = C.edge_patching(model, clean, metric, pert, graph=g)
    scale = ex.values().abs().max()
    for method in C.EDGE_METHODS:
        est = C.edge_attribution(model, clean, metric, pert, method=method, graph=g)
        assert (est.values() - ex.values()).abs().max() < 0.05 * scale, method


@pytest.mark.parametrize("arch", ARCHS)
def test_eap_qkfix_is_exact_along_the_metric_stream(tiny_loaded, arch):
    """``eap-qkfix`` computes the metric position's own stream exactly: where the baseline differs
    from the clean run only at the last token, every edge's score equals exact edge patching; for
    any baseline, so do the edges into the last layer's receivers and into the logits. The
    baseline equal to the clean run scores every edge 0 (to float rounding)."""
    model = tiny_loaded(arch)[0]
    clean, corrupt, metric = _setup(model)
    g = C.build_graph(model)
    last = clean.clone()
    last[-1] = 50 if int(clean[-1]) != 50 else 51
    est = C.edge_attribution(model, clean, metric, last, method="eap-qkfix", graph=g)
    ex = C.edge_patching(model, clean, metric, last, graph=g)
    scale = float(ex.values().abs().max())
    assert scale > 1e-3
    torch.testing.assert_close(est.values(), ex.values(), atol=1e-4 * scale, rtol=0)
    assert est.metric_clean == pytest.approx(ex.metric_clean, abs=1e-4)
    top = torch.zeros_like(g.edges)
    top[:, g.receiver_slice(g.n_layers - 1, "q").start :] = True
    means = C.sender_means(model, [clean, corrupt], graph=g)
    for base in (corrupt, "zero", "mean"):
        est = C.edge_attribution(model, clean, metric, base, method="eap-qkfix", means=means, graph=g)
        ex = C.edge_patching(model, clean, metric, base, means=means, edges=top, graph=g)
        scale = float(ex.values().abs().max())
        torch.testing.assert_close(est.values(top), ex.values(), atol=1e-4 * scale, rtol=0)
    same = C.edge_attribution(model, clean, metric, clean, method="eap-qkfix", graph=g)
    assert float(same.values().abs().max()) < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_eap_qkfix_long_input_path_equals_the_short_one(tiny_loaded, arch, monkeypatch):
    """Long inputs run the clean pass on the fused kernel (linear memory) and every batch in small
    chunks; forced on a short input, the scores are those of the default path."""
    from mechthink import _qkfix

    model = tiny_loaded(arch)[0]
    clean, corrupt, metric = _setup(model)
    g = C.build_graph(model)
    ref = C.edge_attribution(model, clean, metric, corrupt, method="eap-qkfix", graph=g)
    monkeypatch.setattr(_qkfix, "_FUSED_FROM", 0)
    monkeypatch.setattr(_qkfix, "_CHUNK_ELEMENTS", 256)  # one sender and a few rows a chunk
    got = C.edge_attribution(model, clean, metric, corrupt, method="eap-qkfix", graph=g)
    assert got.metric_clean == pytest.approx(ref.metric_clean, abs=1e-5)
    torch.testing.assert_close(got.scores, ref.scores, atol=1e-4 * float(ref.scores.abs().max()), rtol=0)


def test_eap_qkfix_agrees_with_exact_patching(tiny_loaded):
    """Where the baseline differs over several positions, ``eap-qkfix`` ranks the edges as exact
    edge patching does, better than EAP (measured: Spearman 0.98 vs 0.92)."""
    from mechthink import stats

    model = tiny_loaded("Qwen2ForCausalLM")[0]
    clean, corrupt, metric = _setup(model)
    g = C.build_graph(model)
    ex = C.edge_patching(model, clean, metric, corrupt, graph=g)
    rho = {m: stats.spearman(C.edge_attribution(model, clean, metric, corrupt, method=m, graph=g).values(), ex.values())
           for m in ("eap", "eap-qkfix")}
    assert rho["eap-qkfix"] > 0.9 and rho["eap-qkfix"] > rho["eap"], rho


def test_eap_rank_agreement_and_metric(tiny_loaded):
    model = tiny_loaded("Qwen2ForCausalLM")[0]
    clean, corrupt, metric = _setup(model)
    eap = C.edge_attribution(model, clean, metric, corrupt)
    ex = C.edge_patching(model, clean, metric, corrupt)
    from mechthink import stats

    assert stats.spearman(eap.values(), ex.values()) > 0.6  # measured 0.92
    with torch.no_grad():
        assert eap.metric_clean == pytest.approx(float(metric(model.bridge(clean[None]))[0]), abs=1e-4)
        assert ex.metric_ablated == pytest.approx(float(metric(model.bridge(corrupt[None]))[0]), abs=1e-4)
    assert len(eap.to_frame()) == eap.graph.n_edges and eap.top(3)[0][0] in eap.graph.edge_labels()


def test_prune_and_faithfulness(tiny_loaded):
    model = tiny_loaded("LlamaForCausalLM")[0]
    clean, corrupt, metric = _setup(model)
    eap = C.edge_attribution(model, clean, metric, corrupt)
    circ = C.prune(eap, k=20)
    assert 0 < circ.n_edges <= 20
    # every kept edge lies on a path: its sender is fed (or is the embedding), its receiver feeds on
    g = circ.graph
    for u, v in circ.edges.nonzero().tolist():
        assert u == 0 or any(circ.edges[:, r].any() for r in range(len(g.receivers)) if u in g.receiver_nodes(r))
        assert v == g.logits_receiver or any(circ.edges[n].any() for n in g.receiver_nodes(v))
    full = C.prune(eap, k=g.n_edges)
    assert full.n_edges == g.n_edges
    curve = C.faithfulness(model, clean, metric, eap, corrupt, ks=[5, 20, g.n_edges])
    assert curve.faithfulness["eap"][-1] == pytest.approx(1.0, abs=1e-4)
    assert curve.n_edges["eap"][-1] == g.n_edges
    frame = curve.to_frame()
    assert list(frame["k"]) == [5, 20, g.n_edges]
    thr = float(eap.values().abs().sort(descending=True).values[19])
    assert C.prune(eap, threshold=thr).edges.equal(circ.edges)
    rnd = C.random_circuit(g, 7, seed=1)
    assert int(rnd.sum()) == 7 and not (rnd & ~g.edges).any()


def test_bad_input(tiny_loaded):
    model = tiny_loaded("LlamaForCausalLM")[0]
    clean, corrupt, metric = _setup(model)
    g = C.build_graph(model)
    eap = C.edge_attribution(model, clean, metric, corrupt, graph=g)
    with pytest.raises(ValueError, match="k=0"):
        C.prune(eap, k=0)
    with pytest.raises(ValueError, match="exactly one"):
        C.prune(eap)
    only_in = eap.scores.clone()
    only_in[:, g.logits_receiver] = 0.0  # no edge into the logits can be chosen first
    dead = C.EdgeScores(scores=only_in, graph=g, method="eap", baseline="x", metric_clean=0.0,
                        scored=g.edges & (torch.arange(len(g.receivers)) != g.logits_receiver))
    with pytest.raises(ValueError, match="no selected edge lies on a path"):
        C.prune(dead, k=5)
    with pytest.raises(ValueError, match="same length"):
        C.edge_attribution(model, clean, metric, corrupt[:-1], graph=g)
    with pytest.raises(ValueError, match="baseline tensor has shape"):
        C.edge_attribution(model, clean, metric, torch.zeros(3, 5, 7), graph=g)
    with pytest.raises(ValueError, match="needs means"):
        C.edge_attribution(model, clean, metric, "mean", graph=g)
    with pytest.raises(ValueError, match="method"):
        C.edge_attribution(model, clean, metric, "zero", method="acdc", graph=g)
    with pytest.raises(ValueError, match="ks="):
        C.faithfulness(model, clean, metric, eap, corrupt, ks=[0, 3])
    cases = {  # each a one-line ValueError naming the argument
        "k=-1": lambda: C.prune(eap, k=-1),
        "no selected edge lies on a path": lambda: C.prune(eap, threshold=1e9),
        "ablated has shape": lambda: C.run_with_ablated_edges(model, clean, g.edges[:, :-1], corrupt, graph=g),
        "edges selects no edge": lambda: C.edge_patching(model, clean, metric, corrupt, edges=torch.zeros_like(g.edges), graph=g),
        "baseline has 1 sequences for 2": lambda: C.edge_attribution(model, [clean, clean], metric, [corrupt], graph=g),
        "baseline tokens have length": lambda: C.edge_patching(model, clean, metric, corrupt[:-2], graph=g),
        "ig_steps=0": lambda: C.edge_attribution(model, clean, metric, corrupt, method="eap-ig-inputs", ig_steps=0, graph=g),
        "batch_size=0": lambda: C.edge_attribution(model, clean, metric, corrupt, batch_size=0, graph=g),
        "n_edges=0": lambda: C.random_circuit(g, 0),
        "position=": lambda: C.query_attention(model, clean, position=len(clean)),
        "parts mix methods": lambda: C.mean_scores([eap, C.EdgeScores(eap.scores, g, "exact", "x", 0.0)]),
        "estimates has 1 pairs and exact 0": lambda: C.rank_agreement([eap], []),
        "reads only the last position": lambda: C.edge_attribution(model, clean, A.logit_metric(2, 5), corrupt,
                                                                   method="eap-qkfix", graph=g),
        "must have the same length": lambda: C.edge_attribution(model, clean, metric, corrupt[:-1], method="eap-qkfix", graph=g),
        "needs means": lambda: C.edge_attribution(model, clean, metric, "mean", method="eap-qkfix", graph=g),
    }
    for needle, call in cases.items():
        with pytest.raises(ValueError) as err:
            call()
        assert needle in str(err.value) and "\n" not in str(err.value), (needle, str(err.value))


def test_analysis_config_checks_methods():
    from analyses import circuits as an

    with pytest.raises(ValueError, match="methods"):
        an.Config(methods="eap,acdc")
    with pytest.raises(ValueError, match="circuit_method"):
        an.Config(methods="eap", circuit_method="eap-ig-inputs")
    assert an.Config(methods="eap", circuit_method="eap").circuit_method == "eap"


def test_mean_scores_and_rank_agreement(tiny_loaded):
    """Scores of pairs scored apart and averaged = scored together; rho of exact against itself is 1."""
    model = tiny_loaded("Qwen2ForCausalLM")[0]
    clean, corrupt, metric = _setup(model)
    other, other_base = clean.clone(), corrupt.clone()
    other[1], other_base[1] = 77, 78
    g = C.build_graph(model)
    both = C.edge_attribution(model, [clean, other], metric, [corrupt, other_base], graph=g)
    parts = [C.edge_attribution(model, s, metric, b, graph=g) for s, b in ((clean, corrupt), (other, other_base))]
    mean = C.mean_scores(parts)
    torch.testing.assert_close(mean.scores, both.scores, atol=1e-6, rtol=1e-5)
    assert mean.n_samples == 2 and mean.metric_clean == pytest.approx(both.metric_clean, abs=1e-6)
    exact = [C.edge_patching(model, s, metric, b, graph=g) for s, b in ((clean, corrupt), (other, other_base))]
    same = C.rank_agreement(exact, exact, n_boot=50)
    assert same.rho == pytest.approx(1.0) and same.ci == pytest.approx((1.0, 1.0)) and same.rho_large == pytest.approx(1.0)
    r = C.rank_agreement(parts, exact, n_boot=50)
    assert r.ci[0] <= r.rho <= r.ci[1] or r.ci[0] <= r.ci[1]
    assert 0 < r.n_large <= r.n_edges == g.n_edges and r.n_pairs == 2
    assert list(r.to_frame()["rho"]) == [r.rho]


def test_plots_pass_layout_check(tiny_loaded):
    from mechthink.plotting.checks import layout_problems
    from mechthink.plotting.circuits import plot_circuits_overview

    model = tiny_loaded("LlamaForCausalLM")[0]
    clean, corrupt, metric = _setup(model)
    scores = {m: C.edge_attribution(model, clean, metric, corrupt, method=m) for m in C.EDGE_METHODS}
    curve = C.faithfulness(model, clean, metric, scores, corrupt, ks=[2, 5, 10, 40, 190])
    circ = C.prune(scores["eap-ig"], k=10)
    for fig in (curve.plot(), circ.plot(), scores["eap"].plot(), circ.graph.plot(),
                plot_circuits_overview(curve, circ, {"clean": 0.9, "circuit": 0.1, "random": 0.8}, model.spec.name)):
        assert layout_problems(fig) == []
    assert set(curve.to_frame()["method"]) == set(C.EDGE_METHODS)


def test_probability_and_attention_mass(tiny_loaded):
    model = tiny_loaded("LlamaForCausalLM")[0]
    clean, corrupt, _ = _setup(model)
    g = C.build_graph(model)
    ids = model.token_ids("Wait")
    p = C.token_probability(model, [clean, clean], torch.stack([torch.zeros_like(g.edges), g.edges]), ids, [corrupt, corrupt])
    with torch.no_grad():
        pc = model.bridge(clean[None])[0, -1].softmax(-1)[ids].sum()
        pb = model.bridge(corrupt[None])[0, -1].softmax(-1)[ids].sum()
    torch.testing.assert_close(p[0], torch.stack([pc, pb]), atol=1e-5, rtol=1e-4)
    mass = C.attention_mass(model, [clean], [(1, 0), (2, 3)], [list(range(len(clean)))])
    torch.testing.assert_close(mass, torch.ones(1, 2), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_analysis_on_tiny_thinker(tmp_path):
    from analyses import REGISTRY
    from analyses import circuits as an

    assert "circuits" in REGISTRY
    nums = an.main(an.Config(n_samples=4, n_exact=1, n_random=2, out=str(tmp_path)))
    assert (tmp_path / "circuits" / "tiny-thinker.png").exists()
    page = (tmp_path / "circuits" / nums["html_view"]).read_text()
    assert all(f'data-node="{h}"' in page for h in nums["circuit_heads"]) and "http" not in page
    assert nums["p_backtrack_clean"] > 0.5 and nums["n_edges_graph"] == 479
    assert set(nums["spearman_vs_exact"]) == set(C.EDGE_METHODS)


def _hooked(model) -> int:
    """Hook functions attached anywhere on the bridge."""
    return sum(len(hp._forward_hooks) + len(hp._backward_hooks) for hp in model.bridge.hook_dict.values())


@pytest.mark.parametrize("arch", ("LlamaForCausalLM", "Glm4ForCausalLM"))
def test_ablate_edges(tiny_loaded, arch):
    """No edge ablated = the clean run bit for bit; every edge = the corrupted run; a random set
    = run_with_ablated_edges; hooks and flags gone on exit, also when the block raises."""
    model = tiny_loaded(arch)[0]
    clean, corrupt, _ = _setup(model)
    g = C.build_graph(model)
    n_hooks = _hooked(model)
    with torch.no_grad():
        lc, lb = model.bridge(clean[None]), model.bridge(corrupt[None])
        with C.ablate_edges(model, torch.zeros_like(g.edges), corrupt, graph=g) as graph:
            assert graph is g
            none = model.bridge(clean[None])
        with C.ablate_edges(model, g.edges, corrupt, graph=g):
            assert _hooked(model) > n_hooks and model.bridge.cfg.use_split_qkv_input
            every = model.bridge(clean[None])
        rnd = torch.stack([C.random_circuit(g, 60, seed=s) for s in range(3)])
        with C.ablate_edges(model, rnd, corrupt, graph=g):
            some = model.bridge(clean[None].expand(3, -1))
    assert torch.equal(none, lc)
    torch.testing.assert_close(every, lb, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(some, C.run_with_ablated_edges(model, clean, rnd, corrupt, graph=g), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(some[0], lc[0], atol=1e-3)  # the ablation did something
    assert _hooked(model) == n_hooks and not model.bridge.cfg.use_split_qkv_input
    with pytest.raises(RuntimeError, match="inside"):
        with C.ablate_edges(model, g.edges, corrupt, graph=g):
            raise RuntimeError("inside")
    assert _hooked(model) == n_hooks and not model.bridge.cfg.use_attn_result and not model.bridge.cfg.use_hook_mlp_in
    with torch.no_grad(), pytest.raises(ValueError, match="same length"):  # a hook raising also cleans up
        with C.ablate_edges(model, g.edges, corrupt[:-1], graph=g):
            model.bridge(clean[None])
    with pytest.raises(ValueError, match="ablated has shape"):
        with C.ablate_edges(model, g.edges[:-1], corrupt, graph=g):
            pass
    assert _hooked(model) == n_hooks and not model.bridge.cfg.use_split_qkv_input
    with torch.no_grad():
        assert torch.equal(model.bridge(clean[None]), lc)


@pytest.mark.parametrize("arch", ("LlamaForCausalLM", "Glm4ForCausalLM"))
@pytest.mark.parametrize("method", ("eap-ig-inputs", "eap-ig-outputs"))
def test_eap_ig_paths_add_up_to_exact_patching(tiny_loaded, arch, method):
    """Completeness: the scores of one receiver's edges (``-inputs``) or of one sender's
    (``-outputs``) sum to exact patching of all those edges at once, for a corrupted input far
    from the clean one (midpoint rule, 16 steps); EAP, a first-order estimate, does not."""
    model = tiny_loaded(arch)[0]
    clean, corrupt, metric = _setup(model)
    g = C.build_graph(model)
    ig = C.edge_attribution(model, clean, metric, corrupt, method=method, ig_steps=16, graph=g)
    eap = C.edge_attribution(model, clean, metric, corrupt, graph=g)
    if method == "eap-ig-inputs":
        picks = [g.logits_receiver, g.receiver_slice(2, "mlp").start, g.receiver_slice(1, "q").start,
                 g.receiver_slice(2, "k").start, g.receiver_slice(1, "v").start]
        groups = [g.edges & (torch.arange(len(g.receivers)) == v)[None, :] for v in picks]
    else:
        picks = [0, g.head_sender(0, 1), g.mlp_sender(0), g.head_sender(1, 2), g.mlp_sender(2)]
        groups = [g.edges & (torch.arange(len(g.senders)) == u)[:, None] for u in picks]
    masks = torch.stack([torch.zeros_like(g.edges), *groups])
    m = metric(C.run_with_ablated_edges(model, clean, masks, corrupt, graph=g))
    exact = m[1:] - m[0]
    got = torch.stack([ig.scores[mk].sum() for mk in groups])
    first = torch.stack([eap.scores[mk].sum() for mk in groups])
    tol = 0.02 * exact.abs().max()
    assert (got - exact).abs().max() < tol, (got, exact)
    assert (first - exact).abs().max() > 2 * (got - exact).abs().max()  # the path integral is what helps


HOSTILE_TOKEN = "</script><script>document.title='PWNED'</script><img src=x onerror=\"document.title='PWNED'\">"


def test_circuit_html_view(tiny_loaded, tmp_path):
    """The HTML view is self-contained (no URL anywhere it could load from), draws every node and
    edge of the circuit, keeps hostile tokens as text, and its script shows a head's attention."""
    import json
    from html.parser import HTMLParser

    model = tiny_loaded("LlamaForCausalLM")[0]
    clean, corrupt, metric = _setup(model)
    g = C.build_graph(model)
    circ = C.prune(C.edge_attribution(model, clean, metric, corrupt, graph=g), k=15)
    att = C.query_attention(model, clean)
    with torch.no_grad():
        _, cache = model.bridge.run_with_cache(clean[None], names_filter=["blocks.1.attn.hook_pattern"])
    torch.testing.assert_close(att[1], cache["blocks.1.attn.hook_pattern"][0, :, -1], atol=1e-6, rtol=0)
    toks = model.to_str_tokens(clean)
    toks[2] = HOSTILE_TOKEN
    path = circ.to_html(tmp_path / "c.html", toks, att, title="<b>bold</b>")
    page = path.read_text()

    class Tags(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.tags: list[tuple[str, dict]] = []
            self.scripts: list[str] = []

        def handle_starttag(self, tag, attrs):
            self.tags.append((tag, dict(attrs)))

        def handle_data(self, data):
            if self.lasttag == "script":
                self.scripts.append(data)

    p = Tags()
    p.feed(page)
    names = {t for t, _ in p.tags}
    assert "img" not in names and "link" not in names and "iframe" not in names
    for tag, attrs in p.tags:
        assert not {"src", "href", "xlink:href", "onerror", "onload"} & set(attrs), (tag, attrs)
    assert "http:" not in page and "https:" not in page and "//" not in page.replace("://", "")
    assert "</script><script>document" not in page and "<b>bold" not in page
    assert [t for t, a in p.tags if t == "script"] == ["script", "script"]
    drawn = {a["data-node"] for t, a in p.tags if "data-node" in a}
    used = {g.senders[u] for u, _ in circ.edges.nonzero().tolist()}
    used |= {g.senders[n] if n >= 0 else "logits" for _, v in circ.edges.nonzero().tolist() for n in (g.receiver_nodes(v) or [-1])}
    assert used <= drawn and len(drawn) == len(g.senders) + 1
    assert sum(1 for t, a in p.tags if a.get("class") == "edge") == circ.n_edges
    off = {a["data-node"] for t, a in p.tags if a.get("class") == "node off"}
    assert not (used & off) and off == drawn - used
    data = json.loads(next(s for s in p.scripts if s.lstrip().startswith("{")))
    assert data["tokens"][2] == HOSTILE_TOKEN and len(data["attention"]) == g.n_layers * g.n_heads
    assert data["first"] == f"L{circ.heads[0][0]}H{circ.heads[0][1]}"
    with pytest.raises(ValueError, match="both str_tokens and attention"):
        circ.to_html(tmp_path / "x.html", toks)
    with pytest.raises(ValueError, match="attention has shape"):
        circ.to_html(tmp_path / "x.html", toks, att[:, :, :-1])
    from test_report import _render

    dom = _render(path)  # skips without chromium
    assert 'data-ready="1"' in dom and "PWNED" not in dom.split("<title>")[1].split("</title>")[0]
    tokens_div = dom.split('id="tokens"')[1].split("</div>")[0]
    assert tokens_div.count("<span") == len(toks) and "&lt;/script&gt;&lt;script&gt;document" in tokens_div
    assert "<img" not in dom
