"""Edge attribution patching: circuits of attention heads and MLPs, scored edge by edge.

Method: the model is a graph whose nodes are the token embeddings, every attention head, every
MLP and the logits. Each node *writes* its output into the residual stream and each downstream
*receiver* reads the sum of the upstream outputs: a head reads three separate copies of the
residual (its query, key and value inputs; with grouped-query attention the key and value inputs
belong to a key-value head), an MLP reads its own copy, the logits read the final residual.
Edges run from every output to every receiver it can reach (upstream layer < downstream layer, or
attention -> MLP within a layer). As in the EAP literature, a receiver's input is taken *before*
its layer norm (TransformerLens' split query/key/value inputs, ``hook_q_input`` …, and
``hook_mlp_in``).

Edge scores (``score = m(patched) − m(clean)``, patching the edge to a baseline):

* ``"eap"``: edge attribution patching (Syed, Rager & Conmy 2023, "Attribution Patching
  Outperforms Automated Circuit Discovery"): ``score(u -> v) = Σ_pos (a_u^base − a_u^clean) ·
  ∂m/∂x_v`` from one clean forward + backward and the baseline's sender outputs.
* ``"eap-ig"``: EAP with integrated gradients on the inputs (Hanna, Pezzelle & Belinkov 2024,
  "Have Faith in Faithfulness"): the gradient is averaged over ``ig_steps`` interpolations of the
  token embeddings between the baseline and the clean input (midpoints ``α = (k + ½)/n``), all
  steps as the rows of one batched forward/backward.
* ``"eap-ig-inputs"``: integrated gradients along each receiver's own input: receiver ``v``
  alone reads ``x_v + α Σ_u (a_u^base − a_u^clean)`` (every other receiver clean, the model
  downstream recomputed) and its edges are scored with the mean gradient along that path.
* ``"eap-ig-outputs"``: the same along each sender's output (``a_u`` replaced by
  ``α a_u^base + (1 − α) a_u^clean`` in every receiver it feeds), the activation variant of the
  public repository hannamw/EAP-IG (there a layer at a time; Marks et al. 2024, "Sparse Feature
  Circuits", integrate a node's gradient the same way). Both path variants are complete: summed
  over a receiver's (a sender's) edges they give exact patching of all those edges together.
* ``"eap-qkfix"``: EAP with the QK-fix of Kramár et al. 2024 ("AtP*") carried to edges
  (:mod:`mechthink._edge_qkfix`): the receiver's output at the metric's position is recomputed
  with the edge patched (the softmax over changed queries or keys included) and that position's
  stream runs through the later layers exactly; what the patch changes at earlier positions is
  taken to first order. Exact for edges into the last layer and the logits.
* :func:`edge_patching`: exact edge patching, the reference: the receiver gets
  ``x_v + (a_u^base − a_u^clean)`` (only that receiver, everything else recomputed), one row of a
  batched forward per edge.

Baselines: ``"mean"`` (each output's mean over a dataset, :func:`sender_means`), ``"zero"``, or
the tokens of a corrupted input of the same length — for tiny-thinker the *minimal pair*, the same
transcript with the wrong step corrected (``mechthink.models.organism.minimal_pairs``).

Circuits: :func:`prune` keeps the top-k edges (or those above a threshold) that lie on a path
from the embeddings to the logits; :func:`faithfulness` measures the metric with only a circuit's
edges clean and every other edge at the baseline, normalised between all edges ablated (0) and
the clean model (1), as in Hanna et al. (2024) and the public repository hannamw/EAP-IG.

Layer normalisation after the attention output (GLM-4's sandwich norms) is handled by splitting
the normed output over heads with the run's own normalisation scale (``w ⊙ r_h / s``), so the
heads' contributions still sum to the attention output of that run.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import einops
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechthink.attribution import _as_row, _per_row, logits_kwargs
from mechthink.progress import track
from mechthink.results import FlatResult, Result

if TYPE_CHECKING:
    import pandas as pd

    from mechthink.models.thinking_model import ThinkingModel

__all__ = [
    "EDGE_METHODS",
    "Circuit",
    "EdgeGraph",
    "EdgeScores",
    "FaithfulnessCurve",
    "RankAgreement",
    "SenderMeans",
    "ablate_edges",
    "attention_mass",
    "baseline_outputs",
    "build_graph",
    "edge_attribution",
    "edge_patching",
    "faithfulness",
    "mean_scores",
    "prune",
    "query_attention",
    "random_circuit",
    "rank_agreement",
    "run_with_ablated_edges",
    "sender_means",
    "token_probability",
]

Metric = Callable[[Tensor], Tensor]
Method = Literal["eap", "eap-ig", "eap-ig-inputs", "eap-ig-outputs", "eap-qkfix"]
#: The estimators of :func:`edge_attribution`.
EDGE_METHODS: tuple[str, ...] = ("eap", "eap-ig", "eap-ig-inputs", "eap-ig-outputs", "eap-qkfix")
#: Interpolation steps of EAP-IG when none are given (Hanna et al. use 5).
DEFAULT_IG_STEPS = 5
#: EAP-IG (embeddings) runs its interpolation rows in gradient passes of at most this many
#: tokens (at least one row a pass), so its memory at long traces is that of EAP.
IG_TOKENS_PER_PASS = 2048
Baseline = Any  # "mean" | "zero" | token ids of a same-length input | Float[Tensor, "pos sender d_model"]


# ----------------------------------------------------------------------------------- the graph
@dataclass
class EdgeGraph(Result):
    """The computational graph of a model: senders (outputs), receivers (inputs) and edges.

    Senders, in topological order: ``embed``, then per layer ``L{l}H{h}`` (each head) and
    ``MLP{l}``. Receivers: per layer the query input of each head (``L{l}H{h}.q``), the key and
    value inputs of each key-value head (``L{l}H{g}.k``/``.v``; ``KV{g}`` instead of ``H{g}`` when
    key-value heads are shared), ``MLP{l}``, then ``logits``. A receiver reads a prefix of the
    senders, so ``edges[u, v]`` is ``u < n_upstream[v]``.

    Attributes:
        senders: Sender labels.
        receivers: Receiver labels.
        edges: ``[sender, receiver]``: whether the edge exists.
        n_layers: Layers of the model.
        n_heads: Query heads per layer.
        n_kv_heads: Key-value heads per layer.
        model_name: The model the graph was built for.
        attn_post_norm: Whether attention outputs are normed before the residual add (GLM-4).
    """

    senders: list[str]
    receivers: list[str]
    edges: Bool[Tensor, "sender receiver"]
    n_layers: int
    n_heads: int
    n_kv_heads: int
    model_name: str = ""
    attn_post_norm: bool = False

    @property
    def n_edges(self) -> int:
        return int(self.edges.sum())

    @property
    def receivers_per_layer(self) -> int:
        return self.n_heads + 2 * self.n_kv_heads + 1

    def head_sender(self, layer: int, head: int) -> int:
        """Index of head ``(layer, head)`` among the senders."""
        return 1 + layer * (self.n_heads + 1) + head

    def mlp_sender(self, layer: int) -> int:
        return 1 + layer * (self.n_heads + 1) + self.n_heads

    def receiver_slice(self, layer: int, kind: str) -> slice:
        """The receivers of one kind (``"q"``, ``"k"``, ``"v"``, ``"mlp"``) at a layer."""
        base = layer * self.receivers_per_layer
        H, G = self.n_heads, self.n_kv_heads
        spans = {"q": (0, H), "k": (H, H + G), "v": (H + G, H + 2 * G), "mlp": (H + 2 * G, H + 2 * G + 1)}
        if kind not in spans:
            raise ValueError(f"kind={kind!r}; use 'q', 'k', 'v' or 'mlp'")
        a, b = spans[kind]
        return slice(base + a, base + b)

    @property
    def logits_receiver(self) -> int:
        return len(self.receivers) - 1

    def n_upstream(self, receiver: int) -> int:
        """How many senders (a prefix) reach a receiver."""
        return int(self.edges[:, receiver].sum())

    def receiver_nodes(self, receiver: int) -> list[int]:
        """The sender indices of the node(s) a receiver feeds (``[]`` for the logits)."""
        if receiver == self.logits_receiver:
            return []
        layer, off = divmod(receiver, self.receivers_per_layer)
        H, G = self.n_heads, self.n_kv_heads
        if off < H:
            return [self.head_sender(layer, off)]
        if off < H + 2 * G:
            g = (off - H) % G
            return [self.head_sender(layer, h) for h in range(H) if h * G // H == g]
        return [self.mlp_sender(layer)]

    def sender_layer(self, sender: int) -> int:
        """Layer of a sender (``-1`` for the embeddings)."""
        return -1 if sender == 0 else (sender - 1) // (self.n_heads + 1)

    def edge_labels(self, mask: Tensor | None = None) -> list[str]:
        """``"u->v"`` for every edge (of ``mask`` if given), sender-major."""
        m = self.edges if mask is None else mask & self.edges
        return [f"{self.senders[u]}->{self.receivers[v]}" for u, v in m.nonzero().tolist()]

    def to_frame(self) -> "pd.DataFrame":
        """One row per edge: sender, receiver, their layers."""
        import pandas as pd

        rows = [(self.senders[u], self.receivers[v], self.sender_layer(u), self._receiver_layer(v))
                for u, v in self.edges.nonzero().tolist()]
        return pd.DataFrame(rows, columns=["sender", "receiver", "sender_layer", "receiver_layer"])

    def _receiver_layer(self, v: int) -> int:
        return self.n_layers if v == self.logits_receiver else v // self.receivers_per_layer

    def plot(self, ax: Any = None) -> Any:
        """The graph drawn with every edge (layers as rows)."""
        from mechthink.plotting.circuits import plot_circuit_graph

        return plot_circuit_graph(self, None, ax=ax)


def build_graph(model: "ThinkingModel") -> EdgeGraph:
    """The edge graph of a model (:class:`EdgeGraph`): heads, MLPs, embeddings, logits."""
    cfg = model.cfg
    n_layers, H = int(cfg.n_layers), int(cfg.n_heads)
    G = int(getattr(cfg, "n_key_value_heads", None) or H)
    kv = "H" if G == H else "KV"
    senders = ["embed"]
    receivers: list[str] = []
    n_up: list[int] = []
    for L in range(n_layers):
        up = len(senders)
        senders += [f"L{L}H{h}" for h in range(H)] + [f"MLP{L}"]
        receivers += [f"L{L}H{h}.q" for h in range(H)] + [f"L{L}{kv}{g}.k" for g in range(G)]
        receivers += [f"L{L}{kv}{g}.v" for g in range(G)] + [f"MLP{L}"]
        n_up += [up] * (H + 2 * G) + [up + H]
    receivers.append("logits")
    n_up.append(len(senders))
    edges = torch.arange(len(senders))[:, None] < torch.tensor(n_up)[None, :]
    hooks = model.bridge.hook_dict
    need = ["hook_embed", "ln_final.hook_in", "blocks.0.attn.hook_q_input", "blocks.0.attn.hook_result", "blocks.0.hook_mlp_in"]
    missing = [n for n in need if n not in hooks]
    if missing:
        raise ValueError(f"model {model.spec.name!r} lacks the hooks edge attribution needs ({missing}); "
                         "its attention bridge must support split q/k/v inputs and per-head results")
    return EdgeGraph(senders=senders, receivers=receivers, edges=edges, n_layers=n_layers, n_heads=H, n_kv_heads=G,
                     model_name=model.spec.name, attn_post_norm="blocks.0.ln1_post.hook_scale" in hooks)


# ------------------------------------------------------------------------------ the hook engine
@contextmanager
def _edge_mode(model: "ThinkingModel", split: bool = True, result: bool = True) -> Iterator[None]:
    """Split q/k/v inputs (``split``), per-head results (``result``) and ``hook_mlp_in`` on;
    restored on exit."""
    b = model.bridge
    flags = ("use_split_qkv_input", "use_attn_result", "use_hook_mlp_in")
    old = {f: bool(getattr(b.cfg, f, False)) for f in flags}
    try:
        b.set_use_split_qkv_input(split)
        b.set_use_attn_result(result)
        b.set_use_hook_mlp_in(True)
        yield
    finally:
        b.set_use_split_qkv_input(old["use_split_qkv_input"])
        b.set_use_attn_result(old["use_attn_result"])
        b.set_use_hook_mlp_in(old["use_hook_mlp_in"])


def _per_head_w_o(weight: Tensor, n_heads: int, dtype: torch.dtype) -> Float[Tensor, "head d_head d_model"]:
    """An output projection's ``[d_model, head * d_head]`` weight as one matrix per head."""
    return einops.rearrange(weight.detach().to(dtype), "d_model (h d_head) -> h d_head d_model", h=n_heads)


