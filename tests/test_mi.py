"""Tests for mechthink.mi (HSIC MI trajectories and MI peaks, Qian et al. 2025)."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

import mechthink as mt
from mechthink import mi as mmi

# ---------------------------------------------------------------------------------------------
# Independent references
# ---------------------------------------------------------------------------------------------


def ref_paper_mi(x: np.ndarray, y: np.ndarray, sigma: float = 50.0, eps: float = 1e-5) -> float:
    """The paper's formula written out entry by entry (float64)."""
    m = len(x)

    def centred_kernel(v: np.ndarray) -> np.ndarray:
        k = np.empty((m, m))
        for i in range(m):
            for j in range(m):
                k[i, j] = math.exp(-((v[i] - v[j]) ** 2) / (2.0 * sigma * sigma))
        h = np.empty((m, m))
        for i in range(m):
            for j in range(m):
                h[i, j] = (1.0 if i == j else 0.0) - 1.0 / m
        return k @ h  # centred on one side only, as in the paper's kernelmat

    kxc, kyc = centred_kernel(x), centred_kernel(y)
    rx = kxc @ np.linalg.inv(kxc + eps * m * np.eye(m))
    ry = kyc @ np.linalg.inv(kyc + eps * m * np.eye(m))
    total = 0.0
    for i in range(m):
        for j in range(m):
            total += rx[i, j] * ry[j, i]  # sum(Rx * Ry.T)
    return total


def paper_code(x: torch.Tensor, y: torch.Tensor, sigma: float = 50.0, dtype: torch.dtype = torch.float32) -> float:
    """ChnQ/MI-Peaks src/mi_estimators.py, hsic_normalized_cca, re-typed.

    The released code casts kernels with ``.type(torch.FloatTensor)``; ``dtype`` replaces that cast.
    """

    def distmat(X: torch.Tensor) -> torch.Tensor:
        r = torch.sum(X * X, 1).view([-1, 1])
        a = torch.mm(X, X.T)
        return torch.abs(r.expand_as(a) - 2 * a + r.T.expand_as(a))

    def kernelmat(X: torch.Tensor) -> torch.Tensor:
        X = X.view(-1, 1)
        m = X.shape[0]
        H = torch.eye(m, dtype=dtype) - (1.0 / m) * torch.ones([m, m], dtype=dtype)
        Kx = torch.exp(-distmat(X) / (2.0 * sigma * sigma * X.shape[1])).to(dtype)
        return torch.mm(Kx, H)

    m = x.shape[0]
    kxc, kyc = kernelmat(x.to(dtype)), kernelmat(y.to(dtype))
    e = 1e-5
    eye = torch.eye(m, dtype=dtype)
    rx = kxc.mm(torch.inverse(kxc + e * m * eye))
    ry = kyc.mm(torch.inverse(kyc + e * m * eye))
    return float(torch.sum(rx * ry.t()))


def ref_hsic_biased(k: np.ndarray, l: np.ndarray) -> float:
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(k @ h @ l @ h)) / (n - 1) ** 2


def ref_hsic_unbiased_ustat(k: np.ndarray, l: np.ndarray) -> float:
    """U-statistic over ordered 4-tuples of distinct indices (Song et al. 2012, Thm. 2)."""
    n = k.shape[0]
    total, count = 0.0, 0
    for i, j, q, r in itertools.permutations(range(n), 4):
        total += k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2.0 * k[i, j] * l[i, q]
        count += 1
    return total / count


def gauss_kernel_np(z: np.ndarray, sigma: float) -> np.ndarray:
    d2 = ((z[:, None, :] - z[None, :, :]) ** 2).sum(-1)
    return np.exp(-d2 / (2 * sigma * sigma))


