"""MLP value vectors projected onto the vocabulary, neuron search, linear probes, ablation.

A neuron ``n`` of layer ``L`` writes ``act · W_out[L][n]`` into the residual stream; projecting
that row (its *value vector*) through the unembedding shows which tokens the neuron promotes
(Geva et al. 2022). The public repository wj210/cot_backtrack (after ajyl's "MLP value
vectors" post) finds, on
R1-Distill-Llama-8B, neurons whose value vectors promote "wait" (L24 #11117) or "therefore"
(L17 #13623) by training per-layer linear probes that separate backtracking from wrap-up
positions (≥ 0.99 accuracy from layer 6 on) and ranking value vectors by cosine with the probe
direction; ablating them (zeroing ``mlp.hook_post``) tests their effect. :func:`compare_ablations`
ablates several neuron sets (e.g. :meth:`NeuronHits.plan`, :func:`neuron_plan` of the DLA
ranking, :func:`random_plan` as the control) on the same positions.

Compatibility mode folds the final norm's weight into ``W_U`` and centres it, so
``W_out[L][n] @ W_U`` is the value vector's direct effect on the (centred) logits up to the
final norm's per-position scale.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechthink.lens import as_token_row, resolve_targets
from mechthink.models.thinking_model import ThinkingModel
from mechthink.results import Result

__all__ = [
    "value_vector_logits",
    "top_tokens",
    "NeuronHits",
    "search_neurons",
    "LayerProbeResult",
    "collect_activations",
    "layer_probes",
    "rank_by_probe",
    "ablate_neurons",
    "ablation_effect",
    "AblationComparison",
    "AblationEffect",
    "compare_ablations",
    "neuron_dla",
    "neuron_plan",
    "random_plan",
]

#: Neurons to ablate, ``{layer: [neuron, …]}``.
NeuronPlan = dict[int, list[int]]


def _w_out(model: ThinkingModel, layer: int) -> Float[Tensor, "d_mlp d_model"]:
    if not 0 <= layer < model.n_layers:
        raise ValueError(f"layer {layer} is outside [0, {model.n_layers})")
    return model.bridge.blocks[layer].mlp.W_out


def value_vector_logits(model: ThinkingModel, layer: int, neurons: Sequence[int]) -> Float[Tensor, "neuron d_vocab"]:
    """``W_out[layer][neurons] @ W_U``: each value vector's direct effect on every logit."""
    w = _w_out(model, layer)
    idx = torch.tensor(list(neurons), device=w.device)
    if len(idx) and (idx.min() < 0 or idx.max() >= w.shape[0]):
        raise ValueError(f"neurons must be in [0, {w.shape[0]}) for layer {layer}")
    with torch.no_grad():
        return (w[idx] @ model.bridge.W_U).float()


def top_tokens(
    model: ThinkingModel, layer: int, neurons: int | Sequence[int], k: int = 20, bottom: bool = False
) -> pd.DataFrame:
    """The top-k (or bottom-k) vocabulary tokens of each (layer, neuron) value vector.

    Returns:
        A frame with one row per (neuron, rank): ``layer, neuron, rank, token, token_id, logit``.
    """
    neurons = [neurons] if isinstance(neurons, int) else list(neurons)
    logits = value_vector_logits(model, layer, neurons)
    vals, ids = (-logits if bottom else logits).topk(k, dim=-1)
    rows = []
    for i, n in enumerate(neurons):
        for r in range(k):
            tid = int(ids[i, r])
            rows.append(
                {
                    "layer": layer,
                    "neuron": n,
                    "rank": r,
                    "token": model.tokenizer.decode([tid]),
                    "token_id": tid,
                    "logit": float(logits[i, tid]),
                }
            )
    return pd.DataFrame(rows)