@dataclass
class _Engine:
    """Hooks that record sender outputs, patch receiver inputs and keep them for gradients.

    ``ablate[b, u, v] = 1`` replaces the current output of sender ``u`` by ``base[..., u, :]`` in
    receiver ``v``'s input (row ``b``); ``embed`` overrides the embeddings (integrated gradients).
    """

    model: "ThinkingModel"
    graph: EdgeGraph
    base: Tensor | None = None  # [1 | B, pos | 1, sender, d_model]
    ablate: Tensor | None = None  # [B, sender, receiver]
    embed: Tensor | None = None  # [B, pos, d_model]
    keep_inputs: bool = False
    senders_only: bool = False  # only the sender hooks: no split q/k/v inputs, per-head results from hook_z
    cur: Any = field(default_factory=list)  # sender index -> output (a list, or a :class:`_DeltaSink`)
    inputs: dict[int, Tensor] = field(default_factory=dict)  # first receiver index -> [B, pos, n, d_model]
    _result: dict[int, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.cur, _DeltaSink):
            self.cur = [None] * len(self.graph.senders)

    def senders(self) -> Float[Tensor, "batch pos sender d_model"]:
        return torch.stack([c for c in self.cur if c is not None], dim=2)

    # ---- senders
    def _embed(self, act: Tensor, hook: Any) -> Tensor:
        if self.embed is not None:
            act = self.embed.to(act.dtype)
        elif self.keep_inputs and not act.requires_grad:
            act = act.detach().requires_grad_(True)
        self.cur[0] = act
        return act

    def _heads(self, layer: int) -> Callable[..., None]:
        def hook(act: Tensor, hook: Any) -> None:
            if self.graph.attn_post_norm:
                self._result[layer] = act
                return
            for h in range(self.graph.n_heads):
                self.cur[self.graph.head_sender(layer, h)] = act[:, :, h]

        return hook

    def _results_from_z(self) -> bool:
        """Senders-only runs compute the per-head results from ``hook_z`` themselves, exactly as
        the bridge's ``hook_result`` does (``z_h @ W_O_h``, no bias), so ``use_attn_result``
        stays off and attention runs on the fused kernel; not for output projections the bridge
        treats otherwise (``Conv1D`` weights, a result scale)."""
        if not self.senders_only:
            return False
        for blk in self.model.bridge.blocks:
            attn = blk.attn
            o = getattr(getattr(attn, "o", None), "original_component", None)
            if not isinstance(o, torch.nn.Linear) or getattr(attn, "_result_contribution_scale", 1.0) != 1.0:
                return False
        return True

    def _heads_from_z(self, layer: int) -> Callable[..., None]:
        g = self.graph
        weight = self.model.bridge.blocks[layer].attn.o.original_component.weight
        heads = self._heads(layer)

        def hook(z: Tensor, hook: Any) -> None:
            with torch.no_grad():  # recorded, never differentiated
                z4 = z.detach().reshape(z.shape[0], z.shape[1], g.n_heads, -1)
                if getattr(self.cur, "compact", False):  # Δ kept before W_O
                    if g.attn_post_norm:
                        self._result[layer] = z4
                    else:
                        self.cur.add_z(layer, z4)
                    return
                heads(torch.einsum("bshd,hdm->bshm", z4, _per_head_w_o(weight, g.n_heads, z4.dtype)), hook)

        return hook

    def _post_norm(self, layer: int) -> Callable[..., None]:
        weight = self.model.bridge.blocks[layer].ln1_post.original_component.weight

        def hook(scale: Tensor, hook: Any) -> None:  # the run's own scale splits the normed sum
            r = self._result.pop(layer)
            if getattr(self.cur, "compact", False):  # r is z here: Δ kept before W_O
                with torch.no_grad():
                    self.cur.add_z(layer, r / scale.detach().reshape(*scale.shape[:2], 1, 1).to(r.dtype))
                return
            for h in range(self.graph.n_heads):
                self.cur[self.graph.head_sender(layer, h)] = weight.to(r.dtype) * r[:, :, h] / scale

        return hook

    def _mlp(self, layer: int) -> Callable[..., None]:
        def hook(act: Tensor, hook: Any) -> None:
            self.cur[self.graph.mlp_sender(layer)] = act

        return hook

    # ---- receivers
    def _receiver(self, first: int, n: int, per_head: bool) -> Callable[..., Tensor]:
        up = self.graph.n_upstream(first)

        def hook(act: Tensor, hook: Any) -> Tensor:
            if self.ablate is not None and self.base is not None:
                if self.base.shape[1] not in (1, act.shape[1]):
                    raise ValueError(f"the baseline has {self.base.shape[1]} positions but the input has "
                                     f"{act.shape[1]}; a corrupted input (minimal pair) must have the same length")
                if self.ablate.shape[0] not in (1, act.shape[0]):
                    raise ValueError(f"ablated holds {self.ablate.shape[0]} masks but the input has {act.shape[0]} "
                                     "rows; pass one mask, or one per row")
                cur = torch.stack([c for c in self.cur[:up] if c is not None], dim=2)
                delta = self.base[..., :up, :].to(act.dtype) - cur
                mask = self.ablate[:, :up, first : first + n].to(act.dtype).expand(act.shape[0], -1, -1)
                corr = einops.einsum(delta, mask, "b pos u d, b u r -> b pos r d")
                act = act + (corr if per_head else corr[:, :, 0])
            if self.keep_inputs:  # a node of its own: the hook's input may also be the residual
                act = act.clone()
                self.inputs[first] = act
            return act

        return hook

    def hooks(self) -> list[tuple[str, Callable[..., Any]]]:
        g = self.graph
        out: list[tuple[str, Callable[..., Any]]] = [("hook_embed", self._embed)]
        for L in range(g.n_layers):
            if self._results_from_z():
                out.append((f"blocks.{L}.attn.hook_z", self._heads_from_z(L)))
            else:
                out.append((f"blocks.{L}.attn.hook_result", self._heads(L)))
            if g.attn_post_norm:
                out.append((f"blocks.{L}.ln1_post.hook_scale", self._post_norm(L)))
            out.append((f"blocks.{L}.hook_mlp_out", self._mlp(L)))
            if self.senders_only:
                continue
            for kind in ("q", "k", "v"):
                s = g.receiver_slice(L, kind)
                out.append((f"blocks.{L}.attn.hook_{kind}_input", self._receiver(s.start, s.stop - s.start, True)))
            out.append((f"blocks.{L}.hook_mlp_in", self._receiver(g.receiver_slice(L, "mlp").start, 1, False)))
        if not self.senders_only:
            out.append(("ln_final.hook_in", self._receiver(g.logits_receiver, 1, False)))
        return out

    def run(self, tokens: Int[Tensor, "batch pos"], **kw: Any) -> Float[Tensor, "batch kept d_vocab"]:
        if self.senders_only:
            from mechthink.models.fast_attention import fast_attention

            with _edge_mode(self.model, split=False, result=not self._results_from_z()), fast_attention(self.model):
                return self.model.bridge.run_with_hooks(tokens, fwd_hooks=self.hooks(), **kw)
        with _edge_mode(self.model):
            return self.model.bridge.run_with_hooks(tokens, fwd_hooks=self.hooks())

    def receiver_inputs(self) -> list[Tensor]:
        return [self.inputs[k] for k in sorted(self.inputs)]

    def receiver_grads(self, m: Tensor) -> Float[Tensor, "batch pos receiver d_model"]:
        """``∂m/∂x_v`` of every receiver input kept by the last run."""
        grads = torch.autograd.grad(m, self.receiver_inputs())
        return torch.cat([g if g.dim() == 4 else g.unsqueeze(2) for g in grads], dim=2)


