"""Attribution patching vs exact patching, identities, mean activations (tiny random models)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from scipy.stats import spearmanr

import mechthink as mt
from conftest import TYPE_ERRORS
from mechthink import attribution as A
from mechthink.hooks import hook_name

pytestmark = pytest.mark.usefixtures("one_thread")
ARCH = "LlamaForCausalLM"
TEXT = "Hmm, the answer is 12. Alternatively, we could add"
DATA = [
    "Wait, let me check that again.",
    "So the answer is 42. Therefore",
    "Compute 3 + 5 - 2 + 7. First 3 + 5 = 8.",
    "The user asks a question about numbers.",
]


def _scaled(tiny_hf, scale: float):
    ref, tok = tiny_hf(ARCH)
    hf = copy.deepcopy(ref)
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return mt.load_model(f"tiny-random-{ARCH}-x{scale}", hf_model=hf, tokenizer=tok, device="cpu")


@pytest.fixture(scope="module")
def normal(tiny_loaded):
    return tiny_loaded(ARCH)[0]


@pytest.fixture(scope="module")
def near_linear(tiny_hf):
    """The same tiny model with 2-D weights scaled by 0.1: small activations, near-linear."""
    return _scaled(tiny_hf, 0.1)


def _setup(model):
    means = A.mean_activations(model, [model.to_tokens(t)[0] for t in DATA], hooks=A.NODE_TYPES)
    toks = model.to_tokens(TEXT)[0]
    metric = A.logit_metric(-1, model.token_ids("Wait"))
    return means, toks, metric


def _rho(model, nodes=("resid_pre", "attn_out", "mlp_out", "z")):
    means, toks, metric = _setup(model)
    atp = A.attribution_patching(model, toks, metric, "mean", nodes=nodes, means=means)
    ex = A.activation_patching(model, toks, metric, "mean", nodes=nodes, means=means, batch_size=64)
    assert atp.metric_clean == pytest.approx(ex.metric_clean, abs=1e-5)
    return {n: float(spearmanr(atp[n].flatten(), ex[n].flatten())[0]) for n in nodes}, atp, ex


def test_atp_matches_exact_near_linear(near_linear):
    rho, atp, ex = _rho(near_linear)
    # measured here: resid_pre 0.77, attn_out 1.00, mlp_out 1.00, z 1.00. Small weights make
    # attention and MLPs near-linear, but RMSNorm is scale-invariant, so replacing a whole
    # residual vector by the mean stays nonlinear: resid_pre gets a looser bound.
    for n, thr in {"resid_pre": 0.7, "attn_out": 0.95, "mlp_out": 0.95, "z": 0.95}.items():
        assert rho[n] >= thr, (n, rho[n])
    assert atp["z"].shape == (near_linear.n_layers, len(atp.tokens), near_linear.cfg.n_heads)
    assert atp["resid_pre"].shape == (near_linear.n_layers, len(atp.tokens))


def test_atp_is_first_order_exact(normal):
    """Baseline = clean activation + a small perturbation: AtP equals exact patching to first order."""
    toks = normal.to_tokens(TEXT)[0]
    metric = A.logit_metric(-1, normal.token_ids("Wait"))
    names = [hook_name(L, n) for n in A.NODE_TYPES for L in range(normal.n_layers)]
    _, cache = normal.bridge.run_with_cache(toks.unsqueeze(0), names_filter=names)
    g = torch.Generator().manual_seed(0)
    eps = 1e-2
    base = {}
    for h in names:
        a = cache[h][0].float()
        base[h] = a + eps * a.abs().mean() * torch.randn(a.shape, generator=g)
    atp = A.attribution_patching(normal, toks, metric, base, nodes=A.NODE_TYPES)
    ex = A.activation_patching(normal, toks, metric, base, nodes=A.NODE_TYPES, batch_size=64)
    assert atp.baseline == "custom"
    rho = {n: float(spearmanr(atp[n].flatten(), ex[n].flatten())[0]) for n in A.NODE_TYPES}
    for n in A.NODE_TYPES:
        assert rho[n] >= 0.95, (n, rho[n])
        err = (atp[n] - ex[n]).abs().max() / ex[n].abs().max()
        assert err < 0.1, (n, float(err))


def test_atp_vs_exact_normal_model(normal):
    """A random model with widened weights is strongly nonlinear (ρ per node type measured
    0.5-0.95; benchmarks/bench_attribution_rho.py prints them): AtP still ranks positively."""
    rho, _, _ = _rho(normal)
    assert all(v > 0.3 for v in rho.values()), rho


def test_ig_runs_and_tracks_exact(near_linear):
    means, toks, metric = _setup(near_linear)
    ig = A.attribution_patching(
        near_linear, toks, metric, "mean", nodes=("resid_pre", "z"), means=means, estimator="ig", ig_steps=4, ig_batch_size=5
    )
    ex = A.activation_patching(near_linear, toks, metric, "mean", nodes=("resid_pre",), means=means, batch_size=64)
    assert ig.method == "ig" and ig["z"].dim() == 3 and ig.config["ig_steps"] == 4
    rho = spearmanr(ig["resid_pre"].flatten(), ex["resid_pre"].flatten())[0]
    assert rho >= 0.85
    # the batch size only chunks the rows: one chunk per layer gives the same scores
    one = A.attribution_patching(near_linear, toks, metric, "mean", nodes=("z",), means=means, estimator="ig", ig_steps=4, ig_batch_size=64)
    torch.testing.assert_close(one["z"], ig["z"], atol=1e-5, rtol=1e-4)


def test_zero_when_baseline_is_the_clean_run(normal):
    toks = normal.to_tokens(TEXT)[0]
    metric = A.logit_metric(-1, normal.token_ids("Wait"))
    atp = A.attribution_patching(normal, toks, metric, baseline=toks, nodes=A.NODE_TYPES)
    for n in A.NODE_TYPES:
        assert torch.count_nonzero(atp[n]) == 0, n
    ex = A.activation_patching(normal, toks, metric, baseline=toks, nodes=("resid_pre", "z"), positions=[-1, 2], batch_size=8)
    assert torch.nanmean(ex["resid_pre"].abs()) < 1e-5 and torch.nanmean(ex["z"].abs()) < 1e-5
    ig = A.attribution_patching(normal, toks, metric, baseline=toks, nodes=("mlp_out",), estimator="ig", ig_steps=2)
    assert torch.count_nonzero(ig["mlp_out"]) == 0


def test_linear_metric_of_final_resid_equals_exact(normal):
    """Metric = w · (final residual at the last position): AtP is exact for the last layer's
    resid_post and mlp_out (the metric is linear in them), any baseline."""
    bridge = normal.bridge
    hp = bridge.hook_dict["ln_final.hook_in"]
    store: dict[str, torch.Tensor] = {}
    w = torch.randn(normal.d_model, generator=torch.Generator().manual_seed(0))

    def grab(act, hook):
        store["x"] = act
        return act

    def metric(logits):
        return store["x"][:, -1].float() @ w

    toks = normal.to_tokens(TEXT)[0]
    hp.add_hook(grab, is_permanent=True)
    try:
        nodes = ("resid_post", "mlp_out")
        atp = A.attribution_patching(normal, toks, metric, baseline="zero", nodes=nodes)
        last = normal.n_layers - 1
        ex = A.activation_patching(normal, toks, metric, baseline="zero", nodes=nodes, layers=[last], batch_size=32)
    finally:
        hp.remove_hooks("fwd", including_permanent=True)
    for n in nodes:
        torch.testing.assert_close(atp[n][last], ex[n][last], atol=1e-4, rtol=1e-4)
        assert atp[n][last, :-1].abs().max() == 0  # other positions cannot reach the metric
    assert not hp.fwd_hooks


def test_model_left_untouched(normal):
    params = [p.requires_grad for p in normal.bridge.parameters()]
    means, toks, metric = _setup(normal)
    A.attribution_patching(normal, toks, metric, "mean", nodes=("resid_pre",), means=means)
    assert [p.requires_grad for p in normal.bridge.parameters()] == params
    assert all(p.grad is None for p in normal.bridge.parameters())
    assert not any(hp.fwd_hooks for hp in normal.bridge.hook_dict.values())
    with torch.inference_mode():  # callers inside inference mode still get gradients
        r = A.attribution_patching(normal, toks, metric, "zero", nodes=("resid_pre",))
    assert torch.isfinite(r["resid_pre"]).all() and r["resid_pre"].abs().sum() > 0


def test_mean_activations_streaming_save_resume(normal, tmp_path):
    samples = [normal.to_tokens(t)[0] for t in DATA]
    hooks = ["blocks.1.hook_resid_pre", "blocks.0.attn.hook_z"]
    full = A.mean_activations(normal, samples, hooks=hooks)
    # reference: concatenate every cached position except the BOS
    acc = {h: [] for h in hooks}
    for s in samples:
        _, cache = normal.bridge.run_with_cache(s.unsqueeze(0), names_filter=hooks)
        for h in hooks:
            acc[h].append(cache[h][0, 1:])
    for h in hooks:
        ref = torch.cat(acc[h]).double().mean(0).float()
        torch.testing.assert_close(full[h], ref, atol=1e-5, rtol=1e-5)
    assert full.count == sum(len(s) - 1 for s in samples) and full.n_samples == 4
    assert full["blocks.0.attn.hook_z"].shape == (normal.cfg.n_heads, normal.cfg.d_head)
    part = A.mean_activations(normal, samples[:2], hooks=hooks)
    path = part.save(tmp_path / "means.safetensors")
    assert json.loads((tmp_path / "means.safetensors.json").read_text())["count"] == part.count
    resumed = A.mean_activations(normal, samples[2:], hooks=hooks, resume=A.MeanActivations.load(path))
    for h in hooks:
        torch.testing.assert_close(resumed[h], full[h])
    assert resumed.count == full.count
    lists = A.mean_activations(normal, [s.tolist() for s in samples], hooks="resid_pre", skip_bos=False)
    assert len(lists.hooks) == normal.n_layers and lists.count == sum(len(s) for s in samples)
    with pytest.raises(ValueError, match="does not exist"):
        A.mean_activations(normal, samples, hooks=["blocks.0.hook_nope"])


def test_metrics_and_result_api(normal):
    logits = torch.randn(3, 5, 11)
    torch.testing.assert_close(A.logit_metric(-1, 4)(logits), logits[:, -1, 4])
    torch.testing.assert_close(A.logit_metric(2, [1, 3], reduce="sum")(logits), logits[:, 2, 1] + logits[:, 2, 3])
    torch.testing.assert_close(A.logit_diff_metric(-1, 1, [2, 3])(logits), logits[:, -1, 1] - logits[:, -1, [2, 3]].mean(-1))
    lp = A.logit_metric(-1, 4, log_probs=True)(logits)
    torch.testing.assert_close(lp, logits[:, -1].log_softmax(-1)[:, 4])
    with pytest.raises(ValueError):
        A.logit_metric(-1, 4, reduce="median")

    means, toks, metric = _setup(normal)
    scalar_metric = lambda lg: lg[0, -1, normal.token_ids("Wait")].mean()  # noqa: E731
    r = A.attribution_patching(normal, toks, scalar_metric, "mean", nodes=("resid_pre", "z"), means=means)
    r2 = A.attribution_patching(normal, toks, metric, "mean", nodes=("resid_pre", "z"), means=means)
    torch.testing.assert_close(r["z"], r2["z"])
    imp = r.token_importance()
    assert imp.shape == (len(toks),)
    torch.testing.assert_close(imp, r["resid_pre"].max(0).values)
    assert r.token_importance("z", reduce="sum").shape == (len(toks),)
    torch.testing.assert_close(r.token_importance(sign=-1, reduce="max"), (-r["resid_pre"]).max(0).values)
    df = r.to_frame()
    assert len(df) == normal.n_layers * len(toks) * (1 + normal.cfg.n_heads)
    assert set(df.node) == {"resid_pre", "z"}
    js = json.loads(r.to_json())
    assert js["str_tokens"] == r.str_tokens and len(js["scores"]["z"]) == normal.n_layers
    fig = r.plot()
    assert fig.axes
    with pytest.raises(ValueError, match="means"):
        A.attribution_patching(normal, toks, metric, "mean", nodes=("resid_pre",))
    with pytest.raises(ValueError, match="unknown node"):
        A.attribution_patching(normal, toks, metric, "zero", nodes=("resid_mid",))
    with pytest.raises(TYPE_ERRORS):  # jaxtyping binds "pos" to the clean length first
        A.attribution_patching(normal, toks, metric, toks[:-1], nodes=("resid_pre",))


@pytest.mark.parametrize("arch", ["Qwen2ForCausalLM", "Qwen3ForCausalLM"])
def test_other_architectures(tiny_loaded, arch):
    model = tiny_loaded(arch)[0]
    toks = model.to_tokens(TEXT)[0]
    metric = A.logit_metric(-1, model.token_ids("Wait"))
    atp = A.attribution_patching(model, toks, metric, "zero", nodes=("resid_pre", "z"))
    ex = A.activation_patching(model, toks, metric, "zero", nodes=("z",), layers=[model.n_layers - 1], batch_size=64)
    rho = spearmanr(atp["z"][-1].flatten(), ex["z"][-1].flatten())[0]
    assert rho > 0.5


@pytest.mark.slow
def test_smollm2_resid_pre_rho(smollm2):
    """SmolLM2-135M, 16-token prompt, resid_pre, mean-over-prompt baseline; every 3rd layer."""
    model = smollm2[0]
    text = "Tom has 3 apples and buys 5 more. So he has 8 apples. Wait"
    toks = model.to_tokens(text)[0][:16]
    means = A.mean_activations(model, [toks], hooks="resid_pre")
    metric = A.logit_metric(-1, model.token_ids("Wait"))
    layers = list(range(0, model.n_layers, 3))
    atp = A.attribution_patching(model, toks, metric, "mean", nodes=("resid_pre",), means=means)
    ex = A.activation_patching(model, toks, metric, "mean", nodes=("resid_pre",), means=means, layers=layers, batch_size=40)
    a, e = atp["resid_pre"][layers].flatten(), ex["resid_pre"][layers].flatten()
    # Plain AtP's ρ is not asserted (benchmarks/bench_attribution_rho.py prints it): replacing a
    # whole residual vector of a real model by the mean is far outside its linear regime (measured
    # ρ ~ -0.1 here; AtP overshoots exact ~10x at the query position). The QK-fix keeps the
    # pattern and metric-stream effects exact.
    assert atp.metric_clean == pytest.approx(ex.metric_clean, rel=1e-4, abs=1e-4)
    assert torch.isfinite(a).all() and torch.isfinite(e).all()
    qk = A.attribution_patching(model, toks, metric, "mean", nodes=("resid_pre",), means=means, estimator="qkfix")
    rho_qk = float(spearmanr(qk["resid_pre"][layers].flatten(), e)[0])
    assert rho_qk >= 0.8, rho_qk  # measured 0.87 over all 30 layers
    assert torch.allclose(qk["resid_pre"][layers, -1], ex["resid_pre"][layers, -1], atol=1e-4)


@pytest.mark.slow
def test_smollm2_rho_per_node_type(smollm2):
    """Per node type on SmolLM2 (16 tokens, every 5th layer): single heads are near-linear for
    AtP, and the QK-fix ranks attn_out / mlp_out at least as well as AtP. The ρ values are
    printed by benchmarks/bench_attribution_rho.py."""
    model = smollm2[0]
    toks = model.to_tokens("Tom has 3 apples and buys 5 more. So he has 8 apples. Wait")[0][:16]
    nodes = ("attn_out", "mlp_out", "z")
    means = A.mean_activations(model, [toks], hooks=nodes)
    metric = A.logit_metric(-1, model.token_ids("Wait"))
    layers = list(range(0, model.n_layers, 5))
    atp = A.attribution_patching(model, toks, metric, "mean", nodes=nodes, means=means)
    ex = A.activation_patching(model, toks, metric, "mean", nodes=nodes, means=means, layers=layers, batch_size=48)
    rho = {n: float(spearmanr(atp[n][layers].flatten(), ex[n][layers].flatten())[0]) for n in nodes}
    assert all(torch.isfinite(atp[n]).all() for n in nodes)
    assert rho["z"] > 0.5, rho  # single heads are near-linear
    # QK-fix for the sublayer outputs (z is ~4x dearer; measured 0.98 vs AtP's 0.95)
    qk = A.attribution_patching(model, toks, metric, "mean", nodes=("attn_out", "mlp_out"), means=means, estimator="qkfix")
    rho_qk = {n: float(spearmanr(qk[n][layers].flatten(), ex[n][layers].flatten())[0]) for n in ("attn_out", "mlp_out")}
    assert rho_qk["attn_out"] >= rho["attn_out"] and rho_qk["mlp_out"] >= rho["mlp_out"], (rho, rho_qk)


# ------------------------------------------------------------------------------ AtP* QK-fix
QK_ARCHS = ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Glm4ForCausalLM"]
RESID = ("resid_pre", "resid_post")
ALL = A.NODE_TYPES


def _corrupted(model, toks, seed=0):
    g = torch.Generator().manual_seed(seed)
    other = torch.randint(5, int(model.cfg.d_vocab), toks.shape, generator=g)
    other[0] = toks[0]  # same BOS / first token
    return other


@pytest.mark.parametrize("arch", QK_ARCHS)
def test_qkfix_exact_where_nothing_is_linearised(tiny_loaded, arch):
    """QK-fix keeps the patched position's stream, the key/value column it changes and the metric
    position's stream exact; only positions strictly between p and the last stay linear. So it must
    equal exact patching on the last layer, at the last position, and everywhere on a 2-token
    sequence, for every node type and each layout (Qwen2 biases, Qwen3 q/k norms, GLM-4 partial
    rotary and sandwich norms, GQA in all four)."""
    model = tiny_loaded(arch)[0]
    toks = model.to_tokens(TEXT)[0]
    other = _corrupted(model, toks)
    metric = A.logit_metric(-1, model.token_ids("Wait"))
    q = A.attribution_patching(model, toks, metric, other, nodes=ALL, estimator="qkfix")
    ex = A.activation_patching(model, toks, metric, other, nodes=ALL, batch_size=64)
    assert q.method == "qkfix" and q.config["estimator"] == "qkfix" and q.config["ig_steps"] is None
    assert q["z"].shape == ex["z"].shape == (model.n_layers, len(toks), model.cfg.n_heads)
    for n in ALL:
        tol = 1e-4 * max(1.0, float(ex[n].abs().max()))
        assert torch.allclose(q[n][-1], ex[n][-1], atol=tol), (n, (q[n][-1] - ex[n][-1]).abs().max())
        assert torch.allclose(q[n][:, -1], ex[n][:, -1], atol=tol), (n, (q[n][:, -1] - ex[n][:, -1]).abs().max())
    # resid_post of layer L is resid_pre of layer L + 1 (same activations, same corrupted baseline)
    assert torch.allclose(q["resid_post"][:-1], q["resid_pre"][1:], atol=1e-4)
    # the final resid_post reaches the metric only at the last position
    assert torch.count_nonzero(q["resid_post"][-1, :-1]) == 0
    q2 = A.attribution_patching(model, toks[:2], metric, other[:2], nodes=ALL, estimator="qkfix")
    ex2 = A.activation_patching(model, toks[:2], metric, other[:2], nodes=ALL, batch_size=64)
    for n in ALL:
        assert torch.allclose(q2[n], ex2[n], atol=1e-4 * max(1.0, float(ex2[n].abs().max()))), n


def test_qkfix_first_order_exact_and_better_than_atp(normal):
    """Small perturbation: QK-fix agrees with exact patching to first order (so the linearised
    column terms use the right gradients); mean ablation: it ranks nodes at least as well as AtP."""
    toks = normal.to_tokens(TEXT)[0]
    metric = A.logit_metric(-1, normal.token_ids("Wait"))
    names = [hook_name(L, n) for n in ALL for L in range(normal.n_layers)]
    _, cache = normal.bridge.run_with_cache(toks.unsqueeze(0), names_filter=names)
    g = torch.Generator().manual_seed(0)
    base = {h: cache[h][0] + 1e-2 * cache[h][0].abs().mean() * torch.randn(cache[h][0].shape, generator=g) for h in names}
    q = A.attribution_patching(normal, toks, metric, base, nodes=ALL, estimator="qkfix")
    ex = A.activation_patching(normal, toks, metric, base, nodes=ALL, batch_size=64)
    for n in ALL:
        err = (q[n] - ex[n]).abs().max() / ex[n].abs().max()
        assert err < 0.05, (n, float(err))
    means, toks, metric = _setup(normal)
    q = A.attribution_patching(normal, toks, metric, "mean", nodes=("resid_pre",), means=means, estimator="qkfix")
    a = A.attribution_patching(normal, toks, metric, "mean", nodes=("resid_pre",), means=means)
    ex = A.activation_patching(normal, toks, metric, "mean", nodes=("resid_pre",), means=means, batch_size=64)
    rq = float(spearmanr(q["resid_pre"].flatten(), ex["resid_pre"].flatten())[0])
    ra = float(spearmanr(a["resid_pre"].flatten(), ex["resid_pre"].flatten())[0])
    assert rq >= max(ra, 0.8), (ra, rq)


def test_qkfix_saturated_columns_recomputed_consistently(normal, monkeypatch):
    """The closed-form column update and the exact row recompute (used where the clean weight on
    the column is > 0.5) agree when either is used for every entry."""
    from mechthink import _qkfix

    means, toks, metric = _setup(normal)
    out = {}
    for thr in (2.0, -1.0):
        monkeypatch.setattr(_qkfix, "_RECOMPUTE_ABOVE", thr)
        out[thr] = A.attribution_patching(normal, toks, metric, "mean", nodes=("resid_pre",), means=means, estimator="qkfix")["resid_pre"]
    assert torch.allclose(out[2.0], out[-1.0], atol=1e-3 * float(out[-1.0].abs().max()))


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Glm4ForCausalLM"])
def test_qkfix_long_input_path_equals_the_materialised_one(tiny_loaded, arch, monkeypatch):
    """Long inputs run the QK-fix clean pass on the fused kernel with block-wise log-sum-exp and
    8 unembedded positions (linear memory); forced on a short input it gives the scores of the
    materialised-pattern path, and still refuses a metric that reads another position."""
    from mechthink import _qkfix

    model = tiny_loaded(arch)[0]
    toks = model.to_tokens(TEXT)[0]
    metric = A.logit_metric(-1, model.token_ids("Wait"))
    nodes = ("resid_pre", "attn_out", "z")
    ref = A.attribution_patching(model, toks, metric, "zero", nodes=nodes, estimator="qkfix")
    monkeypatch.setattr(_qkfix, "_FUSED_FROM", 0)
    monkeypatch.setattr(_qkfix, "_CHUNK_ELEMENTS", 64)  # several query blocks and recompute blocks
    assert _qkfix._fused(len(toks))
    got = A.attribution_patching(model, toks, metric, "zero", nodes=nodes, estimator="qkfix")
    assert got.metric_clean == pytest.approx(ref.metric_clean, abs=1e-5)
    for n in nodes:
        torch.testing.assert_close(got[n], ref[n], atol=1e-4 * max(1.0, float(ref[n].abs().max())), rtol=1e-4)
    with pytest.raises(ValueError, match="last position"):
        A.attribution_patching(model, toks, A.logit_metric(-2, model.token_ids("Wait")), "zero", nodes=("resid_pre",), estimator="qkfix")


def test_qkfix_errors(tiny_loaded):
    model = tiny_loaded("Qwen2ForCausalLM")[0]
    toks = model.to_tokens(TEXT)[0]
    metric = A.logit_metric(-1, model.token_ids("Wait"))
    with pytest.raises(ValueError, match="last position"):
        A.attribution_patching(model, toks, A.logit_metric(-2, model.token_ids("Wait")), "zero", nodes=("resid_pre",), estimator="qkfix")
    with pytest.raises(ValueError, match="apply to estimator='ig' only"):
        A.attribution_patching(model, toks, metric, "zero", nodes=("resid_pre",), estimator="qkfix", ig_steps=2)
    cfg = model.bridge.original_model.config
    cfg.use_sliding_window = True
    try:
        with pytest.raises(ValueError, match="does not support .*sliding-window"):
            A.attribution_patching(model, toks, metric, "zero", nodes=("resid_pre",), estimator="qkfix")
    finally:
        cfg.use_sliding_window = False
    with pytest.raises(ValueError, match="estimator='qkfix' needs a metric"):  # a scalar metric over all positions
        A.attribution_patching(model, toks, lambda lg: lg[:, :, 5].sum(), "zero", nodes=("z",), estimator="qkfix")


def test_qkfix_organism_rho_goal():
    """ρ ≥ 0.8 for resid nodes on tiny-thinker (planted-error examples, " Wait" logit,
    dataset-mean baseline). Plain AtP measures ~0.3 here."""
    from mechthink.models.organism import HELD_OUT_SEED, held_out_examples

    model = mt.load_model("tiny-thinker")
    ex = held_out_examples(60, seed=HELD_OUT_SEED)
    means = A.mean_activations(model, [e.input_ids for e in ex], hooks=ALL)
    metric = A.logit_metric(-1, model.token_variants("Wait")[" Wait"])
    rhos = {n: [] for n in ALL}
    for e in [e for e in ex if e.is_error][:4]:
        ids = torch.tensor(e.input_ids)
        q = A.attribution_patching(model, ids, metric, "mean", nodes=ALL, means=means, estimator="qkfix")
        x = A.activation_patching(model, ids, metric, "mean", nodes=ALL, means=means, batch_size=128)
        for n in ALL:
            rhos[n].append(float(spearmanr(q[n].flatten(), x[n].flatten())[0]))
    mean = {n: sum(v) / len(v) for n, v in rhos.items()}
    assert mean["resid_pre"] >= 0.8 and mean["resid_post"] >= 0.8, mean


# ------------------------------------------------------------------ estimators, comparison, heads
def test_estimator_dispatch_and_bad_combinations(normal):
    means, toks, metric = _setup(normal)
    toks = toks[:6]
    kw = dict(nodes=("resid_pre",), means=means)
    plain = A.attribution_patching(normal, toks, metric, "mean", **kw)
    assert plain.method == "atp" and plain.config["estimator"] == "atp"
    default_ig = A.attribution_patching(normal, toks, metric, "mean", estimator="ig", **kw)
    explicit = A.attribution_patching(normal, toks, metric, "mean", estimator="ig", ig_steps=A.DEFAULT_IG_STEPS, **kw)
    assert default_ig.config["ig_steps"] == A.DEFAULT_IG_STEPS
    torch.testing.assert_close(default_ig["resid_pre"], explicit["resid_pre"])
    with pytest.raises(TYPE_ERRORS):  # a ValueError naming the estimators, or the Literal check
        A.attribution_patching(normal, toks, metric, "mean", estimator="exact", **kw)
    with pytest.raises(ValueError, match="estimator='exact' is not accepted"):
        A._estimator_options("exact", None, None)
    for bad, match in [
        (dict(estimator="atp", ig_steps=4), "apply to estimator='ig' only"),
        (dict(estimator="atp", ig_batch_size=4), "apply to estimator='ig' only"),
        (dict(estimator="ig", ig_steps=0), "ig_steps=0"),
    ]:
        with pytest.raises(ValueError, match=match):
            A.attribution_patching(normal, toks, metric, "mean", **kw, **bad)


def test_compare_estimators_matches_direct_calls(normal):
    """compare_estimators = the same attribution_patching / activation_patching calls; its ρ
    table = scipy's spearmanr on those results."""
    means, toks, metric = _setup(normal)
    seqs = [toks, normal.to_tokens(DATA[2])[0]]
    comp = A.compare_estimators(
        normal, seqs, metric, means=means, estimators={"atp": ("resid_pre", "z"), "qkfix": ("resid_pre",)}, n_exact=1
    )
    assert comp.methods == ["atp", "qkfix", "exact"] and comp.estimators == ["atp", "qkfix"]
    assert [len(comp.results[m]) for m in comp.methods] == [2, 2, 1]
    for i, seq in enumerate(seqs):
        ref = A.attribution_patching(normal, seq, metric, "mean", nodes=("resid_pre", "z"), means=means)
        torch.testing.assert_close(comp.results["atp"][i]["z"], ref["z"])
    ex = A.activation_patching(normal, seqs[0], metric, "mean", nodes=("resid_pre",), means=means, batch_size=64)
    torch.testing.assert_close(comp.results["exact"][0]["resid_pre"], ex["resid_pre"])
    table = comp.spearman()
    assert table.rho.shape == (2, 1, 1) and table.n_samples == 1
    want = float(spearmanr(comp.results["qkfix"][0]["resid_pre"].flatten(), ex["resid_pre"].flatten())[0])
    assert table.per_sample("resid_pre")["qkfix"] == [pytest.approx(want, abs=1e-12)]
    assert table.mean("resid_pre")["qkfix"] == pytest.approx(want, abs=1e-12)
    assert set(table.mean()) == {"atp/resid_pre", "qkfix/resid_pre"}
    imp = comp.importances("atp")
    torch.testing.assert_close(imp[1], (-comp.results["atp"][1]["resid_pre"]).max(0).values)
    assert len(table.to_frame()) == 2 and table.plot().axes
    frame = comp.to_frame()
    assert set(frame["method"]) == {"atp", "qkfix", "exact"} and set(frame["sample"]) == {0, 1}
    assert len(comp.plot().axes) >= 3
    empty = A.compare_estimators(normal, seqs[:1], metric, means=means, n_exact=0).spearman()
    assert empty.mean() == {} and empty.mean("resid_pre") == {"atp": 0.0, "qkfix": 0.0}
    with pytest.raises(ValueError, match="not accepted"):
        A.compare_estimators(normal, seqs, metric, means=means, estimators={"exact": ("resid_pre",)})
    with pytest.raises(ValueError, match="node='z'"):
        table.per_sample("z")


