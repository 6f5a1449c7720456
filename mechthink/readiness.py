"""Knowing when it knows: answer-readiness labels and probes, early exit without the gold answer,
and the confidence trajectory across layers and steps.

At every step boundary of a trace (the last token of each sentence or line of the thinking,
:func:`mechthink.traces.split_steps`, with its line break) the answer is forced through a forked
KV cache (:func:`mechthink.confidence.answer_probe`: a suffix such as ``</think> The final
answer is \\boxed{`` + greedy decoding) and the boundary is labelled *ready* when the forced
answer equals the answer the model gives at the end of its thinking (no gold needed), and
*correct* when it equals the gold answer (for evaluation only). Linear probes on the residual
stream at the boundary token (or its mean over the step) predict readiness, one per layer,
cross-validated with folds split by problem, scored by AUROC with a problem-bootstrap interval
(Zhang et al. 2025). Early-exit policies that need no gold answer (the probe, the forced
answer's own confidence, the answer written k times, a backtracking word after an answer, fixed
budgets as in s1's budget forcing) are compared on held-out problems as a Pareto curve of
thinking tokens saved against accuracy. The confidence trajectory reads log p(final answer) at
the forced suffix through the logit lens and the tuned lens at every layer and boundary.

Sources: Zhang et al. 2025, "Reasoning Models Know When They're Right: Probing Hidden States for
Self-Verification" (arXiv:2504.05419); Muennighoff et al. 2025, "s1: Simple test-time scaling"
(arXiv:2501.19393); answer instances and backtracking-triggered exit: wj210/cot_backtrack;
Belrose et al. 2023, "Eliciting Latent Predictions from Transformers with the Tuned Lens"
(arXiv:2303.08112) for the logit and tuned lens.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
from einops import einsum, reduce
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechthink.confidence import answer_probe, gold_variants
from mechthink.data.answers import answers_match, normalize_number, parse_answer
from mechthink.progress import track
from mechthink.results import Result
from mechthink.traces import Trace, backtracking_events, split_steps

if TYPE_CHECKING:
    import pandas as pd

    from mechthink.lens import TunedLens
    from mechthink.models.thinking_model import ThinkingModel

__all__ = [
    "AnswerRepeated",
    "BacktrackAfterAnswer",
    "ConfidenceThreshold",
    "Episode",
    "ExitOutcome",
    "ExitPolicy",
    "ExitState",
    "FiringAgreement",
    "ParetoResult",
    "ProbeCV",
    "ProbeThreshold",
    "ReadinessDataset",
    "ReadinessLabels",
    "ReadinessProbe",
    "ReadinessStudy",
    "TokenBudget",
    "Trajectory",
    "TrajectoryMap",
    "auroc",
    "average_trajectories",
    "build_datasets",
    "confidence_trajectory",
    "cross_validate",
    "evaluate_policies",
    "firing_agreement",
    "first_firing",
    "label_traces",
    "make_episode",
    "organism_answer_step",
    "policy_grid",
    "problem_folds",
    "readiness_labels",
    "readiness_study",
    "run_policy",
    "train_probe",
]

Pool = Literal["last", "mean"]
_NUMBER_RE = re.compile(r"(?:(?<![\w)\]])-)?(?<![\w.,])\d+(?:,\d{3})*(?:\.\d+)?(?![\d])")
#: A number that ends a sentence, allowing closing markup (``}``, ``$``, ``**``, ``)``) and a final mark.
_FINAL_NUMBER_RE = re.compile(r"(-?\d+(?:,\d{3})*(?:\.\d+)?)\s*(?:\\\)|\\\]|[}$)*])*\s*[.?!;:]?\s*$")


# ============================================================================ labels
@dataclass
class ReadinessLabels(Result):
    """Forced answers and readiness labels at every step boundary of one trace.

    Attributes:
        trace_id: The trace (problem) id.
        positions: Boundary token positions (the last token of each step with its closing
            whitespace); the answer is forced after ``ids[:position + 1]``.
        step_starts: First token of each step (for the mean over the step).
        step_texts: Each step's text.
        char_ends: Character offset (in ``trace.text``) just past each boundary token.
        suffixes: The suffix as appended at each boundary (its leading whitespace trimmed by
            what the prefix already ends with).
        forced: The forced answer at each boundary (normalised), or None if nothing was decoded.
        logprob: ``[step]`` log-prob of the most likely answer candidate available at that
            boundary (numbers of the question and of the thinking so far, and the forced answer),
            each scored as a whole sequence closed by the terminator).
        ready: ``[step]`` the forced answer equals ``final_answer`` (no gold needed).
        correct: ``[step]`` the forced answer equals ``gold`` (evaluation only), or None.
        final_answer: The answer the model gives after its thinking (parsed from the answer
            text; the forced answer at the last boundary when the thinking never closed).
        final_source: ``"answer"`` or ``"forced"`` (where ``final_answer`` came from).
        gold: The gold answer, if known.
        think_start: First thinking token.
        think_end: End (exclusive) of the thinking.
        suffix: The answer-forcing suffix.
    """

    trace_id: str
    positions: list[int]
    step_starts: list[int]
    step_texts: list[str]
    char_ends: list[int]
    suffixes: list[str]
    forced: list[str | None]
    logprob: Float[Tensor, " step"]
    ready: Bool[Tensor, " step"]
    correct: Bool[Tensor, " step"] | None
    final_answer: str | None
    final_source: str
    gold: str | None
    think_start: int
    think_end: int
    suffix: str

    @property
    def n_steps(self) -> int:
        return len(self.positions)

    @property
    def confidence(self) -> Float[Tensor, " step"]:
        """``exp(logprob)``: the forced answer's probability in [0, 1]."""
        return self.logprob.exp()

    @property
    def n_thinking_tokens(self) -> int:
        """Thinking tokens through the last boundary (what finishing the thinking costs)."""
        return self.positions[-1] + 1 - self.think_start

    def to_frame(self) -> "pd.DataFrame":
        """One row per boundary: step, position, text, forced answer, confidence, ready, correct."""
        import pandas as pd

        return pd.DataFrame({
            "trace_id": self.trace_id, "step": range(self.n_steps), "position": self.positions,
            "text": self.step_texts, "forced": self.forced, "confidence": self.confidence.tolist(),
            "ready": self.ready.tolist(),
            "correct": self.correct.tolist() if self.correct is not None else [None] * self.n_steps,
        })

    def plot(self, ax: Any = None) -> Any:
        """Forced-answer confidence by step with ready / correct marks."""
        from mechthink.plotting.readiness import plot_labels

        return plot_labels(self, ax=ax)


def _numbers(text: str) -> list[tuple[str, int]]:
    """Normalised numbers of ``text`` with the character offset just past each."""
    return [(normalize_number(m.group(0)), m.end()) for m in _NUMBER_RE.finditer(text)]


def _forced_text(text: str) -> str | None:
    text = text.strip()
    return normalize_number(text) if text else None


def _choices(answers: Iterable[str], terminator: str) -> dict[str, list[str]]:
    return {a: [v + terminator for v in gold_variants(a)] for a in answers}


