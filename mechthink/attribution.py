"""Attribution patching (AtP) with mean / zero / corrupted-run baselines, and exact patching.

Method: for a scalar metric ``m`` of the logits and a node activation ``a`` (a residual stream
vector, an attention / MLP output, or one head's ``hook_z``), the linear estimate of patching the
node to a baseline ``b`` is ``Σ_d (b − a)_d · ∂m/∂a_d`` (Nanda 2023, "Attribution Patching";
Kramár et al. 2024, AtP). One forward and one backward give the estimate for every
(layer, position[, head]) node at once. :func:`activation_patching` is the exact reference: it
replaces each node by its baseline and re-runs (many nodes per batched forward).
Source: ARBOR #22 (wj210/cot_backtrack; seed review ``shared/seeds/003``): metric = the
" Wait" logit at the position before backtracking, baseline = the dataset-mean activation per
layer (over samples and positions), a token's importance = max over layers of the resid score.

Sign convention: ``score = m(patched) − m(clean)`` for exact patching, and its first-order
estimate for AtP. With a mean baseline a *negative* score means ablating the node lowers the
metric, i.e. the node supports it.

Integrated gradients (``ig_steps=n``): for each node type and each layer ``L`` separately, the
activation at that one hook is interpolated ``b + α (a − b)`` at the ``n`` midpoints
``α = (k + ½)/n`` while every other hook runs clean, and the gradients at that hook are averaged
over α. All (layer, α) pairs of one node type run as the rows of one batched forward/backward
(``ig_batch_size`` caps the rows), so the cost is ``n_layers · n`` rows per node type rather than
one forward per node. This is "layer-wise" IG (Marks et al. 2024, sparse feature circuits), not
IG of the input embedding.

AtP* QK-fix (``qk_fix=True``): plain AtP misses effects that go through attention *patterns*;
ablating a position's residual vector changes its keys and can make it attended. With
``qk_fix`` every node's score keeps the patched position's own stream, the key/value column it
changes in every later layer, and the metric position's stream exact, and stays linear only in
the effect on the intermediate positions (module ``mechthink._qkfix``; Kramár et al. 2024).
Still no forward pass per node. On tiny-thinker it raises the Spearman ρ against exact patching
of ``resid_pre`` from 0.26 to 0.87 (``analyses/05_attribution.py``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

if TYPE_CHECKING:
    import pandas as pd

    from mechthink.models.thinking_model import ThinkingModel

__all__ = [
    "NODE_TYPES",
    "AttributionResult",
    "MeanActivations",
    "activation_patching",
    "attribution_patching",
    "hook_name",
    "logit_diff_metric",
    "logit_metric",
    "mean_activations",
    "node_hooks",
]

log = logging.getLogger(__name__)

NodeType = Literal["resid_pre", "resid_post", "attn_out", "mlp_out", "z"]
NODE_TYPES: tuple[str, ...] = ("resid_pre", "resid_post", "attn_out", "mlp_out", "z")
Metric = Callable[[Tensor], Tensor]


# ---------------------------------------------------------------------------------------- hooks
def hook_name(node: str, layer: int) -> str:
    """The TransformerLens hook name of a node type at a layer (``z`` -> ``blocks.L.attn.hook_z``)."""
    from transformer_lens.utilities import get_act_name

    if node not in NODE_TYPES:
        raise ValueError(f"unknown node type {node!r}; use one of {NODE_TYPES}")
    return str(get_act_name(node, layer))


def node_hooks(model: "ThinkingModel", nodes: str | Sequence[str]) -> list[str]:
    """Hook names for node types (every layer) or explicit hook names, in the order given."""
    if isinstance(nodes, str):
        nodes = [nodes]
    out: list[str] = []
    for n in nodes:
        names = [hook_name(n, L) for L in range(model.n_layers)] if n in NODE_TYPES else [n]
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


def _per_row(metric: Metric, logits: Float[Tensor, "batch pos vocab"]) -> Float[Tensor, "batch"]:
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

    return metric


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

    return metric


# ------------------------------------------------------------------------------ mean activations
@dataclass
class MeanActivations:
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
        progress: bool = False,
    ) -> "MeanActivations":
        """Add samples (1-D token tensors or lists) to the running sums; returns ``self``.

        One forward per sample, hooks on the requested names only; memory does not grow with
        the number of samples.
        """
        from tqdm.auto import tqdm

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
        with torch.inference_mode():
            for sample in tqdm(dataset, disable=not progress, desc="mean activations"):
                if max_samples is not None and seen >= max_samples:
                    break
                row = _as_row(sample, model.device)
                start[0] = 1 if (self.skip_bos and bos is not None and int(row[0, 0]) == bos and row.shape[1] > 1) else 0
                model.bridge.run_with_hooks(row, fwd_hooks=[(n, make(n)) for n in names], return_type=None)
                self.count += row.shape[1] - start[0]
                self.n_samples += 1
                seen += 1
        return self

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (safetensors: the sums, metadata in the header) and ``path.json``."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "count": self.count,
            "n_samples": self.n_samples,
            "skip_bos": self.skip_bos,
            "model_name": self.model_name,
            "hooks": self.hooks,
        }
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
    progress: bool = False,
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
        progress: Show a tqdm bar.

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
    return resume.update(model, dataset, max_samples=max_samples, progress=progress)


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
    """Activations ``[pos, ...]`` of the named hooks for one row (no gradients)."""
    cache: dict[str, Tensor] = {}

    def make(name: str) -> Callable[..., None]:
        def hook(act: Tensor, hook: Any) -> None:
            cache[name] = act[0].detach().float().clone()

        return hook

    with torch.no_grad():
        model.bridge.run_with_hooks(row, fwd_hooks=[(n, make(n)) for n in names], return_type=None)
    return cache


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
class AttributionResult:
    """Per-node patching scores for one sequence.

    Attributes:
        scores: Per node type, ``[layer, pos]`` (resid/attn_out/mlp_out) or
            ``[layer, pos, head]`` (z): the estimated (AtP, IG) or exact change of the metric
            when the node is replaced by its baseline.
        node_types: The node types in ``scores``.
        tokens: The sequence's token ids.
        str_tokens: Each token decoded.
        metric_clean: The metric on the clean run.
        method: ``"atp"``, ``"ig"`` or ``"exact"``.
        baseline: ``"mean"``, ``"zero"`` or ``"corrupted"``.
        positions: For exact patching, the positions that were patched (others are NaN).
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
            reduce: ``"max"`` (the ARBOR #22 choice), ``"abs_max"`` (signed value of largest
                magnitude), ``"sum"`` or ``"mean"`` over layers.
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

    def to_json(self) -> str:
        """JSON with scores as nested lists, tokens and metadata."""
        return json.dumps(
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

    def plot(self, node: str = "resid_pre", kind: str = "heatmap", **kwargs: Any) -> Any:
        """``kind="heatmap"``: layer × position figure; ``"tokens"``: circuitsvis colored tokens."""
        from mechthink.plotting import attribution as plot_attr

        if kind == "heatmap":
            return plot_attr.plot_attribution_heatmap(self, node=node, **kwargs)
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


def _dot(diff: Tensor, grad: Tensor, node: str) -> Tensor:
    """Σ over the last (feature) axis: ``[pos, d]`` -> ``[pos]``, ``[pos, head, d_head]`` -> ``[pos, head]``."""
    return (diff * grad).sum(-1)


def attribution_patching(
    model: "ThinkingModel",
    tokens: Int[Tensor, "pos"] | Int[Tensor, "1 pos"] | Sequence[int],
    metric: Metric,
    baseline: str | Int[Tensor, "pos"] | Sequence[int] | dict[str, Tensor] = "mean",
    nodes: str | Sequence[str] = ("resid_pre", "attn_out", "mlp_out", "z"),
    means: MeanActivations | None = None,
    ig_steps: int = 0,
    ig_batch_size: int = 64,
    qk_fix: bool = False,
) -> AttributionResult:
    """Attribution patching for every (layer, position[, head]) node from one forward + backward.

    Args:
        model: The loaded model (its parameters are left untouched; gradients are taken with
            ``torch.autograd.grad`` with respect to the activations only).
        tokens: One sequence (1-D, or ``[1, pos]``).
        metric: ``logits [batch, pos, vocab] -> [batch]`` or a scalar (see :func:`logit_metric`).
        baseline: ``"mean"`` (needs ``means``), ``"zero"``, corrupted token ids of the same
            length (their activations at the same positions), or a dict from hook name to a
            baseline activation (``[pos, ...]`` or one position's shape, broadcast).
        nodes: Node types among ``resid_pre, resid_post, attn_out, mlp_out, z``.
        means: Mean activations for ``baseline="mean"``.
        ig_steps: 0 for plain AtP; ``n > 0`` for layer-wise integrated gradients with ``n``
            midpoint steps (module docstring).
        ig_batch_size: Rows per batched IG forward.
        qk_fix: Score every node type with the AtP* QK-fix (module docstring); needs a metric
            of the last position's logits only (e.g. ``logit_metric(-1, ...)``) and a Llama /
            Qwen2 / Qwen3 / GLM-4 layout. Costs O(layers² · rows · pos · d) arithmetic, with
            ``pos`` rows per layer for resid/attn_out/mlp_out and ``pos · heads`` for ``z``.

    Returns:
        An :class:`AttributionResult` with ``method="atp"``, ``"atp+qkfix"`` or ``"ig"``.
    """
    node_types = _split_nodes(nodes)
    if qk_fix and ig_steps > 0:
        raise ValueError("qk_fix=True and ig_steps > 0 are exclusive; choose one estimator")
    row = _as_row(tokens, model.device)
    n_layers = model.n_layers
    names = {n: [hook_name(n, L) for L in range(n_layers)] for n in node_types}
    all_names = [h for n in node_types for h in names[n]]

    with torch.inference_mode(False), torch.enable_grad():
        clean = _run_cache(model, row, all_names) if (ig_steps > 0 or qk_fix) else {}
        if qk_fix:  # its own functional forward + backward replaces the AtP gradients
            from mechthink._qkfix import qkfix_scores

            base = _baselines(model, row, all_names, baseline, means, clean)
            jobs = [(n, L) for n in node_types for L in range(n_layers)]
            fixed, metric_clean = qkfix_scores(
                model, row, lambda lg: _per_row(metric, lg), [(n, L, base[hook_name(n, L)]) for n, L in jobs]
            )
            scores = {n: torch.stack([f for (nn, _), f in zip(jobs, fixed) if nn == n]) for n in node_types}
        elif ig_steps <= 0:
            acts: dict[str, Tensor] = {}

            def make(name: str) -> Callable[..., Tensor]:
                def hook(act: Tensor, hook: Any) -> Tensor:
                    if not act.requires_grad:
                        act = act.detach().requires_grad_(True)
                    acts[name] = act
                    return act

                return hook

            logits = model.bridge.run_with_hooks(row, fwd_hooks=[(h, make(h)) for h in all_names])
            m = _per_row(metric, logits).sum()
            grads = torch.autograd.grad(m, [acts[h] for h in all_names], allow_unused=True)
            metric_clean = float(m.detach())
            grad_of = {h: (g[0].float() if g is not None else torch.zeros_like(acts[h][0], dtype=torch.float32)) for h, g in zip(all_names, grads)}
            act_of = {h: acts[h][0].detach().float() for h in all_names}
            del acts, logits, grads
            base = _baselines(model, row, all_names, baseline, means, act_of)
            scores = {
                n: torch.stack([_dot(base[h] - act_of[h], grad_of[h], n) for h in names[n]]).detach() for n in node_types
            }
        else:
            base = _baselines(model, row, all_names, baseline, means, clean)
            with torch.no_grad():
                metric_clean = float(_per_row(metric, model.bridge(row)).sum())
            scores = {n: _ig_scores(model, row, metric, names[n], clean, base, ig_steps, ig_batch_size) for n in node_types}

    tok = row[0].detach().cpu()
    return AttributionResult(
        scores=scores,
        node_types=node_types,
        tokens=tok,
        str_tokens=model.to_str_tokens(tok),
        metric_clean=metric_clean,
        method="ig" if ig_steps > 0 else ("atp+qkfix" if qk_fix else "atp"),
        baseline=_baseline_label(baseline),
        config={"ig_steps": ig_steps, "qk_fix": qk_fix, "model": model.spec.name},
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
        logits = model.bridge.run_with_hooks(batch, fwd_hooks=[(names[i], make(i)) for i in rows_by_layer])
        m = _per_row(metric, logits).sum()
        order = list(rows_by_layer)
        grads = torch.autograd.grad(m, [leaves[i] for i in order], allow_unused=True)
        for i, g in zip(order, grads):
            if g is not None:
                grad_sum[names[i]] += g.float().sum(0)
        del logits, grads, leaves
    return torch.stack([_dot(base[h] - clean[h], grad_sum[h] / steps, "") for h in names]).detach()


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
    progress: bool = False,
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
    from tqdm.auto import tqdm

    node_types = _split_nodes(nodes)
    row = _as_row(tokens, model.device)
    T = row.shape[1]
    pos_list = list(range(T)) if positions is None else sorted({p % T for p in positions})
    layer_list = list(range(model.n_layers)) if layers is None else list(layers)
    all_names = [hook_name(n, L) for n in node_types for L in layer_list]
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
    with torch.no_grad():
        m_clean = float(_per_row(metric, model.bridge(row))[0])
        for c0 in tqdm(range(0, len(jobs), batch_size), disable=not progress, desc="exact patching"):
            chunk = jobs[c0 : c0 + batch_size]
            groups: dict[str, list[tuple[int, int, int]]] = {}
            for r, (n, L, p, h) in enumerate(chunk):
                groups.setdefault(hook_name(n, L), []).append((r, p, h))

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

            logits = model.bridge.run_with_hooks(row.expand(len(chunk), -1), fwd_hooks=[(h, make(h)) for h in groups])
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