class _DeltaSink:
    """Δ = a^base − a^clean of every sender, built in place as the runs produce their outputs
    (``sign`` = +1 for the baseline run, −1 for the clean run; row 0 of each batch).

    Full: one ``[sender, pos, d_model]`` buffer. Compact (``w_o`` given: per-head outputs taken
    from ``hook_z``, see :meth:`_Engine._results_from_z`): the embeddings and the MLPs in a
    ``[1 + layer, pos, d_model]`` buffer, and each layer's heads *before* their output
    projection, ``[layer, pos, head, d_head]`` (differences of ``z``; of ``z`` over the run's own
    post-norm scale on GLM-4), plus the position-independent ``[layer, head, d_model]`` part of a
    mean or constant baseline. A layer's ``[head, pos, d_model]`` block of Δ is rebuilt through
    ``W_O`` (and the post-norm weight) each time a contraction reads it. The heads then cost
    ``d_model`` floats a token and layer, not ``heads × d_model``: 0.58 GB instead of 2.84 GB on
    SmolLM2 at 4,096 tokens, 4.4 GB instead of 71 GB for an 8B model.
    """

    def __init__(self, graph: EdgeGraph, T: int, d_model: int, dtype: torch.dtype, device: Any,
                 w_o: Sequence[Tensor] | None = None, post: Sequence[Tensor] | None = None) -> None:
        self.g, self.dtype, self.sign = graph, dtype, 1.0
        self.w_o, self.post, self.const = w_o, post, None
        self.compact = w_o is not None
        rows = 1 + graph.n_layers if self.compact else len(graph.senders)
        self.buf = torch.zeros(rows, T, d_model, dtype=dtype, device=device)
        self.y: Tensor | None = None
        if w_o is not None:
            d_head = int(w_o[0].shape[1]) // graph.n_heads
            self.y = torch.zeros(graph.n_layers, T, graph.n_heads, d_head, dtype=dtype, device=device)

    def _row(self, u: int) -> int:
        if not self.compact or u == 0:
            return u
        layer = self.g.sender_layer(u)
        if u != self.g.mlp_sender(layer):
            raise RuntimeError(f"edge attribution: head sender {self.g.senders[u]} reached the compact Δ buffer "
                               "as an output; heads are recorded from hook_z")
        return 1 + layer

    def __setitem__(self, u: int, act: Tensor) -> None:
        with torch.no_grad():
            self.buf[self._row(u)].add_(act[0].detach().to(self.dtype), alpha=self.sign)

    def add_z(self, layer: int, z: Tensor) -> None:
        """One layer's heads before ``W_O``, ``[batch, pos, head, d_head]`` (row 0 counts)."""
        assert self.y is not None
        with torch.no_grad():
            self.y[layer].add_(z[0].detach().to(self.dtype), alpha=self.sign)

    def set_constant(self, b: Tensor) -> None:
        """A position-independent baseline ``[sender, d_model]``: its embedding and MLP rows
        fill the buffer, its head rows are kept apart (added to each rebuilt block)."""
        if not self.compact:
            self.buf.copy_(b.to(self.dtype)[:, None].expand_as(self.buf))
            return
        g = self.g
        full = [0] + [g.mlp_sender(layer) for layer in range(g.n_layers)]
        heads = [g.head_sender(layer, h) for layer in range(g.n_layers) for h in range(g.n_heads)]
        self.buf.copy_(b[full].to(self.dtype)[:, None].expand_as(self.buf))
        hb = b[heads].to(self.dtype).reshape(g.n_layers, g.n_heads, -1)
        self.const = hb if bool(hb.any()) else None

    def embed(self) -> Tensor:
        """Δ of the embeddings, ``[pos, d_model]``."""
        return self.buf[0]

    def heads(self, layer: int) -> Float[Tensor, "head pos d_model"]:
        """One layer's heads' Δ (rebuilt through ``W_O`` when compact)."""
        g = self.g
        if not self.compact:
            s = g.head_sender(layer, 0)
            return self.buf[s : s + g.n_heads]
        assert self.y is not None and self.w_o is not None
        out = torch.einsum("phk,hkm->hpm", self.y[layer], _per_head_w_o(self.w_o[layer], g.n_heads, self.dtype))
        if self.post is not None:
            out = out * self.post[layer].detach().to(self.dtype)
        if self.const is not None:
            out = out + self.const[layer][:, None]
        return out

    def blocks(self, up: int) -> Iterator[tuple[int, Tensor]]:
        """``(first sender, [n, pos * d_model])`` blocks covering senders ``0 .. up-1``."""
        if not self.compact:
            yield 0, self.buf[:up].flatten(1)
            return
        g = self.g
        yield 0, self.buf[0:1].flatten(1)
        for layer in range(g.n_layers):
            s = g.head_sender(layer, 0)
            if s >= up:
                return
            yield s, self.heads(layer).flatten(1)[: up - s]
            if g.mlp_sender(layer) >= up:
                return
            yield g.mlp_sender(layer), self.buf[1 + layer : 2 + layer].flatten(1)

    def full(self) -> Float[Tensor, "sender pos d_model"]:
        """Every sender's Δ as one buffer (for tests and small graphs)."""
        if not self.compact:
            return self.buf
        parts = [b.reshape(b.shape[0], *self.buf.shape[1:]) for _, b in self.blocks(len(self.g.senders))]
        return torch.cat(parts)

    @property
    def nbytes(self) -> int:
        return self.buf.nbytes + (0 if self.y is None else self.y.nbytes) + (0 if self.const is None else self.const.nbytes)


def _delta_buffer(model: "ThinkingModel", graph: EdgeGraph, row: Tensor, baseline: Baseline,
                  means: SenderMeans | None, dtype: torch.dtype, compact: bool) -> _DeltaSink:
    """The baseline's sender outputs, in a :class:`_DeltaSink` the clean run then subtracts from
    (a corrupted input runs once without gradients, its outputs written in place layer by
    layer). Compact when asked for and the baseline allows it (anything but a per-position
    sender-output tensor)."""
    T, d = row.shape[1], int(model.cfg.d_model)
    tokens_baseline = not isinstance(baseline, str) and not (isinstance(baseline, Tensor) and baseline.is_floating_point())
    b = None
    if not tokens_baseline:
        b = _baseline(model, graph, row, baseline, means)[0]  # [pos | 1, sender, d_model]
        compact = compact and b.shape[0] == 1
    w_o = post = None
    if compact:
        blocks = model.bridge.blocks
        w_o = [blk.attn.o.original_component.weight for blk in blocks]
        if graph.attn_post_norm:
            post = [blk.ln1_post.original_component.weight for blk in blocks]
    sink = _DeltaSink(graph, T, d, dtype, model.device, w_o=w_o, post=post)
    if b is not None:
        if b.shape[0] == 1:
            sink.set_constant(b[0])
        else:
            sink.buf.copy_(b.to(dtype).transpose(0, 1))
        return sink
    bt = _as_row(baseline, model.device)
    if bt.shape[1] != T:
        raise ValueError(f"baseline tokens have length {bt.shape[1]} but the clean input has {T}; "
                         "a corrupted input (minimal pair) must have the same length")
    with torch.no_grad():
        _Engine(model, graph, senders_only=True, cur=sink).run(bt)
    return sink


#: EAP contracts the receivers' gradients with Δ in groups of about this many bytes of
#: gradient; with a compact Δ (every head block rebuilt through ``W_O`` once a group) a group
#: may hold half Δ's own size, so Δ is rebuilt a few times, not once a receiver. (SmolLM2, 2,048
#: tokens: groups of half Δ gave 4.07 GB extra peak in 74 s, of all of Δ 4.89 GB in 68 s.)
_GRAD_GROUP_BYTES = 64 << 20