# ---------------------------------------------------------------------------------------------
# Paper estimator
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale,sigma", [(1.0, 50.0), (40.0, 50.0), (1.0, 1.0), (3.0, 2.0)])
def test_paper_single_and_batch_match_reference(scale: float, sigma: float) -> None:
    g = torch.Generator().manual_seed(0)
    d, n = 32, 5
    xs = scale * torch.randn(n, d, generator=g, dtype=torch.float64)
    y = scale * torch.randn(d, generator=g, dtype=torch.float64)
    xs[1] = y + 0.1 * scale * torch.randn(d, generator=g, dtype=torch.float64)  # a dependent row
    ref = np.array([ref_paper_mi(x.numpy(), y.numpy(), sigma=sigma) for x in xs])
    single = np.array([mmi.hsic_mi_paper(x, y, sigma=sigma) for x in xs])
    batch = mmi.hsic_mi_paper_batch(xs, y, sigma=sigma).numpy()
    batch_chunked = mmi.hsic_mi_paper_batch(xs, y, sigma=sigma, chunk_size=2).numpy()
    np.testing.assert_allclose(single, ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(batch, ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(batch_chunked, ref, rtol=1e-6, atol=1e-6)


def test_paper_matches_released_code() -> None:
    g = torch.Generator().manual_seed(1)
    d = 64
    xs = 30 * torch.randn(3, d, generator=g, dtype=torch.float64)
    y = 30 * torch.randn(d, generator=g, dtype=torch.float64)
    ours = mmi.hsic_mi_paper_batch(xs, y)
    theirs64 = torch.tensor([paper_code(x, y, dtype=torch.float64) for x in xs], dtype=torch.float64)
    torch.testing.assert_close(ours, theirs64, rtol=1e-6, atol=1e-8)
    # The released float32 computation is itself only accurate to a few percent (ill-conditioned
    # ridge inverse); ours in float32 lands in the same band.
    theirs32 = torch.tensor([paper_code(x, y) for x in xs], dtype=torch.float64)
    ours32 = mmi.hsic_mi_paper_batch(xs, y, dtype=torch.float32).to(torch.float64)
    torch.testing.assert_close(theirs32, theirs64, rtol=0.1, atol=0.0)
    torch.testing.assert_close(ours32, theirs64, rtol=0.1, atol=0.0)


def test_paper_estimator_is_symmetric_and_larger_for_dependence() -> None:
    g = torch.Generator().manual_seed(2)
    x = 20 * torch.randn(48, generator=g, dtype=torch.float64)
    z = 20 * torch.randn(48, generator=g, dtype=torch.float64)
    assert mmi.hsic_mi_paper(x, z) == pytest.approx(mmi.hsic_mi_paper(z, x), rel=1e-9)
    assert mmi.hsic_mi_paper(x, x + 0.5 * z / 20) > mmi.hsic_mi_paper(x, z)


def test_paper_estimator_rejects_bad_shapes() -> None:
    # ValueError from our checks, or TypeError (jaxtyping) when shape checking is on.
    with pytest.raises((ValueError, TypeError)):
        mmi.hsic_mi_paper(torch.zeros(4), torch.zeros(5))
    with pytest.raises((ValueError, TypeError)):
        mmi.hsic_mi_paper_batch(torch.zeros(2, 4), torch.zeros(5))


# ---------------------------------------------------------------------------------------------
# Population HSIC
# ---------------------------------------------------------------------------------------------


def test_hsic_biased_and_unbiased_match_references() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(7, 2))
    y = x[:, :1] ** 2 + 0.3 * rng.normal(size=(7, 1))
    sx, sy = 1.3, 0.7
    k, l = gauss_kernel_np(x, sx), gauss_kernel_np(y, sy)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    assert mmi.hsic(tx, ty, sigma=(sx, sy)) == pytest.approx(ref_hsic_biased(k, l), rel=1e-10)
    assert mmi.hsic(tx, ty, sigma=(sx, sy), unbiased=True) == pytest.approx(
        ref_hsic_unbiased_ustat(k, l), rel=1e-9, abs=1e-12
    )
    kl, ll = x @ x.T, y @ y.T
    assert mmi.hsic(tx, ty, kernel="linear") == pytest.approx(ref_hsic_biased(kl, ll), rel=1e-10)
    assert mmi.hsic(tx, ty, kernel="linear", unbiased=True) == pytest.approx(
        ref_hsic_unbiased_ustat(kl, ll), rel=1e-9, abs=1e-12
    )


def test_median_sigma() -> None:
    z = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)  # distances 1, 3, 2
    assert mmi.median_sigma(z) == pytest.approx(2.0)