def test_rank_heads_matches_manual_ranking(normal):
    means, toks, metric = _setup(normal)
    results = [A.attribution_patching(normal, normal.to_tokens(t)[0], metric, "mean", nodes=("z",), means=means) for t in DATA[:3]]
    ranking = A.rank_heads(results, k=4)
    # reference: the mean over sequences of each head's summed z score, negated, sorted by hand
    support = {}
    for L in range(normal.n_layers):
        for h in range(normal.cfg.n_heads):
            support[(L, h)] = -sum(float(r["z"][L, :, h].sum()) for r in results) / len(results)
    want = sorted(support, key=lambda lh: -support[lh])[:4]
    assert ranking.heads == want
    assert ranking.labels == [f"L{L}H{h}" for L, h in want]
    assert ranking.top_support == [pytest.approx(support[lh], rel=1e-5, abs=1e-6) for lh in want]
    frame = ranking.to_frame()
    assert len(frame) == normal.n_layers * normal.cfg.n_heads
    assert [tuple(r) for r in frame.sort_values("rank")[["layer", "head"]].head(4).itertuples(index=False)] == want
    assert ranking.plot().axes and json.loads(ranking.to_json())["heads"] == [list(lh) for lh in want]
    with pytest.raises(ValueError, match="nodes=\\('z'"):
        A.rank_heads([A.attribution_patching(normal, toks, metric, "mean", nodes=("resid_pre",), means=means)])


