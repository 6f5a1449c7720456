"""The layout check on every public plot function, on small and on long synthetic inputs.

Every public function of the modules in ``mechthink/plotting/`` (helpers and HTML writers aside)
is discovered by introspection and must have at least one case below; a new plot function
without a case fails :func:`test_every_plot_function_has_a_case`. Each case builds result objects
by hand (small tensors, real-looking tokens and sentences; no model forward: plotting never
recomputes) and draws them once on a new figure and, where the function takes an ``ax``, once on
axes passed in. The drawn figure must pass :func:`mechthink.plotting.checks.layout_problems`: no
overlapping tick labels, no text off the canvas, no colliding titles / labels, no legend over a
value label. Long cases (200 tokens, 30 sentences, 32 layers) are where labels collide.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import pkgutil
from collections.abc import Callable
from typing import Any

import pandas as pd
import pytest
import torch

from mechthink import plotting
from mechthink.plotting.base import new_figure
from mechthink.plotting.checks import layout_problems

# real special tokens such as "<｜User｜>" have glyphs DejaVu Sans lacks (drawn as boxes)
# small tensor ops (circuit pruning) on one torch thread: far faster on a busy machine
pytestmark = [pytest.mark.filterwarnings("ignore:Glyph .* missing from font"), pytest.mark.usefixtures("one_thread")]

#: Modules of mechthink.plotting that hold no plot functions.
NOT_PLOTS_MODULES = {"style", "checks", "base"}
#: Public helpers that are not plot functions (figure / axes factories).
HELPERS = {"new_figure", "new_axes", "axes_or_new"}
#: Public functions that write HTML, not figures (checked by test_html_writers_produce_html).
HTML_WRITERS = {"colored_tokens_html", "save_colored_tokens", "circuit_html", "save_circuit_html"}


def discover() -> dict[str, Callable[..., Any]]:
    """``module.function`` -> function, for every public plot function of mechthink.plotting."""
    out = {}
    for info in pkgutil.iter_modules(plotting.__path__):
        if info.name in NOT_PLOTS_MODULES:
            continue
        mod = importlib.import_module(f"mechthink.plotting.{info.name}")
        for name, fn in vars(mod).items():
            if name.startswith("_") or name in HELPERS | HTML_WRITERS or not inspect.isfunction(fn):
                continue
            if fn.__module__ == mod.__name__:
                out[f"{info.name}.{name}"] = fn
    return out


# ============================================================================ realistic inputs
TOKENS = [
    "<｜begin▁of▁sentence｜>", "<｜User｜>", "Janet", " has", " 3", " apples", " and", " buys", " 5", " more", ".",
    " How", " many", "?", "<｜Assistant｜>", "<think>", "\n", "Okay", ",", " so", " I", " need", " to", " add", " 3",
    " and", " 5", ".", " 3", " +", " 5", " =", " 8", ".", "\n\n", "Wait", ",", " let", " me", " check", ":", " 3",
    " +", " 5", " =", " 8", ".", " Yes", ".", "\n", "</think>", "\n\n", "The", " answer", " is", " \\", "boxed",
    "{", "8", "}", ".",
]
SENTENCES = [
    "Okay, so I need to find how many apples Janet has after she buys more at the market.",
    "She starts with 3 apples.",
    "Then she buys 5 more, so 3 + 5 = 8.",
    "Wait, let me check that again.",
    "Hmm, 3 + 5 is indeed 8, since 3 + 4 = 7 and one more is 8.",
    "Alternatively, I could count them one by one: 4, 5, 6, 7, 8.",
    "So the answer is 8.",
    "Therefore, Janet has \\boxed{8} apples.",
]
WORDS = [" Wait", " Hmm", " Alternatively", " But", "\n\n", " So", " check", " again", " answer", " =", "5", " wait",
         " Let", " verify", " Actually", " mistake", " recalculate", " However", " Therefore", " step"]
MODEL = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
ANCHOR_METHODS = ["resampling", "counterfactual", "suppression", "receiver", "atp", "mi"]
BACKTRACK = ["Wait", "Hmm", "Alternatively", "But wait"]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=gen(seed))


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed))


def tokens(n: int) -> list[str]:
    return list(itertools.islice(itertools.cycle(TOKENS), n))


def sentences(n: int) -> list[Any]:
    from mechthink.anchors import Sentence

    out, char, tok = [], 0, 0
    for i in range(n):
        text = SENTENCES[i % len(SENTENCES)]
        length = 4 + len(text) // 5
        out.append(Sentence(i, text, char, char + len(text), tok, tok + length))
        char, tok = char + len(text) + 1, tok + length
    return out


def resid_layers(n: int) -> list[str]:
    return [f"resid_pre_{k}" for k in range(n)] + [f"resid_post_{n - 1}"]


def _ax(fig: Any) -> Any:
    """An axes on the given blank figure, or None (the plot function makes its own figure)."""
    return None if fig is None else fig.add_subplot()


# ---------------------------------------------------------------------------- anchors
def scores_by_method(n: int) -> dict[str, torch.Tensor]:
    return {m: rand(n, seed=k) for k, m in enumerate(ANCHOR_METHODS)}


def resampling(n: int) -> Any:
    from mechthink.anchors import ResamplingImportance

    imp = randn(4, n)
    imp[:, -1] = float("nan")  # the last sentence has no next prefix
    return ResamplingImportance(sentences(n), list(range(n + 1)), [[] for _ in range(n + 1)], "8", imp, rand(n),
                                torch.full((n + 1,), 20, dtype=torch.long), 50)


def suppression(n: int) -> Any:
    from mechthink.anchors import SuppressionMatrix

    return SuppressionMatrix(sentences(n), (rand(n, n) * 3).tril(-1), rand(n, 6 * n))


def receivers(n_layers: int, n_heads: int, n: int) -> Any:
    from mechthink.anchors import ReceiverHeads

    return ReceiverHeads(rand(n_layers, n_heads) * 20, [(1, 2), (n_layers - 1, 0), (n_layers // 2, n_heads - 1)],
                         [rand(n)], [[0, 2, 3]])


def agreement() -> Any:
    from mechthink.anchors import MethodAgreement

    m = len(ANCHOR_METHODS)
    r = rand(m, m) * 2 - 1
    r = (r + r.T) / 2
    r.fill_diagonal_(1.0)
    r[0, 3] = r[3, 0] = float("nan")
    return MethodAgreement(list(ANCHOR_METHODS), r, rand(m, m), 3, 4)


def every_method(n: int, n_layers: int = 28, n_heads: int = 12) -> Any:
    from mechthink.anchors import AnchorTrace, EveryMethod, SentenceScores
    from mechthink.traces import Trace

    sents = sentences(n)
    trace = Trace("gsm8k-0017", "Janet has 3 apples and buys 5 more. How many?", "8", "", [], [], "", [], "", "", None,
                  None, "given")
    scores = {m: [v] for m, v in scores_by_method(n).items()}
    at = SentenceScores(sents, rand(n), rand(n), "atp")
    mi = SentenceScores(sents, rand(n), rand(n), "mi")
    return EveryMethod([AnchorTrace(trace, sents)], [resampling(n)], [suppression(n)], receivers(n_layers, n_heads, n),
                       [at], [mi], agreement(), scores)


# ---------------------------------------------------------------------------- attribution
def attribution(n_tok: int, n_layers: int, n_heads: int = 4, method: str = "atp", seed: int = 0) -> Any:
    from mechthink.attribution import AttributionResult

    scores = {"resid_pre": randn(n_layers, n_tok, seed=seed), "z": randn(n_layers, n_tok, n_heads, seed=seed)}
    return AttributionResult(scores, ("resid_pre", "z"), torch.arange(n_tok), tokens(n_tok), 3.217, method=method)


def comparison(n_tok: int, n_layers: int) -> Any:
    from mechthink.attribution import EstimatorComparison

    return EstimatorComparison({m: [attribution(n_tok, n_layers, method=m, seed=k)] for k, m in
                                enumerate(("atp", "qkfix", "exact"))})


def bin_labels(n_bins: int) -> list[str]:
    from mechthink.context import _bin_labels

    return _bin_labels(n_bins)


def binned(n_bins: int, n_samples: int = 8) -> Any:
    from mechthink.context import BinnedImportance

    v = rand(n_samples, n_bins + 1)
    return BinnedImportance(bin_labels(n_bins), v, v.mean(0), "minmax")


def binned_attention(n_bins: int, n_heads: int = 5) -> Any:
    from mechthink.context import BinnedAttention

    heads = [(L, h) for L, h in zip(range(3, 3 + 2 * n_heads, 2), range(n_heads))]
    return BinnedAttention(heads, bin_labels(n_bins), rand(n_heads, n_bins + 1), 8)


def hits(k: int = 5, n: int = 12, seed: int = 0) -> Any:
    from mechthink.models.organism.scoring import GroundTruthHits

    b = rand(4, n, seed=seed) > 0.4
    return GroundTruthHits(k, b[0] | b[1], b[1], b[2] & b[1], b[3])


def mean_activations(n_layers: int) -> Any:
    from mechthink.attribution import MeanActivations

    sums = {f"blocks.{L}.{h}": randn(16, seed=L) * (L + 1) for L in range(n_layers)
            for h in ("hook_resid_pre", "attn.hook_z", "hook_mlp_out")}
    return MeanActivations(sums, count=480, n_samples=8)


# ---------------------------------------------------------------------------- circuits
def edge_graph(n_layers: int, n_heads: int, n_kv_heads: int, name: str = MODEL) -> Any:
    """The graph :func:`mechthink.circuits.build_graph` makes (it reads only the config and hook names)."""
    from types import SimpleNamespace

    from mechthink.circuits import build_graph

    hooks = dict.fromkeys(("hook_embed", "ln_final.hook_in", "blocks.0.attn.hook_q_input", "blocks.0.attn.hook_result",
                           "blocks.0.hook_mlp_in"))
    cfg = SimpleNamespace(n_layers=n_layers, n_heads=n_heads, n_key_value_heads=n_kv_heads)
    return build_graph(SimpleNamespace(cfg=cfg, bridge=SimpleNamespace(hook_dict=hooks), spec=SimpleNamespace(name=name)))


def _inputs(graph: Any, node: tuple[int, int] | int | None) -> list[int]:
    """Receivers of a head ``(layer, head)`` (q, k, v), of MLP ``layer``, or of the logits (None)."""
    if node is None:
        return [graph.logits_receiver]
    if isinstance(node, int):
        return [graph.receiver_slice(node, "mlp").start]
    L, h = node
    g = h * graph.n_kv_heads // graph.n_heads
    return [graph.receiver_slice(L, "q").start + h] + [graph.receiver_slice(L, kv).start + g for kv in ("k", "v")]


def edge_scores(graph: Any, method: str = "eap-ig", seed: int = 0) -> Any:
    from mechthink.circuits import EdgeScores

    nl, nh = graph.n_layers, graph.n_heads
    s = 0.05 * randn(*graph.edges.shape, seed=seed) * graph.edges
    # a planted circuit: embed -> L0 head -> middle head -> last MLP -> logits, plus direct paths to the logits
    path = [0, graph.head_sender(0, 1), graph.head_sender(nl // 2, nh - 1), graph.mlp_sender(nl - 1)]
    nodes: list[Any] = [(0, 1), (nl // 2, nh - 1), nl - 1, None]
    for k, (u, node) in enumerate(zip(path, nodes)):
        s[u, _inputs(graph, node)] = (-1.0) ** k * (2.0 - 0.3 * k)
    for u in path[:-1]:
        s[u, graph.logits_receiver] = 0.8
    s[graph.mlp_sender(0), _inputs(graph, (nl // 2, nh - 1))] = -1.2
    s[0, graph.receiver_slice(0, "mlp").start] = 1.1
    return EdgeScores(s, graph, method, "tokens", 4.1, -0.3, n_samples=8)


def circuit(n_layers: int, n_heads: int, n_kv_heads: int, k: int = 40) -> Any:
    from mechthink.circuits import prune

    name = MODEL if n_layers > 8 else "tiny-thinker"
    return prune(edge_scores(edge_graph(n_layers, n_heads, n_kv_heads, name)), k=k)


def faithfulness_curve(n_points: int, n_total: int, methods: tuple[str, ...] = ("eap", "eap-ig", "exact")) -> Any:
    from mechthink.circuits import FaithfulnessCurve

    # the analysis's recipe: every k up to a third of the points, then geometric up to every edge
    ks = sorted(set(range(1, n_points // 3 + 1)) | {round(n_total ** (i / (n_points - 1))) for i in range(n_points)})
    n_edges = {m: [max(1, round(k * (0.6 + 0.1 * j))) for k in ks] for j, m in enumerate(methods)}
    faith = {m: (1 - (-torch.tensor(n_edges[m], dtype=torch.float) / (8 + 20 * j)).exp()
                 + 0.05 * randn(len(ks), seed=j)).tolist() for j, m in enumerate(methods)}
    return FaithfulnessCurve(ks, n_edges, faith, 4.1, -0.3, n_total)


P_BACKTRACK = {"clean": 0.62, "circuit": 0.07, "random": 0.55}


# ---------------------------------------------------------------------------- confidence
def probe_result(n: int, choices: list[str], seed: int = 0, closed: bool = True) -> Any:
    from mechthink.confidence import AnswerProbeResult

    positions = [40 + 7 * i for i in range(n)]
    lp = -rand(n, len(choices), seed=seed) * 8
    marks = {"think_start": positions[0]} | ({"think_end": positions[-1]} if closed else {})
    return AnswerProbeResult(lp, lp + 2, rand(n, seed=seed), positions, choices, "\n\nSo the answer is", marks=marks)


def early_exit(n: int) -> Any:
    from mechthink.confidence import EarlyExitResult, EarlyExitRow

    rows = [EarlyExitRow(i, 50 + 9 * i, " Wait" if i % 2 else None, -0.3 * i, float(0.9 ** i), 10.0 - i, "18", i % 3 != 1)
            for i in range(n)]
    return EarlyExitResult("gsm8k-0042", "18", "\n\nSo the answer is", rows, None)


def early_exit_summary(n: int) -> Any:
    from mechthink.confidence import EarlyExitInstance, EarlyExitSummary

    return EarlyExitSummary(40, 31, [EarlyExitInstance(i + 1, max(1, 30 - 2 * i), float(0.8 - 0.02 * i), -0.5, 0.6, 9.0 - i)
                                     for i in range(n)])


def gold_curves(n_traces: int, n_points: int) -> Any:
    from mechthink.confidence import GoldConfidenceCurves, GoldConfidenceRow

    golds = [str(10 + k) for k in range(n_traces)]
    curves = [probe_result(n_points, [g, "7", "12"], seed=k, closed=k % 3 != 2) for k, g in enumerate(golds)]
    rows = [GoldConfidenceRow(f"gsm8k-{k:04d}", g, k % 3 != 2, -6.0, -0.2, 0.7, 0.2) for k, g in enumerate(golds)]
    return GoldConfidenceCurves(curves, rows)


# ---------------------------------------------------------------------------- interventions
def suppression_sweep() -> Any:
    from mechthink.interventions import (
        ControlOutcome,
        SuppressionOutcome,
        SuppressionSweep,
    )

    cumulative = [" + ".join(BACKTRACK[: k + 1]) for k in range(len(BACKTRACK))]
    sets = {w: [100 + i] for i, w in enumerate(BACKTRACK)}
    for k, name in enumerate(cumulative):
        sets.setdefault(name, list(range(100, 101 + k)))
    outcomes: dict[str, Any] = {"none": SuppressionOutcome(0.72, 0.45, 0)}
    for k, name in enumerate(sets):
        outcomes[name] = SuppressionOutcome(0.7 - 0.05 * (name.count("+") + 1) - 0.01 * k, 0.3, len(sets[name]))
        for j, pool in enumerate(("random", "random unused")):
            acc = 0.71 - 0.01 * j
            outcomes[f"{pool}({name})"] = ControlOutcome(acc, 0.03, acc, [acc - 0.02, acc, acc + 0.02], 0.44, len(sets[name]))
    return SuppressionSweep(list(BACKTRACK), list(BACKTRACK), sets, cumulative, outcomes,
                            {"random": None, "random unused": [1, 2, 3]}, [100, 101, 102, 103],
                            {k: [f" {k}"] for k in sets}, 812, 40, MODEL)


def sampled_suppression() -> Any:
    from mechthink.interventions import SampledCondition, SampledSuppression
    from mechthink.stats import PairedChange

    conds = {name: SampledCondition(0.6 + 0.05 * k, 0.68, PairedChange(-0.08 + 0.05 * k, (-0.15 + 0.05 * k, -0.01 + 0.05 * k), 9, 3, 8))
             for k, name in enumerate(("Wait", "random(Wait)", "random unused(Wait)"))}
    return SampledSuppression("Wait", 0.68, conds, {"none": 0.5, "Wait": 0.1}, {"none": rand(8, 40)}, 0.6, 8, 4, 3, 40,
                              MODEL)


def forcing(parameter: str) -> Any:
    from mechthink.interventions import ForcingSweep, GenerationScore

    values = [64, 128, 256, 512, 1024, 2048] if parameter == "budget" else [0, 1, 2, 4, 8]
    scores = [GenerationScore(0.3 + 0.08 * i, 100.0 * (i + 1), 0.5 + 0.08 * i, 0.1 * i) for i in range(len(values))]
    return ForcingSweep(parameter, values, scores, [1.0 - 0.15 * i for i in range(len(values))],
                        GenerationScore(0.74, 812.0, 0.9, 0.05), " Wait", 40, MODEL)


# ---------------------------------------------------------------------------- lens
VOCAB = {i: t for i, t in enumerate(dict.fromkeys(TOKENS + WORDS))}


def components(mode: str, n_layers: int) -> list[str]:
    if mode == "accumulated":
        return resid_layers(n_layers)
    return ["embed"] + [f"{kind}_{L}" for L in range(n_layers) for kind in ("attn", "mlp")]


def lens_result(mode: str, n_layers: int, n_rows: int = 3) -> Any:
    from mechthink.lens import LensResult

    comps = components(mode, n_layers)
    c, t, k = len(comps), 2, 5
    logits = randn(n_rows, c, t) * 4
    top = torch.randint(0, len(VOCAB), (n_rows, c, k), generator=gen(1))
    return LensResult(logits, logits.softmax(-1), torch.randint(0, 100, (n_rows, c, t), generator=gen(2)), top,
                      randn(n_rows, c, k), randn(n_rows, t), comps, [35, 66], [" Wait", " So"], [0] * n_rows,
                      [47 + i for i in range(n_rows)], tokens(n_rows), mode, "final", VOCAB)


def lens_summary(n_layers: int) -> Any:
    from mechthink.lens import LensSummary

    acc, dec = components("accumulated", n_layers), components("decomposed", n_layers)
    mean = randn(len(dec))
    top = [dec[i] for i in mean.abs().argsort(descending=True)[:5].tolist()]
    return LensSummary(" Wait", 40, 0.31, acc, rand(len(acc)), {acc[-1]: 30}, dec, mean, top, 3.2e-6)


def tuned_lens(n_layers: int, d: int = 8) -> Any:
    from mechthink.lens import TunedLens

    return TunedLens(randn(n_layers, d, d) * 0.1, randn(n_layers, d) * 0.1, MODEL)


def tuned_comparison(n_layers: int) -> Any:
    from mechthink.lens import TunedLensComparison

    acc = components("accumulated", n_layers)
    kl = torch.linspace(6, 0, n_layers)
    return TunedLensComparison(kl, kl * 0.4, rand(len(acc)), acc, tuned_lens(n_layers), 64, 16)


# ---------------------------------------------------------------------------- mi
def trajectory(n: int) -> Any:
    from mechthink.mi import MITrajectory

    mi = rand(n) * 0.3
    peaks = torch.arange(3, n, 7)
    mi[peaks] += 0.6
    return MITrajectory(mi, torch.arange(n) + 60, tokens(n), peaks, "blocks.20.hook_resid_post")


def peak_summary(n_tokens: int) -> Any:
    from mechthink.mi import PeakSummary

    counts = {w: 40 - k for k, w in enumerate((WORDS * 2)[:n_tokens])}
    return PeakSummary(8, 1600, 120, 0.21, [], counts, "iqr")


# ---------------------------------------------------------------------------- readiness
def probe_cv(n_layers: int, pool: str = "last", seed: int = 0) -> Any:
    from mechthink.readiness import ProbeCV

    layers = resid_layers(n_layers)
    auc = rand(len(layers), seed=seed) * 0.4 + 0.55
    return ProbeCV(auc, torch.stack([auc - 0.08, (auc + 0.05).clamp(max=1.0)], 1), torch.zeros(6, len(layers)),
                   ["p0"] * 6, list(range(6)), layers, pool, 5)


def pareto() -> Any:
    from mechthink.readiness import ParetoResult

    rows = []
    for k, fam in enumerate(("probe", "confidence", "answer_k", "backtrack", "budget")):
        for j in range(5):
            saved = 0.1 * (j + 1) + 0.03 * k
            rows.append({"policy": fam, "param": float(j), "saved": saved, "accuracy": 0.75 - 0.4 * saved ** 2 - 0.01 * k,
                         "loss": 0.4 * saved ** 2, "exited": 0.2 * j})
    return ParetoResult(rows, 0.76, 40, 32000)


def chosen(p: Any) -> dict[str, Any]:
    return {fam: next(r for r in p.rows if r["policy"] == fam) for fam in ("probe", "confidence")} | {"budget": None}


def trajectory_map(n_layers: int, n_offsets: int) -> Any:
    from mechthink.readiness import TrajectoryMap

    half = n_offsets // 2
    return TrajectoryMap(-rand(n_layers + 1, n_offsets) * 60, torch.ones(n_offsets, dtype=torch.long),
                         list(range(-half, n_offsets - half)), resid_layers(n_layers), "logit", "first_fire", 0.0)


def readiness_labels(n: int) -> Any:
    from mechthink.readiness import ReadinessLabels

    conf = torch.linspace(0.05, 0.95, n)
    ready = conf > 0.5
    return ReadinessLabels("gsm8k-0042", [60 + 12 * i for i in range(n)], [50 + 12 * i for i in range(n)],
                           [SENTENCES[i % len(SENTENCES)] for i in range(n)], [80 * i for i in range(n)],
                           ["\n\nSo the answer is"] * n, ["8" if r else None for r in ready.tolist()], conf.log(), ready,
                           ready & (torch.arange(n) % 2 == 0), "8", "boxed", "8", 40, 60 + 12 * n, "\n\nSo the answer is")


def readiness_dataset(n_steps: int, n_layers: int = 4) -> Any:
    from mechthink.readiness import ReadinessDataset

    steps = [s for _ in range(5) for s in range(n_steps)]
    ready = torch.tensor([s > n_steps // 3 for s in steps])
    return ReadinessDataset(torch.zeros(len(steps), n_layers + 1, 4), ready, ready, [f"p{k}" for k in range(5) for _ in range(n_steps)],
                            steps, resid_layers(n_layers), "last")


def readiness_probe(n_layers: int) -> Any:
    from mechthink.readiness import ReadinessProbe

    return ReadinessProbe(randn(n_layers + 1, 16), randn(n_layers + 1), resid_layers(n_layers), "last", n_layers // 2)


def firing(n: int) -> Any:
    from mechthink.readiness import FiringAgreement

    fire = [None if k % 7 == 6 else (k % 5) - 2 + 10 for k in range(n)]
    return FiringAgreement([f"t{k}" for k in range(n)], fire, [10] * n, 0.5, 1)


def study(n_layers: int, maps: bool = True) -> Any:
    from mechthink.readiness import ReadinessStudy

    p = pareto()
    m = {"logit": trajectory_map(n_layers, 9), "tuned": trajectory_map(n_layers, 9)} if maps else {}
    return ReadinessStudy({"last": probe_cv(n_layers), "mean": probe_cv(n_layers, "mean", seed=1)},
                          readiness_probe(n_layers), {"ready": 0.81, "correct": 0.7}, p, p, chosen(p), m, firing(20), 0.01,
                          32, 8, 0.4)


# ---------------------------------------------------------------------------- steering
def steering_vector(n_layers: int) -> Any:
    from mechthink.steering import SteeringVector

    return SteeringVector(randn(n_layers, 16), list(range(n_layers)), "hook_resid_post", "mean_diff")


def coefficient_sweep(n_coeffs: int = 7, layers: tuple[int, ...] = (10, 12)) -> Any:
    from mechthink.steering import CoefficientSweep, DecisionMetrics

    coeffs = [float(c) for c in torch.linspace(-8, 8, n_coeffs).tolist()]

    def ms(shift: float) -> list[Any]:
        return [DecisionMetrics(*(min(1.0, max(0.0, 0.5 + shift + 0.04 * c + 0.02 * k)) for k in range(7))) for c in coeffs]

    return CoefficientSweep(coeffs, list(layers), {"wrong": ms(0.1), "correct": ms(-0.1), "mix": ms(0.0)},
                            {"wrong": 20, "correct": 20}, MODEL)


# ---------------------------------------------------------------------------- value vectors
def layer_probe(n_layers: int) -> Any:
    from mechthink.value_vectors import LayerProbeResult

    return LayerProbeResult(rand(n_layers) * 0.5 + 0.5, rand(n_layers) * 0.3 + 0.7, randn(n_layers, 16),
                            list(range(n_layers)), "hook_resid_post", 5, ("correct step", "wrong step"))


def ablations() -> Any:
    from mechthink.value_vectors import AblationComparison

    plans = {"top-20 value vectors": {18: [3, 7], 20: [11]}, "random 20 neurons": {5: [1, 2, 3]}, "top-20, layer 20 only": {20: [11]}}
    return AblationComparison(rand(16) * 0.4, {k: rand(16, seed=i + 1) * 0.3 for i, k in enumerate(plans)}, plans,
                              [" Wait", "Wait", " wait"])


ABLATION_LABELS = {"top-20 value vectors": "top 20", "random 20 neurons": "random 20", "top-20, layer 20 only": "L20 only"}


def ablation_effect() -> Any:
    from mechthink.value_vectors import AblationEffect

    return AblationEffect(rand(24) * 0.5, rand(24, seed=1) * 0.4, [" Wait"], {18: [3, 7], 20: [11]})


def neuron_hits(n: int) -> Any:
    from mechthink.value_vectors import NeuronHits

    return NeuronHits(torch.randint(0, 28, (n,), generator=gen(3)), torch.randint(0, 8960, (n,), generator=gen(4)),
                      torch.linspace(12, 4, n), randn(n), "z-score", [" Wait", "Wait", " wait"])


def vv_records(n: int) -> list[dict[str, Any]]:
    return [{"layer": 18 + k % 8, "neuron": 1000 + 37 * k, "score": 12.0 - 0.3 * k,
             "top_tokens": [WORDS[(k + j) % len(WORDS)] for j in range(10)]} for k in range(n)]


# ============================================================================ the cases
#: ``module.function`` -> [(case id, draw)]; draw(fig) draws on a new figure of its own when
#: ``fig`` is None, else on axes of the blank figure ``fig``. AXES_FREE: functions that lay out a
#: whole figure (drawn once, on their own figure).
CASES: dict[str, list[tuple[str, Callable[[Any], Any]]]] = {}
AXES_FREE: set[str] = set()


def case(name: str, cid: str, draw: Callable[[Any], Any]) -> None:
    CASES.setdefault(name, []).append((cid, draw))


def figure_case(name: str, cid: str, draw: Callable[[], Any]) -> None:
    AXES_FREE.add(name)
    case(name, cid, lambda fig: draw())


def register() -> None:
    from mechthink.plotting import anchors as A
    from mechthink.plotting import attribution as T
    from mechthink.plotting import circuits as X
    from mechthink.plotting import confidence as C
    from mechthink.plotting import interventions as I
    from mechthink.plotting import lens as L
    from mechthink.plotting import mi as M
    from mechthink.plotting import readiness as R
    from mechthink.plotting import steering as S
    from mechthink.plotting import value_vectors as V

    # anchors
    for n in (8, 30):
        case("anchors.plot_sentence_bars", f"{n}sent", lambda f, n=n: A.plot_sentence_bars(scores_by_method(n), sentences(n), ax=_ax(f)))
        case("anchors.plot_resampling", f"{n}sent", lambda f, n=n: A.plot_resampling(resampling(n), ax=_ax(f)))
        case("anchors.plot_dependency_matrix", f"{n}sent", lambda f, n=n: A.plot_dependency_matrix(suppression(n), ax=_ax(f)))
        figure_case("anchors.anchors_figure", f"{n}sent", lambda n=n: A.anchors_figure(every_method(n)))
    for nl, nh in ((4, 4), (32, 16)):
        case("anchors.plot_receiver_heads", f"{nl}x{nh}", lambda f, nl=nl, nh=nh: A.plot_receiver_heads(receivers(nl, nh, 8), ax=_ax(f)))
        case("attribution.plot_head_heatmap", f"{nl}x{nh}", lambda f, nl=nl, nh=nh: T.plot_head_heatmap(
            rand(nl, nh), marked=[(1, 2), (nl - 1, 0)], label="AtP support", title="heads by AtP support", ax=_ax(f)))
        case("attribution.plot_head_ranking", f"{nl}x{nh}", lambda f, nl=nl, nh=nh: _head_ranking(T, nl, nh, f))
    case("anchors.plot_agreement", "6methods", lambda f: A.plot_agreement(agreement(), ax=_ax(f)))

    # attribution
    for nt, nl in ((24, 6), (200, 32)):
        cid = f"{nt}tok{nl}L"
        case("attribution.plot_attribution_heatmap", cid, lambda f, nt=nt, nl=nl: T.plot_attribution_heatmap(attribution(nt, nl), ax=_ax(f)))
        case("attribution.plot_estimator_heatmaps", cid, lambda f, nt=nt, nl=nl: _estimators(T, nt, nl, f))
        figure_case("attribution.plot_attribution_overview", cid, lambda nt=nt, nl=nl: T.plot_attribution_overview(
            comparison(nt, nl), binned(10), binned_attention(10), " Wait", MODEL))
    case("attribution.plot_attribution_heatmap", "z-node", lambda f: T.plot_attribution_heatmap(attribution(24, 6), node="z", ax=_ax(f)))
    for nb in (5, 20):
        case("attribution.plot_binned", f"{nb}bins", lambda f, nb=nb: T.plot_binned(bin_labels(nb), binned(nb).values, ax=_ax(f),
                                                                                     title="AtP importance by region"))
        case("attribution.plot_binned", f"{nb}bins-heads", lambda f, nb=nb: T.plot_binned(
            bin_labels(nb), binned_attention(nb).values, ylabel="attention",
            row_labels=[f"L{L}H{h}" for L, h in binned_attention(nb).heads], ax=_ax(f), title="attention of the top heads"))
    case("attribution.plot_spearman_table", "3x4", lambda f: T.plot_spearman_table(_spearman(), ax=_ax(f)))
    for n in (8, 30):
        words = [(w, 1.0 - k / n) for k, w in enumerate((WORDS * 2)[:n])]
        case("attribution.plot_word_bars", f"{n}words", lambda f, words=words, n=n: T.plot_word_bars(
            words, hits=[k % 3 == 0 for k in range(n)], ax=_ax(f), title="top words by AtP"))
    case("attribution.plot_overlap_histogram", "20samples", lambda f: T.plot_overlap_histogram(_overlaps(), ax=_ax(f)))
    case("attribution.plot_hit_fractions", "2methods", lambda f: T.plot_hit_fractions({"atp": hits(), "qkfix": hits(seed=1)}, ax=_ax(f)))
    case("attribution.plot_hit_fractions", "1method", lambda f: T.plot_hit_fractions({"atp": hits()}, ax=_ax(f)))
    for nl in (2, 28):
        case("attribution.plot_mean_norms", f"{nl}L", lambda f, nl=nl: T.plot_mean_norms(mean_activations(nl), ax=_ax(f)))

    # circuits (tiny-thinker-like 4 layers x 4 heads with 2 kv heads; R1-Distill-like 28 x 12 with 2; 32 x 16 with 4)
    for nl, nh, nkv in ((4, 4, 2), (28, 12, 2), (32, 16, 4)):
        cid = f"{nl}x{nh}kv{nkv}"
        case("circuits.plot_circuit_graph", f"{cid}-circuit", lambda f, nl=nl, nh=nh, nkv=nkv: _circuit_graph(X, circuit(nl, nh, nkv), f))
        case("circuits.plot_circuit_graph", f"{cid}-top", lambda f, nl=nl, nh=nh, nkv=nkv: X.plot_circuit_graph(
            circuit(nl, nh, nkv).graph, circuit(nl, nh, nkv).scores, ax=_ax(f), top_fraction=0.01))
        figure_case("circuits.plot_circuits_overview", cid, lambda nl=nl, nh=nh, nkv=nkv: X.plot_circuits_overview(
            faithfulness_curve(60 if nl < 10 else 200, circuit(nl, nh, nkv).graph.n_edges), circuit(nl, nh, nkv), P_BACKTRACK, MODEL,
            {"random": 0.04}))
    case("circuits.plot_circuit_graph", "4x4kv2-all", lambda f: X.plot_circuit_graph(edge_graph(4, 4, 2, "tiny-thinker"), ax=_ax(f)))
    for npt, n_total in ((20, 600), (200, 180_000)):
        case("circuits.plot_faithfulness", f"{npt}pts", lambda f, npt=npt, n_total=n_total: X.plot_faithfulness(
            faithfulness_curve(npt, n_total), ax=_ax(f)))
    case("circuits.plot_faithfulness", "5methods", lambda f: X.plot_faithfulness(faithfulness_curve(
        200, 180_000, ("eap", "eap-ig", "eap-ig-inputs", "eap-ig-outputs", "exact")), ax=_ax(f)))
    case("circuits.plot_ablation_bars", "3conds", lambda f: X.plot_ablation_bars(P_BACKTRACK, {"random": 0.04}, ax=_ax(f)))
    case("circuits.plot_ablation_bars", "8conds", lambda f: X.plot_ablation_bars(
        {"clean": 0.62, "circuit ablated": 0.07, "random edges (seed 0)": 0.55, "random edges (seed 1)": 0.58,
         "circuit heads only": 0.2, "circuit MLPs only": 0.5, "everything ablated": 0.01, "top 1% edges": 0.1},
        ax=_ax(f), ylabel="P(Wait)"))

    # confidence
    case("confidence.plot_probe", "yes-no", lambda f: C.plot_probe(probe_result(12, ["Yes", "No"]), ax=_ax(f), title="is the answer ready?"))
    case("confidence.plot_probe", "4choices-200pos", lambda f: C.plot_probe(probe_result(200, ["18", "20", "16", "9"]), ax=_ax(f)))
    for n in (4, 25):
        case("confidence.plot_early_exit", f"{n}inst", lambda f, n=n: C.plot_early_exit(early_exit(n), ax=_ax(f)))
        case("confidence.plot_early_exit_summary", f"{n}inst", lambda f, n=n: C.plot_early_exit_summary(
            early_exit_summary(n), ax=_ax(f), model_name=MODEL))
    for nt, npt in ((3, 8), (12, 60)):
        case("confidence.plot_confidence_curves", f"{nt}traces", lambda f, nt=nt, npt=npt: C.plot_confidence_curves(
            gold_curves(nt, npt).curves, gold_curves(nt, npt).golds, ax=_ax(f), title="log p(gold)"))
        case("confidence.plot_gold_confidence", f"{nt}traces", lambda f, nt=nt, npt=npt: C.plot_gold_confidence(
            gold_curves(nt, npt), ax=_ax(f), model_name=MODEL))

    # interventions
    case("interventions.plot_suppression_curve", "4words", lambda f: I.plot_suppression_curve(suppression_sweep(), ax=_ax(f)))
    case("interventions.plot_suppression_singles", "4words", lambda f: I.plot_suppression_singles(suppression_sweep(), ax=_ax(f)))
    case("interventions.plot_sampled_suppression", "3conds", lambda f: I.plot_sampled_suppression(sampled_suppression(), ax=_ax(f)))
    figure_case("interventions.suppression_figure", "4words", lambda: I.suppression_figure(suppression_sweep(), sampled_suppression()))
    for p in ("budget", "extensions"):
        case("interventions.plot_forcing_sweep", p, lambda f, p=p: I.plot_forcing_sweep(forcing(p), ax=_ax(f)))
    figure_case("interventions.forcing_figure", "2sweeps", lambda: I.forcing_figure(forcing("budget"), forcing("extensions")))

    # lens
    for nl in (6, 32):
        for mode in ("accumulated", "decomposed"):
            case("lens.plot_lens_heatmap", f"{mode}-{nl}L", lambda f, nl=nl, mode=mode: L.plot_lens_heatmap(lens_result(mode, nl), ax=_ax(f)))
            case("lens.plot_dla", f"{mode}-{nl}L", lambda f, nl=nl, mode=mode: L.plot_dla(lens_result(mode, nl), ax=_ax(f)))
        figure_case("lens.plot_logit_lens_overview", f"{nl}L", lambda nl=nl: L.plot_logit_lens_overview(
            lens_result("accumulated", nl), lens_result("decomposed", nl), f"{MODEL}: logit lens at ' Wait'"))
        case("lens.plot_lens_summary", f"{nl}L", lambda f, nl=nl: L.plot_lens_summary(lens_summary(nl), ax=_ax(f)))
        case("lens.plot_tuned_lens_kl", f"{nl}L", lambda f, nl=nl: L.plot_tuned_lens_kl(tuned_comparison(nl), ax=_ax(f)))
        case("lens.plot_translator_norms", f"{nl}L", lambda f, nl=nl: L.plot_translator_norms(tuned_lens(nl), ax=_ax(f)))

    # mi
    for n in (30, 200):
        case("mi.plot_mi_trajectory", f"{n}steps", lambda f, n=n: M.plot_mi_trajectory(trajectory(n), ax=_ax(f)))
        figure_case("mi.plot_mi_peaks", f"{n}steps", lambda n=n: M.plot_mi_peaks(trajectory(n), peak_summary(20), model_name=MODEL))
    for n in (6, 20):
        case("mi.plot_peak_token_counts", f"{n}tok", lambda f, n=n: M.plot_peak_token_counts(
            pd.Series(peak_summary(n).token_counts), top=15, ax=_ax(f)))
        case("mi.plot_peak_summary", f"{n}tok", lambda f, n=n: M.plot_peak_summary(peak_summary(n), ax=_ax(f)))

    # readiness
    for nl in (4, 32):
        case("readiness.plot_auroc", f"{nl}L", lambda f, nl=nl: R.plot_auroc([probe_cv(nl), probe_cv(nl, "mean", 1)], ax=_ax(f)))
        case("readiness.plot_trajectory_map", f"{nl}L", lambda f, nl=nl: R.plot_trajectory_map(
            trajectory_map(nl, 9 if nl < 10 else 41), ax=_ax(f)))
        case("readiness.plot_probe_weights", f"{nl}L", lambda f, nl=nl: R.plot_probe_weights(readiness_probe(nl), ax=_ax(f)))
        figure_case("readiness.plot_readiness", f"{nl}L", lambda nl=nl: R.plot_readiness(study(nl), title=f"{MODEL}: answer readiness"))
    figure_case("readiness.plot_readiness", "no-maps", lambda: R.plot_readiness(study(6, maps=False)))
    case("readiness.plot_pareto", "5families", lambda f: R.plot_pareto(pareto(), ax=_ax(f), chosen=chosen(pareto())))
    for n in (8, 40):
        case("readiness.plot_labels", f"{n}steps", lambda f, n=n: R.plot_labels(readiness_labels(n), ax=_ax(f)))
        case("readiness.plot_ready_by_step", f"{n}steps", lambda f, n=n: R.plot_ready_by_step(readiness_dataset(n), ax=_ax(f)))
        case("readiness.plot_firing", f"{n}traces", lambda f, n=n: R.plot_firing(firing(n), ax=_ax(f)))

    # steering
    def own_ax(fig: Any, size: tuple[float, float] = (6, 4)) -> Any:
        return (fig if fig is not None else new_figure(*size)).add_subplot()

    case("steering.plot_curves", "3series", lambda f: S.plot_curves(
        own_ax(f), [-8, -4, 0, 4, 8], {"P(Wait next)": [0.1, 0.2, 0.3, 0.5, 0.6], "accuracy": [0.7, 0.7, 0.72, 0.6, 0.4],
                                        "closed": [0.9, 0.9, 0.8, 0.7, 0.5]}, "steering coefficient", "rate", "a sweep"))
    case("steering.plot_curves", "xticklabels", lambda f: S.plot_curves(
        own_ax(f), list(range(6)), {"acc": [0.5] * 6}, "setting", "rate", "named settings",
        xticklabels=["none", "Wait", "Hmm", "Alternatively", "But wait", "all"]))
    case("steering.plot_bars", "6bars", lambda f: S.plot_bars(
        own_ax(f), ["none", "Wait", "Hmm", "Alternatively", "But wait", "all four"], [0.72, 0.7, 0.71, 0.69, 0.7, 0.41],
        "final accuracy", "suppressed words", errors=[0.02] * 6))
    for nl in (6, 32):
        case("steering.plot_vector_norms", f"{nl}L", lambda f, nl=nl: S.plot_vector_norms(steering_vector(nl), ax=_ax(f)))
    for nc in (5, 17):
        case("steering.plot_coefficient_sweep", f"{nc}coeffs", lambda f, nc=nc: S.plot_coefficient_sweep(coefficient_sweep(nc), ax=_ax(f)))
        case("steering.plot_sweep_outcomes", f"{nc}coeffs", lambda f, nc=nc: S.plot_sweep_outcomes(coefficient_sweep(nc), ax=_ax(f)))
    figure_case("steering.coefficient_sweep_figure", "2sweeps", lambda: S.coefficient_sweep_figure(
        {"L10": coefficient_sweep(layers=(10,)), "L10-14": coefficient_sweep(layers=(10, 12, 14))}))

    # value vectors
    for nl in (6, 32):
        case("value_vectors.plot_probe_accuracy", f"{nl}L", lambda f, nl=nl: V.plot_probe_accuracy(layer_probe(nl), ax=_ax(f)))
    case("value_vectors.plot_ablation_bars", "3plans", lambda f: V.plot_ablation_bars(ablations(), labels=ABLATION_LABELS, ax=_ax(f)))
    case("value_vectors.plot_ablation_bars", "plan-names", lambda f: V.plot_ablation_bars(ablations(), ax=_ax(f)))
    case("value_vectors.plot_ablation_scatter", "24ex", lambda f: V.plot_ablation_scatter(ablation_effect(), ax=_ax(f)))
    for n in (8, 30):
        case("value_vectors.plot_neuron_hits", f"{n}hits", lambda f, n=n: V.plot_neuron_hits(neuron_hits(n), ax=_ax(f)))
    for n in (6, 20):
        case("value_vectors.plot_value_vector_table", f"{n}rows", lambda f, n=n: V.plot_value_vector_table(
            vv_records(n), ax=_ax(f), title="value vectors promoting ' Wait'"))
        figure_case("value_vectors.plot_value_vector_overview", f"{n}rows", lambda n=n: V.plot_value_vector_overview(
            layer_probe(28), ablations(), vv_records(n), " Wait", MODEL, labels=ABLATION_LABELS))


def _head_ranking(T: Any, nl: int, nh: int, fig: Any) -> Any:
    from mechthink.attribution import HeadRanking

    return T.plot_head_ranking(HeadRanking(-rand(nl, nh), [(1, 2), (nl - 1, 0), (nl // 2, nh - 1)]), ax=_ax(fig))


def _circuit_graph(X: Any, c: Any, fig: Any) -> Any:
    return X.plot_circuit_graph(c.graph, c.scores, ax=_ax(fig), circuit=c)


def _estimators(T: Any, nt: int, nl: int, fig: Any) -> Any:
    comp = comparison(nt, nl)
    axes = None if fig is None else list(fig.subplots(3, 1))
    return T.plot_estimator_heatmaps(comp, axes=axes, what="' Wait' logit")


def _spearman() -> Any:
    from mechthink.attribution import SpearmanTable

    return SpearmanTable(["atp", "qkfix", "ig"], ["resid_pre", "attn_out", "mlp_out", "z"], rand(3, 4, 6) * 2 - 1)


def _overlaps() -> Any:
    from mechthink.context import FutureWordOverlap, TopWordOverlap

    ov = [TopWordOverlap([(w, 0.5) for w in WORDS[:5]], [k % 2 == 0 for k in range(5)], (k % 6) / 5, 64) for k in range(20)]
    return FutureWordOverlap(ov, ["So 3 + 5 = 8."] * 20)


register()


def _figure(out: Any) -> Any:
    return out if hasattr(out, "get_axes") else out.figure


def _check(fig: Any) -> None:
    problems = layout_problems(fig)
    for p in problems:
        print(p)
    assert problems == [], "\n".join(problems[:15])


PARAMS = [pytest.param(name, cid, draw, given, id=f"{name}-{cid}-{'given_ax' if given else 'own_fig'}")
          for name, items in CASES.items() for cid, draw in items
          for given in ((False,) if name in AXES_FREE else (False, True))]


# ============================================================================ tests
def test_every_plot_function_has_a_case():
    found = discover()
    missing = sorted(set(found) - set(CASES))
    assert not missing, f"plot functions without a layout case in tests/test_plot_layout.py: {missing}"
    stale = sorted(set(CASES) - set(found))
    assert not stale, f"cases for functions that are not public plot functions: {stale}"
    takes_ax = {n for n, fn in found.items() if {"ax", "axes"} & set(inspect.signature(fn).parameters)}
    assert AXES_FREE.isdisjoint(takes_ax), f"these take an ax: draw them on given axes too: {sorted(AXES_FREE & takes_ax)}"


@pytest.mark.parametrize(("name", "cid", "draw", "given"), PARAMS)
def test_layout(name, cid, draw, given):
    """No overlapping tick labels, no text off the canvas, on a new figure and on given axes."""
    if not given:
        _check(_figure(draw(None)))
        return
    own = _figure(draw(None))  # the size the function picks for itself (not drawn)
    fig = new_figure(*own.get_size_inches())
    out = _figure(draw(fig))
    assert out is fig, f"{name} drew on another figure than the one of the axes given"
    _check(fig)


def test_html_writers_produce_html(tmp_path):
    from mechthink.plotting.attribution import colored_tokens_html, save_colored_tokens

    toks, vals = list(TOKENS), rand(len(TOKENS))
    page = colored_tokens_html(toks, vals, title="AtP importance")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<h3>AtP importance</h3>" in page and "boxed" in page and "Janet" in page
    saved = save_colored_tokens(tmp_path / "tokens.html", toks, vals, title="AtP importance").read_text(encoding="utf-8")
    assert saved.startswith("<!DOCTYPE html>") and "<h3>AtP importance</h3>" in saved and len(saved) == len(page)  # ids differ


def test_circuit_html_produces_the_page(tmp_path):
    from mechthink.plotting.circuits import circuit_html, save_circuit_html

    c = circuit(4, 4, 2)
    toks = tokens(12)
    att = rand(4, 4, len(toks)).softmax(-1)
    page = circuit_html(c, toks, att, title="tiny-thinker: the circuit behind ' Wait'")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<h2>tiny-thinker: the circuit behind &#x27; Wait&#x27;</h2>" in page and "<svg" in page
    assert f"{c.n_edges} of {c.graph.n_edges} edges" in page and "L0H1" in page and "Janet" in page
    assert page.count('class="edge"') == c.n_edges
    bare = circuit_html(c)  # no tokens: the page says so instead of an attention panel
    assert "No attention patterns were given" in bare and 'id="tokens"' not in bare
    saved = save_circuit_html(tmp_path / "circuit" / "view.html", c, toks, att, title="tiny-thinker: the circuit behind ' Wait'")
    assert saved.read_text(encoding="utf-8") == page