@dataclass
class NeuronHits(Result):
    """Neurons whose value vectors most promote a target token set.

    Attributes:
        layers / neurons: location of each hit, best first.
        scores: the score used for ranking (see ``score``).
        target_logits: mean direct logit of the targets for each hit.
        score: ``"logit"`` (mean target logit of the value vector) or ``"zscore"`` (that, in
            standard deviations of the value vector's logits over the whole vocabulary).
        targets: the target token strings.
    """

    layers: Int[Tensor, "hit"]
    neurons: Int[Tensor, "hit"]
    scores: Float[Tensor, "hit"]
    target_logits: Float[Tensor, "hit"]
    score: str
    targets: list[str]

    def to_frame(self, model: ThinkingModel | None = None, k: int = 10) -> pd.DataFrame:
        """One row per hit; with ``model``, also the value vector's top-k tokens."""
        rows = []
        for i in range(len(self.neurons)):
            row: dict[str, Any] = {
                "layer": int(self.layers[i]),
                "neuron": int(self.neurons[i]),
                "score": float(self.scores[i]),
                "target_logit": float(self.target_logits[i]),
            }
            if model is not None:
                tt = top_tokens(model, row["layer"], [row["neuron"]], k=k)
                row["top_tokens"] = list(tt["token"])
            rows.append(row)
        return pd.DataFrame(rows)

    def plan(self) -> NeuronPlan:
        """The hits as ``{layer: [neuron, …]}`` (for :func:`ablate_neurons`)."""
        return neuron_plan(self.layers, self.neurons)

    def plot(self, ax: Any = None) -> Any:
        """Bars of the hits' scores, labelled ``L{layer}N{neuron}``."""
        from mechthink.plotting.value_vectors import plot_neuron_hits

        return plot_neuron_hits(self, ax=ax)


@torch.no_grad()
def search_neurons(
    model: ThinkingModel,
    targets: Sequence[str | int] | str | int,
    layers: Sequence[int] | None = None,
    k: int = 20,
    score: Literal["logit", "zscore"] = "zscore",
    chunk: int = 4096,
) -> NeuronHits:
    """Find the (layer, neuron) value vectors that most promote ``targets`` (all their variants).

    ``score="logit"`` ranks by the mean of the targets' direct logits; ``"zscore"`` divides by
    each value vector's logit standard deviation over the vocabulary (so neurons that promote the
    targets *specifically* rank first). Chunked over neurons: memory ``chunk × d_vocab``.
    """
    if score not in ("logit", "zscore"):
        raise ValueError(f"score={score!r} is not supported; use 'logit' or 'zscore'")
    ids, strs = resolve_targets(model, targets)
    layers = list(range(model.n_layers)) if layers is None else list(layers)
    W_U = model.bridge.W_U
    tid = torch.tensor(ids, device=W_U.device)
    all_scores, all_tl, all_layer, all_neuron = [], [], [], []
    for L in layers:
        w = _w_out(model, L)
        for start in range(0, w.shape[0], chunk):
            block = w[start : start + chunk]
            t_logit = (block @ W_U[:, tid]).float().mean(-1)
            if score == "zscore":
                full = (block @ W_U).float()
                s = (t_logit - full.mean(-1)) / full.std(-1).clamp_min(1e-8)
            else:
                s = t_logit
            all_scores.append(s)
            all_tl.append(t_logit)
            all_layer.append(torch.full_like(s, L, dtype=torch.long))
            all_neuron.append(torch.arange(start, start + len(s), device=s.device))
    scores = torch.cat(all_scores)
    top = scores.topk(min(k, len(scores))).indices
    return NeuronHits(
        layers=torch.cat(all_layer)[top].cpu(),
        neurons=torch.cat(all_neuron)[top].cpu(),
        scores=scores[top].cpu(),
        target_logits=torch.cat(all_tl)[top].cpu(),
        score=score,
        targets=strs,
    )