@pytest.mark.parametrize("unbiased", [False, True])
def test_hsic_near_zero_for_independent_positive_for_dependent(unbiased: bool) -> None:
    g = torch.Generator().manual_seed(4)
    n = 200
    x = torch.randn(n, 2, generator=g, dtype=torch.float64)
    indep = torch.randn(n, 2, generator=g, dtype=torch.float64)
    noisy = x + 0.3 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    square = x[:, :1] ** 2  # uncorrelated with x[:, 0] but dependent
    h_ind = mmi.hsic(x, indep, unbiased=unbiased)
    h_noisy = mmi.hsic(x, noisy, unbiased=unbiased)
    h_sq = mmi.hsic(x[:, :1], square, unbiased=unbiased)
    assert abs(h_ind) < 5e-3
    assert h_noisy > 20 * max(abs(h_ind), 1e-4)
    assert h_sq > 10 * max(abs(h_ind), 1e-4)
    # normalised version
    assert abs(mmi.nhsic(x, indep, unbiased=unbiased)) < 0.05
    assert mmi.nhsic(x, noisy, unbiased=unbiased) > 0.5
    assert mmi.nhsic(x[:, :1], square, unbiased=unbiased) > 0.2
    assert mmi.nhsic(x, x, unbiased=unbiased) == pytest.approx(1.0)


def test_linear_cka_invariances() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(50, 4, generator=g, dtype=torch.float64)
    w = torch.randn(4, 3, generator=g, dtype=torch.float64)
    y = x @ w + 0.1 * torch.randn(50, 3, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    base = mmi.nhsic(x, y, kernel="linear")
    assert mmi.nhsic(x, 7.0 * y @ q, kernel="linear") == pytest.approx(base, rel=1e-9)


# ---------------------------------------------------------------------------------------------
# Peaks
# ---------------------------------------------------------------------------------------------


def planted_series() -> tuple[torch.Tensor, list[int]]:
    g = torch.Generator().manual_seed(6)
    mi = 1.0 + 0.05 * torch.rand(200, generator=g, dtype=torch.float64)
    spikes = [3, 57, 58, 140, 199]
    mi[spikes] += torch.tensor([2.0, 1.0, 3.0, 0.5, 1.5], dtype=torch.float64)
    return mi, spikes


def test_detect_peaks_iqr_and_topk_find_planted_spikes() -> None:
    mi, spikes = planted_series()
    assert mmi.detect_peaks(mi).tolist() == spikes
    assert mmi.detect_peaks(mi, method="topk", k=5).tolist() == spikes
    assert mmi.detect_peaks(mi, method="topk").shape == (20,)  # notebook default k = 20
    assert mmi.detect_peaks(mi[:3], method="topk", k=10).tolist() == [0, 1, 2]
    assert mmi.detect_peaks(torch.ones(10, dtype=torch.float64)).tolist() == []


def test_detect_peaks_iqr_threshold_by_hand() -> None:
    mi = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 9.0, 11.0], dtype=torch.float64)
    # linear quartiles: Q1 = 2.5, Q3 = 7.0, IQR = 4.5 -> thresholds 13.75 (whis 1.5), 9.25 (whis 0.5)
    assert mmi.detect_peaks(mi).tolist() == []
    assert mmi.detect_peaks(mi, whis=0.5).tolist() == [6]


