"""Attribution patching (AtP) with mean / zero / corrupted-run baselines, and exact patching.

Method: for a scalar metric ``m`` of the logits and a node activation ``a`` (a residual stream
vector, an attention / MLP output, or one head's ``hook_z``), the linear estimate of patching the
node to a baseline ``b`` is ``Σ_d (b − a)_d · ∂m/∂a_d`` (Nanda 2023, "Attribution Patching";
Kramár et al. 2024, AtP). One forward and one backward give the estimate for every
(layer, position[, head]) node at once. :func:`activation_patching` is the exact reference: it
replaces each node by its baseline and re-runs (many nodes per batched forward).
Setting after the public repository wj210/cot_backtrack: metric = the " Wait" logit at the
position before backtracking, baseline = the dataset-mean activation per layer (over samples and
positions), a token's importance = max over layers of the resid score.

Sign convention: ``score = m(patched) − m(clean)`` for exact patching, and its first-order
estimate for the estimators. With a mean baseline a *negative* score means ablating the node
lowers the metric, i.e. the node supports it.

:func:`attribution_patching` dispatches on ``estimator``:

* ``"atp"``: plain attribution patching (one forward + one backward).
* ``"ig"``: layer-wise integrated gradients (Marks et al. 2024, sparse feature circuits): for
  each node type and each layer ``L`` separately, the activation at that one hook is
  interpolated ``b + α (a − b)`` at the ``ig_steps`` midpoints ``α = (k + ½)/n`` while every other
  hook runs clean, and the gradients at that hook are averaged over α. All (layer, α) pairs of one
  node type run as the rows of one batched forward/backward (``ig_batch_size`` caps the rows).
* ``"qkfix"``: AtP* QK-fix (Kramár et al. 2024). Plain AtP misses effects that go through
  attention *patterns*; ablating a position's residual vector changes its keys and can make it
  attended. The QK-fix keeps the patched position's own stream, the key/value column it changes
  in every later layer, and the metric position's stream exact, and stays linear only in the
  effect on the intermediate positions (module ``mechthink._qkfix``). Still no forward pass per
  node.

Evaluation helpers: :func:`compare_estimators` runs several estimators and exact patching on the
same sequences (:class:`EstimatorComparison`, with Spearman ρ tables against exact patching,
:class:`SpearmanTable`), and :func:`rank_heads` ranks attention heads by their summed ``z``
scores (:class:`HeadRanking`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechthink import stats
from mechthink.models.fast_attention import fast_attention
from mechthink.progress import track
from mechthink.hooks import hook_name
from mechthink.results import Result

if TYPE_CHECKING:
    import pandas as pd

    from mechthink.models.thinking_model import ThinkingModel

__all__ = [
    "ESTIMATORS",
    "NODE_TYPES",
    "AttributionResult",
    "EstimatorComparison",
    "HeadRanking",
    "MeanActivations",
    "SpearmanTable",
    "activation_patching",
    "attribution_patching",
    "compare_estimators",
    "logit_diff_metric",
    "logit_metric",
    "logits_kwargs",
    "mean_activations",
    "node_hooks",
    "rank_heads",
]

log = logging.getLogger(__name__)

NodeType = Literal["resid_pre", "resid_post", "attn_out", "mlp_out", "z"]
NODE_TYPES: tuple[str, ...] = ("resid_pre", "resid_post", "attn_out", "mlp_out", "z")
Estimator = Literal["atp", "ig", "qkfix"]
#: The estimators of :func:`attribution_patching`.
ESTIMATORS: tuple[str, ...] = ("atp", "ig", "qkfix")
#: Integrated-gradient midpoints when ``estimator="ig"`` is given no ``ig_steps``.
DEFAULT_IG_STEPS = 8
Metric = Callable[[Tensor], Tensor]


# ---------------------------------------------------------------------------------------- hooks
def _node_hook(node: str, layer: int) -> str:
    """The hook of a node type at a layer (``z`` -> ``blocks.L.attn.hook_z``), via :func:`mechthink.hooks.hook_name`."""
    if node not in NODE_TYPES:
        raise ValueError(f"unknown node type {node!r}; use one of {NODE_TYPES}")
    return hook_name(layer, node)


def node_hooks(model: "ThinkingModel", nodes: str | Sequence[str]) -> list[str]:
    """Hook names for node types (every layer) or explicit hook names, in the order given."""
    if isinstance(nodes, str):
        nodes = [nodes]
    out: list[str] = []
    for n in nodes:
        names = [_node_hook(n, L) for L in range(model.n_layers)] if n in NODE_TYPES else [n]
        for name in names:
            if name not in model.bridge.hook_dict:
                raise ValueError(f"hook {name!r} does not exist on {model.spec.name}; see model.bridge.hook_dict")
            if name not in out:
                out.append(name)
    return out


def _as_row(tokens: Any, device: torch.device) -> Int[Tensor, "1 pos"]:
    t = torch.as_tensor(tokens, dtype=torch.long)
    if t.dim() == 2:
        if t.shape[0] != 1:
            raise ValueError(f"expected one sequence, got tokens of shape {tuple(t.shape)}; loop over samples")
        t = t[0]
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"expected a non-empty 1-D token sequence, got shape {tuple(t.shape)}")
    return t.unsqueeze(0).to(device)


def _per_row(metric: Metric, logits: Float[Tensor, "batch pos d_vocab"]) -> Float[Tensor, "batch"]:
    """The metric for each row: metrics returning ``[batch]`` are used as is, scalars row by row."""
    out = metric(logits)
    b = logits.shape[0]
    if out.dim() == 1 and out.shape[0] == b:
        return out.float()
    if out.dim() == 0 and b == 1:
        return out.float().reshape(1)
    return torch.stack([metric(logits[i : i + 1]).float().reshape(()) for i in range(b)])


# -------------------------------------------------------------------------------------- metrics
def _select(logits: Tensor, pos: int, token_ids: int | Sequence[int], reduce: str, log_probs: bool) -> Tensor:
    ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
    x = logits[:, pos].float()
    if log_probs:
        x = x.log_softmax(-1)
    x = x[:, ids]
    if reduce == "mean":
        return x.mean(-1)
    if reduce == "sum":
        return x.sum(-1)
    if reduce == "logsumexp":
        return x.logsumexp(-1)
    if reduce == "max":
        return x.max(-1).values
    raise ValueError(f"reduce={reduce!r}; use 'mean', 'sum', 'logsumexp' or 'max'")


def logit_metric(
    pos: int,
    token_ids: int | Sequence[int],
    reduce: str = "mean",
    log_probs: bool = False,
) -> Metric:
    """Metric: the logit (or log-prob) of token(s) at a position, one value per batch row.

    Args:
        pos: Query position (negative counts from the end; ``-1`` predicts the next token).
        token_ids: One id or several (e.g. ``model.token_ids("Wait")``), combined by ``reduce``.
        reduce: ``"mean"`` | ``"sum"`` | ``"logsumexp"`` | ``"max"`` over the ids.
        log_probs: Use log-softmax instead of raw logits (compatibility-mode logits are centred).
    """
    if reduce not in ("mean", "sum", "logsumexp", "max"):
        raise ValueError(f"reduce={reduce!r}; use 'mean', 'sum', 'logsumexp' or 'max'")

    def metric(logits: Tensor) -> Tensor:
        return _select(logits, pos, token_ids, reduce, log_probs)

    return _reads_last(metric, pos)


def logit_diff_metric(
    pos: int,
    good_ids: int | Sequence[int],
    bad_ids: int | Sequence[int],
    reduce: str = "mean",
    log_probs: bool = False,
) -> Metric:
    """Metric: logit(good) − logit(bad) at a position (each side combined by ``reduce``)."""

    def metric(logits: Tensor) -> Tensor:
        return _select(logits, pos, good_ids, reduce, log_probs) - _select(logits, pos, bad_ids, reduce, log_probs)

    return _reads_last(metric, pos)


def _reads_last(metric: Metric, pos: int) -> Metric:
    """Mark a metric that reads only ``logits[:, pos]`` with ``pos < 0``: its ``logits_to_keep``
    attribute (``-pos``) lets the forwards unembed only the last ``-pos`` positions (a
    ``[batch, pos, d_vocab]`` logits tensor and its gradient are the largest tensors of a long
    trace's AtP). A negative index means the same on the kept slice."""
    if isinstance(pos, int) and pos < 0:
        metric.logits_to_keep = -pos  # type: ignore[attr-defined]
    return metric


def logits_kwargs(model: "ThinkingModel", metric: Metric) -> dict[str, Any]:
    """``{"logits_to_keep": k}`` for a forward whose logits only ``metric`` reads, where the metric
    declares it reads the last ``k`` positions only (:func:`logit_metric` with a negative
    position) and the wrapped model takes ``logits_to_keep``; else ``{}`` (every position)."""
    k = getattr(metric, "logits_to_keep", None)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or not model.last_logits_kwargs():
        return {}
    return {"logits_to_keep": k}


# ------------------------------------------------------------------------------ mean activations
@dataclass
class MeanActivations(Result):
    """Streaming per-hook means over samples and positions (the mean-ablation baseline).

    Attributes:
        sums: Per hook, the float64 sum over every counted position (shape of one position's
            activation: ``[d_model]`` or ``[head, d_head]``).
        count: Number of positions summed.
        n_samples: Number of sequences seen.
        skip_bos: Whether position 0 was left out when it held the BOS token.
        model_name: The model the means were computed on.
    """

    sums: dict[str, Tensor]
    count: int = 0
    n_samples: int = 0
    skip_bos: bool = True
    model_name: str = ""

    @property
    def hooks(self) -> list[str]:
        return list(self.sums)

    @property
    def means(self) -> dict[str, Tensor]:
        """Per hook, the float32 mean activation."""
        if self.count == 0:
            raise ValueError("MeanActivations is empty (count=0); call update() with some samples first")
        return {k: (v / self.count).float() for k, v in self.sums.items()}

    def __getitem__(self, hook: str) -> Tensor:
        if hook not in self.sums:
            raise KeyError(f"no mean for {hook!r}; this MeanActivations has {len(self.sums)} hooks, e.g. {self.hooks[:3]}")
        return (self.sums[hook] / max(self.count, 1)).float()

    def update(
        self,
        model: "ThinkingModel",
        dataset: Iterable[Any],
        max_samples: int | None = None,
    ) -> "MeanActivations":
        """Add samples (1-D token tensors or lists) to the running sums; returns ``self``.

        One forward per sample, hooks on the requested names only; memory does not grow with
        the number of samples (progress through :func:`mechthink.progress.track`). Attention
        runs on the fused kernel where no pattern is hooked
        (:func:`mechthink.models.fast_attention.fast_attention`; short samples run exact).
        """
        bos = model.bos_token_id
        sums = self.sums
        names = list(sums)

        def make(name: str) -> Callable[..., None]:
            def hook(act: Tensor, hook: Any) -> None:
                a = act[0, start[0] :].detach().to(torch.float64)
                sums[name] += a.sum(0).cpu()

            return hook

        start = [0]
        seen = 0
        with torch.inference_mode(), fast_attention(model):
            for sample in track(dataset, "mean activations"):
                if max_samples is not None and seen >= max_samples:
                    break
                row = _as_row(sample, model.device)
                start[0] = 1 if (self.skip_bos and bos is not None and int(row[0, 0]) == bos and row.shape[1] > 1) else 0
                model.bridge.run_with_hooks(row, fwd_hooks=[(n, make(n)) for n in names], return_type=None)
                self.count += row.shape[1] - start[0]
                self.n_samples += 1
                seen += 1
        return self

    def to_frame(self) -> "pd.DataFrame":
        """One row per hook: its name, the shape of one position's mean, and the mean's L2 norm."""
        import pandas as pd

        means = self.means
        return pd.DataFrame(
            [(h, tuple(m.shape), float(m.norm())) for h, m in means.items()], columns=["hook", "shape", "mean_norm"]
        )

    def to_json(self, path: str | Path | None = None) -> str:
        """JSON with the counts, the model name and each hook's mean (nested lists)."""
        text = json.dumps({**self._meta(), "means": {k: v.tolist() for k, v in self.means.items()}})
        if path is not None:
            Path(path).write_text(text)
        return text

    def plot(self, ax: Any = None) -> Any:
        """Bar chart of the L2 norm of each hook's mean activation."""
        from mechthink.plotting.attribution import plot_mean_norms

        return plot_mean_norms(self, ax=ax)

    def _meta(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "n_samples": self.n_samples,
            "skip_bos": self.skip_bos,
            "model_name": self.model_name,
            "hooks": self.hooks,
        }

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (safetensors: the sums, metadata in the header) and ``path.json``."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = self._meta()
        save_file({k: v.contiguous() for k, v in self.sums.items()}, str(path), metadata={"mechthink": json.dumps(meta)})
        path.with_name(path.name + ".json").write_text(json.dumps(meta, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "MeanActivations":
        """Read what :meth:`save` wrote (resumable: call :meth:`update` to add more samples)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["mechthink"])
            sums = {k: f.get_tensor(k) for k in meta["hooks"]}
        return cls(sums=sums, count=meta["count"], n_samples=meta["n_samples"], skip_bos=meta["skip_bos"], model_name=meta["model_name"])


def mean_activations(
    model: "ThinkingModel",
    dataset: Iterable[Any],
    hooks: str | Sequence[str] = ("resid_pre",),
    skip_bos: bool = True,
    resume: MeanActivations | None = None,
    max_samples: int | None = None,
) -> MeanActivations:
    """Mean activation per hook over a dataset (all samples, all positions), streamed.

    Args:
        model: The loaded model.
        dataset: Iterable of 1-D token tensors or lists (any lengths).
        hooks: Node types (``"resid_pre"``, ``"z"``, … expanded to every layer) or hook names.
        skip_bos: Leave out position 0 when it is the BOS token (its activations are outliers
            by orders of magnitude on most models and would dominate the mean).
        resume: Continue accumulating into an existing (e.g. loaded) result.
        max_samples: Stop after this many samples.

    Returns:
        A :class:`MeanActivations` (``.means``, ``.count``, ``.save()``).
    """
    names = node_hooks(model, hooks)
    if resume is None:
        shapes = _hook_shapes(model, names)
        resume = MeanActivations(
            sums={n: torch.zeros(shapes[n], dtype=torch.float64) for n in names},
            skip_bos=skip_bos,
            model_name=model.spec.name,
        )
    else:
        missing = [n for n in names if n not in resume.sums]
        if missing:
            raise ValueError(f"resume has no sums for {missing[:3]} (…{len(missing)} hooks); resume with the same hooks")
    return resume.update(model, dataset, max_samples=max_samples)


def _hook_shapes(model: "ThinkingModel", names: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Per-position activation shapes of hooks, read from a 2-token forward."""
    shapes: dict[str, tuple[int, ...]] = {}

    def make(name: str) -> Callable[..., None]:
        def hook(act: Tensor, hook: Any) -> None:
            shapes[name] = tuple(act.shape[2:])

        return hook

    with torch.inference_mode():
        row = torch.zeros(1, 2, dtype=torch.long, device=model.device)
        model.bridge.run_with_hooks(row, fwd_hooks=[(n, make(n)) for n in names], return_type=None)
    return shapes


# ------------------------------------------------------------------------------------- baselines
def _run_cache(model: "ThinkingModel", row: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
    """Activations ``[pos, ...]`` of the named hooks for one row (no gradients), float32."""
    from mechthink.hooks import gather

    cache = gather(model, row.reshape(-1), list(names), device=row.device)
    return {n: cache[n][0].float() for n in names}


def _baselines(
    model: "ThinkingModel",
    row: Tensor,
    names: Sequence[str],
    baseline: str | Tensor | Sequence[int] | dict[str, Tensor],
    means: MeanActivations | None,
    clean: dict[str, Tensor],
) -> dict[str, Tensor]:
    """Per hook, the baseline activation broadcast to ``[pos, ...]`` (float32)."""
    if isinstance(baseline, dict):
        missing = [n for n in names if n not in baseline]
        if missing:
            raise ValueError(f"baseline dict has no entry for {missing[:3]} ({len(missing)} missing)")
        return {n: baseline[n].to(clean[n].device).float().expand_as(clean[n]).clone() for n in names}
    if isinstance(baseline, str):
        if baseline == "zero":
            return {n: torch.zeros_like(clean[n]) for n in names}
        if baseline == "mean":
            if means is None:
                raise ValueError("baseline='mean' needs means=mean_activations(model, dataset, hooks=...)")
            missing = [n for n in names if n not in means.sums]
            if missing:
                raise ValueError(f"means has no entry for {missing[:3]} ({len(missing)} missing); compute means for these nodes")
            return {n: means[n].to(clean[n].device).expand_as(clean[n]).clone() for n in names}
        raise ValueError(f"baseline={baseline!r}; use 'mean', 'zero' or corrupted token ids")
    corrupt = _as_row(baseline, model.device)
    if corrupt.shape != row.shape:
        raise ValueError(f"corrupted tokens have shape {tuple(corrupt.shape)}, clean {tuple(row.shape)}; they must match")
    return _run_cache(model, corrupt, names)


def _baseline_label(baseline: Any) -> str:
    if isinstance(baseline, str):
        return baseline
    return "custom" if isinstance(baseline, dict) else "corrupted"


# ---------------------------------------------------------------------------------------- result
@dataclass
class AttributionResult(Result):
    """Per-node patching scores for one sequence.

    Attributes:
        scores: Per node type, ``[layer, pos]`` (resid/attn_out/mlp_out) or
            ``[layer, pos, head]`` (z): the estimated (AtP, IG, QK-fix) or exact change of the
            metric when the node is replaced by its baseline.
        node_types: The node types in ``scores``.
        tokens: The sequence's token ids.
        str_tokens: Each token decoded.
        metric_clean: The metric on the clean run.
        method: The estimator (``"atp"``, ``"ig"``, ``"qkfix"``) or ``"exact"``.
        baseline: ``"mean"``, ``"zero"``, ``"corrupted"`` or ``"custom"``.
        positions: For exact patching, the positions that were patched (others are NaN).
        config: The call's settings (estimator, IG steps, layers, model name).
    """

    scores: dict[str, Tensor]
    node_types: tuple[str, ...]
    tokens: Int[Tensor, "pos"]
    str_tokens: list[str]
    metric_clean: float
    method: str = "atp"
    baseline: str = "mean"
    positions: list[int] | None = None
    config: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, node: str) -> Tensor:
        if node not in self.scores:
            raise KeyError(f"no scores for {node!r}; this result has {self.node_types}")
        return self.scores[node]

    def token_importance(
        self, node: str = "resid_pre", reduce: str = "max", sign: float | int = 1.0
    ) -> Float[Tensor, "pos"]:
        """One importance per token: ``sign · score`` reduced over layers (and heads, summed).

        Args:
            node: Node type.
            reduce: ``"max"`` (the wj210/cot_backtrack choice), ``"abs_max"`` (signed value of
                largest magnitude), ``"sum"`` or ``"mean"`` over layers.
            sign: Multiply scores first; ``-1`` ranks tokens whose ablation lowers the metric.
        """
        s = self[node].float() * sign
        if s.dim() == 3:
            s = einops.reduce(s, "layer pos head -> layer pos", "sum")
        if reduce == "max":
            return s.max(0).values
        if reduce == "abs_max":
            idx = s.abs().argmax(0, keepdim=True)
            return s.gather(0, idx)[0]
        if reduce == "sum":
            return s.sum(0)
        if reduce == "mean":
            return s.mean(0)
        raise ValueError(f"reduce={reduce!r}; use 'max', 'abs_max', 'sum' or 'mean'")

    def to_frame(self) -> "pd.DataFrame":
        """Long table: node, layer, pos, head (−1 for non-head nodes), token, score."""
        import pandas as pd

        rows = []
        for node in self.node_types:
            s = self.scores[node].float().cpu()
            if s.dim() == 2:
                s = s.unsqueeze(-1)
                heads = [-1]
            else:
                heads = list(range(s.shape[2]))
            for L in range(s.shape[0]):
                for p in range(s.shape[1]):
                    for hi, h in enumerate(heads):
                        rows.append((node, L, p, h, self.str_tokens[p], float(s[L, p, hi])))
        return pd.DataFrame(rows, columns=["node", "layer", "pos", "head", "token", "score"])

    def to_json(self, path: str | Path | None = None) -> str:
        """JSON with scores as nested lists, tokens and metadata (also written to ``path``)."""
        text = json.dumps(
            {
                "method": self.method,
                "baseline": self.baseline,
                "metric_clean": self.metric_clean,
                "node_types": list(self.node_types),
                "tokens": self.tokens.tolist(),
                "str_tokens": self.str_tokens,
                "positions": self.positions,
                "config": self.config,
                "scores": {k: v.float().cpu().tolist() for k, v in self.scores.items()},
            }
        )
        if path is not None:
            Path(path).write_text(text)
        return text

    def plot(self, ax: Any = None, node: str = "resid_pre", kind: str = "heatmap", **kwargs: Any) -> Any:
        """``kind="heatmap"``: layer × position figure; ``"tokens"``: circuitsvis colored tokens."""
        from mechthink.plotting import attribution as plot_attr

        if kind == "heatmap":
            return plot_attr.plot_attribution_heatmap(self, node=node, ax=ax, **kwargs)
        if kind == "tokens":
            return plot_attr.colored_tokens_html(self.str_tokens, self.token_importance(node), **kwargs)
        raise ValueError(f"kind={kind!r}; use 'heatmap' or 'tokens'")


# ------------------------------------------------------------------------------- attribution
def _split_nodes(nodes: str | Sequence[str]) -> tuple[str, ...]:
    nodes = (nodes,) if isinstance(nodes, str) else tuple(nodes)
    bad = [n for n in nodes if n not in NODE_TYPES]
    if bad:
        raise ValueError(f"unknown node types {bad}; use any of {NODE_TYPES}")
    if not nodes:
        raise ValueError("nodes is empty; pass e.g. ('resid_pre',)")
    return nodes


def _dot(diff: Tensor, grad: Tensor) -> Tensor:
    """Σ over the last (feature) axis: ``[pos, d]`` -> ``[pos]``, ``[pos, head, d_head]`` -> ``[pos, head]``."""
    return (diff * grad).sum(-1)


Baseline = str | Tensor | Sequence[int] | dict[str, Tensor]
Scores = tuple[dict[str, Tensor], float]


def _estimate_atp(
    model: "ThinkingModel", row: Tensor, metric: Metric, names: dict[str, list[str]], baseline: Baseline,
    means: MeanActivations | None,
) -> Scores:
    """Plain AtP: activations kept as leaves in one forward, ``∂m/∂a`` from one backward."""
    all_names = [h for hs in names.values() for h in hs]
    acts: dict[str, Tensor] = {}

    def make(name: str) -> Callable[..., Tensor]:
        def hook(act: Tensor, hook: Any) -> Tensor:
            if not act.requires_grad:
                act = act.detach().requires_grad_(True)
            acts[name] = act
            return act

        return hook

    logits = model.bridge.run_with_hooks(row, fwd_hooks=[(h, make(h)) for h in all_names], **logits_kwargs(model, metric))
    m = _per_row(metric, logits).sum()
    grads = torch.autograd.grad(m, [acts[h] for h in all_names], allow_unused=True)
    metric_clean = float(m.detach())
    grad_of = {
        h: (g[0].float() if g is not None else torch.zeros_like(acts[h][0], dtype=torch.float32))
        for h, g in zip(all_names, grads)
    }
    act_of = {h: acts[h][0].detach().float() for h in all_names}
    del acts, logits, grads
    base = _baselines(model, row, all_names, baseline, means, act_of)
    scores = {n: torch.stack([_dot(base[h] - act_of[h], grad_of[h]) for h in hs]).detach() for n, hs in names.items()}
    return scores, metric_clean


def _estimate_qkfix(
    model: "ThinkingModel", row: Tensor, metric: Metric, names: dict[str, list[str]], baseline: Baseline,
    means: MeanActivations | None,
) -> Scores:
    """AtP* QK-fix: its own functional forward + backward (:mod:`mechthink._qkfix`)."""
    from mechthink._qkfix import qkfix_scores

    all_names = [h for hs in names.values() for h in hs]
    clean = _run_cache(model, row, all_names)
    base = _baselines(model, row, all_names, baseline, means, clean)
    jobs = [(n, L) for n, hs in names.items() for L in range(len(hs))]
    fixed, metric_clean = qkfix_scores(
        model, row, lambda lg: _per_row(metric, lg), [(n, L, base[names[n][L]]) for n, L in jobs]
    )
    scores = {n: torch.stack([f for (nn, _), f in zip(jobs, fixed) if nn == n]) for n in names}
    return scores, metric_clean


def _estimate_ig(
    model: "ThinkingModel", row: Tensor, metric: Metric, names: dict[str, list[str]], baseline: Baseline,
    means: MeanActivations | None, steps: int, batch_size: int,
) -> Scores:
    """Layer-wise integrated gradients (module docstring), one batched pass per node type."""
    all_names = [h for hs in names.values() for h in hs]
    clean = _run_cache(model, row, all_names)
    base = _baselines(model, row, all_names, baseline, means, clean)
    with torch.no_grad():
        metric_clean = float(_per_row(metric, model.bridge(row, **logits_kwargs(model, metric))).sum())
    scores = {n: _ig_scores(model, row, metric, hs, clean, base, steps, batch_size) for n, hs in names.items()}
    return scores, metric_clean


def _estimator_options(estimator: str, ig_steps: int | None, ig_batch_size: int | None) -> dict[str, int]:
    """Validate ``estimator`` and its options; the keyword arguments of its estimator function."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator={estimator!r} is not accepted; use one of {ESTIMATORS}")
    if estimator != "ig":
        if ig_steps is not None or ig_batch_size is not None:
            raise ValueError(f"ig_steps/ig_batch_size apply to estimator='ig' only, not estimator={estimator!r}")
        return {}
    steps = DEFAULT_IG_STEPS if ig_steps is None else ig_steps
    batch = 64 if ig_batch_size is None else ig_batch_size
    if steps < 1 or batch < 1:
        raise ValueError(f"ig_steps={ig_steps!r}, ig_batch_size={ig_batch_size!r}; use integers >= 1")
    return {"steps": steps, "batch_size": batch}


_ESTIMATE: dict[str, Callable[..., Scores]] = {"atp": _estimate_atp, "ig": _estimate_ig, "qkfix": _estimate_qkfix}


def attribution_patching(
    model: "ThinkingModel",
    tokens: Int[Tensor, "pos"] | Int[Tensor, "1 pos"] | Sequence[int],
    metric: Metric,
    baseline: str | Int[Tensor, "pos"] | Sequence[int] | dict[str, Tensor] = "mean",
    nodes: str | Sequence[str] = ("resid_pre", "attn_out", "mlp_out", "z"),
    means: MeanActivations | None = None,
    estimator: Estimator = "atp",
    ig_steps: int | None = None,
    ig_batch_size: int | None = None,
    fast: bool = True,
) -> AttributionResult:
    """Estimated patching scores for every (layer, position[, head]) node without a forward per node.

    Args:
        model: The loaded model (its parameters are left untouched; gradients are taken with
            ``torch.autograd.grad`` with respect to the activations only).
        tokens: One sequence (1-D, or ``[1, pos]``).
        metric: ``logits [batch, pos, d_vocab] -> [batch]`` or a scalar (see :func:`logit_metric`).
        baseline: ``"mean"`` (needs ``means``), ``"zero"``, corrupted token ids of the same
            length (their activations at the same positions), or a dict from hook name to a
            baseline activation (``[pos, ...]`` or one position's shape, broadcast).
        nodes: Node types among ``resid_pre, resid_post, attn_out, mlp_out, z``.
        means: Mean activations for ``baseline="mean"``.
        estimator: ``"atp"`` (one forward + backward), ``"ig"`` (layer-wise integrated
            gradients) or ``"qkfix"`` (AtP* QK-fix; needs a metric of the last position's logits
            only, e.g. ``logit_metric(-1, ...)``, and a Llama / Qwen2 / Qwen3 / GLM-4 layout;
            costs O(layers² · rows · pos · d), ``pos`` rows per layer for resid/attn_out/mlp_out
            and ``pos · heads`` for ``z``). See the module docstring.
        ig_steps: Midpoints of the IG path (default :data:`DEFAULT_IG_STEPS`); ``"ig"`` only.
        ig_batch_size: Rows per batched IG forward (default 64); ``"ig"`` only.
        fast: For ``"atp"`` and ``"ig"``, run attention on the fused SDPA kernel
            (:func:`mechthink.models.fast_attention.fast_attention`): no ``pos x pos`` pattern is
            stored for the backward, so memory grows linearly with ``pos``; every node type
            (``z`` included) fires as on the exact path, scores equal to float rounding.
            ``False`` runs the bridge's exact attention. ``"qkfix"`` has its own forward.

    Returns:
        An :class:`AttributionResult` whose ``method`` is the estimator.
    """
    if not isinstance(fast, bool):
        raise ValueError(f"fast must be True or False, got {fast!r}")
    node_types = _split_nodes(nodes)
    options = _estimator_options(estimator, ig_steps, ig_batch_size)
    row = _as_row(tokens, model.device)
    names = {n: [_node_hook(n, L) for L in range(model.n_layers)] for n in node_types}
    with torch.inference_mode(False), torch.enable_grad(), fast_attention(model, enabled=fast and estimator != "qkfix"):
        scores, metric_clean = _ESTIMATE[estimator](model, row, metric, names, baseline, means, **options)
    tok = row[0].detach().cpu()
    return AttributionResult(
        scores=scores,
        node_types=node_types,
        tokens=tok,
        str_tokens=model.to_str_tokens(tok),
        metric_clean=metric_clean,
        method=estimator,
        baseline=_baseline_label(baseline),
        config={"estimator": estimator, "ig_steps": options.get("steps"), "model": model.spec.name},
    )


def _ig_scores(
    model: "ThinkingModel",
    row: Tensor,
    metric: Metric,
    names: Sequence[str],
    clean: dict[str, Tensor],
    base: dict[str, Tensor],
    steps: int,
    batch_size: int,
) -> Tensor:
    """Layer-wise IG for one node type: rows = (layer, α) pairs, each patching one hook."""
    alphas = (torch.arange(steps, dtype=torch.float32) + 0.5) / steps
    pairs = [(i, a) for i in range(len(names)) for a in range(steps)]
    grad_sum = {h: torch.zeros_like(clean[h]) for h in names}
    per_chunk = max(1, batch_size)
    for c0 in range(0, len(pairs), per_chunk):
        chunk = pairs[c0 : c0 + per_chunk]
        rows_by_layer: dict[int, list[tuple[int, int]]] = {}
        for r, (i, a) in enumerate(chunk):
            rows_by_layer.setdefault(i, []).append((r, a))
        leaves: dict[int, Tensor] = {}

        def make(i: int) -> Callable[..., Tensor]:
            h = names[i]
            rows = [r for r, _ in rows_by_layer[i]]
            al = alphas[[a for _, a in rows_by_layer[i]]].to(clean[h].device)

            def hook(act: Tensor, hook: Any) -> Tensor:
                al_b = al.reshape(-1, *([1] * clean[h].dim())).to(act.dtype)
                interp = base[h].to(act.dtype) + al_b * (clean[h] - base[h]).to(act.dtype)
                leaf = interp.detach().requires_grad_(True)
                leaves[i] = leaf
                out = act.clone()
                out[rows] = leaf
                return out

            return hook

        batch = row.expand(len(chunk), -1)
        logits = model.bridge.run_with_hooks(batch, fwd_hooks=[(names[i], make(i)) for i in rows_by_layer],
                                             **logits_kwargs(model, metric))
        m = _per_row(metric, logits).sum()
        order = list(rows_by_layer)
        grads = torch.autograd.grad(m, [leaves[i] for i in order], allow_unused=True)
        for i, g in zip(order, grads):
            if g is not None:
                grad_sum[names[i]] += g.float().sum(0)
        del logits, grads, leaves
    return torch.stack([_dot(base[h] - clean[h], grad_sum[h] / steps) for h in names]).detach()


# ------------------------------------------------------------------------------ exact patching
def activation_patching(
    model: "ThinkingModel",
    tokens: Int[Tensor, "pos"] | Int[Tensor, "1 pos"] | Sequence[int],
    metric: Metric,
    baseline: str | Int[Tensor, "pos"] | Sequence[int] | dict[str, Tensor] = "mean",
    nodes: str | Sequence[str] = ("resid_pre", "attn_out", "mlp_out", "z"),
    means: MeanActivations | None = None,
    positions: Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
) -> AttributionResult:
    """Exact activation patching: each node replaced by its baseline, the metric re-measured.

    ``score = metric(patched) − metric(clean)`` per (layer, pos[, head]). ``batch_size`` nodes
    are patched per forward (the sequence repeated, each row patching one node).
    ``transformer_lens.patching`` runs one forward per node through ``run_with_hooks``; this
    batches instead. Unpatched (layer, position) cells are NaN.

    Args:
        positions: Positions to patch (default all); negative values count from the end.
        layers: Layers to patch (default all).
        Other arguments as in :func:`attribution_patching`.
    """
    node_types = _split_nodes(nodes)
    row = _as_row(tokens, model.device)
    T = row.shape[1]
    pos_list = list(range(T)) if positions is None else sorted({p % T for p in positions})
    layer_list = list(range(model.n_layers)) if layers is None else list(layers)
    all_names = [_node_hook(n, L) for n in node_types for L in layer_list]
    clean = _run_cache(model, row, all_names)
    base = _baselines(model, row, all_names, baseline, means, clean)
    n_heads = int(model.cfg.n_heads)

    jobs: list[tuple[str, int, int, int]] = []  # (node, layer, pos, head or -1)
    for n in node_types:
        for L in layer_list:
            for p in pos_list:
                if n == "z":
                    jobs += [(n, L, p, h) for h in range(n_heads)]
                else:
                    jobs.append((n, L, p, -1))

    scores = {
        n: torch.full((model.n_layers, T, n_heads) if n == "z" else (model.n_layers, T), float("nan")) for n in node_types
    }
    keep = logits_kwargs(model, metric)
    with torch.no_grad(), fast_attention(model):
        m_clean = float(_per_row(metric, model.bridge(row, **keep))[0])
        for c0 in track(range(0, len(jobs), batch_size), "exact patching"):
            chunk = jobs[c0 : c0 + batch_size]
            groups: dict[str, list[tuple[int, int, int]]] = {}
            for r, (n, L, p, h) in enumerate(chunk):
                groups.setdefault(_node_hook(n, L), []).append((r, p, h))

            def make(h_name: str) -> Callable[..., Tensor]:
                rows = torch.tensor([r for r, _, _ in groups[h_name]])
                ps = torch.tensor([p for _, p, _ in groups[h_name]])
                hs = torch.tensor([h for _, _, h in groups[h_name]])

                def hook(act: Tensor, hook: Any) -> Tensor:
                    out = act.clone()
                    b = base[h_name].to(act.device, act.dtype)
                    if hs[0] >= 0:
                        out[rows, ps, hs] = b[ps, hs]
                    else:
                        out[rows, ps] = b[ps]
                    return out

                return hook

            logits = model.bridge.run_with_hooks(row.expand(len(chunk), -1), fwd_hooks=[(h, make(h)) for h in groups], **keep)
            vals = _per_row(metric, logits).cpu() - m_clean
            for r, (n, L, p, h) in enumerate(chunk):
                if h >= 0:
                    scores[n][L, p, h] = vals[r]
                else:
                    scores[n][L, p] = vals[r]

    tok = row[0].detach().cpu()
    return AttributionResult(
        scores=scores,
        node_types=node_types,
        tokens=tok,
        str_tokens=model.to_str_tokens(tok),
        metric_clean=m_clean,
        method="exact",
        baseline=_baseline_label(baseline),
        positions=pos_list,
        config={"layers": layer_list, "model": model.spec.name},
    )


# --------------------------------------------------------------------------- estimator comparison
@dataclass
class SpearmanTable(Result):
    """Spearman ρ of each estimator's scores against exact patching, per node type and sequence.

    Attributes:
        estimators: The estimators compared (rows).
        nodes: The node types (columns).
        rho: ``[estimator, node, sample]`` rank correlation over all (layer, pos[, head]) cells.
    """

    estimators: list[str]
    nodes: list[str]
    rho: Float[Tensor, "estimator node sample"]

    @property
    def n_samples(self) -> int:
        return int(self.rho.shape[-1])

    def per_sample(self, node: str) -> dict[str, list[float]]:
        """Per estimator, the ρ of every sequence for one node type."""
        j = self._node_index(node)
        return {e: self.rho[i, j].tolist() for i, e in enumerate(self.estimators)}

    def mean(self, node: str | None = None) -> dict[str, float]:
        """Mean ρ over sequences: per estimator for one ``node`` (0.0 without sequences), else
        keyed ``"estimator/node"`` in node-major order (empty without sequences)."""
        if node is not None:
            return {e: stats.mean(v) for e, v in self.per_sample(node).items()}
        if self.n_samples == 0:
            return {}
        return {f"{e}/{n}": stats.mean(self.rho[i, j].tolist()) for j, n in enumerate(self.nodes) for i, e in enumerate(self.estimators)}

    def _node_index(self, node: str) -> int:
        if node not in self.nodes:
            raise ValueError(f"node={node!r} is not in this table; use one of {self.nodes}")
        return self.nodes.index(node)

    def to_frame(self) -> "pd.DataFrame":
        """One row per (estimator, node, sample): ``rho``."""
        import pandas as pd

        rows = [
            (e, n, s, float(self.rho[i, j, s]))
            for i, e in enumerate(self.estimators)
            for j, n in enumerate(self.nodes)
            for s in range(self.n_samples)
        ]
        return pd.DataFrame(rows, columns=["estimator", "node", "sample", "rho"])

    def plot(self, ax: Any = None) -> Any:
        """Grouped bars of the mean ρ per node type, one bar per estimator."""
        from mechthink.plotting.attribution import plot_spearman_table

        return plot_spearman_table(self, ax=ax)


@dataclass
class EstimatorComparison(Result):
    """Several estimators and exact patching, run on the same sequences.

    Attributes:
        results: Per method (the estimators, then ``"exact"``), one :class:`AttributionResult`
            per sequence in order; ``"exact"`` covers only the first ``n_exact`` sequences.
        exact_nodes: The node types exact patching scored.
    """

    results: dict[str, list[AttributionResult]]
    exact_nodes: tuple[str, ...] = ("resid_pre",)

    @property
    def methods(self) -> list[str]:
        """The estimators and ``"exact"``, in the order they were run."""
        return list(self.results)

    @property
    def estimators(self) -> list[str]:
        return [m for m in self.results if m != "exact"]

    def importances(
        self, method: str, node: str = "resid_pre", reduce: str = "max", sign: float | int = -1
    ) -> list[Float[Tensor, "_pos"]]:
        """:meth:`AttributionResult.token_importance` of every sequence scored by ``method``
        (default: max over layers of ``−score``, the wj210/cot_backtrack importance)."""
        if method not in self.results:
            raise ValueError(f"method={method!r} was not run; use one of {self.methods}")
        return [r.token_importance(node, reduce=reduce, sign=sign) for r in self.results[method]]

    def spearman(self, nodes: Sequence[str] | None = None) -> SpearmanTable:
        """Spearman ρ of each estimator against exact patching, on the sequences exact covers."""
        nodes = list(self.exact_nodes if nodes is None else nodes)
        exact = self.results.get("exact", [])
        rho = torch.tensor(
            [[[stats.spearman(r[n], x[n]) for r, x in zip(self.results[e], exact)] for n in nodes] for e in self.estimators],
            dtype=torch.float64,
        ).reshape(len(self.estimators), len(nodes), len(exact))
        return SpearmanTable(estimators=self.estimators, nodes=nodes, rho=rho)

    def to_frame(self) -> "pd.DataFrame":
        """Every result's :meth:`AttributionResult.to_frame` with ``method`` and ``sample`` columns."""
        import pandas as pd

        frames = [r.to_frame().assign(method=m, sample=i) for m, rs in self.results.items() for i, r in enumerate(rs)]
        return pd.concat(frames, ignore_index=True)

    def plot(self, ax: Any = None, sample: int = 0, node: str = "resid_pre") -> Any:
        """Layer × position heatmaps of one sequence, one panel per method (``ax``: one axes per
        method, or None for a new figure)."""
        from mechthink.plotting.attribution import plot_estimator_heatmaps

        return plot_estimator_heatmaps(self, sample=sample, node=node, axes=ax)


def compare_estimators(
    model: "ThinkingModel",
    sequences: Sequence[Sequence[int] | Tensor],
    metric: Metric,
    baseline: str | dict[str, Tensor] = "mean",
    means: MeanActivations | None = None,
    estimators: Mapping[str, Sequence[str]] | None = None,
    exact_nodes: Sequence[str] = ("resid_pre",),
    n_exact: int | None = None,
    exact_batch_size: int = 64,
) -> EstimatorComparison:
    """Run estimators and exact patching on each sequence (for ρ tables and ground-truth checks).

    Args:
        model: The loaded model.
        sequences: Token sequences (1-D each).
        metric: As in :func:`attribution_patching`.
        baseline: ``"mean"`` (needs ``means``), ``"zero"`` or a dict of baseline activations.
        means: Mean activations for ``baseline="mean"``.
        estimators: Estimator name -> node types it scores (default AtP and QK-fix on
            ``resid_pre``); run in this order on every sequence, before exact patching.
        exact_nodes: Node types exact patching scores.
        n_exact: Exact patching only on the first ``n_exact`` sequences (None: all; 0: none).
        exact_batch_size: Patched nodes per forward of exact patching.

    Returns:
        An :class:`EstimatorComparison`.
    """
    estimators = {"atp": ("resid_pre",), "qkfix": ("resid_pre",)} if estimators is None else dict(estimators)
    bad = [e for e in estimators if e not in ESTIMATORS]
    if bad:
        raise ValueError(f"estimators {bad} are not accepted; use names among {ESTIMATORS}")
    if n_exact is not None and n_exact < 0:
        raise ValueError(f"n_exact={n_exact}; use None (all) or an integer >= 0")
    results: dict[str, list[AttributionResult]] = {e: [] for e in estimators}
    results["exact"] = []
    for i, seq in enumerate(track(sequences, "attribution estimators")):
        ids = torch.as_tensor(seq)
        for e, nodes in estimators.items():
            results[e].append(attribution_patching(model, ids, metric, baseline, nodes=nodes, means=means, estimator=e))
        if n_exact is None or i < n_exact:
            results["exact"].append(
                activation_patching(model, ids, metric, baseline, nodes=exact_nodes, means=means, batch_size=exact_batch_size)
            )
    return EstimatorComparison(results=results, exact_nodes=tuple(exact_nodes))


# ---------------------------------------------------------------------------------- head ranking
@dataclass
class HeadRanking(Result):
    """Attention heads ranked by their summed ``z`` scores over sequences.

    Attributes:
        support: ``[layer, head]``: ``sign ·`` (mean over sequences of the head's ``z`` score
            summed over positions). With a mean baseline and ``sign=-1``: how much ablating the
            head everywhere lowers the metric, to first order.
        heads: The top ``(layer, head)`` pairs, best first.
        sign: The sign applied.
    """

    support: Float[Tensor, "layer head"]
    heads: list[tuple[int, int]]
    sign: float = -1.0

    @property
    def labels(self) -> list[str]:
        """``"L{layer}H{head}"`` of each top head."""
        return [f"L{L}H{h}" for L, h in self.heads]

    @property
    def top_support(self) -> list[float]:
        """The support of each top head."""
        return [float(self.support[L, h]) for L, h in self.heads]

    def to_frame(self) -> "pd.DataFrame":
        """One row per head: layer, head, support, rank among all heads (0 = best)."""
        import pandas as pd

        n_layers, n_heads = self.support.shape
        order = self.support.flatten().argsort(descending=True).tolist()
        rank = {i: r for r, i in enumerate(order)}
        return pd.DataFrame(
            [(L, h, float(self.support[L, h]), rank[L * n_heads + h]) for L in range(n_layers) for h in range(n_heads)],
            columns=["layer", "head", "support", "rank"],
        )

    def plot(self, ax: Any = None) -> Any:
        """Layer × head heatmap of the support with the top heads marked."""
        from mechthink.plotting.attribution import plot_head_ranking

        return plot_head_ranking(self, ax=ax)


def rank_heads(results: Sequence[AttributionResult], k: int = 3, sign: float = -1.0) -> HeadRanking:
    """The ``k`` heads with the largest ``sign ·`` mean over ``results`` of the summed ``z`` scores.

    Args:
        results: Attribution results that scored the ``z`` node type.
        k: How many heads to keep.
        sign: ``-1`` (default) ranks heads whose ablation lowers the metric first.
    """
    if not results or any("z" not in r.scores for r in results):
        raise ValueError("results: pass at least one AttributionResult that scored nodes=('z', ...)")
    if k < 1:
        raise ValueError(f"k={k}; use an integer >= 1")
    support = sign * torch.stack([r.scores["z"].sum(1) for r in results]).mean(0)
    order = support.flatten().argsort(descending=True)[:k].tolist()
    n_heads = support.shape[1]
    return HeadRanking(support=support, heads=[(i // n_heads, i % n_heads) for i in order], sign=float(sign))
