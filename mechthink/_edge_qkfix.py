"""Edge attribution with the AtP* QK-fix: exact along the metric's own stream, linear elsewhere.

Used by :func:`mechthink.circuits.edge_attribution` with ``method="eap-qkfix"``. Source: the
QK-fix and the exact treatment of the metric position's own stream of Kramár et al. 2024
("AtP*: An efficient and scalable method for localizing LLM behaviour to components",
arXiv 2403.00745), carried from nodes (:mod:`mechthink._qkfix`) to the edges of
:mod:`mechthink.circuits`.

Patching edge ``u -> r`` to its baseline changes receiver ``r``'s input by ``Δ_u = a_u^base −
a_u^clean`` at every position. The metric reads the last position ``t = T − 1`` only, so the
score ``m(patched) − m(clean)`` is split by the way the change travels:

1. **The metric's own stream, exactly.** The receiver's output at ``t`` is recomputed with
   ``Δ_u`` in its input. A query input changes the head's query at ``t``; a key (value) input
   changes the key (value) of *every* position as the query at ``t`` sees it, and the softmax
   over the changed scores is recomputed (the QK-fix); an MLP input changes its output at ``t``;
   the logits read ``t``'s final stream. The changed stream of ``t`` then runs through every
   later layer exactly (its own key and value recomputed, the other positions' clean), and the
   metric is read from its logits.
2. **Every other position, to first order.** What the patch changes at positions ``p < t`` (the
   head's output at those queries, the MLP's output there) reaches the metric through later
   attention. That part is EAP's ``Σ_p Δ_u[p] · ∂m/∂x_r[p]`` with the gradient taken through the
   queries ``q < t`` only (the metric position's own path is part 1).

It is exact for every edge into the last layer's receivers and into the logits, and for every
edge when the baseline differs from the clean run at the last position only; what stays linear
is how the changes at earlier positions act on later layers. Cost per sequence: one functional
forward + backward, one local backward per layer (the receivers' inputs split), and per edge one
softmax row of ``T`` keys (key / value receivers also project ``T`` positions) and one stream
through the remaining layers: linear in ``T`` per edge, with no forward pass per edge.

Supported decoder layouts: those of :mod:`mechthink._qkfix` (Llama, Qwen2, Qwen3, GLM-4; GQA)
with ``nn.Linear`` query / key / value projections. At every call the functional clean forward
is checked against the model, its per-head attention against the split-input recomputation and
the senders' clean outputs against its residual streams; a mismatch raises.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from mechthink import _qkfix
from mechthink._qkfix import _Clean, _Functional, _u, checked_clean_run

if TYPE_CHECKING:
    from mechthink.circuits import EdgeGraph
    from mechthink.models.thinking_model import ThinkingModel

NAME = "method='eap-qkfix'"
FALLBACK = "method='eap'"


def _proj_rows(lin: torch.nn.Module, x: Tensor, dh: int) -> Tensor:
    """``x [n, T, d]`` -> ``[n, T, dh]``: row ``i`` projected by head ``i``'s slice of a linear map."""
    if not isinstance(lin, torch.nn.Linear):
        raise ValueError(f"{NAME} needs nn.Linear query/key/value projections, got {type(lin).__name__}; use {FALLBACK}")
    n = x.shape[0]
    w = lin.weight.float().reshape(-1, dh, lin.weight.shape[-1])[:n]
    y = torch.einsum("ntd,ned->nte", x, w)
    if lin.bias is not None:
        y = y + lin.bias.float().reshape(-1, dh)[:n, None]
    return y