def test_peak_stats_by_hand() -> None:
    mi = torch.tensor([1.0, 1.0, 5.0, 1.0, 1.0, 1.0, 6.0, 1.0, 2.0, 1.0], dtype=torch.float64)
    s = mmi.peak_stats(mi, torch.tensor([6, 2, 8]))
    assert isinstance(s, mmi.PeakStats)
    assert s.count == 3 and isinstance(s.count, int)
    assert s.length == 10
    assert s.ratio == pytest.approx(0.3)
    assert s.mean_interval == pytest.approx(3.0)  # gaps 4, 2
    assert s.mean_mi == pytest.approx(2.0)
    assert s.mean_peak_mi == pytest.approx(13.0 / 3)
    assert s.aom == pytest.approx(13.0 / 3 - 2.0)
    one = mmi.peak_stats(mi, torch.tensor([2]))
    assert math.isnan(one.mean_interval)
    none = mmi.peak_stats(mi, torch.zeros(0, dtype=torch.long))
    assert none.count == 0 and math.isnan(none.mean_peak_mi)


def _traj(tokens: list[str], peaks: list[int], start: int = 0, mi: list[float] | None = None) -> mmi.MITrajectory:
    return mmi.MITrajectory(
        mi=torch.tensor(mi if mi is not None else [0.0] * len(tokens), dtype=torch.float64),
        positions=torch.arange(start, start + len(tokens)),
        tokens=tokens,
        peaks=torch.tensor(peaks, dtype=torch.long),
    )


def test_event_enrichment_by_hand() -> None:
    a = _traj(["x", " Wait", "1", "2", "."], [1, 2], start=10)  # events at 11 (backtrack), 12, 13 (result)
    b = _traj(["So", "3", "y"], [0], start=4)  # 4 wrap-up, 5 result
    events = [{11: "backtrack", 12: "result", 13: "result", 99: "result"}, {4: "wrap-up", 5: "result"}]
    got = {e.kind: e for e in mmi.event_enrichment([a, b], events)}
    assert list(got) == ["backtrack", "other", "result", "wrap-up"]  # sorted; 99 is not a step
    # 8 steps, 3 peaks: backtrack 1/1 peak, result 1 of 3, wrap-up 1 of 1, other 0 of 3
    assert (got["result"].n_steps, got["result"].n_peaks) == (3, 1)
    assert got["result"].share_of_peaks == pytest.approx(1 / 3) and got["result"].share_of_steps == pytest.approx(3 / 8)
    assert got["result"].peak_rate == pytest.approx(1 / 3)
    assert (got["other"].n_steps, got["other"].n_peaks, got["other"].peak_rate) == (3, 0, 0.0)
    assert got["backtrack"].peak_rate == 1.0 and got["wrap-up"].share_of_peaks == pytest.approx(1 / 3)
    assert sum(e.share_of_steps for e in got.values()) == pytest.approx(1.0)
    assert mmi.event_enrichment([], []) == []
    with pytest.raises(ValueError, match="event maps"):
        mmi.event_enrichment([a, b], [{}])