@torch.no_grad()
def neuron_dla(
    model: ThinkingModel,
    examples: Sequence[tuple[Sequence[int] | Tensor, int]],
    targets: Sequence[str | int] | str | int,
    layers: Sequence[int] | None = None,
    k: int = 20,
) -> pd.DataFrame:
    """Neurons ranked by their direct logit attribution to ``targets`` at the given positions.

    DLA of neuron n of layer L at a position = ``act[n] · (W_out[L][n] @ W_U[:, t])`` divided by
    the final norm's scale there (frozen from the forward), averaged over the target ids and the
    examples: how much that neuron's value vector, weighted by how strongly it fired, writes the
    targets' logits directly. Unlike :func:`search_neurons` it depends on the inputs.

    Returns:
        ``layer, neuron, dla, mean_act`` for the top-k neurons, best first.
    """
    from mechthink.hooks import gather, hook_name

    ids, _ = resolve_targets(model, targets)
    layers = list(range(model.n_layers)) if layers is None else list(layers)
    posts = [hook_name(L, "mlp_post") for L in layers]
    W_U = model.bridge.W_U[:, torch.tensor(ids, device=model.device)]
    per_layer_vv = [(_w_out(model, L) @ W_U).float().mean(-1) for L in layers]  # [d_mlp]
    total = [torch.zeros_like(v) for v in per_layer_vv]
    acts_sum = [torch.zeros_like(v) for v in per_layer_vv]
    examples = list(examples)
    for toks, pos in examples:
        cache = gather(model, [int(i) for i in as_token_row(toks, "cpu")], [*posts, "ln_final.hook_scale"],
                       positions=[int(pos)], device=model.device)
        scale = cache["ln_final.hook_scale"][0, 0].float()
        for i, name in enumerate(posts):
            act = cache[name][0, 0].float()
            total[i] += act * per_layer_vv[i] / scale
            acts_sum[i] += act
    n = max(1, len(examples))
    rows = [
        {"layer": L, "neuron": j, "dla": float(total[i][j]) / n, "mean_act": float(acts_sum[i][j]) / n}
        for i, L in enumerate(layers)
        for j in range(len(total[i]))
    ]
    frame = pd.DataFrame(rows).sort_values("dla", ascending=False).head(k).reset_index(drop=True)
    return frame


# --------------------------------------------------------------------------- probes
@torch.no_grad()
def collect_activations(
    model: ThinkingModel,
    examples: Sequence[tuple[Sequence[int] | Tensor, int]],
    hook: str = "hook_resid_post",
    layers: Sequence[int] | None = None,
) -> Float[Tensor, "example layer d"]:
    """Activations of ``blocks.{L}.{hook}`` at one position per example (token ids, position),
    gathered only there (:func:`mechthink.hooks.gather`)."""
    from mechthink.hooks import gather, hook_name, suffix_kind

    layers = list(range(model.n_layers)) if layers is None else list(layers)
    names = [hook_name(L, suffix_kind(hook)) for L in layers]
    seqs, positions = [], []
    for toks, pos in examples:
        t = [int(i) for i in as_token_row(toks, "cpu")]
        if not -len(t) <= pos < len(t):
            raise ValueError(f"collect_activations: position {pos} outside a sequence of length {len(t)}")
        seqs.append(t)
        positions.append([int(pos)])
    cache = gather(model, seqs, names, positions=positions, batch_size=1)
    return torch.stack([cache[n][:, 0].float() for n in names], dim=1)


@dataclass
class LayerProbeResult(Result):
    """Per-layer logistic-regression probes separating two labelled position sets.

    Attributes:
        accuracy: k-fold cross-validated accuracy per layer.
        train_accuracy: accuracy of the probe fit on all examples.
        directions: unit probe weight vectors (in the activation space) per layer.
        layers / hook / folds / label_names: what was probed.
    """

    accuracy: Float[Tensor, "layer"]
    train_accuracy: Float[Tensor, "layer"]
    directions: Float[Tensor, "layer d"]
    layers: list[int]
    hook: str
    folds: int
    label_names: tuple[str, str]

    def to_frame(self) -> pd.DataFrame:
        """One row per layer: cross-validated and training accuracy."""
        return pd.DataFrame(
            {
                "layer": self.layers,
                "cv_accuracy": self.accuracy.tolist(),
                "train_accuracy": self.train_accuracy.tolist(),
            }
        )

    def to_json(self, path: str | None = None) -> str:
        """JSON of the hook, folds, labels and per-layer accuracies (not the directions)."""
        text = json.dumps({"hook": self.hook, "folds": self.folds, "labels": list(self.label_names), "rows": self.to_frame().to_dict(orient="records")})
        if path is not None:
            with open(path, "w") as fh:
                fh.write(text)
        return text

    def plot(self, ax: Any = None) -> Any:
        """Cross-validated accuracy per layer."""
        from mechthink.plotting.value_vectors import plot_probe_accuracy

        return plot_probe_accuracy(self, ax=ax)