def _gradient_group_bytes(delta: _DeltaSink) -> int:
    return max(_GRAD_GROUP_BYTES, delta.nbytes // 2) if delta.compact else _GRAD_GROUP_BYTES


def _eap_lean(model: "ThinkingModel", graph: EdgeGraph, row: Tensor, baseline: Baseline, means: SenderMeans | None,
              metric: Metric, ig_steps: int, head_chunk: int = 16, compact: bool = True) -> tuple[Tensor, float]:
    """EAP (``ig_steps=0``) or EAP-IG on the embeddings, in memory linear in the length.

    Same scores as keeping every receiver's own input (``Σ_pos Δ_u · ∂m/∂x_v``; tested against
    that reference on every architecture), computed without ever materialising a receiver's
    input or a ``[pos, pos]`` pattern: the gradient forward runs with the split q/k/v inputs and
    per-head results off, on the fused attention kernel
    (:func:`mechthink.models.fast_attention.fast_attention`), and keeps the gradients at
    ``hook_q`` / ``hook_k`` / ``hook_v`` (``d_head`` wide per head), ``hook_mlp_in`` and
    ``ln_final.hook_in``. A head's gradient at its own pre-norm input, ``∂m/∂x_{q,h}``, is the
    vector-Jacobian product of the layer's shared ``ln1`` input -> ``hook_q`` map with the
    gradient masked to head ``h`` (one layer's heads in one batched product,
    ``is_grads_batched``), and contracted with the sender differences ``Δ`` in groups of
    gradient (:func:`_gradient_group_bytes`: half a compact ``Δ``). ``Δ`` is a
    :class:`_DeltaSink`, the clean outputs subtracted in place during the gradient forward.
    With ``compact`` (the default, wherever per-head outputs come from ``hook_z`` as the
    bridge's ``hook_result`` computes them, and the baseline is not a per-position tensor) the
    heads are kept before ``W_O``, ``d_model`` floats a token and layer, and each layer's block
    is rebuilt when a group reads it. EAP-IG's interpolation rows run in passes of at most
    :data:`IG_TOKENS_PER_PASS` tokens, each pass in a function of its own so none of its graph
    outlives it. Peak memory: one ordinary forward + backward (of one pass), ``Δ``, one rebuilt
    layer block and one gradient group.
    """
    from mechthink.models.fast_attention import fast_attention

    dtype = torch.float32
    g = graph
    from_z = _Engine(model, g, senders_only=True)._results_from_z()
    delta = _delta_buffer(model, g, row, baseline, means, dtype, compact=from_z and compact)
    e_base = delta.embed().clone()
    delta.sign = -1.0
    sink = _Engine(model, g, senders_only=True, cur=delta)
    merged = ig_steps == 0 and from_z  # the gradient forward is the clean run
    m_clean = float("nan")
    if not merged:
        with torch.no_grad():
            m_clean = float(_per_row(metric, sink.run(row, **logits_kwargs(model, metric)))[0])
    keep: dict[Any, Tensor] = {}

    def store(key: Any, own: bool = False) -> Callable[..., Tensor]:
        def hook(act: Tensor, hook: Any) -> Tensor:
            if own:  # the MLP's own copy: the hook's input is also the residual stream
                act = act.clone()
            keep[key] = act
            return act

        return hook

    emb = None
    if ig_steps:
        e_clean = e_base - delta.embed()
        alpha = ((torch.arange(ig_steps, device=row.device, dtype=dtype) + 0.5) / ig_steps)[:, None, None]
        emb = (e_base + alpha * (e_clean - e_base)).detach()

    n_rows = max(ig_steps, 1)
    per_pass = max(1, min(n_rows, IG_TOKENS_PER_PASS // row.shape[1]))
    scores = torch.zeros(g.edges.shape, dtype=torch.float64)
    n_up = g.edges.sum(0).tolist()
    group_bytes = _gradient_group_bytes(delta)
    pending: list[tuple[int, Tensor]] = []

    def flush() -> None:  # Σ_pos Δ_u · ∂m/∂x_v for the pending receivers, Δ read block by block
        if not pending:
            return
        mats = [(v0, int(n_up[v0]), gx.flatten(1)) for v0, gx in pending]
        for start, block in delta.blocks(max(up for _, up, _ in mats)):
            for v0, up, gm in mats:
                k = min(block.shape[0], up - start)
                if k > 0:
                    scores[start : start + k, v0 : v0 + gm.shape[0]] += (block[:k] @ gm.T).double().cpu() / n_rows
        pending.clear()

    def contract(v0: int, gx: Tensor) -> None:  # gx [n, pos, d_model] summed over rows: receivers v0..
        pending.append((v0, gx.to(dtype)))
        if sum(t.nbytes for _, t in pending) >= group_bytes:
            flush()

    def gradient_pass(rows: Tensor, part_emb: Tensor | None) -> float | None:
        """One forward + backward of ``rows``; scores added in place, the clean metric
        returned when this is the merged clean run. A function of its own, so nothing of a
        pass's autograd graph (a kept input, a hook output) lives on into the next pass."""
        clean = None

        def embed(act: Tensor, hook: Any, e: Tensor | None = part_emb) -> Tensor:
            return e.to(act.dtype) if e is not None else act.detach().requires_grad_(True)

        hooks: list[tuple[str, Callable[..., Any]]] = [("hook_embed", embed)]
        for L in range(g.n_layers):
            hooks.append((f"blocks.{L}.ln1.hook_in", store(("x", L))))
            hooks += [(f"blocks.{L}.attn.hook_{k}", store((k, L))) for k in ("q", "k", "v")]
            hooks.append((f"blocks.{L}.hook_mlp_in", store(("mlp", L), own=True)))
        hooks.append(("ln_final.hook_in", store("final")))
        if merged:
            hooks += sink.hooks()  # after the embedding hook above: the sink sees the leaf it made
        with torch.inference_mode(False), torch.enable_grad(), _edge_mode(model, split=False, result=False), \
                fast_attention(model):
            logits = model.bridge.run_with_hooks(rows, fwd_hooks=hooks, **logits_kwargs(model, metric))
            m = _per_row(metric, logits)
            del logits
            if merged:
                clean = float(m.detach()[0])
            names = [(k, L) for L in range(g.n_layers) for k in ("q", "k", "v", "mlp")] + ["final"]
            missing = [n for n in names + [("x", L) for L in range(g.n_layers)] if n not in keep]
            if missing:
                raise RuntimeError(f"edge attribution: hook points {missing[:3]} did not fire on {model.spec.name!r}")
            grads = dict(zip(names, torch.autograd.grad(m.sum(), [keep[n] for n in names], retain_graph=True,
                                                        allow_unused=True)))
            for L in range(g.n_layers):
                x = keep[("x", L)]
                for kind in ("q", "k", "v"):
                    out, gout = keep[(kind, L)], grads[(kind, L)]
                    if gout is None:
                        continue
                    start, n = g.receiver_slice(L, kind).start, out.shape[2]
                    for h0 in range(0, n, head_chunk):
                        hs = range(h0, min(n, h0 + head_chunk))
                        go = torch.zeros((len(hs), *gout.shape), dtype=gout.dtype, device=gout.device)
                        for i, h in enumerate(hs):
                            go[i, :, :, h] = gout[:, :, h]
                        (gx,) = torch.autograd.grad(out, x, go, retain_graph=True, is_grads_batched=True)
                        contract(start + h0, gx.sum(1))
                        del go, gx
                gm = grads[("mlp", L)]
                if gm is not None:
                    contract(g.receiver_slice(L, "mlp").start, gm.sum(0)[None])
            if grads["final"] is not None:
                contract(g.logits_receiver, grads["final"].sum(0)[None])
            flush()
            del grads, m
            keep.clear()
        return clean

    for r0 in range(0, n_rows, per_pass):
        rows = row.expand(min(per_pass, n_rows - r0), -1)
        part_emb = None if emb is None else emb[r0 : r0 + rows.shape[0]].clone().requires_grad_(True)
        clean = gradient_pass(rows, part_emb)
        if merged:
            m_clean = float(clean)
        del part_emb
    return scores.float(), m_clean


# ---------------------------------------------------------------------------------- baselines
@dataclass
class SenderMeans(Result):
    """Each sender's mean output over a dataset (the mean-ablation baseline of edges).

    Attributes:
        means: ``[sender, d_model]`` mean over every counted position.
        count: Positions counted.
        n_samples: Sequences seen.
        senders: Sender labels.
        model_name: The model.
    """

    means: Float[Tensor, "sender d_model"]
    count: int
    n_samples: int
    senders: list[str]
    model_name: str = ""

    def to_frame(self) -> "pd.DataFrame":
        """One row per sender: its mean output's L2 norm."""
        import pandas as pd

        return pd.DataFrame({"sender": self.senders, "mean_norm": self.means.norm(dim=-1).tolist()})


def sender_means(model: "ThinkingModel", dataset: Iterable[Any], skip_bos: bool = True,
                 graph: EdgeGraph | None = None) -> SenderMeans:
    """Mean output of every sender over a dataset (all positions; BOS left out as in
    :func:`mechthink.attribution.mean_activations`), one forward per sequence."""
    graph = graph or build_graph(model)
    total, count, n = None, 0, 0
    bos = model.bos_token_id
    for seq in track(dataset, "sender means"):
        acts = baseline_outputs(model, seq, graph)[0].double()
        start = 1 if skip_bos and bos is not None and int(torch.as_tensor(seq).flatten()[0]) == bos and acts.shape[0] > 1 else 0
        s = acts[start:].sum(0)
        total = s if total is None else total + s
        count += acts.shape[0] - start
        n += 1
    if total is None:
        raise ValueError("dataset is empty; pass at least one token sequence")
    return SenderMeans(means=(total / count).float(), count=count, n_samples=n, senders=graph.senders,
                       model_name=model.spec.name)


def baseline_outputs(model: "ThinkingModel", tokens: Any, graph: EdgeGraph | None = None) -> Float[Tensor, "1 pos sender d_model"]:
    """Every sender's output on one sequence (``[1, pos, sender, d_model]``), no gradients."""
    graph = graph or build_graph(model)
    eng = _Engine(model, graph, senders_only=True)
    with torch.no_grad():
        eng.run(_as_row(tokens, model.device))
    return eng.senders().detach()


def _output_list(model: "ThinkingModel", graph: EdgeGraph, row: Tensor) -> list[Tensor | None]:
    """Every sender's output on one row as a list of ``[pos, d_model]`` (no stacked copy)."""
    eng = _Engine(model, graph, senders_only=True)
    with torch.no_grad():
        eng.run(row)
    return [c[0].detach() for c in eng.cur]


def _sender_differences(model: "ThinkingModel", graph: EdgeGraph, row: Tensor, baseline: Baseline,
                        means: SenderMeans | None) -> tuple[Float[Tensor, "layer pos d_model"], Float[Tensor, "sender pos d_model"]]:
    """``a^base − a^clean`` of every sender, contiguous ``[sender, pos, d_model]``, built one
    sender at a time (each output is dropped once its difference is written), and the sums of
    the clean outputs that each layer's attention inputs and the logits read."""
    t = baseline if isinstance(baseline, str) else torch.as_tensor(baseline)
    tokens = not isinstance(t, str) and not t.is_floating_point()
    base_list = _output_list(model, graph, _as_row(t, model.device)) if tokens else None
    base = None if tokens else _baseline(model, graph, row, baseline, means)[0]  # [pos | 1, sender, d_model]
    clean = _output_list(model, graph, row)
    ups = [graph.n_upstream(graph.receiver_slice(L, "q").start) for L in range(graph.n_layers)]
    ups.append(graph.n_upstream(graph.logits_receiver))
    delta = torch.empty(len(clean), *clean[0].shape, dtype=clean[0].dtype, device=clean[0].device)
    total, sums = torch.zeros_like(clean[0]), []
    for u in range(len(clean)):
        sums += [total.clone() for up in ups[len(sums):] if up == u]
        c = clean[u]
        total += c
        delta[u] = (base_list[u] if base_list is not None else base[:, u]) - c
        clean[u] = None
        if base_list is not None:
            base_list[u] = None
    sums += [total.clone() for _ in ups[len(sums):]]
    return torch.stack(sums), delta


def _baseline(model: "ThinkingModel", graph: EdgeGraph, row: Tensor | None, baseline: Baseline,
              means: SenderMeans | None, run: bool = True) -> Tensor | None:
    """Baseline sender outputs ``[1, pos | 1, sender, d_model]`` for one clean row (``None``:
    any length, checked when the model runs); ``run=False`` only checks the baseline (a corrupted
    input is not run, and ``None`` is returned for it)."""
    n, d = len(graph.senders), int(model.cfg.d_model)
    if isinstance(baseline, str):
        if baseline == "zero":
            return torch.zeros(1, 1, n, d, device=model.device)
        if baseline == "mean":
            if means is None:
                raise ValueError("baseline='mean' needs means=sender_means(model, dataset)")
            if tuple(means.means.shape) != (n, d):
                raise ValueError(f"means has shape {tuple(means.means.shape)}; this graph needs [{n}, {d}]")
            return means.means.to(model.device)[None, None]
        raise ValueError(f"baseline={baseline!r}; use 'mean', 'zero', token ids of a same-length input or a tensor")
    T = None if row is None else row.shape[1]
    t = torch.as_tensor(baseline)
    if t.is_floating_point():
        t = t if t.dim() == 4 else t.unsqueeze(0)
        if t.dim() != 4 or t.shape[0] != 1 or (T is not None and t.shape[1] not in (1, T)) or tuple(t.shape[2:]) != (n, d):
            raise ValueError(f"baseline tensor has shape {tuple(torch.as_tensor(baseline).shape)}; "
                             f"use [pos or 1, {n}, {d}]" + (f" (pos = {T})" if T is not None else ""))
        return t.to(model.device)
    b = _as_row(t, model.device)
    if T is not None and b.shape[1] != T:
        raise ValueError(f"baseline tokens have length {b.shape[1]} but the clean input has {T}; "
                         "a corrupted input (minimal pair) must have the same length")
    return baseline_outputs(model, b, graph) if run else None


def _examples(tokens: Any, baseline: Baseline) -> list[tuple[Any, Baseline]]:
    """Pair each clean sequence with its baseline (one sequence or a list of them)."""
    t = tokens if isinstance(tokens, Tensor) else None
    single = (t is not None and t.dim() == 1) or (t is None and len(tokens) > 0 and isinstance(tokens[0], int))
    if t is not None and t.dim() == 2 and t.shape[0] == 1:
        single, tokens = True, t[0]
    if single:
        return [(tokens, baseline)]
    seqs = list(tokens)
    if not seqs:
        raise ValueError("tokens is empty; pass one token sequence or a list of them")
    if isinstance(baseline, str) or (isinstance(baseline, Tensor) and baseline.is_floating_point()):
        return [(s, baseline) for s in seqs]
    bases = list(baseline)
    if len(bases) != len(seqs):
        raise ValueError(f"baseline has {len(bases)} sequences for {len(seqs)} clean ones; pass one per sequence")
    return list(zip(seqs, bases))


# ------------------------------------------------------------------------------- edge scores
@dataclass
class EdgeScores(Result):
    """Scores of every edge (``m(patched) − m(clean)``, averaged over the sequences).

    Attributes:
        scores: ``[sender, receiver]`` (0 where there is no edge).
        graph: The graph.
        method: One of :data:`EDGE_METHODS` or ``"exact"``.
        baseline: A label of the baseline.
        metric_clean: Mean clean metric.
        metric_ablated: Mean metric with every edge at the baseline (NaN if not measured).
        n_samples: Sequences averaged.
        scored: ``[sender, receiver]``: which edges were scored (exact patching may sample).
    """

    scores: Float[Tensor, "sender receiver"]
    graph: EdgeGraph
    method: str
    baseline: str
    metric_clean: float
    metric_ablated: float = float("nan")
    n_samples: int = 1
    scored: Bool[Tensor, "sender receiver"] | None = None

    @property
    def mask(self) -> Bool[Tensor, "sender receiver"]:
        return self.graph.edges if self.scored is None else self.graph.edges & self.scored

    def values(self, mask: Tensor | None = None) -> Float[Tensor, "edge"]:
        """The scores of the scored edges (of ``mask`` if given), sender-major."""
        return self.scores[self.mask if mask is None else mask & self.mask]

    def top(self, k: int = 10) -> list[tuple[str, float]]:
        """The ``k`` edges with the largest ``|score|``."""
        labels, vals = self.graph.edge_labels(self.mask), self.values()
        order = vals.abs().argsort(descending=True)[:k].tolist()
        return [(labels[i], float(vals[i])) for i in order]

    def to_frame(self) -> "pd.DataFrame":
        """One row per scored edge: sender, receiver, score, method."""
        import pandas as pd

        idx = self.mask.nonzero().tolist()
        return pd.DataFrame([(self.graph.senders[u], self.graph.receivers[v], float(self.scores[u, v]), self.method)
                             for u, v in idx], columns=["sender", "receiver", "score", "method"])

    def plot(self, ax: Any = None) -> Any:
        """The graph with edge widths and colours by score (the top 5% of edges)."""
        from mechthink.plotting.circuits import plot_circuit_graph

        return plot_circuit_graph(self.graph, self, ax=ax)


def mean_scores(parts: Sequence[EdgeScores]) -> EdgeScores:
    """The mean of scores of disjoint sets of sequences (same graph and method), weighted by
    their ``n_samples``: scoring pairs in parts (e.g. some one by one) gives the scores of all."""
    if not parts:
        raise ValueError("parts is empty; pass at least one EdgeScores")
    if len({p.method for p in parts}) != 1 or any(p.graph is not parts[0].graph for p in parts):
        raise ValueError("parts mix methods or graphs; pass scores of one method on one graph")
    n = sum(p.n_samples for p in parts)

    def avg(name: str) -> float:
        return sum(getattr(p, name) * p.n_samples for p in parts) / n

    return EdgeScores(scores=sum(p.scores * p.n_samples for p in parts) / n, graph=parts[0].graph, method=parts[0].method,
                      baseline=parts[0].baseline, metric_clean=avg("metric_clean"), metric_ablated=avg("metric_ablated"),
                      n_samples=n, scored=parts[0].scored)


def _label(baseline: Baseline) -> str:
    if isinstance(baseline, str):
        return baseline
    return "tensor" if isinstance(baseline, Tensor) and baseline.is_floating_point() else "tokens"


def edge_attribution(
    model: "ThinkingModel",
    tokens: Any,
    metric: Metric,
    baseline: Baseline = "mean",
    method: str = "eap",
    means: SenderMeans | None = None,
    ig_steps: int | None = None,
    graph: EdgeGraph | None = None,
    batch_size: int = 64,
) -> EdgeScores:
    """Score every edge by EAP or one of the EAP-IG variants (one sequence, or the mean over a
    list of them).

    Args:
        model: The loaded model.
        tokens: One 1-D token sequence or a list of them (any lengths).
        metric: ``logits [batch, pos, d_vocab] -> [batch]`` (e.g.
            :func:`mechthink.attribution.logit_metric` at the query position ``-1``).
        baseline: ``"mean"`` (needs ``means``), ``"zero"``, the tokens of a same-length
            corrupted input (one per clean sequence: e.g. the minimal pairs), or sender outputs
            ``[pos or 1, sender, d_model]``.
        method: One of :data:`EDGE_METHODS`: ``"eap"``; ``"eap-ig"`` (the token embeddings
            interpolated); ``"eap-ig-inputs"`` (each receiver's input interpolated on its own,
            the rest of the model clean; ``receivers x ig_steps`` rows of forward/backward);
            ``"eap-ig-outputs"`` (each sender's output interpolated in every receiver it
            feeds; ``senders x ig_steps`` rows); ``"eap-qkfix"`` (EAP with the AtP* QK-fix,
            :mod:`mechthink._edge_qkfix`: each receiver's output at the metric position and that
            position's stream through the later layers computed exactly, the other positions to
            first order; the closest to exact patching; needs a metric of the last position).
        means: :func:`sender_means` for ``baseline="mean"``.
        ig_steps: Interpolation steps of the EAP-IG variants (default 5).
        graph: A prebuilt :func:`build_graph` (built if omitted).
        batch_size: Rows per batched forward/backward of ``"eap-ig-inputs"`` / ``"-outputs"``.

    Returns:
        :class:`EdgeScores`.
    """
    if method not in EDGE_METHODS:
        raise ValueError(f"method={method!r}; use one of {EDGE_METHODS}")
    steps = DEFAULT_IG_STEPS if ig_steps is None else ig_steps
    if method != "eap" and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"ig_steps={ig_steps!r}; use an integer >= 1")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}; use an integer >= 1")
    graph = graph or build_graph(model)
    pairs = _examples(tokens, baseline)
    total = torch.zeros(graph.edges.shape)
    m_clean = 0.0
    for seq, base in track(pairs, f"edge attribution ({method})") if len(pairs) > 1 else pairs:
        row = _as_row(seq, model.device)
        if method in ("eap", "eap-ig"):
            s, m = _eap_lean(model, graph, row, base, means, metric, steps if method == "eap-ig" else 0)
        elif method == "eap-qkfix":
            s, m = _eap_qkfix(model, graph, row, base, means, metric)
        else:
            b = _baseline(model, graph, row, base, means)
            s, m = _eap_ig_paths(model, graph, row, b, metric, steps, _ig_groups(graph, method), batch_size)
        total += s
        m_clean += m
    n = len(pairs)
    return EdgeScores(scores=(total / n) * graph.edges, graph=graph, method=method, baseline=_label(baseline),
                      metric_clean=m_clean / n, n_samples=n)


def _eap_qkfix(model: "ThinkingModel", graph: EdgeGraph, row: Tensor, baseline: Baseline, means: SenderMeans | None,
               metric: Metric) -> tuple[Tensor, float]:
    """EAP with the AtP* QK-fix (:mod:`mechthink._edge_qkfix`): exact along the metric position's
    own stream, first order at the other positions."""
    from mechthink._edge_qkfix import edge_qkfix_scores

    _baseline(model, graph, row, baseline, means, run=False)  # bad input fails before the clean pass
    with torch.inference_mode(False), torch.enable_grad():
        return edge_qkfix_scores(model, graph, row, lambda: _sender_differences(model, graph, row, baseline, means),
                                 lambda lg: _per_row(metric, lg))


def _ig_groups(graph: EdgeGraph, method: str) -> Bool[Tensor, "group sender receiver"]:
    """The edges interpolated together by an EAP-IG path variant, one mask per group: a
    receiver's column (``"eap-ig-inputs"``) or a sender's row (``"eap-ig-outputs"``). The same
    mask names the edges the group's gradients score."""
    e = graph.edges
    if method == "eap-ig-inputs":
        return torch.stack([e * (torch.arange(e.shape[1]) == v) for v in range(e.shape[1])])
    return torch.stack([e * (torch.arange(e.shape[0]) == u)[:, None] for u in range(e.shape[0]) if e[u].any()])


def _eap_ig_paths(model: "ThinkingModel", graph: EdgeGraph, row: Tensor, base: Tensor, metric: Metric, steps: int,
                  groups: Tensor, batch_size: int) -> tuple[Tensor, float]:
    """EAP-IG along edge-wise paths: for each group (a ``[sender, receiver]`` edge mask) the
    group's edges carry ``α · baseline + (1 − α) · clean`` of their senders (``α = (k + ½)/n``,
    every other edge clean, the model recomputed); its edges are scored by the mean gradient at
    their receiver along that path: ``Σ_pos (a_u^base − a_u^clean) · mean_α ∂m/∂x_v``.

    Summed over a group, the scores are the integrated gradient of the group's path, so they add
    up to exact patching of all the group's edges at once (to the midpoint rule's error)."""
    clean = baseline_outputs(model, row, graph)
    with torch.no_grad():
        m_clean = float(_per_row(metric, _Engine(model, graph).run(row))[0])
    delta = (base[0] - clean[0]).expand_as(clean[0]).float()
    alpha = (torch.arange(steps, dtype=torch.float32) + 0.5) / steps
    rows = einops.rearrange(groups.float()[:, None] * alpha[None, :, None, None], "g n u r -> (g n) u r")
    which = einops.repeat(torch.arange(groups.shape[0]), "g -> (g n)", n=steps)
    scores = torch.zeros(graph.edges.shape)
    for c0 in range(0, rows.shape[0], batch_size):
        chunk = rows[c0 : c0 + batch_size].to(model.device)
        eng = _Engine(model, graph, base=base, ablate=chunk, keep_inputs=True)
        with torch.inference_mode(False), torch.enable_grad():
            m = _per_row(metric, eng.run(row.expand(chunk.shape[0], -1)))
            g = eng.receiver_grads(m.sum()).float()
        per_row = einops.einsum(delta, g, "pos u d, b pos r d -> b u r").detach().cpu()
        scores += (per_row * groups[which[c0 : c0 + batch_size]]).sum(0) / steps
    return scores, m_clean


# --------------------------------------------------------------------------- exact patching
@contextmanager
def ablate_edges(
    model: "ThinkingModel",
    ablated: Bool[Tensor, "sender receiver"] | Bool[Tensor, "batch sender receiver"],
    baseline: Baseline = "mean",
    means: SenderMeans | None = None,
    graph: EdgeGraph | None = None,
) -> Iterator[EdgeGraph]:
    """Context manager: every forward of ``model.bridge`` inside it runs with the ``ablated``
    edges carrying the baseline (every other edge clean); yields the graph.

    Args:
        ablated: ``[sender, receiver]`` (every row of a batch) or ``[batch, sender, receiver]``
            (one mask per row).
        baseline: As in :func:`edge_attribution`; corrupted tokens must match the length of
            the inputs run inside the block.
        means: :func:`sender_means` for ``baseline="mean"``.
        graph: A prebuilt :func:`build_graph`.

    The hooks and the bridge's edge flags are removed/restored on exit, also when the block
    raises. With no edge ablated nothing is installed (the clean run, bit for bit); otherwise the
    split q/k/v inputs make clean edges differ from a plain forward by float rounding (~1e-6).
    """
    graph = graph or build_graph(model)
    a = _ablation_masks(graph, ablated)
    base = _baseline(model, graph, None, baseline, means)
    if not a.any():
        yield graph
        return
    eng = _Engine(model, graph, base=base, ablate=a.float().to(model.device))
    with _edge_mode(model), model.bridge.hooks(fwd_hooks=eng.hooks()):
        yield graph


def _ablation_masks(graph: EdgeGraph, ablated: Tensor) -> Bool[Tensor, "batch sender receiver"]:
    """``ablated`` as ``[batch, sender, receiver]`` edges of the graph (one-line error otherwise)."""
    a = torch.as_tensor(ablated)
    a = a if a.dim() == 3 else a.unsqueeze(0)
    if a.dim() != 3 or tuple(a.shape[1:]) != tuple(graph.edges.shape):
        raise ValueError(f"ablated has shape {tuple(torch.as_tensor(ablated).shape)}; use [{len(graph.senders)}, "
                         f"{len(graph.receivers)}] (or with a leading batch axis)")
    return a.bool() & graph.edges


def run_with_ablated_edges(
    model: "ThinkingModel",
    tokens: Any,
    ablated: Bool[Tensor, "sender receiver"] | Bool[Tensor, "batch sender receiver"],
    baseline: Baseline = "mean",
    means: SenderMeans | None = None,
    graph: EdgeGraph | None = None,
) -> Float[Tensor, "batch pos d_vocab"]:
    """Logits with the ``ablated`` edges carrying the baseline (every other edge clean).

    A 3-D ``ablated`` gives one row per mask (the sequence repeated).
    """
    graph = graph or build_graph(model)
    row = _as_row(tokens, model.device)
    a = _ablation_masks(graph, ablated)
    base = _baseline(model, graph, row, baseline, means)
    eng = _Engine(model, graph, base=base, ablate=a.float().to(model.device))
    with torch.no_grad():
        return eng.run(row.expand(a.shape[0], -1))


def _masked_metrics(model: "ThinkingModel", graph: EdgeGraph, row: Tensor, base: Tensor, metric: Metric,
                    masks: Tensor, batch_size: int) -> Tensor:
    """The metric with each ``[sender, receiver]`` ablation mask of ``masks``, batched."""
    out = []
    with torch.no_grad():
        for c0 in range(0, masks.shape[0], batch_size):
            chunk = masks[c0 : c0 + batch_size].float().to(model.device)
            eng = _Engine(model, graph, base=base, ablate=chunk)
            out.append(_per_row(metric, eng.run(row.expand(chunk.shape[0], -1))).cpu())
    return torch.cat(out)


def edge_patching(
    model: "ThinkingModel",
    tokens: Any,
    metric: Metric,
    baseline: Baseline = "mean",
    means: SenderMeans | None = None,
    edges: Bool[Tensor, "sender receiver"] | None = None,
    batch_size: int = 64,
    graph: EdgeGraph | None = None,
) -> EdgeScores:
    """Exact edge patching: each edge's receiver gets the baseline output of its sender, the
    rest of the model is recomputed; ``score = m(patched) − m(clean)`` (mean over sequences).

    Args:
        edges: ``[sender, receiver]``: the edges to patch (default all; others are NaN).
        batch_size: Edges per batched forward.
        Other arguments as in :func:`edge_attribution`.
    """
    graph = graph or build_graph(model)
    want = graph.edges if edges is None else (edges.bool() & graph.edges)
    idx = want.nonzero()
    if idx.shape[0] == 0:
        raise ValueError("edges selects no edge of the graph; pass a [sender, receiver] mask with some edges")
    masks = torch.zeros(idx.shape[0], *graph.edges.shape, dtype=torch.bool)
    masks[torch.arange(idx.shape[0]), idx[:, 0], idx[:, 1]] = True
    pairs = _examples(tokens, baseline)
    total = torch.zeros(idx.shape[0])
    m_clean = m_abl = 0.0
    for seq, b in track(pairs, "exact edge patching") if len(pairs) > 1 else pairs:
        row = _as_row(seq, model.device)
        base = _baseline(model, graph, row, b, means)
        ends = torch.stack([torch.zeros_like(graph.edges), graph.edges])
        ref = _masked_metrics(model, graph, row, base, metric, ends, 2)
        vals = _masked_metrics(model, graph, row, base, metric, masks, batch_size)
        total += vals - ref[0]
        m_clean += float(ref[0])
        m_abl += float(ref[1])
    n = len(pairs)
    scores = torch.zeros(graph.edges.shape)
    scores[idx[:, 0], idx[:, 1]] = total / n
    return EdgeScores(scores=scores, graph=graph, method="exact", baseline=_label(baseline), metric_clean=m_clean / n,
                      metric_ablated=m_abl / n, n_samples=n, scored=want.clone())


@dataclass
class RankAgreement(FlatResult):
    """Spearman ρ between an estimator's edge scores and exact edge patching, over pairs.

    Attributes:
        rho: ρ of the pair-averaged scores over every scored edge.
        ci: 95% percentile bootstrap interval of ``rho`` over pairs (pairs resampled with
            replacement, scores re-averaged, ρ recomputed).
        rho_large: ρ over the edges whose exact ``|score|`` is at least ``min_fraction`` of the
            largest (most edges have ~0 effect; their ranks are noise).
        ci_large: The bootstrap interval of ``rho_large`` (the edge set fixed).
        n_large: Edges in that set.
        n_edges: Edges compared.
        n_pairs: Pairs.
        min_fraction: The fraction defining the large edges.
    """

    plotted_by: ClassVar[str] = "the analysis JSON (spearman_vs_exact)"

    rho: float
    ci: tuple[float, float]
    rho_large: float
    ci_large: tuple[float, float]
    n_large: int
    n_edges: int
    n_pairs: int
    min_fraction: float = 0.01


def rank_agreement(estimates: Sequence[EdgeScores], exact: Sequence[EdgeScores], min_fraction: float = 0.01,
                   n_boot: int = 1000, seed: int = 0) -> RankAgreement:
    """Spearman ρ of per-pair estimates (one :class:`EdgeScores` per pair) against exact edge
    patching of the same pairs, with bootstrap intervals over pairs (:class:`RankAgreement`)."""
    from mechthink import stats

    if len(estimates) != len(exact) or not estimates:
        raise ValueError(f"estimates has {len(estimates)} pairs and exact {len(exact)}; pass the same pairs (>= 1)")
    mask = exact[0].mask
    est = torch.stack([e.scores[mask] for e in estimates])
    ex = torch.stack([e.scores[mask] for e in exact])
    ref = ex.mean(0).abs()
    large = ref >= min_fraction * ref.max()

    def rho(idx: Tensor, keep: Tensor | None) -> float:
        a, b = est[idx].mean(0), ex[idx].mean(0)
        return stats.spearman(a, b) if keep is None else stats.spearman(a[keep], b[keep])

    n = est.shape[0]
    gen = torch.Generator().manual_seed(int(seed))
    draws = [torch.randint(n, (n,), generator=gen) for _ in range(n_boot)]

    def interval(keep: Tensor | None) -> tuple[float, float]:
        boots = sorted(v for v in (rho(d, keep) for d in draws) if not math.isnan(v))
        if not boots:
            return (float("nan"), float("nan"))
        lo, hi = max(round(0.025 * len(boots)) - 1, 0), max(round(0.975 * len(boots)) - 1, 0)
        return boots[lo], boots[hi]

    every = torch.arange(n)
    return RankAgreement(rho=rho(every, None), ci=interval(None), rho_large=rho(every, large), ci_large=interval(large),
                         n_large=int(large.sum()), n_edges=int(mask.sum()), n_pairs=n, min_fraction=min_fraction)


# ------------------------------------------------------------------------------------ circuits
@dataclass
class Circuit(Result):
    """A set of edges on paths from the embeddings to the logits.

    Attributes:
        edges: ``[sender, receiver]``: the circuit's edges.
        graph: The graph.
        scores: The scores the circuit was chosen by (or None).
        k: The top-k asked for (or None with a threshold).
        threshold: The ``|score|`` threshold (or None).
    """

    edges: Bool[Tensor, "sender receiver"]
    graph: EdgeGraph
    scores: EdgeScores | None = None
    k: int | None = None
    threshold: float | None = None

    @property
    def n_edges(self) -> int:
        return int(self.edges.sum())

    @property
    def fraction(self) -> float:
        """Share of the graph's edges in the circuit."""
        return self.n_edges / self.graph.n_edges

    @property
    def heads(self) -> list[tuple[int, int]]:
        """``(layer, head)`` of every head with an edge in or out of the circuit."""
        nodes = set(self.edges.any(1).nonzero().flatten().tolist())
        for v in self.edges.any(0).nonzero().flatten().tolist():
            nodes |= set(self.graph.receiver_nodes(v))
        g = self.graph
        return sorted((g.sender_layer(u), (u - 1) % (g.n_heads + 1)) for u in nodes
                      if u > 0 and (u - 1) % (g.n_heads + 1) < g.n_heads)

    @property
    def labels(self) -> list[str]:
        return self.graph.edge_labels(self.edges)

    def to_frame(self) -> "pd.DataFrame":
        """One row per circuit edge: sender, receiver, score."""
        import pandas as pd

        g = self.graph
        return pd.DataFrame([(g.senders[u], g.receivers[v], float(self.scores.scores[u, v]) if self.scores else float("nan"))
                             for u, v in self.edges.nonzero().tolist()], columns=["sender", "receiver", "score"])

    def plot(self, ax: Any = None) -> Any:
        """The graph with only the circuit's edges, width/colour by score."""
        from mechthink.plotting.circuits import plot_circuit_graph

        return plot_circuit_graph(self.graph, self.scores, ax=ax, circuit=self)

    def to_html(self, path: Any, str_tokens: Sequence[str] | None = None,
                attention: Float[Tensor, "layer head pos"] | None = None, title: str | None = None) -> Any:
        """Write a self-contained interactive HTML view (inline SVG and script, no network):
        the circuit on the graph with a tooltip per node and edge and, given ``str_tokens`` and
        ``attention`` (:func:`query_attention`), the attention of the head under the pointer
        over the tokens. Returns the path.
        """
        from mechthink.plotting.circuits import save_circuit_html

        return save_circuit_html(path, self, str_tokens, attention, title)


def _on_paths(graph: EdgeGraph, chosen: Tensor) -> Tensor:
    """The edges of ``chosen`` on a path embeddings -> logits (one forward, one backward pass)."""
    n_s, n_r = chosen.shape
    fwd = torch.zeros(n_s, dtype=torch.bool)
    fwd[0] = True
    recv_of: list[list[int]] = [[] for _ in range(n_s)]
    for v in range(n_r):
        for u in graph.receiver_nodes(v):
            recv_of[u].append(v)
    for u in range(1, n_s):  # senders are in topological order
        fwd[u] = bool(chosen[fwd][:, recv_of[u]].any()) if recv_of[u] else False
    bwd_r = torch.zeros(n_r, dtype=torch.bool)
    bwd_r[graph.logits_receiver] = True
    bwd_s = torch.zeros(n_s, dtype=torch.bool)
    for u in range(n_s - 1, -1, -1):
        bwd_s[u] = bool((chosen[u] & bwd_r).any())
        for v in recv_of[u]:
            bwd_r[v] = bwd_r[v] or bool(bwd_s[u])
    # a receiver is alive when any node it feeds reaches the logits (k/v feed a head group)
    alive_r = torch.tensor([v == graph.logits_receiver or any(bool(bwd_s[u]) for u in graph.receiver_nodes(v))
                            for v in range(n_r)])
    return chosen & fwd[:, None] & alive_r[None, :]


def prune(scores: EdgeScores, k: int | None = None, threshold: float | None = None, absolute: bool = True) -> Circuit:
    """The top-``k`` edges by ``|score|`` (or those with ``|score| >= threshold``), keeping only
    the ones on a path from the embeddings to the logits.

    Args:
        scores: Edge scores.
        k: How many edges to select before pruning dangling ones (> 0).
        threshold: Instead of ``k``: the minimum ``|score|``.
        absolute: Rank by ``|score|`` (default) or by ``−score`` (edges supporting the metric
            under ablation first).
    """
    kept = _select(scores, k, threshold, absolute)
    if not kept.any():
        raise ValueError(f"no selected edge lies on a path from the embeddings to the logits (k={k}, "
                         f"threshold={threshold}); select more edges")
    return Circuit(edges=kept, graph=scores.graph, scores=scores, k=k, threshold=threshold)


def _select(scores: EdgeScores, k: int | None, threshold: float | None, absolute: bool = True) -> Tensor:
    """The pruned top-k / threshold edge mask (possibly empty)."""
    if (k is None) == (threshold is None):
        raise ValueError("pass exactly one of k= (an integer > 0) and threshold=")
    graph, mask = scores.graph, scores.mask
    vals = scores.scores.abs() if absolute else -scores.scores
    vals = vals.masked_fill(~mask, float("-inf"))
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise ValueError(f"k={k!r}; use an integer > 0")
        order = vals.flatten().argsort(descending=True)[: min(k, int(mask.sum()))]
        chosen = torch.zeros(vals.numel(), dtype=torch.bool)
        chosen[order] = True
        chosen = chosen.reshape(vals.shape) & mask
    else:
        chosen = (vals >= float(threshold)) & mask
    return _on_paths(graph, chosen)


def random_circuit(graph: EdgeGraph, n_edges: int, seed: int = 0) -> Bool[Tensor, "sender receiver"]:
    """``n_edges`` edges of the graph drawn uniformly (a control for a circuit of that size)."""
    if not 0 < n_edges <= graph.n_edges:
        raise ValueError(f"n_edges={n_edges}; use 1..{graph.n_edges}")
    idx = graph.edges.nonzero()
    pick = random.Random(seed).sample(range(idx.shape[0]), n_edges)
    out = torch.zeros_like(graph.edges)
    out[idx[pick, 0], idx[pick, 1]] = True
    return out


@dataclass
class FaithfulnessCurve(Result):
    """Faithfulness of the top-k circuits of one or more scorings, against circuit size.

    Attributes:
        k: The top-k values asked for.
        n_edges: ``{method: [edges kept after pruning, per k]}``.
        faithfulness: ``{method: [normalised metric, per k]}``: ``(m(circuit) − m(ablated)) /
            (m(clean) − m(ablated))`` with means over sequences.
        metric_clean: Mean clean metric.
        metric_ablated: Mean metric with every edge at the baseline.
        n_total_edges: Edges in the graph.
        target: The faithfulness the smallest circuit is reported for.
    """

    k: list[int]
    n_edges: dict[str, list[int]]
    faithfulness: dict[str, list[float]]
    metric_clean: float
    metric_ablated: float
    n_total_edges: int
    target: float = 0.8

    def smallest(self, method: str, target: float | None = None) -> int | None:
        """Fewest edges of a circuit reaching ``target`` faithfulness (None if none does)."""
        t = self.target if target is None else target
        ok = [n for n, f in zip(self.n_edges[method], self.faithfulness[method]) if f >= t]
        return min(ok) if ok else None

    def to_frame(self) -> "pd.DataFrame":
        """One row per (method, k): edges kept, share of the graph, faithfulness."""
        import pandas as pd

        return pd.DataFrame([(m, k, n, n / self.n_total_edges, f) for m in self.faithfulness
                             for k, n, f in zip(self.k, self.n_edges[m], self.faithfulness[m])],
                            columns=["method", "k", "n_edges", "edge_fraction", "faithfulness"])

    def plot(self, ax: Any = None) -> Any:
        """Faithfulness against the number of edges, one line per method."""
        from mechthink.plotting.circuits import plot_faithfulness

        return plot_faithfulness(self, ax=ax)


def faithfulness(
    model: "ThinkingModel",
    tokens: Any,
    metric: Metric,
    scores: EdgeScores | dict[str, EdgeScores],
    baseline: Baseline = "mean",
    ks: Sequence[int] | None = None,
    means: SenderMeans | None = None,
    batch_size: int = 64,
    target: float = 0.8,
) -> FaithfulnessCurve:
    """The faithfulness curve of top-k circuits (:func:`prune`) of one or several scorings.

    Args:
        scores: One :class:`EdgeScores` or ``{name: EdgeScores}`` on the same graph.
        ks: Top-k values (default ~40 values spaced geometrically up to every edge).
        target: The faithfulness :meth:`FaithfulnessCurve.smallest` reports circuits for.
        Other arguments as in :func:`edge_attribution`.
    """
    named = scores if isinstance(scores, dict) else {scores.method: scores}
    graph = next(iter(named.values())).graph
    n_total = graph.n_edges
    if ks is None:
        ks = sorted({max(1, round(n_total ** (i / 39))) for i in range(40)})
    ks = [int(k) for k in ks]
    if not ks or min(ks) <= 0:
        raise ValueError(f"ks={ks}; use top-k values > 0")
    circuits = {m: [_select(s, k, None) for k in ks] for m, s in named.items()}
    masks = torch.stack([graph.edges, torch.zeros_like(graph.edges)] + [~c & graph.edges for m in named for c in circuits[m]])
    pairs = _examples(tokens, baseline)
    total = torch.zeros(masks.shape[0])
    for seq, b in track(pairs, "faithfulness") if len(pairs) > 1 else pairs:
        row = _as_row(seq, model.device)
        total += _masked_metrics(model, graph, row, _baseline(model, graph, row, b, means), metric, masks, batch_size)
    mean = total / len(pairs)
    m_abl, m_clean = float(mean[0]), float(mean[1])
    denom = m_clean - m_abl
    vals = ((mean[2:] - m_abl) / denom if abs(denom) > 1e-12 else torch.full_like(mean[2:], float("nan"))).tolist()
    faith, n_edges, i = {}, {}, 0
    for m in named:
        faith[m] = vals[i : i + len(ks)]
        n_edges[m] = [int(c.sum()) for c in circuits[m]]
        i += len(ks)
    return FaithfulnessCurve(k=ks, n_edges=n_edges, faithfulness=faith, metric_clean=m_clean, metric_ablated=m_abl,
                             n_total_edges=n_total, target=target)


# ------------------------------------------------------------------------------- measurements
def token_probability(
    model: "ThinkingModel",
    tokens: Any,
    ablated: Bool[Tensor, "mask sender receiver"],
    token_ids: Sequence[int],
    baseline: Baseline = "mean",
    means: SenderMeans | None = None,
    graph: EdgeGraph | None = None,
) -> Float[Tensor, "sample mask"]:
    """P(any of ``token_ids``) at the last position with each ablation mask (rows), per sequence.

    Args:
        tokens: One sequence or a list (``baseline`` as in :func:`edge_attribution`).
        ablated: ``[mask, sender, receiver]``: edges carrying the baseline (e.g. a circuit's, or
            random sets of its size; an all-False mask gives the clean model).
        token_ids: The tokens whose probabilities are summed (e.g. the backtracking words).
    """
    graph = graph or build_graph(model)
    ids = torch.tensor(list(token_ids))
    out = []
    for seq, b in _examples(tokens, baseline):
        logits = run_with_ablated_edges(model, seq, ablated, b, means=means, graph=graph)
        out.append(logits[:, -1].float().softmax(-1)[:, ids.to(logits.device)].sum(-1).cpu())
    return torch.stack(out)


def query_attention(model: "ThinkingModel", tokens: Any, position: int = -1) -> Float[Tensor, "layer head pos"]:
    """Every head's attention from ``position`` (the query) over the tokens of one sequence."""
    from mechthink.hooks import gather, hook_name

    seq = _as_row(tokens, torch.device("cpu"))[0].tolist()
    if not -len(seq) <= position < len(seq):
        raise ValueError(f"position={position}; use -{len(seq)}..{len(seq) - 1} for a sequence of {len(seq)} tokens")
    names = [hook_name(L, "pattern") for L in range(int(model.cfg.n_layers))]
    cache = gather(model, [seq], names, positions=position)
    return torch.stack([cache.per_sequence(n)[0][:, -1] for n in names]).float()


def attention_mass(
    model: "ThinkingModel",
    tokens: Any,
    heads: Sequence[tuple[int, int]],
    positions: Sequence[Sequence[int]],
) -> Float[Tensor, "sample head"]:
    """Attention each head puts from the last position onto ``positions`` (one list per sequence)."""
    from mechthink.hooks import gather, hook_name

    seqs = [list(map(int, torch.as_tensor(t).flatten().tolist())) for t in tokens]
    if len(positions) != len(seqs):
        raise ValueError(f"positions has {len(positions)} lists for {len(seqs)} sequences; pass one per sequence")
    layers = sorted({L for L, _ in heads})
    cache = gather(model, seqs, [hook_name(L, "pattern") for L in layers], positions=-1)
    out = torch.zeros(len(seqs), len(heads))
    for i, pos in enumerate(positions):
        for j, (L, h) in enumerate(heads):
            pat = cache.per_sequence(hook_name(L, "pattern"))[i][h, -1]
            out[i, j] = pat[list(pos)].sum()
    return out