def _split_attention(fn: _Functional, l: int, xq: Tensor, xk: Tensor, xv: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Per-head attention output ``[H, T, dh]`` of layer ``l`` where head ``h`` reads its query
    from ``xq[h]`` and key-value head ``g`` its key from ``xk[g]`` and value from ``xv[g]`` (each a
    pre-norm stream ``[T, d]``)."""
    layer, attn = fn.layers[l], fn.attn[l]

    def norm(x: Tensor) -> Tensor:
        return fn._m(_u(layer.input_layernorm), x)

    q = _proj_rows(_u(attn.q_proj), norm(xq), fn.dh)
    k = _proj_rows(_u(attn.k_proj), norm(xk), fn.dh)
    v = _proj_rows(_u(attn.v_proj), norm(xv), fn.dh)
    if getattr(attn, "q_norm", None) is not None:
        q = fn._m(_u(attn.q_norm), q)
        k = fn._m(_u(attn.k_norm), k)
    q, k = fn.apply_rotary(q[None], k[None], cos, sin)
    q, k = q[0].float(), k[0].float()
    return F.scaled_dot_product_attention(q, fn.expand_kv(k), fn.expand_kv(v), is_causal=True, scale=fn.scale)


def _keys_values(fn: _Functional, l: int, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Streams ``[n, T, d]`` -> rotated keys and values ``[n, Hkv, T, dh]`` of layer ``l`` (as
    :meth:`_Functional.qkv`, without the queries)."""
    layer, attn = fn.layers[l], fn.attn[l]
    h = fn._m(_u(layer.input_layernorm), x)
    n, T, _ = h.shape
    k = fn._m(_u(attn.k_proj), h).view(n, T, -1, fn.dh)
    v = fn._m(_u(attn.v_proj), h).view(n, T, -1, fn.dh)
    if getattr(attn, "k_norm", None) is not None:
        k = fn._m(_u(attn.k_norm), k)
    k, v = k.transpose(1, 2), v.transpose(1, 2)
    _, k = fn.apply_rotary(k, k, cos, sin)
    return k.float(), v.float()


def _last_stream_metric(fn: _Functional, c: _Clean, l0: int, s: Tensor, metric_rows: Callable[[Tensor], Tensor]) -> Tensor:
    """Rows ``s [n, d]``: the last position's stream entering layer ``l0`` (``n_layers``: the
    final stream), every other position clean. Returns the metric of each row's logits ``[n]``."""
    T = c.K[0].shape[1]
    t = T - 1
    cos, sin = fn.rope(torch.tensor([t], device=s.device))
    out = []
    step = max(1, _qkfix._CHUNK_ELEMENTS // max(1, fn.H * T))
    for c0 in range(0, s.shape[0], step):
        x = s[c0 : c0 + step]
        n = x.shape[0]
        for l in range(l0, fn.n_layers):
            q, k, v = fn.qkv(l, x[:, None], cos, sin)
            q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0].float()  # [n, H | Hkv, dh]
            qg = q.reshape(n, fn.Hkv, fn.g, fn.dh)
            scores = torch.einsum("nkgd,ktd->nkgt", qg, c.K[l][:, :t]) * fn.scale
            own = torch.einsum("nkgd,nkd->nkg", qg, k)[..., None] * fn.scale
            a = torch.cat([scores, own], -1).softmax(-1)
            z = torch.einsum("nkgt,ktd->nkgd", a[..., :t], c.V[l][:, :t]) + a[..., t:] * v[:, :, None]
            x = fn.after_attention(l, x, z.reshape(n, -1))
        out.append(metric_rows(fn.logits(x)[:, None]))
    return torch.cat(out)


def _tolerance(fn: _Functional, ref: Tensor) -> float:
    """Agreement required between two computations of the same tensor (relative to its size)."""
    return (1e-3 if fn.dtype == torch.float32 else 5e-2) * max(1.0, float(ref.abs().max()))


def _check_senders(fn: _Functional, c: _Clean, sums: Tensor) -> None:
    """The senders' clean outputs must sum to the functional run's residual streams."""
    for l, total in enumerate(sums.to(fn.device).float()):
        r = c.R[l]
        err = float((total - r).abs().max())
        if not err <= _tolerance(fn, r):
            raise RuntimeError(f"{NAME}: the senders' outputs do not sum to the residual stream of layer {l} "
                               f"(max |Δ| = {err:.3g}); use {FALLBACK}")


def edge_qkfix_scores(
    model: "ThinkingModel",
    graph: "EdgeGraph",
    row: Tensor,
    differences: Callable[[], tuple[Tensor, Tensor]],
    metric_rows: Callable[[Tensor], Tensor],
) -> tuple[Float[Tensor, "sender receiver"], float]:
    """QK-fixed scores of every edge of ``graph`` for one clean ``row`` ``[1, T]``.

    Args:
        differences: ``() -> (sums, delta)``: the sums of the senders' clean outputs on ``row``
            that each layer's attention inputs and the logits read, ``[layer + 1, pos, d_model]``,
            and ``a^base − a^clean`` of every sender at every position, contiguous
            ``[sender, pos, d_model]``; called after the clean forward + backward, so the
            differences and that pass's autograd graph are never held together.
        metric_rows: Logits ``[batch, pos, vocab]`` -> ``[batch]``; must read the last position only.

    Returns:
        ``[sender, receiver]`` scores (0 off the graph) and the metric of the model's own clean forward.
    """
    fn = _Functional(model)
    T = row.shape[1]
    t = T - 1
    c, metric_clean = checked_clean_run(model, fn, row, metric_rows, stream_grads=True, name=NAME, fallback=FALLBACK)
    sums, delta = differences()
    _check_senders(fn, c, sums)
    D = delta.to(fn.device).float()
    del delta
    H, G = fn.H, fn.Hkv
    cos, sin = fn.rope(torch.arange(T, device=fn.device))
    cos_t, sin_t = fn.rope(torch.tensor([t], device=fn.device))
    scores = torch.zeros(graph.edges.shape)
    d = D.shape[-1]
    sender_step = max(1, _qkfix._CHUNK_ELEMENTS // max(1, T * d))
    for l in range(fn.n_layers):
        sl_q, sl_k, sl_v = (graph.receiver_slice(l, k) for k in ("q", "k", "v"))
        up = graph.n_upstream(sl_q.start)
        Dl = D[:up]
        # ---- part 2: the gradient at each receiver's input through the queries before t (split inputs)
        with torch.enable_grad():
            xs = [c.R[l].expand(n, T, d).clone().requires_grad_(True) for n in (H, G, G)]
            z = _split_attention(fn, l, *xs, cos, sin)
            err = float((z.detach() - c.Z[l]).abs().max())
            if not err <= _tolerance(fn, c.Z[l]):
                raise RuntimeError(f"{NAME}: the split-input attention of layer {l} disagrees with the functional "
                                   f"forward (max |Δ| = {err:.3g}); use {FALLBACK}")
            gq, gk, gv = torch.autograd.grad((z[:, :t] * c.GZ[l][:, :t]).sum(), xs)
            xm = c.M[l].clone().requires_grad_(True)
            (gm,) = torch.autograd.grad((fn.mlp_out(l, xm)[:t] * c.GR[l][:t]).sum(), [xm])
        with torch.no_grad():
            grads = torch.cat([gq, gk, gv])  # [H + 2G, T, d]: receivers sl_q.start .. sl_v.stop
            scores[:up, sl_q.start : sl_v.stop] += torch.einsum("upd,rpd->ur", Dl, grads).cpu()
            # ---- part 1: each receiver's output at t with Δ_u in its input, then t's stream exactly
            q_clean = c.Q[l][:, t]  # [H, dh]
            K, V = fn.expand_kv(c.K[l]), fn.expand_kv(c.V[l])  # [H, T, dh]
            a_clean = ((K @ q_clean[:, :, None])[..., 0] * fn.scale).softmax(-1)  # [H, T]
            z_t = c.Z[l][:, t]  # [H, dh]
            q_new = fn.qkv(l, (c.R[l][t] + Dl[:, t])[:, None], cos_t, sin_t)[0][:, :, 0]  # [up, H, dh]
            new_z = torch.empty(H + 2 * G, up, H, fn.dh, device=fn.device)  # per receiver, sender: z at t
            new_z[:] = z_t
            for h in range(H):  # query receivers
                new_z[h, :, h] = ((q_new[:, h] @ K[h].T) * fn.scale).softmax(-1) @ V[h]
            for s0 in range(0, up, sender_step):  # key / value receivers: T positions re-projected
                s1 = min(up, s0 + sender_step)
                k_all, v_all = _keys_values(fn, l, c.R[l][None] + Dl[s0:s1], cos, sin)  # [n, Hkv, T, dh]
                for h in range(H):
                    g = h // fn.g
                    sc = torch.einsum("d,ntd->nt", q_clean[h], k_all[:, g]) * fn.scale
                    new_z[H + g, s0:s1, h] = sc.softmax(-1) @ V[h]
                    new_z[H + G + g, s0:s1, h] = torch.einsum("t,ntd->nd", a_clean[h], v_all[:, g])
            attn_clean = fn.attn_out(l, z_t.reshape(1, -1))
            mid = c.M[l][t] + fn.attn_out(l, new_z.reshape(-1, H * fn.dh)) - attn_clean  # [(H + 2G) · up, d]
            rows = torch.cat([c.M[l][t][None], mid])
            metric = _last_stream_metric(fn, c, l + 1, fn.mlp_tail(l, rows), metric_rows)
            exact = (metric[1:] - metric[0]).reshape(H + 2 * G, up)
            scores[:up, sl_q.start : sl_v.stop] += exact.T.cpu()
            # ---- the MLP receiver
            r_mlp = graph.receiver_slice(l, "mlp").start
            up_m = graph.n_upstream(r_mlp)
            scores[:up_m, r_mlp] += torch.einsum("upd,pd->u", D[:up_m], gm).cpu()
            m_in = torch.cat([c.M[l][t][None], c.M[l][t] + D[:up_m, t]])
            rows = c.R[l + 1][t] + fn.mlp_out(l, m_in) - fn.mlp_out(l, c.M[l][t][None])
            metric = _last_stream_metric(fn, c, l + 1, rows, metric_rows)
            scores[:up_m, r_mlp] += (metric[1:] - metric[0]).cpu()
    with torch.no_grad():  # the logits: the final stream of t, exactly
        rows = torch.cat([c.R[fn.n_layers][t][None], c.R[fn.n_layers][t] + D[:, t]])
        metric = metric_rows(fn.logits(rows)[:, None])
        scores[:, graph.logits_receiver] = (metric[1:] - metric[0]).cpu()
    return scores * graph.edges, metric_clean