def _fit_logreg(x: Tensor, y: Tensor, l2: float, steps: int) -> tuple[Tensor, Tensor]:
    """L2-regularised logistic regression on standardised features (LBFGS, full batch)."""
    w = torch.zeros(x.shape[1], dtype=x.dtype, requires_grad=True)
    b = torch.zeros((), dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def layer_probes(
    acts: Float[Tensor, "example layer d"],
    labels: Sequence[int] | Int[Tensor, "example"],
    layers: Sequence[int] | None = None,
    hook: str = "hook_resid_post",
    folds: int = 5,
    l2: float = 1e-3,
    steps: int = 100,
    seed: int = 0,
    label_names: tuple[str, str] = ("wrap-up", "backtrack"),
) -> LayerProbeResult:
    """Train one linear probe per layer on activations (from :func:`collect_activations`).

    Features are standardised per layer (mean/std from the training fold); the returned
    direction is mapped back to the raw activation space (``w / std``) and unit-normalised.
    """
    y = torch.as_tensor(list(labels) if not isinstance(labels, Tensor) else labels).double()
    if set(y.unique().tolist()) - {0.0, 1.0} or len(y.unique()) != 2:
        raise ValueError("layer_probes: labels must contain both classes 0 and 1 and nothing else")
    n = acts.shape[0]
    if n != len(y):
        raise ValueError(f"layer_probes: {n} activations but {len(y)} labels")
    folds = max(2, min(folds, int(min((y == 0).sum(), (y == 1).sum()))))
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    fold_of = torch.empty(n, dtype=torch.long)
    fold_of[perm] = torch.arange(n) % folds
    layers = list(range(acts.shape[1])) if layers is None else list(layers)
    accs, train_accs, dirs = [], [], []
    for li in range(acts.shape[1]):
        x = acts[:, li].double()
        correct = 0
        for f in range(folds):
            tr, te = fold_of != f, fold_of == f
            mu, sd = x[tr].mean(0), x[tr].std(0).clamp_min(1e-6)
            w, b = _fit_logreg((x[tr] - mu) / sd, y[tr], l2, steps)
            pred = (((x[te] - mu) / sd) @ w + b) > 0
            correct += int((pred == y[te].bool()).sum())
        accs.append(correct / n)
        mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
        w, b = _fit_logreg((x - mu) / sd, y, l2, steps)
        train_accs.append(float(((((x - mu) / sd) @ w + b > 0) == y.bool()).double().mean()))
        d = w / sd
        dirs.append((d / d.norm().clamp_min(1e-12)).float())
    return LayerProbeResult(
        accuracy=torch.tensor(accs),
        train_accuracy=torch.tensor(train_accs),
        directions=torch.stack(dirs),
        layers=layers,
        hook=hook,
        folds=folds,
        label_names=label_names,
    )


@torch.no_grad()
def rank_by_probe(model: ThinkingModel, probe: LayerProbeResult, layer: int, k: int = 20) -> pd.DataFrame:
    """Value vectors of ``layer`` ranked by cosine with that layer's probe direction.

    Positive cosine = the neuron writes toward the probe's positive class (``label_names[1]``).
    Returns ``layer, neuron, cosine`` plus each value vector's top-5 tokens.
    """
    if layer not in probe.layers:
        raise ValueError(f"layer {layer} was not probed (probed: {probe.layers})")
    d = probe.directions[probe.layers.index(layer)].to(model.device)
    w = _w_out(model, layer).float()
    cos = (w @ d) / w.norm(dim=-1).clamp_min(1e-12)
    top = cos.topk(min(k, len(cos))).indices.tolist()
    vv = value_vector_logits(model, layer, top).topk(5, dim=-1).indices
    return pd.DataFrame(
        [
            {
                "layer": layer,
                "neuron": n,
                "cosine": float(cos[n]),
                "top_tokens": [model.tokenizer.decode([int(t)]) for t in vv[i]],
            }
            for i, n in enumerate(top)
        ]
    )


# --------------------------------------------------------------------------- ablation
@contextlib.contextmanager
def ablate_neurons(model: ThinkingModel, neurons: Mapping[int, Sequence[int]]) -> Iterator[None]:
    """Zero the ``mlp.hook_post`` activations of the given neurons ``{layer: [neuron, …]}``.

    A context manager on ``bridge.hooks``: exactly the hooks it added are removed on exit,
    also after an exception.
    """
    from mechthink.hooks import hook_name

    fwd_hooks = []
    for layer, ns in neurons.items():
        idx = torch.tensor(list(ns), dtype=torch.long, device=model.device)
        if len(idx) and (idx.min() < 0 or idx.max() >= _w_out(model, layer).shape[0]):
            raise ValueError(f"ablate_neurons: neuron index out of range for layer {layer}")

        def zero(act: Tensor, hook: Any, idx: Tensor = idx) -> Tensor:
            act = act.clone()
            act[..., idx] = 0.0
            return act

        fwd_hooks.append((hook_name(layer, "mlp_post", model), zero))
    with model.bridge.hooks(fwd_hooks=fwd_hooks):
        yield


@dataclass
class AblationEffect(Result):
    """Target probability before and after ablating one set of neurons, per example.

    Attributes:
        prob_clean: P(any target token) at each example's position, clean.
        prob_ablated: The same with the neurons ablated.
        targets: The target token strings.
        neurons: The ablated neurons ``{layer: [neuron, …]}``.
    """

    prob_clean: Float[Tensor, "example"]
    prob_ablated: Float[Tensor, "example"]
    targets: list[str]
    neurons: dict[int, list[int]]

    @property
    def mean_drop(self) -> float:
        return float((self.prob_clean - self.prob_ablated).mean())

    def to_frame(self) -> pd.DataFrame:
        """One row per example: prob_clean, prob_ablated."""
        return pd.DataFrame({"prob_clean": self.prob_clean.tolist(), "prob_ablated": self.prob_ablated.tolist()})

    def plot(self, ax: Any = None) -> Any:
        """Clean vs ablated probability per example (one point each, the diagonal = no effect)."""
        from mechthink.plotting.value_vectors import plot_ablation_scatter

        return plot_ablation_scatter(self, ax=ax)


@dataclass
class AblationComparison(Result):
    """Several neuron sets ablated on the same examples.

    Attributes:
        prob_clean: P(any target token) at each example's position, clean.
        prob_ablated: Per plan name, the same with that plan's neurons ablated.
        plans: Per plan name, the ablated neurons ``{layer: [neuron, …]}``.
        targets: The target token strings.
    """

    prob_clean: Float[Tensor, "example"]
    prob_ablated: dict[str, Float[Tensor, "example"]]
    plans: dict[str, NeuronPlan]
    targets: list[str]

    def mean_prob(self) -> dict[str, float]:
        """Mean probability over examples: ``"clean"`` and each plan."""
        return {"clean": float(self.prob_clean.mean()), **{k: float(v.mean()) for k, v in self.prob_ablated.items()}}

    def effect(self, plan: str) -> AblationEffect:
        """One plan's :class:`AblationEffect`."""
        if plan not in self.plans:
            raise ValueError(f"plan={plan!r} was not ablated; use one of {list(self.plans)}")
        return AblationEffect(self.prob_clean, self.prob_ablated[plan], self.targets, self.plans[plan])

    def to_frame(self) -> pd.DataFrame:
        """One row per (plan, example): prob_clean, prob_ablated."""
        return pd.concat([self.effect(k).to_frame().assign(plan=k, example=range(len(self.prob_clean))) for k in self.plans],
                         ignore_index=True)

    def plot(self, ax: Any = None, labels: Mapping[str, str] | None = None) -> Any:
        """Bars of the mean probability, clean and under each plan (``labels``: bar names)."""
        from mechthink.plotting.value_vectors import plot_ablation_bars

        return plot_ablation_bars(self, labels=labels, ax=ax)


def neuron_plan(layers: Sequence[int] | Tensor, neurons: Sequence[int] | Tensor) -> NeuronPlan:
    """``{layer: [neuron, …]}`` from parallel layer and neuron lists (order kept)."""
    layers = layers.tolist() if isinstance(layers, Tensor) else [int(x) for x in layers]
    neurons = neurons.tolist() if isinstance(neurons, Tensor) else [int(x) for x in neurons]
    if len(layers) != len(neurons):
        raise ValueError(f"neuron_plan: {len(layers)} layers but {len(neurons)} neurons; pass one layer per neuron")
    plan: NeuronPlan = {}
    for L, n in zip(layers, neurons):
        plan.setdefault(int(L), []).append(int(n))
    return plan


def random_plan(model: ThinkingModel, layers: Sequence[int] | Tensor, seed: int = 0) -> NeuronPlan:
    """A control plan: for each entry of ``layers`` (in order) one uniformly random neuron of that
    layer, drawn from a generator seeded with ``seed`` (repeats are possible)."""
    g = torch.Generator().manual_seed(seed)
    layers = layers.tolist() if isinstance(layers, Tensor) else [int(x) for x in layers]
    neurons = [int(torch.randint(_w_out(model, L).shape[0], (1,), generator=g)) for L in layers]
    return neuron_plan(layers, neurons)


def _target_probs(model: ThinkingModel, examples: Sequence[tuple[Sequence[int] | Tensor, int]], tid: Tensor) -> Tensor:
    """P(any of the token ids ``tid``) at each example's position."""
    out = []
    for toks, pos in examples:
        t = as_token_row(toks, model.device)
        lp = model.bridge(t[None])[0, pos].float().log_softmax(-1)
        out.append(lp[tid].exp().sum())
    return torch.stack(out).cpu()


@torch.no_grad()
def compare_ablations(
    model: ThinkingModel,
    examples: Sequence[tuple[Sequence[int] | Tensor, int]],
    plans: Mapping[str, Mapping[int, Sequence[int]]],
    targets: Sequence[str | int] | str | int,
) -> AblationComparison:
    """P(any target token) at each (tokens, position) example, clean and under each plan.

    Args:
        model: The loaded model.
        examples: ``(token ids, position)`` pairs.
        plans: Plan name -> neurons ``{layer: [neuron, …]}`` zeroed together.
        targets: Words (all their single-token variants) or token ids.
    """
    if not examples:
        raise ValueError("compare_ablations: examples is empty; pass (token ids, position) pairs")
    ids, strs = resolve_targets(model, targets)
    tid = torch.tensor(ids, device=model.device)
    clean = _target_probs(model, examples, tid)
    ablated = {}
    for name, neurons in plans.items():
        with ablate_neurons(model, neurons):
            ablated[name] = _target_probs(model, examples, tid)
    fixed = {name: {int(k): [int(n) for n in v] for k, v in plan.items()} for name, plan in plans.items()}
    return AblationComparison(prob_clean=clean, prob_ablated=ablated, plans=fixed, targets=strs)


def ablation_effect(
    model: ThinkingModel,
    examples: Sequence[tuple[Sequence[int] | Tensor, int]],
    neurons: Mapping[int, Sequence[int]],
    targets: Sequence[str | int] | str | int,
) -> AblationEffect:
    """P(any target token) at each example's position, clean vs with ``neurons`` ablated."""
    return compare_ablations(model, examples, {"ablated": neurons}, targets).effect("ablated")