def test_mean_activations_views(normal):
    means = A.mean_activations(normal, [normal.to_tokens(t)[0] for t in DATA], hooks=("resid_pre",))
    frame = means.to_frame()
    assert len(frame) == normal.n_layers
    assert frame["mean_norm"].iloc[1] == pytest.approx(float(means["blocks.1.hook_resid_pre"].norm()), rel=1e-6)
    js = json.loads(means.to_json())
    assert js["count"] == means.count and len(js["means"]["blocks.0.hook_resid_pre"]) == normal.d_model
    assert means.plot().axes


# ------------------------------------------------------------------- fused-kernel attention
@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Glm4ForCausalLM"])
@pytest.mark.parametrize("estimator", ["atp", "ig"])
def test_scores_on_the_fused_kernel_equal_the_exact_path(tiny_loaded, arch, estimator):
    """Every node type, ``z`` included, scores the same with the SDPA forward (forced on for
    these short inputs, ``min_scores=0``) as with the bridge's exact attention."""
    from mechthink.models.fast_attention import fast_attention

    model = tiny_loaded(arch)[0]
    toks = model.to_tokens(TEXT)[0]
    metric = A.logit_metric(-1, model.token_ids("Wait"))
    kw = dict(nodes=A.NODE_TYPES, estimator=estimator, **({"ig_steps": 2} if estimator == "ig" else {}))
    exact = A.attribution_patching(model, toks, metric, "zero", fast=False, **kw)
    with fast_attention(model, min_scores=0) as fa:
        fast = A.attribution_patching(model, toks, metric, "zero", **kw)
    assert fa.fast_calls > 0 and fa.exact_calls == 0
    assert fast.metric_clean == pytest.approx(exact.metric_clean, abs=1e-5)
    for n in A.NODE_TYPES:
        scale = max(1.0, float(exact[n].abs().max()))
        assert float((fast[n] - exact[n]).abs().max()) <= 1e-4 * scale, n