def _boundaries(trace: Trace) -> tuple[list[Any], list[int]]:
    """The steps of the thinking and their boundary tokens, one step per distinct boundary.

    A step's boundary is the last token before the next step starts (so it holds the step's
    closing whitespace, e.g. the line break); the last step's is the last thinking token.
    """
    if trace.think_start is None:
        raise ValueError(
            f"readiness: trace {trace.id!r} has no thinking (the think tag never opens); generate with thinking='on'"
        )
    all_steps = split_steps(trace)
    if not all_steps:
        raise ValueError(f"readiness: trace {trace.id!r} has no step boundaries (its thinking is empty)")
    last = trace.thinking_span[1] - 1
    nxt = [int(s.token_start) - 1 for s in all_steps[1:]] + [last]
    steps, positions = [], []
    for s, p in zip(all_steps, nxt):
        p = max(p, int(s.token_end) - 1)
        if not positions or p > positions[-1]:
            steps.append(s)
            positions.append(p)
    return steps, positions


def _suffix_after(trace: Trace, position: int, suffix: str) -> str:
    """``suffix`` without the leading whitespace the prefix through ``position`` already ends with."""
    head = trace.text[: trace.offsets[position][1]]
    ws = len(head) - len(head.rstrip())
    lead = len(suffix) - len(suffix.lstrip())
    return suffix[min(ws, lead):]


def _forced_probe(
    model: "ThinkingModel", trace: Trace, positions: Sequence[int], suffixes: Sequence[str],
    choices: Mapping[str, Sequence[str]], greedy_tokens: int, stop: str,
) -> tuple[Tensor, list[str]]:
    """:func:`answer_probe` at each position with its own suffix (one call per distinct suffix)."""
    logprobs = torch.empty(len(positions), len(choices))
    greedy = [""] * len(positions)
    for suf in dict.fromkeys(suffixes):
        idx = [i for i, s in enumerate(suffixes) if s == suf]
        res = answer_probe(model, trace.ids, [positions[i] for i in idx], choices, suffix=suf,
                           greedy_tokens=greedy_tokens, greedy_stop=stop or None)
        logprobs[idx] = res.logprobs
        for k, i in enumerate(idx):
            greedy[i] = (res.greedy or [""] * len(idx))[k]
    return logprobs, greedy


@torch.inference_mode()
def readiness_labels(
    model: "ThinkingModel",
    trace: Trace,
    *,
    gold: str | None = None,
    suffix: str | None = None,
    terminator: str | None = None,
    max_answer_tokens: int = 8,
) -> ReadinessLabels:
    """Force the answer at every step boundary and label it ready (= the final answer) and correct.

    A boundary is the last token of a step with its closing whitespace (the token before the
    next step). The suffix follows without repeating whitespace the prefix already ends with
    (after a line break, ``\\n</think>`` becomes ``</think>``). The forced answer is the greedy
    decoding after the suffix up to the terminator. Its confidence is the largest probability
    among the answer candidates available at that boundary: the numbers of the question and of
    the thinking up to the boundary, and the forced answer itself (each a whole sequence closed
    by the terminator, spellings such as ``1,250``/``1250`` combined). One incremental pass over
    the trace on a KV cache (per distinct suffix) scores every candidate at every boundary; a
    second pass runs only for forced answers that are not among them.

    Args:
        model: The loaded model.
        trace: A trace with thinking (:func:`mechthink.traces.generate`).
        gold: The gold answer (default ``trace.gold``); only the ``correct`` labels use it.
        suffix: The answer-forcing suffix (default ``model.spec.answer_suffix``). A suffix that
            stays inside the thinking, such as ``"\\nSo the answer is "``, works too.
        terminator: What closes an answer: ends the greedy decoding and every scored candidate
            (default ``"}"`` after a suffix ending in ``{`` such as ``\\boxed{``, else ``"."``).
        max_answer_tokens: Greedy decoding budget of the forced answer.

    Returns:
        A :class:`ReadinessLabels`.

    Raises:
        ValueError: a trace without thinking or without step boundaries, or a bad budget.
    """
    if isinstance(max_answer_tokens, bool) or not isinstance(max_answer_tokens, int) or max_answer_tokens < 1:
        raise ValueError(f"readiness_labels: max_answer_tokens={max_answer_tokens!r}; use an integer >= 1")
    steps, positions = _boundaries(trace)
    suffix = model.spec.answer_suffix if suffix is None else suffix
    gold = trace.gold if gold is None else gold
    if terminator is None:
        terminator = "}" if suffix.rstrip().endswith("{") else "."
    suffixes = [_suffix_after(trace, p, suffix) for p in positions]
    char_ends = [int(trace.offsets[p][1]) for p in positions]
    c0, c1 = trace.thinking_char_span
    first_end: dict[str, int] = {n: 0 for n, _ in _numbers(trace.question)}
    for n, end in _numbers(trace.text[c0:c1]):
        first_end.setdefault(n, c0 + end)
    cands = list(first_end) or ["0"]  # a placeholder never counted unless it is the forced answer
    logprobs, greedy = _forced_probe(model, trace, positions, suffixes, _choices(cands, terminator),
                                     max_answer_tokens, terminator)
    forced = [_forced_text(g) for g in greedy]
    missing = sorted({f for f in forced if f is not None and f not in cands})
    if missing:
        extra, _ = _forced_probe(model, trace, positions, suffixes, _choices(missing, terminator), 0, terminator)
        logprobs, cands = torch.cat([logprobs, extra], dim=1), cands + missing
    avail = torch.tensor([[first_end.get(c, math.inf) <= ce or c == f for c in cands]
                          for ce, f in zip(char_ends, forced)], dtype=torch.bool)
    best = logprobs.masked_fill(~avail, -math.inf).max(dim=1).values
    final = parse_answer(trace.answer_text) if trace.think_end is not None else None
    source = "answer" if final is not None else "forced"
    final = final if final is not None else forced[-1]
    ready = torch.tensor([f is not None and final is not None and answers_match(f, final) for f in forced])
    correct = (torch.tensor([f is not None and answers_match(f, str(gold)) for f in forced])
               if gold is not None else None)
    return ReadinessLabels(
        trace_id=trace.id, positions=positions, step_starts=[int(s.token_start) for s in steps],
        step_texts=[s.text for s in steps], char_ends=char_ends, suffixes=suffixes, forced=forced,
        logprob=best.float(), ready=ready, correct=correct, final_answer=final, final_source=source,
        gold=None if gold is None else str(gold), think_start=int(trace.think_start),
        think_end=int(trace.thinking_span[1]), suffix=suffix,
    )


def label_traces(model: "ThinkingModel", traces: Sequence[Trace], **kwargs: Any) -> list[ReadinessLabels]:
    """:func:`readiness_labels` for every trace (with a progress bar)."""
    return [readiness_labels(model, t, **kwargs) for t in track(traces, "readiness labels")]


# ============================================================================ features
def _layer_hooks(n_layers: int) -> list[str]:
    from mechthink.hooks import hook_name

    return [hook_name(L, "resid_pre") for L in range(n_layers)] + [hook_name(n_layers - 1, "resid_post")]


