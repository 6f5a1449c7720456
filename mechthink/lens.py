"""Logit lens over the residual stream and direct logit attribution of embed / attention / MLP.

Two views of how a prediction (e.g. the next token " Wait" at a backtracking point) forms:

* ``mode="accumulated"``: the residual stream before each block (``resid_pre_L``) and the final
  ``resid_post``, each passed through the model's final norm (recomputed for that state) and the
  unembedding — the logit lens (nostalgebraist 2020). At the last layer it *is* the model's
  output distribution.
* ``mode="decomposed"``: the final residual written as ``embed + Σ_L (attn_L + mlp_L)``, each
  component divided by the final norm's scale *frozen from the real forward* (so the
  contributions plus the unembedding bias sum exactly to the model's logit: direct logit
  attribution), or with ``norm="recompute"`` each component normalised on its own (a lens of
  what that component alone would say).

Optionally the identity is replaced by a *tuned lens* (Belrose et al. 2023): one affine
translator per layer, trained so that the translated residual's lens matches the model's final
distribution (KL), saved as safetensors (:class:`TunedLens`, :func:`train_tuned_lens`).

:func:`summarize_lens` reduces an accumulated lens and a DLA at many positions to the numbers
of one target (:class:`LensSummary`); :func:`compare_tuned_lens` trains a tuned lens on part of
the sequences and compares it with the plain lens on the rest (:class:`TunedLensComparison`).

Source: the public repository wj210/cot_backtrack ("understanding backtracking — logit lens",
R1-Distill-Llama-8B), following ajyl's MLP value-vector post; TransformerLens's
``ActivationCache.accumulated_resid`` / ``decompose_resid`` / ``apply_ln_to_stack``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
from einops import einsum, rearrange
from jaxtyping import Float, Int
from torch import Tensor

from mechthink.hooks import gather, hook_name, hook_names
from mechthink.models.thinking_model import ThinkingModel
from mechthink.results import Result

__all__ = [
    "LensResult",
    "LensSummary",
    "TunedLens",
    "TunedLensComparison",
    "as_token_row",
    "compare_tuned_lens",
    "component_names",
    "dla_bias",
    "final_norm",
    "logit_lens",
    "resolve_targets",
    "sum_check",
    "summarize_lens",
    "train_tuned_lens",
    "tuned_lens_kl",
    "unembed",
]

LensMode = Literal["accumulated", "decomposed"]
NormMode = Literal["frozen", "recompute"]


# --------------------------------------------------------------------------- model pieces
def as_token_row(tokens: Sequence[int] | Tensor, device: torch.device | str | None = None) -> Int[Tensor, "pos"]:
    """One token sequence (list or tensor) as a 1-D long tensor, optionally on ``device``."""
    t = tokens if isinstance(tokens, Tensor) else torch.as_tensor(list(tokens))
    return t.to(dtype=torch.long, device=device) if device is not None else t.long()


def _norm_weight(model: ThinkingModel) -> Tensor | None:
    w = getattr(model.bridge.ln_final, "w", None)
    return w.detach() if isinstance(w, Tensor) else None


def _is_layernorm(model: ThinkingModel) -> bool:
    return str(getattr(model.cfg, "normalization_type", "RMS")).upper().startswith("LN")


def final_norm(
    model: ThinkingModel, x: Float[Tensor, "... d_model"], scale: Float[Tensor, "... 1"] | None = None
) -> Float[Tensor, "... d_model"]:
    """The model's final norm applied to ``x``; with ``scale`` given, that scale is used (frozen).

    Without ``scale`` this computes the norm's own scale of ``x`` (RMS or LayerNorm, eps from
    the config) — exactly what ``bridge.ln_final`` does, so the lens of the last residual is the
    model's own output. With a frozen ``scale`` the map is linear in ``x`` (the bias of a
    LayerNorm, if any, is left to :func:`unembed`'s bias term).
    """
    x = x.to(model.bridge.W_U.dtype)
    if _is_layernorm(model):
        x = x - x.mean(-1, keepdim=True)
    if scale is None:
        eps = float(getattr(model.cfg, "eps", 1e-5))
        scale = (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    out = x / scale
    w = _norm_weight(model)
    return out * w if w is not None else out


def unembed(model: ThinkingModel, x: Float[Tensor, "... d_model"], bias: bool = True) -> Float[Tensor, "... d_vocab"]:
    """``x @ W_U (+ b_U)`` with the bridge's (compatibility-mode, centred) unembedding.

    The weights are detached: gradients (e.g. when training a tuned lens) never reach the model.
    """
    out = x @ model.bridge.W_U.detach()
    if bias and getattr(model.bridge, "b_U", None) is not None:
        out = out + model.bridge.b_U.detach()
    return out


def component_names(n_layers: int, mode: LensMode) -> list[str]:
    """Component labels: ``resid_pre_0 … resid_pre_{n-1}, resid_post_{n-1}`` or
    ``embed, attn_0, mlp_0, …, attn_{n-1}, mlp_{n-1}``."""
    if mode == "accumulated":
        return [f"resid_pre_{L}" for L in range(n_layers)] + [f"resid_post_{n_layers - 1}"]
    return ["embed"] + [f"{kind}_{L}" for L in range(n_layers) for kind in ("attn", "mlp")]


def resolve_targets(model: ThinkingModel, targets: Sequence[str | int] | str | int) -> tuple[list[int], list[str]]:
    """Token ids and labels for targets given as words (every single-token variant) or ids."""
    if isinstance(targets, (str, int)):
        targets = [targets]
    ids: list[int] = []
    for t in targets:
        new = [int(t)] if isinstance(t, int) else model.token_ids([t])
        ids += [i for i in new if i not in ids]
    if not ids:
        raise ValueError("logit_lens: no targets; pass words such as ' Wait' or token ids")
    vocab = int(model.bridge.W_U.shape[-1])
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"target token ids {bad} are outside the vocabulary [0, {vocab})")
    return ids, [model.tokenizer.decode([i]) for i in ids]


# --------------------------------------------------------------------------- result
@dataclass
class LensResult(Result):
    """Logit-lens / DLA result for several samples and positions.

    Attributes:
        target_logits: logit of each target token per (row, component); ``row`` enumerates
            (sample, position) pairs, see ``samples`` / ``positions``.
        target_probs: probability of each target under the component's own distribution
            (softmax of that component's lens logits; for ``accumulated`` this is the lens).
        target_ranks: rank (0 = top-1) of each target in that distribution.
        top_ids / top_logits: the top-k tokens of each component's lens logits.
        components: component labels (see :func:`component_names`).
        target_ids / targets: target token ids and their strings.
        samples / positions: the sample index and token position of each row.
        position_tokens: the token at each row's position (the input, not the prediction).
        model_logits: the model's actual logits of the targets at each row (for checks).
        mode / norm: how the lens was computed.
    """

    target_logits: Float[Tensor, "row component target"]
    target_probs: Float[Tensor, "row component target"]
    target_ranks: Int[Tensor, "row component target"]
    top_ids: Int[Tensor, "row component k"]
    top_logits: Float[Tensor, "row component k"]
    model_logits: Float[Tensor, "row target"]
    components: list[str]
    target_ids: list[int]
    targets: list[str]
    samples: list[int]
    positions: list[int]
    position_tokens: list[str]
    mode: str
    norm: str
    vocab: dict[int, str] = field(default_factory=dict, repr=False)

    def top_tokens(self, row: int, component: int | str) -> list[str]:
        """Strings of the top-k tokens for one row and component."""
        c = self.components.index(component) if isinstance(component, str) else component
        return [self.vocab.get(i, str(i)) for i in self.top_ids[row, c].tolist()]

    def to_frame(self) -> pd.DataFrame:
        """One row per (sample, position, component, target): logit, prob, rank, top-1 token."""
        rows = []
        for r in range(len(self.positions)):
            for c, comp in enumerate(self.components):
                top1 = self.top_tokens(r, c)[0] if self.top_ids.shape[-1] else ""
                for t, target in enumerate(self.targets):
                    rows.append(
                        {
                            "sample": self.samples[r],
                            "position": self.positions[r],
                            "token": self.position_tokens[r],
                            "component": comp,
                            "target": target,
                            "target_id": self.target_ids[t],
                            "logit": float(self.target_logits[r, c, t]),
                            "prob": float(self.target_probs[r, c, t]),
                            "rank": int(self.target_ranks[r, c, t]),
                            "top1": top1,
                        }
                    )
        return pd.DataFrame(rows)

    def mean_over_rows(self) -> Float[Tensor, "component target"]:
        """Target logits averaged over all rows (samples × positions)."""
        return self.target_logits.mean(0)

    def first_top1_component(self, target: int = 0) -> list[str | None]:
        """Per row, the first component (in order) where target ``target`` is top-1, or None."""
        out: list[str | None] = []
        for r in range(len(self.positions)):
            hits = (self.target_ranks[r, :, target] == 0).nonzero()
            out.append(self.components[int(hits[0])] if len(hits) else None)
        return out

    def to_json(self, path: str | Path | None = None) -> str:
        """JSON with the labels, the mean target logits per component and the full frame."""
        payload: dict[str, Any] = {
            "mode": self.mode,
            "norm": self.norm,
            "components": self.components,
            "targets": self.targets,
            "target_ids": self.target_ids,
            "mean_target_logits": self.mean_over_rows().tolist(),
            "rows": self.to_frame().to_dict(orient="records"),
        }
        text = json.dumps(payload)
        if path is not None:
            with open(path, "w") as fh:
                fh.write(text)
        return text

    def plot(self, ax: Any = None, kind: Literal["heatmap", "dla"] = "heatmap", row: int = 0, **kwargs: Any) -> Any:
        """Draw the lens (``heatmap``: layers × components with top tokens) or the DLA line chart."""
        from mechthink.plotting import lens as lens_plots

        if kind == "heatmap":
            return lens_plots.plot_lens_heatmap(self, row=row, ax=ax, **kwargs)
        if kind == "dla":
            return lens_plots.plot_dla(self, ax=ax, **kwargs)
        raise ValueError(f"kind={kind!r}; use 'heatmap' or 'dla'")


# --------------------------------------------------------------------------- computation
def _normalise_inputs(
    model: ThinkingModel,
    tokens: Int[Tensor, "batch pos"] | Int[Tensor, "pos"] | Sequence[Sequence[int]] | Sequence[Tensor],
    positions: int | Sequence[int] | Sequence[Sequence[int]] | None,
) -> list[tuple[Tensor, list[int]]]:
    if isinstance(tokens, Tensor):
        seqs = [tokens] if tokens.dim() == 1 else list(tokens)
    else:
        seqs = [as_token_row(s) for s in tokens]
    if not seqs:
        raise ValueError("logit_lens: no token sequences given")
    per: list[list[int]]
    if positions is None:
        per = [[-1] for _ in seqs]
    elif isinstance(positions, int):
        per = [[positions] for _ in seqs]
    else:
        flat = [p for p in positions if isinstance(p, int)]
        if len(flat) == len(positions):
            per = [flat for _ in seqs]
        else:
            if len(positions) != len(seqs):
                raise ValueError(f"logit_lens: {len(positions)} position lists for {len(seqs)} sequences")
            per = [[int(q) for q in p] for p in positions if not isinstance(p, int)]
    out = []
    for i, (s, ps) in enumerate(zip(seqs, per)):
        n = int(s.shape[-1])
        fixed = []
        for p in ps:
            q = p + n if p < 0 else p
            if not 0 <= q < n:
                raise ValueError(f"logit_lens: position {p} is outside sequence {i} of length {n}")
            fixed.append(q)
        out.append((s.to(model.device), fixed))
    return out


@torch.no_grad()
def logit_lens(
    model: ThinkingModel,
    tokens: Int[Tensor, "batch pos"] | Int[Tensor, "pos"] | Sequence[Sequence[int]] | Sequence[Tensor],
    targets: Sequence[str | int] | str | int,
    mode: LensMode = "accumulated",
    positions: int | Sequence[int] | Sequence[Sequence[int]] | None = None,
    norm: NormMode = "frozen",
    top_k: int = 5,
    tuned: TunedLens | None = None,
) -> LensResult:
    """Logit lens (accumulated residual) or direct logit attribution (decomposed components).

    Args:
        model: A loaded :class:`ThinkingModel`.
        tokens: One sequence, a ``[batch, pos]`` tensor, or a list of sequences (ragged is fine;
            each is run on its own with only the needed hooks cached).
        targets: Words (every single-token variant is used, e.g. " Wait", "Wait", " wait") or ids.
        mode: ``"accumulated"`` or ``"decomposed"``.
        positions: Positions to read (default the last); an int, one list for all sequences, or
            one list per sequence. Negative positions count from the end.
        norm: For ``decomposed``: ``"frozen"`` divides every component by the final norm's scale
            from the real forward (contributions + bias sum to the logit), ``"recompute"``
            normalises each component on its own. ``accumulated`` always recomputes.
        top_k: How many top tokens to keep per component.
        tuned: For ``accumulated``: a :class:`TunedLens` whose translators are applied to each
            ``resid_pre_L`` before the final norm (the final ``resid_post`` stays as it is).

    Returns:
        A :class:`LensResult` (rows = (sample, position) pairs).
    """
    if mode not in ("accumulated", "decomposed"):
        raise ValueError(f"mode={mode!r} is not supported; use 'accumulated' or 'decomposed'")
    if norm not in ("frozen", "recompute"):
        raise ValueError(f"norm={norm!r} is not supported; use 'frozen' or 'recompute'")
    if tuned is not None and mode != "accumulated":
        raise ValueError("a tuned lens applies to mode='accumulated' only")
    if tuned is not None and (tuned.n_layers, tuned.d_model) != (model.n_layers, model.d_model):
        raise ValueError(f"the tuned lens is for {tuned.n_layers} layers of width {tuned.d_model} but the model has "
                         f"{model.n_layers} layers of width {model.d_model}; train one for this model")
    target_ids, target_strs = resolve_targets(model, targets)
    n_layers = model.n_layers
    comps = component_names(n_layers, mode)
    if mode == "accumulated":
        hooks = [hook_name(L, "resid_pre") for L in range(n_layers)] + [hook_name(n_layers - 1, "resid_post")]
    else:
        hooks = (
            [hook_name(0, "resid_pre")]
            + [hook_name(L, k) for L in range(n_layers) for k in ("attn_out", "mlp_out")]
            + ["ln_final.hook_scale"]
        )
    tid = torch.tensor(target_ids, device=model.device)

    all_tl, all_tp, all_tr, all_ti, all_tv, all_ml = [], [], [], [], [], []
    samples: list[int] = []
    positions_out: list[int] = []
    pos_tokens: list[str] = []
    for i, (seq, pos) in enumerate(_normalise_inputs(model, tokens, positions)):
        cache = gather(model, seq, hooks, positions=[int(x) for x in pos], logits=True, device=model.device)
        logits = cache.logits  # [1, npos, vocab]: only the gathered positions are kept
        p = torch.arange(len(pos), device=model.device)
        stack = torch.stack([cache[h][0] for h in hooks if h != "ln_final.hook_scale"], dim=1)  # [npos, comp, d]
        if mode == "accumulated":
            if tuned is not None:
                stack = torch.cat([tuned.translate_stack(stack[:, :-1]), stack[:, -1:]], dim=1)
            comp_logits = unembed(model, final_norm(model, stack))
        else:
            scale = cache["ln_final.hook_scale"][0]  # [npos, 1]
            if norm == "frozen":
                normed = final_norm(model, stack, scale=rearrange(scale, "n one -> n 1 one"))
            else:
                normed = final_norm(model, stack)
            comp_logits = unembed(model, normed, bias=False)
        comp_logits = comp_logits.float()
        lp = comp_logits.log_softmax(-1)
        t_logit = comp_logits[..., tid]
        t_prob = lp[..., tid].exp()
        t_rank = (comp_logits.unsqueeze(-2) > t_logit.unsqueeze(-1)).sum(-1)
        tv, ti = comp_logits.topk(min(top_k, comp_logits.shape[-1]), dim=-1)
        all_tl.append(t_logit)
        all_tp.append(t_prob)
        all_tr.append(t_rank)
        all_ti.append(ti)
        all_tv.append(tv)
        all_ml.append(logits[0, p][:, tid].float())
        samples += [i] * len(pos)
        positions_out += pos
        pos_tokens += [model.tokenizer.decode([int(seq[q])]) for q in pos]
        del cache

    top_ids = torch.cat(all_ti)
    vocab = {i: model.tokenizer.decode([i]) for i in sorted(set(top_ids.flatten().tolist()))}
    return LensResult(
        target_logits=torch.cat(all_tl),
        target_probs=torch.cat(all_tp),
        target_ranks=torch.cat(all_tr),
        top_ids=top_ids,
        top_logits=torch.cat(all_tv),
        model_logits=torch.cat(all_ml),
        components=comps,
        target_ids=target_ids,
        targets=target_strs,
        samples=samples,
        positions=positions_out,
        position_tokens=pos_tokens,
        mode=mode if tuned is None else "tuned",
        norm="recompute" if mode == "accumulated" else norm,
        vocab=vocab,
    )


def dla_bias(model: ThinkingModel, target_ids: Sequence[int]) -> Float[Tensor, "target"]:
    """The unembedding bias of each target (the constant that completes the DLA sum)."""
    b = getattr(model.bridge, "b_U", None)
    if b is None:
        return torch.zeros(len(target_ids))
    return b[torch.tensor(list(target_ids), device=b.device)].float().cpu()


def sum_check(result: LensResult, model: ThinkingModel) -> Float[Tensor, "row target"]:
    """For a ``decomposed``/``frozen`` result: Σ components + bias − model logit (≈ 0)."""
    if result.mode != "decomposed" or result.norm != "frozen":
        raise ValueError("sum_check needs a decomposed lens with norm='frozen'")
    total = einsum(result.target_logits, "row comp target -> row target")
    return total + dla_bias(model, result.target_ids).to(total.device) - result.model_logits


# --------------------------------------------------------------------------- tuned lens
@dataclass
class TunedLens(Result):
    """Per-layer affine translators ``x ↦ x + x @ weight[L] + bias[L]`` for ``resid_pre_L``.

    Initialised at zero (= the plain logit lens). Train with :func:`train_tuned_lens`.
    """

    weight: Float[Tensor, "layer d_model d_model"]
    bias: Float[Tensor, "layer d_model"]
    model_name: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        w, b = self.weight, self.bias
        if w.ndim != 3 or w.shape[1] != w.shape[2] or b.shape != (w.shape[0], w.shape[1]):
            raise ValueError(f"TunedLens: weight must be [layer, d_model, d_model] and bias [layer, d_model], got "
                             f"{tuple(w.shape)} and {tuple(b.shape)}")
        if not (bool(torch.isfinite(w).all()) and bool(torch.isfinite(b).all())):
            raise ValueError("TunedLens: weight and bias must be finite (NaN/inf found)")

    @property
    def n_layers(self) -> int:
        return int(self.weight.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.weight.shape[1])

    @classmethod
    def identity(cls, n_layers: int, d_model: int, model_name: str = "") -> "TunedLens":
        return cls(torch.zeros(n_layers, d_model, d_model), torch.zeros(n_layers, d_model), model_name)

    def translate_stack(self, stack: Float[Tensor, "n layer d_model"]) -> Float[Tensor, "n layer d_model"]:
        """Translate ``resid_pre_L`` for every layer L (the stack's layer axis)."""
        w = self.weight.to(stack.device, stack.dtype)
        b = self.bias.to(stack.device, stack.dtype)
        return stack + einsum(stack, w, "n layer d, layer d e -> n layer e") + b

    def to_frame(self) -> pd.DataFrame:
        """One row per layer: the Frobenius norm of its translator's weight and its bias norm."""
        return pd.DataFrame(
            {
                "layer": list(range(self.n_layers)),
                "weight_norm": self.weight.float().flatten(1).norm(dim=1).tolist(),
                "bias_norm": self.bias.float().norm(dim=1).tolist(),
            }
        )

    def to_json(self, path: str | Path | None = None) -> str:
        """JSON of the model name, the training config and the per-layer norms (not the weights;
        :meth:`save` writes those)."""
        text = json.dumps({"model_name": self.model_name, "meta": self.meta, "layers": self.to_frame().to_dict(orient="records")})
        if path is not None:
            Path(path).write_text(text)
        return text

    def plot(self, ax: Any = None) -> Any:
        """The translators' weight and bias norms per layer."""
        from mechthink.plotting.lens import plot_translator_norms

        return plot_translator_norms(self, ax=ax)

    def save(self, path: str | Path) -> None:
        """Save as safetensors (metadata: model name and training config as JSON)."""
        from safetensors.torch import save_file

        meta = {"model_name": self.model_name, "meta": json.dumps(self.meta)}
        save_file({"weight": self.weight.contiguous(), "bias": self.bias.contiguous()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> "TunedLens":
        """Read a file written by :meth:`save` (one-line errors for anything else)."""
        from safetensors import safe_open

        if not Path(path).is_file():
            raise FileNotFoundError(f"TunedLens.load: {path}: no such file")
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                weight, bias = fh.get_tensor("weight"), fh.get_tensor("bias")
        except Exception as exc:  # safetensors raises its own types for a non-safetensors file or a missing tensor
            raise ValueError(f"TunedLens.load: {path} is not a tuned lens written by TunedLens.save "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})") from None
        return cls(weight, bias, meta.get("model_name", ""), json.loads(meta.get("meta", "{}")))


def tuned_lens_kl(
    model: ThinkingModel, tuned: TunedLens | None, sequences: Sequence[Sequence[int] | Tensor]
) -> Float[Tensor, "layer"]:
    """Mean KL(final ‖ lens of resid_pre_L) per layer over all positions (``tuned=None``: plain lens)."""
    tuned = tuned or TunedLens.identity(model.n_layers, model.d_model)
    names = hook_names(model, "resid_pre")
    total = torch.zeros(model.n_layers)
    count = 0
    with torch.no_grad():
        for seq in sequences:
            cache = gather(model, as_token_row(seq, "cpu"), names, logits=True, device=model.device)
            target = cache.logits[0].float().log_softmax(-1)
            stack = torch.stack([cache[n][0] for n in names], dim=1).float()
            lp = unembed(model, final_norm(model, tuned.translate_stack(stack))).float().log_softmax(-1)
            kl = (target.exp()[:, None] * (target[:, None] - lp)).sum(-1)  # [pos, layer]
            total += kl.sum(0).cpu()
            count += kl.shape[0]
    return total / max(1, count)


def train_tuned_lens(
    model: ThinkingModel,
    sequences: Sequence[Sequence[int] | Tensor],
    steps: int = 200,
    lr: float = 1e-3,
    batch_size: int = 8,
    seed: int = 0,
) -> TunedLens:
    """Train one affine translator per layer so each layer's lens matches the final distribution.

    Loss: KL(final ‖ lens(translate(resid_pre_L))) summed over layers, averaged over positions of
    a random batch of ``sequences`` per step (Adam). Residuals are computed without gradients
    through the model; only the translators learn.
    """
    g = torch.Generator().manual_seed(seed)
    tuned = TunedLens.identity(model.n_layers, model.d_model, model.spec.name)
    weight = tuned.weight.to(model.device).float().requires_grad_(True)
    bias = tuned.bias.to(model.device).float().requires_grad_(True)
    opt = torch.optim.Adam([weight, bias], lr=lr)
    names = hook_names(model, "resid_pre")
    seqs = [as_token_row(s) for s in sequences]
    if not seqs:
        raise ValueError("train_tuned_lens: no training sequences")
    for _ in range(steps):
        idx = torch.randint(len(seqs), (min(batch_size, len(seqs)),), generator=g).tolist()
        stacks, targets = [], []
        with torch.no_grad():
            for i in idx:
                cache = gather(model, seqs[i], names, logits=True, device=model.device)
                stacks.append(torch.stack([cache[n][0] for n in names], dim=1).float())
                targets.append(cache.logits[0].float().log_softmax(-1))
        stack, target = torch.cat(stacks), torch.cat(targets)
        with torch.enable_grad():
            translated = stack + einsum(stack, weight, "n layer d, layer d e -> n layer e") + bias
            lp = unembed(model, final_norm(model, translated)).float().log_softmax(-1)
            loss = (target.exp()[:, None] * (target[:, None] - lp)).sum(-1).mean(0).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    tuned.weight = weight.detach().cpu()
    tuned.bias = bias.detach().cpu()
    tuned.meta = {"steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed, "n_sequences": len(seqs)}
    return tuned


# --------------------------------------------------------------------------- summaries
@dataclass
class TunedLensComparison(Result):
    """A tuned lens trained on some sequences, compared with the plain lens on held-out ones.

    Attributes:
        kl_plain: Held-out mean KL(final ‖ plain lens of ``resid_pre_L``) per layer.
        kl_tuned: The same for the tuned lens.
        top1_fraction: Per accumulated component, the fraction of held-out rows where the first
            target is the tuned lens's top-1 token.
        components: The accumulated components (:func:`component_names`).
        tuned: The trained lens.
        n_train: Sequences it was trained on (the first ones).
        n_heldout: Sequences it was evaluated on (the rest).
    """

    kl_plain: Float[Tensor, "layer"]
    kl_tuned: Float[Tensor, "layer"]
    top1_fraction: Float[Tensor, "component"]
    components: list[str]
    tuned: TunedLens
    n_train: int
    n_heldout: int

    def to_frame(self) -> pd.DataFrame:
        """One row per layer: held-out KL of the plain and the tuned lens."""
        return pd.DataFrame(
            {"layer": list(range(len(self.kl_plain))), "kl_plain": self.kl_plain.tolist(), "kl_tuned": self.kl_tuned.tolist()}
        )

    def to_json(self, path: str | Path | None = None) -> str:
        """JSON of the per-layer KLs, the top-1 fractions and the lens's training config."""
        text = json.dumps(
            {
                "kl": self.to_frame().to_dict(orient="records"),
                "top1_fraction": dict(zip(self.components, self.top1_fraction.tolist())),
                "n_train": self.n_train,
                "n_heldout": self.n_heldout,
                "meta": self.tuned.meta,
            }
        )
        if path is not None:
            Path(path).write_text(text)
        return text

    def plot(self, ax: Any = None) -> Any:
        """Held-out KL per layer, plain vs tuned."""
        from mechthink.plotting.lens import plot_tuned_lens_kl

        return plot_tuned_lens_kl(self, ax=ax)


def compare_tuned_lens(
    model: ThinkingModel,
    sequences: Sequence[Sequence[int] | Tensor],
    targets: Sequence[str | int] | str | int,
    steps: int = 100,
    lr: float = 3e-3,
    batch_size: int = 4,
    n_train: int | None = None,
) -> TunedLensComparison:
    """Train a tuned lens on the first ``n_train`` sequences (default half) and compare it with
    the plain lens on the rest: per-layer KL to the final distribution, and how often the first
    target is top-1 at each sequence's last position under the tuned lens."""
    n_train = len(sequences) // 2 if n_train is None else n_train
    if not 0 < n_train < len(sequences):
        raise ValueError(f"n_train={n_train} with {len(sequences)} sequences; leave at least one to train on and one held out")
    train, held = list(sequences[:n_train]), list(sequences[n_train:])
    tuned = train_tuned_lens(model, train, steps=steps, lr=lr, batch_size=batch_size)
    lens = logit_lens(model, held, targets, mode="accumulated", tuned=tuned)
    return TunedLensComparison(
        kl_plain=tuned_lens_kl(model, None, held),
        kl_tuned=tuned_lens_kl(model, tuned, held),
        top1_fraction=(lens.target_ranks[:, :, 0] == 0).float().mean(0),
        components=lens.components,
        tuned=tuned,
        n_train=len(train),
        n_heldout=len(held),
    )


@dataclass
class LensSummary(Result):
    """The logit lens and the DLA of one target, reduced over many positions.

    Attributes:
        target: The target token string.
        n_positions: Rows (sample, position pairs) summarised.
        p_target_final_mean: Mean probability of the target in the model's output.
        components: The accumulated lens components.
        top1_fraction: Per accumulated component, how often the target is top-1.
        first_top1_counts: How many rows first have the target top-1 at each component
            (``"None"``: never).
        dla_components: The decomposed components.
        mean_dla: Mean direct logit contribution of each decomposed component.
        top_dla_components: The components with the largest mean contribution, best first.
        dla_sum_error: Max |Σ contributions + bias − model logit| (the DLA identity, ≈ 0).
    """

    target: str
    n_positions: int
    p_target_final_mean: float
    components: list[str]
    top1_fraction: Float[Tensor, "component"]
    first_top1_counts: dict[str, int]
    dla_components: list[str]
    mean_dla: Float[Tensor, "dla_component"]
    top_dla_components: list[str]
    dla_sum_error: float

    def to_frame(self) -> pd.DataFrame:
        """One row per decomposed component: its mean DLA and its rank (0 = largest)."""
        order = self.mean_dla.argsort(descending=True).tolist()
        rank = {c: r for r, c in enumerate(order)}
        return pd.DataFrame(
            {"component": self.dla_components, "mean_dla": self.mean_dla.tolist(), "rank": [rank[i] for i in range(len(order))]}
        )

    def plot(self, ax: Any = None) -> Any:
        """Bars of the mean DLA per component, the top ones highlighted."""
        from mechthink.plotting.lens import plot_lens_summary

        return plot_lens_summary(self, ax=ax)


def summarize_lens(
    model: ThinkingModel, accumulated: LensResult, decomposed: LensResult, target: int = 0, n_top: int = 5
) -> LensSummary:
    """Summarise an ``accumulated`` lens and a ``decomposed``/``frozen`` DLA of the same rows
    for target index ``target``: top-1 rates per layer, where the target first becomes top-1,
    the mean DLA per component and its ``n_top`` components, and the DLA sum identity."""
    if accumulated.mode != "accumulated" or decomposed.mode != "decomposed":
        raise ValueError(
            f"summarize_lens: pass an accumulated and a decomposed lens, got {accumulated.mode!r} and {decomposed.mode!r}"
        )
    first = accumulated.first_top1_component(target)
    mean_dla = decomposed.target_logits[:, :, target].mean(0)
    order = mean_dla.argsort(descending=True)
    return LensSummary(
        target=accumulated.targets[target],
        n_positions=len(accumulated.positions),
        p_target_final_mean=float(accumulated.target_probs[:, -1, target].mean()),
        components=accumulated.components,
        top1_fraction=(accumulated.target_ranks[:, :, target] == 0).float().mean(0),
        first_top1_counts={str(k): first.count(k) for k in sorted(set(first), key=str)},
        dla_components=decomposed.components,
        mean_dla=mean_dla,
        top_dla_components=[decomposed.components[i] for i in order[:n_top].tolist()],
        dla_sum_error=float(sum_check(decomposed, model).abs().max()),
    )