def test_peak_summary() -> None:
    a = _traj([" Wait", "\n", " So", "1"], [0, 1], mi=[4.0, 3.0, 1.0, 0.0])
    b = _traj([" Wait", "2"], [0], mi=[2.0, 0.0])
    s = mmi.peak_summary([a, b], [{0: "backtrack"}, {}])
    assert (s.n_traces, s.n_steps, s.n_peaks) == (2, 6, 3)
    assert s.peak_ratio == pytest.approx(0.5) and s.mean_peaks_per_trace == pytest.approx(1.5)
    assert s.mean_mi == pytest.approx((2.0 + 1.0) / 2)
    assert s.token_counts == {" Wait": 2, "\n": 1} and s.peak_method == "iqr"
    assert s.top_tokens(1).to_dict() == {" Wait": 2}
    numbers = s.numbers(top=1)
    assert numbers["top_peak_tokens"] == {" Wait": 2}
    assert numbers["events_at_peaks"]["backtrack"] == {"share_of_peaks": 1 / 3, "share_of_steps": 1 / 6, "peak_rate": 1.0}
    assert list(s.to_frame().columns) == ["kind", "n_steps", "n_peaks", "share_of_peaks", "share_of_steps", "peak_rate"]
    assert json.loads(s.to_json())["token_counts"] == {" Wait": 2, "\n": 1}
    assert mmi.peak_summary([a], strip=True, pattern=r"[a-zA-Z]+").token_counts == {"Wait": 1}
    unlabelled = mmi.peak_summary([a, b])
    assert [e.kind for e in unlabelled.events] == ["other"] and unlabelled.events[0].peak_rate == 0.5
    empty = mmi.peak_summary([])
    assert (empty.n_steps, empty.peak_ratio, empty.mean_mi, empty.events) == (0, 0.0, 0.0, [])

    from matplotlib.figure import Figure

    from mechthink.plotting.mi import plot_mi_peaks

    assert isinstance(s.plot(), Figure)
    fig = plot_mi_peaks(a, s, model_name="m")
    assert len(fig.axes) == 2 and fig._suptitle.get_text().startswith("m: ")


# ---------------------------------------------------------------------------------------------
# Trajectory on a tiny random model
# ---------------------------------------------------------------------------------------------