@dataclass
class ReadinessDataset(Result):
    """Residual features at step boundaries with their readiness labels, over many traces.

    Attributes:
        features: ``[row, layer, d_model]`` residual stream at each boundary (``pool="last"``:
            the boundary token; ``"mean"``: the mean over the step's tokens), for
            ``resid_pre_0 .. resid_pre_{n-1}, resid_post_{n-1}``.
        ready: ``[row]`` readiness labels (forced answer = final answer).
        correct: ``[row]`` forced answer = gold (False where no gold is known).
        problems: Problem (trace) id of each row; folds never split a problem.
        steps: Boundary index of each row inside its trace.
        layers: Layer labels indexing the second axis.
        pool: ``"last"`` or ``"mean"``.
    """

    features: Float[Tensor, "row layer d_model"]
    ready: Bool[Tensor, " row"]
    correct: Bool[Tensor, " row"]
    problems: list[str]
    steps: list[int]
    layers: list[str]
    pool: str

    def __len__(self) -> int:
        return len(self.problems)

    def subset(self, problems: Iterable[str]) -> "ReadinessDataset":
        """The rows of the given problems (in the original order)."""
        keep = set(problems)
        idx = torch.tensor([i for i, p in enumerate(self.problems) if p in keep], dtype=torch.long)
        return ReadinessDataset(self.features[idx], self.ready[idx], self.correct[idx],
                                [self.problems[i] for i in idx.tolist()], [self.steps[i] for i in idx.tolist()],
                                self.layers, self.pool)

    def by_problem(self, values: Sequence[float] | Tensor) -> dict[str, list[float]]:
        """One value per row grouped into per-problem lists in boundary order."""
        vals = values.tolist() if isinstance(values, Tensor) else list(values)
        if len(vals) != len(self):
            raise ValueError(f"by_problem: {len(vals)} values for {len(self)} rows")
        return _group(self.problems, self.steps, vals)

    def to_frame(self) -> "pd.DataFrame":
        """One row per boundary: problem, step, ready, correct (features left out)."""
        import pandas as pd

        return pd.DataFrame({"problem": self.problems, "step": self.steps, "ready": self.ready.tolist(),
                             "correct": self.correct.tolist()})

    def to_json(self, path: str | Path | None = None) -> str:
        """The labels and the feature shape (the features themselves are left out)."""
        text = json.dumps({"pool": self.pool, "layers": self.layers, "feature_shape": list(self.features.shape),
                           "rows": self.to_frame().to_dict(orient="records")})
        if path is not None:
            Path(path).write_text(text)
        return text

    def plot(self, ax: Any = None) -> Any:
        """Fraction of ready boundaries by step index."""
        from mechthink.plotting.readiness import plot_ready_by_step

        return plot_ready_by_step(self, ax=ax)


def _group(problems: Sequence[str], steps: Sequence[int], values: Sequence[float]) -> dict[str, list[float]]:
    """Per-problem lists of ``values`` in step order."""
    out: dict[str, list[float]] = {}
    for p, _, v in sorted(zip(problems, steps, values), key=lambda r: r[1]):  # stable: by step within a problem
        out.setdefault(p, []).append(float(v))
    return out


@torch.inference_mode()
def _boundary_features(model: "ThinkingModel", trace: Trace, labels: ReadinessLabels) -> dict[str, Tensor]:
    from mechthink.hooks import gather

    names = _layer_hooks(model.n_layers)
    cache = gather(model, trace.ids[: labels.positions[-1] + 1], names)
    stack = torch.stack([cache[n][0] for n in names], dim=1).float().cpu()  # [pos, layer, d_model]
    last = stack[torch.tensor(labels.positions)]
    mean = torch.stack([reduce(stack[s : p + 1], "pos layer d -> layer d", "mean")
                        for s, p in zip(labels.step_starts, labels.positions)])
    return {"last": last, "mean": mean}


def build_datasets(
    model: "ThinkingModel", traces: Sequence[Trace], labels: Sequence[ReadinessLabels]
) -> dict[str, ReadinessDataset]:
    """Residual features at every boundary of every trace, ``{"last": ..., "mean": ...}``.

    One forward per trace (only the residual hooks cached) gives both pools.
    """
    from mechthink.lens import component_names

    if len(traces) != len(labels) or not traces:
        raise ValueError(f"build_datasets: need one labels object per trace, got {len(traces)} traces and "
                         f"{len(labels)} labels")
    feats: dict[str, list[Tensor]] = {"last": [], "mean": []}
    for tr, lab in track(list(zip(traces, labels)), "readiness features"):
        if tr.id != lab.trace_id:
            raise ValueError(f"build_datasets: labels of {lab.trace_id!r} paired with trace {tr.id!r}")
        for k, v in _boundary_features(model, tr, lab).items():
            feats[k].append(v)
    ready = torch.cat([lab.ready for lab in labels])
    correct = torch.cat([lab.correct if lab.correct is not None else torch.zeros(lab.n_steps, dtype=torch.bool)
                         for lab in labels])
    problems = [lab.trace_id for lab in labels for _ in range(lab.n_steps)]
    steps = [i for lab in labels for i in range(lab.n_steps)]
    layers = component_names(model.n_layers, "accumulated")
    return {k: ReadinessDataset(torch.cat(v), ready, correct, problems, steps, layers, k) for k, v in feats.items()}


# ============================================================================ probes
def auroc(scores: Float[Tensor, " row"], labels: Bool[Tensor, " row"]) -> float:
    """Area under the ROC curve (Mann-Whitney U; ties count one half).

    Raises:
        ValueError: shapes differ or only one class is present.
    """
    return float(_auroc_columns(scores.reshape(-1, 1), labels.reshape(-1))[0])


def _auroc_columns(scores: Float[Tensor, "row col"], labels: Bool[Tensor, " row"]) -> Float[Tensor, " col"]:
    from scipy.stats import rankdata

    if scores.shape[0] != labels.shape[0]:
        raise ValueError(f"auroc: {scores.shape[0]} scores for {labels.shape[0]} labels")
    pos = int(labels.sum())
    neg = int(labels.numel()) - pos
    if pos == 0 or neg == 0:
        raise ValueError("auroc: needs both ready and not-ready rows")
    ranks = torch.from_numpy(rankdata(scores.double().numpy(), axis=0))
    u = ranks[labels].sum(0) - pos * (pos + 1) / 2
    return (u / (pos * neg)).float()