def test_last_position_metrics_unembed_only_what_they_read(normal):
    """logit_metric / logit_diff_metric at a negative position declare ``logits_to_keep``; the
    forwards then unembed only those positions, and every score equals the full-logits run
    (the same metric without the declaration)."""
    means, toks, metric = _setup(normal)
    diff = A.logit_diff_metric(-2, normal.token_ids("Wait"), normal.token_ids("So"))
    assert metric.logits_to_keep == 1 and diff.logits_to_keep == 2
    assert not hasattr(A.logit_metric(3, 5), "logits_to_keep")
    assert A.logits_kwargs(normal, metric) == {"logits_to_keep": 1}
    assert A.logits_kwargs(normal, lambda lg: lg[:, -1, 0]) == {}
    shapes = []
    normal.bridge.unembed.add_hook(lambda x, hook: shapes.append(tuple(x.shape)) or x)  # noqa: B023
    try:
        for m in (metric, diff):
            plain = lambda lg, m=m: m(lg)  # noqa: E731 - the same metric without logits_to_keep
            for fn, kw in ((A.attribution_patching, {"nodes": ("resid_pre", "z")}),
                           (A.attribution_patching, {"nodes": ("mlp_out",), "estimator": "ig", "ig_steps": 2}),
                           (A.activation_patching, {"nodes": ("resid_pre",), "layers": [1], "batch_size": 4})):
                shapes.clear()
                kept = fn(normal, toks, m, "mean", means=means, **kw)
                assert shapes and all(s[1] <= m.logits_to_keep < len(toks) for s in shapes), shapes
                full = fn(normal, toks, plain, "mean", means=means, **kw)
                assert kept.metric_clean == pytest.approx(full.metric_clean, abs=1e-6)
                for n in kept.scores:
                    torch.testing.assert_close(kept.scores[n], full.scores[n], atol=1e-6, rtol=1e-5, equal_nan=True)
    finally:
        normal.bridge.unembed.remove_hooks()