WORDS = ["<bos>", "<eos>", "<unk>", "Wait", "So", "Therefore", "Hmm", "the", "answer", "is",
         "2", "+", "=", "4", ",", ".", "x", "y", "let", "me"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> "mt.ThinkingModel":
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")
    tokdir = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(str(tokdir))
    tok = AutoTokenizer.from_pretrained(str(tokdir))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    hf = LlamaForCausalLM(cfg).eval()
    bridge = TransformerBridge.boot_transformers(str(tokdir), hf_model=hf, tokenizer=tok)
    bridge.enable_compatibility_mode()
    from mechthink.models.registry import generic_spec

    return mt.ThinkingModel(bridge, tok, generic_spec("tiny-mi", "LlamaForCausalLM", 2, 32), prepend_bos=False)


def test_mi_trajectory_matches_manual_computation(tiny_model: "mt.ThinkingModel") -> None:
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(3, len(WORDS), (18,), generator=g)
    tokens[0] = 0
    answer = torch.tensor([0, 4, 7, 8, 9, 13])
    start = 6
    traj = mmi.mi_trajectory(tiny_model, tokens, answer, start, sigma=1.0)

    n_steps = len(tokens) - start
    assert traj.mi.shape == (n_steps,)
    assert traj.positions.tolist() == list(range(start, len(tokens)))
    assert traj.tokens == [WORDS[i] for i in tokens[start:].tolist()]
    assert traj.hook == "blocks.1.hook_resid_post"

    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    _, cache = tiny_model.bridge.run_with_cache(tokens[None], names_filter=hooks)
    _, acache = tiny_model.bridge.run_with_cache(answer[None], names_filter=hooks)
    resid, h_y = cache[hooks[1]][0], acache[hooks[1]][0, -1]
    manual = [mmi.hsic_mi_paper(resid[t - 1], h_y, sigma=1.0) for t in range(start, len(tokens))]
    np.testing.assert_allclose(traj.mi.numpy(), manual, rtol=1e-6, atol=1e-8)

    mean_traj = mmi.mi_trajectory(tiny_model, tokens, answer, start, hook=hooks[0], answer_repr="mean")
    h_mean = acache[hooks[0]][0].mean(0)
    manual0 = [mmi.hsic_mi_paper(cache[hooks[0]][0, t - 1], h_mean) for t in range(start, len(tokens))]
    np.testing.assert_allclose(mean_traj.mi.numpy(), manual0, rtol=1e-6, atol=1e-8)


def test_mi_trajectory_result_api(tiny_model: "mt.ThinkingModel") -> None:
    g = torch.Generator().manual_seed(8)
    tokens = torch.randint(3, len(WORDS), (25,), generator=g)
    answer = torch.tensor([0, 4, 7, 8, 9, 13])
    traj = mmi.mi_trajectory(tiny_model, tokens, answer, 5, sigma=1.0, peak_method="topk", k=3)
    assert traj.peaks.shape == (3,)
    assert traj.peaks.tolist() == sorted(torch.topk(traj.mi, 3).indices.tolist())

    df = traj.to_frame()
    assert isinstance(df, pd.DataFrame) and len(df) == 20
    assert list(df.columns) == ["step", "position", "token", "mi", "is_peak"]
    assert df["is_peak"].sum() == 3

    payload = json.loads(traj.to_json())
    assert payload["peaks"] == traj.peaks.tolist()
    assert payload["stats"]["count"] == 3
    assert payload["config"]["answer_repr"] == "last"

    from matplotlib.figure import Figure

    fig = traj.plot()
    assert isinstance(fig, Figure)
    assert len(fig.axes[0].texts) == 3  # one label per peak

    iqr = traj.with_peaks("iqr")
    assert iqr.peak_method == "iqr"

    counts = mmi.peak_token_counts([traj, traj])
    assert counts.sum() == 6
    assert counts.index[0] in traj.peak_tokens
    assert counts.iloc[0] >= 2

    with pytest.raises(ValueError):
        mmi.mi_trajectory(tiny_model, tokens, answer, 0)
    with pytest.raises((ValueError, TypeError)):  # TypeError when jaxtyping/beartype checks are on
        mmi.mi_trajectory(tiny_model, tokens, answer, 3, estimator="knn")  # type: ignore[arg-type]


def test_mi_trajectories_tokenize_the_solution(tiny_model: "mt.ThinkingModel") -> None:
    ids = [0, 7, 8, 9, 10, 11, 10, 12, 13, 15, 3, 4, 13]
    ex = mmi.MIExample(ids, 4, "So the answer is 4", {10: "backtrack"})
    (traj,) = mmi.mi_trajectories(tiny_model, [ex], peak_method="topk", sigma=1.0, k=2)
    ref = mmi.mi_trajectory(tiny_model, torch.tensor(ids), torch.tensor([4, 7, 8, 9, 13]), 4, sigma=1.0,
                            peak_method="topk", k=2)
    assert torch.equal(traj.mi, ref.mi) and torch.equal(traj.peaks, ref.peaks)
    assert traj.positions.tolist() == list(range(4, len(ids)))


def test_peak_token_counts_pattern() -> None:
    mk = lambda toks, peaks: mmi.MITrajectory(  # noqa: E731
        mi=torch.zeros(len(toks), dtype=torch.float64),
        positions=torch.arange(len(toks)),
        tokens=toks,
        peaks=torch.tensor(peaks, dtype=torch.long),
    )
    a = mk([" Wait", " 2", " So", ","], [0, 1, 2, 3])
    b = mk([" Wait", " the", " Hmm"], [0, 2])
    counts = mmi.peak_token_counts([a, b], pattern=r"[a-zA-Z]+")
    assert counts.to_dict() == {"Wait": 2, "So": 1, "Hmm": 1}
    assert counts.name == "count"
    all_counts = mmi.peak_token_counts([a, b], strip=False)
    assert all_counts[" Wait"] == 2 and all_counts[","] == 1


def test_plot_peak_token_counts() -> None:
    from matplotlib.figure import Figure

    from mechthink.plotting.mi import plot_peak_token_counts

    fig = plot_peak_token_counts(pd.Series({"Wait": 5, "So": 3}, name="count"))
    assert isinstance(fig, Figure)