def problem_folds(problems: Sequence[str], n_folds: int = 5, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """Cross-validation folds split by problem: ``[(train_rows, test_rows), ...]``.

    Problems (not rows) are shuffled with ``seed`` and dealt round-robin into ``n_folds``
    folds, so all boundaries of a problem land on the same side of every split.

    Raises:
        ValueError: ``n_folds`` < 2 or more folds than problems.
    """
    uniq = sorted(set(problems))
    if isinstance(n_folds, bool) or not isinstance(n_folds, int) or not 2 <= n_folds <= len(uniq):
        raise ValueError(f"problem_folds: n_folds={n_folds!r}; use an integer in 2..{len(uniq)} "
                         "(the number of problems)")
    order = torch.randperm(len(uniq), generator=torch.Generator().manual_seed(int(seed))).tolist()
    fold_of = {uniq[j]: k % n_folds for k, j in enumerate(order)}
    folds = torch.tensor([fold_of[p] for p in problems])
    return [((folds != k).nonzero().flatten(), (folds == k).nonzero().flatten()) for k in range(n_folds)]


def _fit_logistic(
    x: Float[Tensor, "row layer d_model"], y: Bool[Tensor, " row"], l2: float, max_iter: int
) -> tuple[Tensor, Tensor]:
    """L2-regularised logistic regression per layer on standardised features (L-BFGS).

    Returns weight ``[layer, d_model]`` and bias ``[layer]`` in the raw feature space.
    """
    x = x.double()
    mu = x.mean(0)
    sd = x.std(0, unbiased=False).clamp_min(1e-6)
    z = (x - mu) / sd
    target = y.double()[:, None].expand(-1, x.shape[1])
    w = torch.zeros(x.shape[1], x.shape[2], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        logits = einsum(z, w, "row layer d, layer d -> row layer") + b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(0).sum()
        loss = loss + 0.5 * l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w_raw = (w.detach() / sd)
    b_raw = b.detach() - (w_raw * mu).sum(-1)
    return w_raw.float(), b_raw.float()


@dataclass
class ReadinessProbe(Result):
    """Linear readiness probes, one per layer: ``P(ready) = sigmoid(x @ weight[L] + bias[L])``.

    Attributes:
        weight: ``[layer, d_model]`` (standardisation folded in: apply to raw residuals).
        bias: ``[layer]``.
        layers: Layer labels.
        pool: The pooling the probes were trained on (``"last"`` or ``"mean"``).
        layer: The layer :meth:`predict` uses (the best cross-validated one, typically).
        meta: Training settings.
    """

    weight: Float[Tensor, "layer d_model"]
    bias: Float[Tensor, " layer"]
    layers: list[str]
    pool: str
    layer: int
    meta: dict[str, Any] = field(default_factory=dict)

    def _check(self, features: Tensor) -> Tensor:
        n_layer, width = self.weight.shape
        if features.ndim != 3 or features.shape[-1] != width or features.shape[-2] != n_layer:
            raise ValueError(f"ReadinessProbe: features of shape {tuple(features.shape)} do not fit a probe of "
                             f"{n_layer} layers x width {width}; pass [row, {n_layer}, {width}]")
        return features

    def logits_all(self, features: Float[Tensor, "row layer d_model"]) -> Float[Tensor, "row layer"]:
        """Probe logits at every layer."""
        x = self._check(features).float()
        return einsum(x, self.weight.to(x.device), "row layer d, layer d -> row layer") + self.bias.to(x.device)

    def predict(self, features: Float[Tensor, "row layer d_model"]) -> Float[Tensor, " row"]:
        """``P(ready)`` of each row at :attr:`layer`."""
        return torch.sigmoid(self.logits_all(features)[:, self.layer])

    def save(self, path: str | Path) -> None:
        """Save as safetensors (layers, pool, layer and meta in the metadata)."""
        from safetensors.torch import save_file

        meta = {"layers": json.dumps(self.layers), "pool": self.pool, "layer": str(self.layer),
                "meta": json.dumps(self.meta)}
        save_file({"weight": self.weight.contiguous(), "bias": self.bias.contiguous()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> "ReadinessProbe":
        """Load a probe written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            m = fh.metadata() or {}
            return cls(fh.get_tensor("weight"), fh.get_tensor("bias"), json.loads(m.get("layers", "[]")),
                       m.get("pool", "last"), int(m.get("layer", "0")), json.loads(m.get("meta", "{}")))

    def to_frame(self) -> "pd.DataFrame":
        """One row per layer: weight norm and bias."""
        import pandas as pd

        return pd.DataFrame({"layer": self.layers, "weight_norm": self.weight.norm(dim=-1).tolist(),
                             "bias": self.bias.tolist(), "used": [i == self.layer for i in range(len(self.layers))]})

    def plot(self, ax: Any = None) -> Any:
        """Weight norm by layer (the used layer highlighted)."""
        from mechthink.plotting.readiness import plot_probe_weights

        return plot_probe_weights(self, ax=ax)


def _check_dataset(ds: ReadinessDataset, who: str) -> None:
    if len(ds) == 0:
        raise ValueError(f"{who}: the dataset has no rows")
    n = int(ds.ready.sum())
    if n == 0 or n == len(ds):
        raise ValueError(f"{who}: needs both ready and not-ready boundaries, got {n} ready of {len(ds)}")


def train_probe(
    dataset: ReadinessDataset, layer: int | None = None, l2: float = 1e-2, max_iter: int = 200
) -> ReadinessProbe:
    """Train one logistic readiness probe per layer on all rows of ``dataset``.

    Args:
        dataset: Features and labels (e.g. the training problems' boundaries).
        layer: The layer :meth:`ReadinessProbe.predict` uses (default: the last).
        l2: L2 penalty on the standardised weights.
        max_iter: L-BFGS iterations.
    """
    _check_dataset(dataset, "train_probe")
    n_layer = len(dataset.layers)
    layer = n_layer - 1 if layer is None else int(layer)
    if not 0 <= layer < n_layer:
        raise ValueError(f"train_probe: layer={layer} is outside 0..{n_layer - 1}")
    w, b = _fit_logistic(dataset.features, dataset.ready, l2, max_iter)
    return ReadinessProbe(w, b, list(dataset.layers), dataset.pool, layer,
                          {"l2": l2, "max_iter": max_iter, "n_rows": len(dataset),
                           "n_problems": len(set(dataset.problems))})


@dataclass
class ProbeCV(Result):
    """Cross-validated readiness probes (folds split by problem).

    Attributes:
        auroc: ``[layer]`` AUROC of the pooled out-of-fold scores.
        ci: ``[layer, 2]`` bootstrap interval over problems.
        logits: ``[row, layer]`` out-of-fold probe logits (each row scored by a probe that never
            saw its problem).
        problems: Problem of each row.
        steps: Boundary index of each row.
        layers: Layer labels.
        pool: The feature pooling.
        n_folds: Folds.
    """

    auroc: Float[Tensor, " layer"]
    ci: Float[Tensor, "layer 2"]
    logits: Float[Tensor, "row layer"]
    problems: list[str]
    steps: list[int]
    layers: list[str]
    pool: str
    n_folds: int

    @property
    def best_layer(self) -> int:
        """Index of the layer with the highest AUROC."""
        return int(self.auroc.argmax())

    def scores_by_problem(self, layer: int | None = None) -> dict[str, list[float]]:
        """Out-of-fold ``P(ready)`` at ``layer`` (default the best) grouped by problem in step order."""
        col = torch.sigmoid(self.logits[:, self.best_layer if layer is None else layer]).tolist()
        return _group(self.problems, self.steps, col)

    def to_frame(self) -> "pd.DataFrame":
        """One row per layer: auroc, ci_low, ci_high."""
        import pandas as pd

        return pd.DataFrame({"pool": self.pool, "layer": self.layers, "auroc": self.auroc.tolist(),
                             "ci_low": self.ci[:, 0].tolist(), "ci_high": self.ci[:, 1].tolist()})

    def to_json(self, path: str | Path | None = None) -> str:
        """Per-layer AUROC and interval (the out-of-fold logits left out)."""
        text = json.dumps({"pool": self.pool, "n_folds": self.n_folds, "best_layer": self.layers[self.best_layer],
                           "layers": self.to_frame().to_dict(orient="records")})
        if path is not None:
            Path(path).write_text(text)
        return text

    def plot(self, ax: Any = None) -> Any:
        """AUROC by layer with the bootstrap interval."""
        from mechthink.plotting.readiness import plot_auroc

        return plot_auroc([self], ax=ax)


def _bootstrap_auroc(
    scores: Float[Tensor, "row col"], labels: Bool[Tensor, " row"], problems: Sequence[str], n_boot: int, seed: int,
    level: float,
) -> Float[Tensor, "col 2"]:
    """Percentile interval of the AUROC, resampling problems (all their rows together)."""
    uniq = sorted(set(problems))
    rows = {p: [] for p in uniq}
    for i, p in enumerate(problems):
        rows[p].append(i)
    g = torch.Generator().manual_seed(int(seed))
    boots = []
    for _ in range(n_boot):
        pick = torch.randint(len(uniq), (len(uniq),), generator=g).tolist()
        idx = torch.tensor([i for j in pick for i in rows[uniq[j]]])
        y = labels[idx]
        if 0 < int(y.sum()) < len(y):
            boots.append(_auroc_columns(scores[idx], y))
    if not boots:
        return torch.full((scores.shape[1], 2), math.nan)
    b = torch.stack(boots).double()
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    return torch.quantile(b, q, dim=0).T.float()


def cross_validate(
    dataset: ReadinessDataset,
    n_folds: int = 5,
    seed: int = 0,
    l2: float = 1e-2,
    n_boot: int = 1000,
    level: float = 0.95,
    max_iter: int = 200,
) -> ProbeCV:
    """Per-layer readiness probes cross-validated with folds split by problem.

    Every row is scored by the probe of the fold that held its problem out; the AUROC per layer
    is computed on the pooled out-of-fold logits, its interval by resampling problems.
    """
    _check_dataset(dataset, "cross_validate")
    if not 0 < level < 1:
        raise ValueError(f"cross_validate: level={level} must be in (0, 1)")
    logits = torch.empty(len(dataset), len(dataset.layers))
    for train, test in problem_folds(dataset.problems, n_folds, seed):
        y = dataset.ready[train]
        if int(y.sum()) in (0, len(y)):  # one class only: the probe is the base rate
            logits[test] = 20.0 if bool(y.all()) else -20.0
            continue
        w, b = _fit_logistic(dataset.features[train], y, l2, max_iter)
        logits[test] = einsum(dataset.features[test].float(), w, "row layer d, layer d -> row layer") + b
    area = _auroc_columns(logits, dataset.ready)
    ci = _bootstrap_auroc(logits, dataset.ready, dataset.problems, n_boot, seed, level)
    return ProbeCV(area, ci, logits, list(dataset.problems), list(dataset.steps), list(dataset.layers), dataset.pool,
                   n_folds)


# ============================================================================ exit policies
@dataclass(frozen=True)
class ExitState:
    """What a policy sees at one step boundary (nothing that needs the gold answer).

    Attributes:
        step: Boundary index (0-based).
        position: Token position of the boundary.
        n_thinking_tokens: Thinking tokens written so far (through this boundary).
        text: The step's text.
        forced_answer: The answer forced at this boundary.
        confidence: Probability of the most likely answer candidate, in [0, 1].
        probe: The readiness probe's ``P(ready)``, or None when no probe was given.
        answers_written: How many sentences so far end with the latest sentence-ending number.
        backtrack_next: A backtracking word starts in the next step (exit before writing it).
    """

    step: int
    position: int
    n_thinking_tokens: int
    text: str
    forced_answer: str | None
    confidence: float
    probe: float | None
    answers_written: int
    backtrack_next: bool


@runtime_checkable
class ExitPolicy(Protocol):
    """A rule that decides, at each boundary, whether to stop thinking and force the answer.

    ``name`` labels the family and ``param`` its setting on the Pareto curve; ``should_exit``
    must be a pure function of the state.
    """

    name: ClassVar[str]

    @property
    def param(self) -> float: ...

    def should_exit(self, state: ExitState) -> bool: ...


def _unit(value: float, who: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{who}: threshold={value!r} is outside [0, 1]")


def _count(value: int, who: str, name: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{who}: {name}={value!r}; use an integer >= {low}")


@dataclass(frozen=True)
class _OneSetting:
    """A policy with one setting, its first field: a threshold in [0, 1] or a count >= ``low``."""

    name: ClassVar[str] = ""
    threshold_like: ClassVar[bool] = False
    low: ClassVar[int] = 0

    @property
    def param(self) -> float:
        """The setting (its place on the Pareto curve)."""
        return float(getattr(self, dataclasses.fields(self)[0].name))

    def __post_init__(self) -> None:
        key = dataclasses.fields(self)[0].name
        if self.threshold_like:
            _unit(getattr(self, key), type(self).__name__)
        else:
            _count(getattr(self, key), type(self).__name__, key, self.low)


@dataclass(frozen=True)
class _Threshold(_OneSetting):
    threshold: float
    threshold_like: ClassVar[bool] = True


@dataclass(frozen=True)
class ProbeThreshold(_Threshold):
    """Exit when the readiness probe's ``P(ready)`` reaches ``threshold`` (in [0, 1])."""

    name: ClassVar[str] = "probe"

    def should_exit(self, state: ExitState) -> bool:
        if state.probe is None:
            raise ValueError("ProbeThreshold: the state has no probe score; pass probe scores to make_episode")
        return state.probe >= self.threshold


@dataclass(frozen=True)
class ConfidenceThreshold(_Threshold):
    """Exit when the forced answer's probability (no training) reaches ``threshold`` (in [0, 1])."""

    name: ClassVar[str] = "confidence"

    def should_exit(self, state: ExitState) -> bool:
        return state.confidence >= self.threshold


@dataclass(frozen=True)
class AnswerRepeated(_OneSetting):
    """Exit once the same number has ended ``k`` sentences (an answer written k times)."""

    k: int
    name: ClassVar[str] = "answer_k"
    low: ClassVar[int] = 1

    def should_exit(self, state: ExitState) -> bool:
        return state.answers_written >= self.k


@dataclass(frozen=True)
class BacktrackAfterAnswer(_OneSetting):
    """Exit at the first backtracking word once an answer was written ``min_answers`` times."""

    min_answers: int = 1
    name: ClassVar[str] = "backtrack"
    low: ClassVar[int] = 1

    def should_exit(self, state: ExitState) -> bool:
        return state.backtrack_next and state.answers_written >= self.min_answers


@dataclass(frozen=True)
class TokenBudget(_OneSetting):
    """Budget forcing: exit at the first boundary with at least ``tokens`` thinking tokens."""

    tokens: int
    name: ClassVar[str] = "budget"

    def should_exit(self, state: ExitState) -> bool:
        return state.n_thinking_tokens >= self.tokens


def policy_grid(budgets: Sequence[int] = (8, 16, 32, 64), probe: bool = True) -> list[ExitPolicy]:
    """The default sweep of every policy family (probe thresholds only when ``probe``)."""
    out: list[ExitPolicy] = []
    if probe:
        out += [ProbeThreshold(t / 20) for t in range(1, 20)] + [ProbeThreshold(0.99)]
    out += [ConfidenceThreshold(t) for t in (0.5, 0.9, 0.99, 0.999, 0.9999, 0.99999, 0.999999)]
    out += [AnswerRepeated(k) for k in (1, 2, 3, 4)]
    out += [BacktrackAfterAnswer(m) for m in (1, 2, 3)]
    out += [TokenBudget(int(b)) for b in budgets]
    return out


@dataclass
class Episode:
    """One trace as a sequence of exit states, with what finishing the thinking gives.

    Attributes:
        trace_id: The trace id.
        states: One :class:`ExitState` per boundary.
        final_answer: The answer after the whole thinking (the no-exit outcome).
        gold: The gold answer (needed to score accuracy), or None.
        n_thinking_tokens: Thinking tokens through the last boundary.
    """

    trace_id: str
    states: list[ExitState]
    final_answer: str | None
    gold: str | None
    n_thinking_tokens: int


def _answers_written(texts: Sequence[str]) -> list[int]:
    counts: dict[str, int] = {}
    latest: str | None = None
    out = []
    for t in texts:
        m = _FINAL_NUMBER_RE.search(t)
        if m:
            latest = normalize_number(m.group(1))
            counts[latest] = counts.get(latest, 0) + 1
        out.append(counts.get(latest, 0) if latest is not None else 0)
    return out


def make_episode(
    trace: Trace,
    labels: ReadinessLabels,
    probe_scores: Sequence[float] | None = None,
    words: Iterable[str] | None = None,
) -> Episode:
    """The exit states of one labelled trace.

    Args:
        trace: The trace (for backtracking words).
        labels: Its :class:`ReadinessLabels`.
        probe_scores: ``P(ready)`` per boundary (e.g. a probe's held-out scores), or None.
        words: Backtracking words (default: the model's, see
            :func:`mechthink.traces.backtracking_events`).
    """
    if trace.id != labels.trace_id:
        raise ValueError(f"make_episode: labels of {labels.trace_id!r} paired with trace {trace.id!r}")
    if probe_scores is not None and len(probe_scores) != labels.n_steps:
        raise ValueError(f"make_episode: {len(probe_scores)} probe scores for {labels.n_steps} boundaries")
    events = [e.position for e in backtracking_events(trace, words)]
    nxt = labels.positions[1:] + [labels.positions[-1]]
    conf = labels.confidence.tolist()
    states = [
        ExitState(step=i, position=p, n_thinking_tokens=p + 1 - labels.think_start, text=labels.step_texts[i],
                  forced_answer=labels.forced[i], confidence=float(conf[i]),
                  probe=None if probe_scores is None else float(probe_scores[i]), answers_written=k,
                  backtrack_next=any(p < e <= q for e in events))
        for i, (p, q, k) in enumerate(zip(labels.positions, nxt, _answers_written(labels.step_texts)))
    ]
    return Episode(labels.trace_id, states, labels.final_answer, labels.gold, labels.n_thinking_tokens)


@dataclass(frozen=True)
class ExitOutcome:
    """Where a policy stopped one episode: ``step`` (None: it finished), answer, tokens used."""

    step: int | None
    answer: str | None
    tokens_used: int
    tokens_saved: int


def run_policy(policy: ExitPolicy, episode: Episode) -> ExitOutcome:
    """Walk the boundaries in order; exit at the first where the policy says so."""
    for s in episode.states:
        if policy.should_exit(s):
            saved = episode.n_thinking_tokens - s.n_thinking_tokens
            return ExitOutcome(s.step, s.forced_answer, s.n_thinking_tokens, saved)
    return ExitOutcome(None, episode.final_answer, episode.n_thinking_tokens, 0)


def _hit(answer: str | None, gold: str | None) -> bool:
    return answer is not None and gold is not None and answers_match(answer, gold)


@dataclass
class ParetoResult(Result):
    """Thinking tokens saved against accuracy for every policy setting, against finishing.

    Attributes:
        rows: One dict per policy setting: ``policy``, ``param``, ``saved`` (fraction of the
            thinking tokens not written), ``accuracy``, ``loss`` (baseline − accuracy),
            ``exited`` (fraction of episodes that exited early).
        baseline_accuracy: Accuracy when every trace finishes its thinking.
        n_episodes: Episodes evaluated.
        total_tokens: Thinking tokens of all episodes when finishing.
    """

    rows: list[dict[str, Any]]
    baseline_accuracy: float
    n_episodes: int
    total_tokens: int

    def best_within(self, max_loss: float = 0.01) -> dict[str, dict[str, Any] | None]:
        """Per policy family, the setting saving most tokens with ``loss <= max_loss`` (None if none)."""
        out: dict[str, dict[str, Any] | None] = {}
        for r in self.rows:
            best = out.setdefault(r["policy"], None)
            if r["loss"] <= max_loss + 1e-12 and (best is None or r["saved"] > best["saved"]):
                out[r["policy"]] = r
        return out

    def choose(self, calibration: "ParetoResult", max_loss: float = 0.01) -> dict[str, dict[str, Any] | None]:
        """Per family, this result's row at the setting ``calibration`` picked with :meth:`best_within`."""
        picked = calibration.best_within(max_loss)
        table = {(r["policy"], r["param"]): r for r in self.rows}
        return {k: (table.get((v["policy"], v["param"])) if v is not None else None) for k, v in picked.items()}

    def to_frame(self) -> "pd.DataFrame":
        """One row per policy setting."""
        import pandas as pd

        return pd.DataFrame(self.rows, columns=["policy", "param", "saved", "accuracy", "loss", "exited"])

    def plot(self, ax: Any = None) -> Any:
        """The Pareto curves (tokens saved vs accuracy), one line per policy family."""
        from mechthink.plotting.readiness import plot_pareto

        return plot_pareto(self, ax=ax)


def evaluate_policies(episodes: Sequence[Episode], policies: Sequence[ExitPolicy]) -> ParetoResult:
    """Run every policy on every episode: tokens saved and accuracy against finishing.

    Raises:
        ValueError: no episodes, or an episode without a gold answer.
    """
    if not episodes:
        raise ValueError("evaluate_policies: no episodes")
    missing = [e.trace_id for e in episodes if e.gold is None]
    if missing:
        raise ValueError(f"evaluate_policies: episodes {missing[:3]} have no gold answer (accuracy needs it)")
    total = sum(e.n_thinking_tokens for e in episodes)
    base = sum(_hit(e.final_answer, e.gold) for e in episodes) / len(episodes)
    rows = []
    for pol in policies:
        outs = [run_policy(pol, e) for e in episodes]
        acc = sum(_hit(o.answer, e.gold) for o, e in zip(outs, episodes)) / len(episodes)
        rows.append({"policy": pol.name, "param": pol.param, "saved": sum(o.tokens_saved for o in outs) / max(total, 1),
                     "accuracy": acc, "loss": base - acc, "exited": sum(o.step is not None for o in outs) / len(outs)})
    return ParetoResult(rows, base, len(episodes), total)


# ============================================================================ first firing
def first_firing(scores: Sequence[float], threshold: float = 0.5) -> int | None:
    """Index of the first boundary whose probe score reaches ``threshold`` (None if none does)."""
    _unit(threshold, "first_firing")
    return next((i for i, s in enumerate(scores) if s >= threshold), None)


def organism_answer_step(trace: Trace, labels: ReadinessLabels) -> int | None:
    """tiny-thinker's ground truth for ``trace``: the boundary after which the answer is
    determined (:func:`mechthink.models.organism.answer_determining_step`), or None."""
    from mechthink.models.organism import answer_determining_step

    return answer_determining_step(trace.question, labels.step_texts)


@dataclass
class FiringAgreement(Result):
    """Where the probe first fires against a known answer-determining step.

    Attributes:
        trace_ids: The traces.
        first_fire: First boundary with ``P(ready) >= threshold`` (None: never).
        truth: The ground-truth boundary (None: unknown; such traces are not counted).
        threshold: The probe threshold.
        tolerance: Steps of slack counted as agreement.
    """

    trace_ids: list[str]
    first_fire: list[int | None]
    truth: list[int | None]
    threshold: float
    tolerance: int

    @property
    def n(self) -> int:
        """Traces with a known ground truth."""
        return sum(t is not None for t in self.truth)

    @property
    def fraction(self) -> float:
        """Fraction of those where the probe fired within ``tolerance`` steps of the truth."""
        pairs = [(f, t) for f, t in zip(self.first_fire, self.truth) if t is not None]
        hits = [f is not None and abs(f - t) <= self.tolerance for f, t in pairs]
        return sum(hits) / len(hits) if hits else math.nan

    def to_frame(self) -> "pd.DataFrame":
        """One row per trace: first_fire, truth, offset."""
        import pandas as pd

        return pd.DataFrame({"trace_id": self.trace_ids, "first_fire": self.first_fire, "truth": self.truth,
                             "offset": [None if f is None or t is None else f - t
                                        for f, t in zip(self.first_fire, self.truth)]})

    def plot(self, ax: Any = None) -> Any:
        """Histogram of first firing − ground truth (in steps)."""
        from mechthink.plotting.readiness import plot_firing

        return plot_firing(self, ax=ax)


def firing_agreement(
    episodes: Sequence[Episode], truth: Sequence[int | None], threshold: float = 0.5, tolerance: int = 1
) -> FiringAgreement:
    """Compare each episode's first probe firing with its ground-truth step."""
    if len(episodes) != len(truth):
        raise ValueError(f"firing_agreement: {len(truth)} ground-truth steps for {len(episodes)} episodes")
    _count(tolerance, "firing_agreement", "tolerance", 0)
    fires = []
    for e in episodes:
        scores = [s.probe for s in e.states]
        if any(s is None for s in scores):
            raise ValueError(f"firing_agreement: episode {e.trace_id!r} has no probe scores")
        fires.append(first_firing([float(s) for s in scores if s is not None], threshold))
    return FiringAgreement([e.trace_id for e in episodes], fires, list(truth), float(threshold), tolerance)


# ============================================================================ trajectory
@dataclass
class Trajectory(Result):
    """log p(final answer) at the forced suffix, per boundary and layer, for one trace.

    Attributes:
        trace_id: The trace.
        logp: ``[step, layer]`` log-probability of the final answer's first token at the last
            suffix position, through the lens of each layer (floored at log 1e-30).
        layers: Layer labels.
        lens: ``"logit"`` or ``"tuned"``.
        target: The final answer's first token.
    """

    trace_id: str
    logp: Float[Tensor, "step layer"]
    layers: list[str]
    lens: str
    target: str

    def to_frame(self) -> "pd.DataFrame":
        """One row per (step, layer)."""
        import pandas as pd

        return pd.DataFrame([{"trace_id": self.trace_id, "step": s, "layer": layer, "logp": float(self.logp[s, j])}
                             for s in range(self.logp.shape[0]) for j, layer in enumerate(self.layers)])

    def plot(self, ax: Any = None) -> Any:
        """Heatmap layer x step of this trace."""
        return average_trajectories([self], None, align="start").plot(ax=ax)


@torch.no_grad()
def confidence_trajectory(
    model: "ThinkingModel", trace: Trace, labels: ReadinessLabels, tuned: "TunedLens | None" = None
) -> Trajectory:
    """Read log p(final answer) at the forced suffix of every boundary through every layer's lens.

    Each boundary's prefix + suffix runs through :func:`mechthink.lens.logit_lens` (with
    ``tuned`` for the tuned lens); the target is the first token of the final answer (a lens
    reads one next-token distribution, so multi-token answers count by their first token).
    """
    from mechthink.lens import logit_lens

    if labels.final_answer is None:
        raise ValueError(f"confidence_trajectory: trace {trace.id!r} has no final answer to track")
    first = model.tokenizer(labels.final_answer, add_special_tokens=False)["input_ids"][:1]
    if not first:
        raise ValueError(f"confidence_trajectory: the final answer {labels.final_answer!r} tokenizes to nothing")
    seqs = [list(trace.ids[: p + 1]) + [int(i) for i in model.tokenizer(suf, add_special_tokens=False)["input_ids"]]
            for p, suf in zip(labels.positions, labels.suffixes)]
    res = logit_lens(model, seqs, targets=[int(first[0])], positions=-1, top_k=1, tuned=tuned)
    logp = res.target_probs[:, :, 0].clamp_min(1e-30).log()
    lens = "tuned" if tuned is not None else "logit"
    return Trajectory(trace.id, logp.cpu(), list(res.components), lens, res.targets[0])


@dataclass
class TrajectoryMap(Result):
    """Mean log p(final answer) by layer and step over many traces.

    Attributes:
        mean: ``[layer, offset]`` mean over the traces present at that step.
        count: ``[offset]`` traces present.
        offsets: Step labels of the columns (step index, or step − first firing).
        layers: Layer labels.
        lens: ``"logit"`` or ``"tuned"``.
        align: ``"start"`` (columns = step index) or ``"first_fire"`` (step − probe's first firing).
        mark: Column value where the probe first fires (0 when aligned on it; the median
            first firing when aligned on the start), or None.
    """

    mean: Float[Tensor, "layer offset"]
    count: Int[Tensor, " offset"]
    offsets: list[int]
    layers: list[str]
    lens: str
    align: str
    mark: float | None

    def to_frame(self) -> "pd.DataFrame":
        """One row per (layer, offset)."""
        import pandas as pd

        return pd.DataFrame([{"layer": layer, "offset": o, "logp": float(self.mean[j, k]), "count": int(self.count[k])}
                             for j, layer in enumerate(self.layers) for k, o in enumerate(self.offsets)])

    def plot(self, ax: Any = None) -> Any:
        """Heatmap (layer x step) with the probe's first firing marked."""
        from mechthink.plotting.readiness import plot_trajectory_map

        return plot_trajectory_map(self, ax=ax)


def average_trajectories(
    trajectories: Sequence[Trajectory],
    first_fire: Sequence[int | None] | None,
    align: Literal["start", "first_fire"] = "first_fire",
    min_count: int = 1,
) -> TrajectoryMap:
    """Average trajectories into a layer x step map.

    Args:
        trajectories: One per trace.
        first_fire: The probe's first firing per trace (None: never fired), or None.
        align: ``"start"``: columns are step indices; ``"first_fire"``: steps relative to the
            first firing (traces that never fire are left out).
        min_count: Keep columns with at least this many traces.
    """
    if not trajectories:
        raise ValueError("average_trajectories: no trajectories")
    if align not in ("start", "first_fire"):
        raise ValueError(f"average_trajectories: align={align!r}; use 'start' or 'first_fire'")
    if first_fire is not None and len(first_fire) != len(trajectories):
        raise ValueError(f"average_trajectories: {len(first_fire)} firings for {len(trajectories)} trajectories")
    if align == "first_fire" and first_fire is None:
        raise ValueError("average_trajectories: align='first_fire' needs first_fire")
    fires = list(first_fire) if first_fire is not None else [None] * len(trajectories)
    sums: dict[int, Tensor] = {}
    counts: dict[int, int] = {}
    for tr, ff in zip(trajectories, fires):
        if align == "first_fire" and ff is None:
            continue
        shift = ff if align == "first_fire" and ff is not None else 0
        for s in range(tr.logp.shape[0]):
            o = s - shift
            sums[o] = sums.get(o, torch.zeros(tr.logp.shape[1])) + tr.logp[s].float()
            counts[o] = counts.get(o, 0) + 1
    offsets = sorted(o for o in counts if counts[o] >= min_count)
    if not offsets:
        raise ValueError("average_trajectories: no step has enough traces (did the probe ever fire?)")
    mean = torch.stack([sums[o] / counts[o] for o in offsets], dim=1)
    fired = sorted(f for f in fires if f is not None)
    mark = 0.0 if align == "first_fire" else (float(fired[len(fired) // 2]) if fired else None)
    return TrajectoryMap(mean, torch.tensor([counts[o] for o in offsets]), offsets, list(trajectories[0].layers),
                         trajectories[0].lens, align, mark)


# ============================================================================ the study
@dataclass
class ReadinessStudy(Result):
    """Everything the readiness analysis measures, train problems vs held-out problems.

    Attributes:
        cv: Cross-validated probes on the training problems, per pool.
        probe: The probe trained on all training problems at the best layer of ``cv["last"]``.
        held_out_auroc: AUROC of that probe on the held-out boundaries, against ``ready`` and
            against ``correct`` (gold, evaluation only).
        calibration: Policies on the training problems (out-of-fold probe scores).
        evaluation: Policies on the held-out problems.
        chosen: Per family, the held-out row at the setting picked on the training problems.
        maps: Trajectory maps of the held-out traces, per lens.
        agreement: First firing vs ground truth (tiny-thinker only), or None.
        max_loss: The accuracy loss allowed (fraction; 0.01 = one point).
        n_train: Training traces.
        n_test: Held-out traces.
        ready_fraction: Fraction of boundaries labelled ready.
    """

    cv: dict[str, ProbeCV]
    probe: ReadinessProbe
    held_out_auroc: dict[str, float]
    calibration: ParetoResult
    evaluation: ParetoResult
    chosen: dict[str, dict[str, Any] | None]
    maps: dict[str, TrajectoryMap]
    agreement: FiringAgreement | None
    max_loss: float
    n_train: int
    n_test: int
    ready_fraction: float

    def numbers(self) -> dict[str, Any]:
        """The headline numbers (JSON-friendly)."""
        cv = self.cv["last"]
        best = self.evaluation.best_within(self.max_loss)
        policies = {
            fam: {"chosen_param": None if c is None else c["param"], "saved": None if c is None else c["saved"],
                  "loss": None if c is None else c["loss"],
                  "frontier_saved": None if best.get(fam) is None else best[fam]["saved"],
                  "frontier_param": None if best.get(fam) is None else best[fam]["param"]}
            for fam, c in self.chosen.items()
        }
        no_gold = [p["saved"] or 0.0 for fam, p in policies.items()]
        agree = None if self.agreement is None else self.agreement.fraction
        return {
            "n_train": self.n_train, "n_test": self.n_test, "ready_fraction": self.ready_fraction,
            "best_layer": cv.layers[cv.best_layer], "best_layer_auroc": float(cv.auroc[cv.best_layer]),
            "best_layer_auroc_ci": cv.ci[cv.best_layer].tolist(),
            "auroc_by_layer": {pool: r.to_frame().to_dict(orient="records") for pool, r in self.cv.items()},
            "held_out_auroc": self.held_out_auroc, "baseline_accuracy": self.evaluation.baseline_accuracy,
            "max_loss": self.max_loss, "policies": policies,
            "probe_first_fire_within_1_step": agree,
            "n_with_ground_truth": None if self.agreement is None else self.agreement.n,
            "goals": {"auroc_ge_0.9": float(cv.auroc[cv.best_layer]) >= 0.9, "saved_ge_0.25": max(no_gold) >= 0.25,
                      "first_fire_agreement_ge_0.8": None if agree is None else agree >= 0.8},
            "pareto": self.evaluation.rows,
        }

    def to_frame(self) -> "pd.DataFrame":
        """The held-out Pareto rows."""
        return self.evaluation.to_frame()

    def to_json(self, path: str | Path | None = None) -> str:
        """:meth:`numbers` as JSON."""
        from mechthink.results import jsonable

        text = json.dumps(jsonable(self.numbers()), indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    def plot(self, ax: Any = None, title: str | None = None) -> Any:
        """The four-panel figure: AUROC by layer, Pareto curves, the two trajectory maps."""
        from mechthink.plotting.readiness import plot_readiness

        return plot_readiness(self, title=title)


def readiness_study(
    model: "ThinkingModel",
    train: Sequence[Trace],
    test: Sequence[Trace],
    *,
    n_folds: int = 5,
    budgets: Sequence[int] = (8, 16, 32, 64),
    tuned: "TunedLens | None" = None,
    fire_threshold: float = 0.5,
    max_loss: float = 0.01,
    seed: int = 0,
    ground_truth: bool = False,
    suffix: str | None = None,
) -> ReadinessStudy:
    """Label, probe and exit: the whole protocol on training vs held-out problems.

    Labels every boundary; cross-validates the probes (per pool) on ``train`` by problem (at
    most one fold per training problem);
    trains the probe at the best layer on all of ``train`` and scores ``test``; evaluates the
    policy grid on both (the training side with out-of-fold probe scores) and picks each
    family's setting on ``train``; averages the held-out trajectories (logit lens, and the
    ``tuned`` lens when given) aligned on the probe's first firing; with ``ground_truth``
    (tiny-thinker) compares the first firing with :func:`organism_answer_step`.
    """
    _unit(fire_threshold, "readiness_study")
    if len(train) < 2 or not test:
        raise ValueError(f"readiness_study: need >= 2 training traces and >= 1 held-out trace, got {len(train)} "
                         f"and {len(test)}")
    traces = list(train) + list(test)
    labels = label_traces(model, traces, suffix=suffix)
    data = build_datasets(model, traces, labels)
    train_ids, test_ids = [t.id for t in train], [t.id for t in test]
    n_folds = min(n_folds, len(set(train_ids)))  # a small run has fewer training problems than folds
    cv = {pool: cross_validate(ds.subset(train_ids), n_folds=n_folds, seed=seed) for pool, ds in data.items()}
    best = cv["last"].best_layer
    probe = train_probe(data["last"].subset(train_ids), layer=best)
    held = data["last"].subset(test_ids)
    scores = probe.predict(held.features)
    held_auroc = {"ready": auroc(scores, held.ready) if 0 < int(held.ready.sum()) < len(held) else math.nan,
                  "correct": auroc(scores, held.correct) if 0 < int(held.correct.sum()) < len(held) else math.nan}
    oof, test_scores = cv["last"].scores_by_problem(best), held.by_problem(scores)
    n = len(train)
    cal_eps = [make_episode(t, lab, oof[t.id]) for t, lab in zip(train, labels[:n])]
    test_eps = [make_episode(t, lab, test_scores[t.id]) for t, lab in zip(test, labels[n:])]
    grid = policy_grid(budgets)
    calibration, evaluation = evaluate_policies(cal_eps, grid), evaluate_policies(test_eps, grid)
    fires = [first_firing([float(s.probe or 0.0) for s in e.states], fire_threshold) for e in test_eps]
    maps = {}
    for name, lens in (("logit", None), ("tuned", tuned)):
        if name == "tuned" and lens is None:
            continue
        pairs = track(list(zip(test, labels[n:])), f"{name} lens")
        trajs = [confidence_trajectory(model, t, lab, tuned=lens) for t, lab in pairs]
        maps[name] = average_trajectories(trajs, fires, align="first_fire", min_count=max(1, len(test) // 10))
    agreement = (firing_agreement(test_eps, [organism_answer_step(t, lab) for t, lab in zip(test, labels[n:])],
                                  fire_threshold) if ground_truth else None)
    ready = torch.cat([lab.ready for lab in labels])
    chosen = evaluation.choose(calibration, max_loss)
    return ReadinessStudy(cv, probe, held_auroc, calibration, evaluation, chosen, maps, agreement, max_loss, len(train),
                          len(test), float(ready.float().mean()))
