"""AtP* QK-fix for attribution patching, run through the model's own HF modules.

Used by :func:`mechthink.attribution.attribution_patching` with ``estimator="qkfix"``.
Source: Kramár et al. 2024, "AtP*: An efficient and scalable method for localizing LLM
behaviour to components" (arXiv 2403.00745).

Why: plain attribution patching of ``resid_pre`` under mean ablation misranks nodes whose effect
goes through attention *patterns*. Replacing position ``p``'s residual vector by the mean changes
``p``'s keys, a position the later queries barely attended can become attended, and the softmax
gradient at the clean point does not see it (the AtP failure mode of Kramár et al. 2024). On
tiny-thinker this puts the Spearman ρ of AtP against exact patching at 0.26.

What is computed, for every node (``L``, ``p``) = "``resid_pre`` of layer ``L`` at position ``p``
replaced by its baseline ``b``", with no forward pass per node:

1. **p's own stream, exactly.** Causality leaves every position ``< p`` unchanged, so the patched
   stream of ``p`` through layers ``L..n-1`` is exact given the clean keys/values of the earlier
   positions. All ``p`` run at once as a batch of single-query rows.
2. **Column-p terms, exact in the pattern.** In each layer ``l ≥ L`` only key/value column ``p``
   changes for the queries ``q > p`` (to the patched stream's ``k'_l[p]``, ``v'_l[p]``). The new
   attention output of query ``q`` is then exactly
   ``z'_q = (z_q − a·v_p + a·e^Δs·v'_p) / (1 − a + a·e^Δs)`` with ``a`` the clean weight on ``p`` and
   ``Δs`` the score change; it is contracted with the clean gradient ``∂m/∂z_l[q]`` (computed in
   log space, stable when the softmax saturates). Only these intermediate positions
   ``p < q < T−1`` stay linear.
3. **The metric's own stream, exactly.** The last position is rerun through layers ``L..n-1`` with
   column ``p`` replaced in every layer (and its own key/value recomputed), and the metric is read
   from its logits: the largest terms are exact.

Other node types enter mid-layer: ``resid_post`` of L is ``resid_pre`` of L+1; for ``attn_out``,
``mlp_out`` and one head's ``z`` at (L, p), p's stream is finished through layer L with the patch
(keys and values of layer L itself are unchanged) and the same three steps run from layer L+1.

For ``p = T−1``, and for every ``p`` at the last layer, the estimate equals exact patching. The
metric must read only the last position's logits (``logit_metric(-1, ...)`` and the like).

Supported decoder layouts: Llama / Qwen2 (attention biases) / Qwen3 (q/k norms) / GLM-4 (partial
interleaved rotary, sandwich norms), with GQA. At every call the functional clean forward is
checked against ``model.bridge``; a mismatch raises instead of returning wrong scores.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from mechthink.models.thinking_model import ThinkingModel

_CHUNK_ELEMENTS = 1 << 23  # rows·T·heads per chunk of positions (bounds the [rows, heads, T] tensors)
_RECOMPUTE_ABOVE = 0.5  # clean weight on column p above which a column term is recomputed row-exactly


def _u(module: Any) -> Any:
    """The HF module a TransformerBridge component wraps (or the module itself)."""
    return getattr(module, "_original_component", module)


class _Functional:
    """The decoder stack as functions of (stream, position), built from the HF submodules."""

    def __init__(self, model: "ThinkingModel") -> None:
        hf = model.bridge.original_model
        cfg = hf.config
        arch = (getattr(cfg, "architectures", None) or [type(hf).__name__])[0]
        inner = _u(hf.model)
        layers = [_u(layer) for layer in inner.layers]
        problems = []
        if getattr(cfg, "use_sliding_window", False) or any(
            t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])
        ):
            problems.append("sliding-window attention")
        if getattr(cfg, "attn_logit_softcapping", None) or getattr(cfg, "final_logit_softcapping", None):
            problems.append("logit soft-capping")
        for layer in layers:
            attn = _u(getattr(layer, "self_attn", None))
            need = ("input_layernorm", "post_attention_layernorm", "mlp", "self_attn")
            if any(not hasattr(layer, n) for n in need) or any(
                not hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "head_dim")
            ):
                problems.append(f"decoder layer {type(layer).__name__}")
                break
            if getattr(attn, "sliding_window", None):
                problems.append("sliding-window attention")
                break
        if problems:
            raise ValueError(
                f"estimator='qkfix' does not support {arch} ({', '.join(sorted(set(problems)))}); "
                "it supports Llama, Qwen2, Qwen3 and GLM-4 decoder layouts; use estimator='atp'"
            )
        self.arch = arch
        self.embed = _u(inner.embed_tokens)
        self.norm = _u(inner.norm)
        self.lm_head = _u(hf.lm_head)
        self.rotary = _u(inner.rotary_emb)
        self.layers = layers
        self.attn = [_u(layer.self_attn) for layer in layers]
        a0 = self.attn[0]
        self.apply_rotary: Callable[..., Any] = sys.modules[type(a0).__module__].apply_rotary_pos_emb
        self.dh = int(a0.head_dim)
        self.scale = float(a0.scaling)
        self.H = int(cfg.num_attention_heads)
        self.Hkv = int(getattr(cfg, "num_key_value_heads", None) or self.H)
        self.g = self.H // self.Hkv
        self.n_layers = len(layers)
        p = next(hf.parameters())
        self.dtype, self.device = p.dtype, p.device

    # ---------------------------------------------------------------- module calls (float32 out)
    def _m(self, module: Any, x: Tensor) -> Tensor:
        return module(x.to(self.dtype)).float()

    def _opt(self, layer: Any, name: str, x: Tensor) -> Tensor:
        mod = getattr(layer, name, None)
        return x if mod is None else self._m(_u(mod), x)

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin ``[1, n, rot_dim]`` for the given positions."""
        dummy = torch.zeros(1, positions.numel(), 1, dtype=self.dtype, device=self.device)
        cos, sin = self.rotary(dummy, positions.reshape(1, -1).to(self.device))
        return cos.float(), sin.float()

    def qkv(self, l: int, s: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Stream ``[B, S, d]`` -> rotated q ``[B, H, S, dh]``, k, v ``[B, Hkv, S, dh]``.

        ``cos``/``sin`` are ``[B or 1, S, rot_dim]``."""
        layer, attn = self.layers[l], self.attn[l]
        x = self._m(_u(layer.input_layernorm), s)
        B, S, _ = x.shape
        q = self._m(_u(attn.q_proj), x).view(B, S, -1, self.dh)
        k = self._m(_u(attn.k_proj), x).view(B, S, -1, self.dh)
        v = self._m(_u(attn.v_proj), x).view(B, S, -1, self.dh)
        if getattr(attn, "q_norm", None) is not None:
            q = self._m(_u(attn.q_norm), q)
            k = self._m(_u(attn.k_norm), k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q, k = self.apply_rotary(q, k, cos, sin)
        return q.float(), k.float(), v

    def attn_out(self, l: int, z: Tensor) -> Tensor:
        """``z [..., H·dh]`` -> what the attention adds to the stream (``hook_attn_out``)."""
        return self._opt(self.layers[l], "post_self_attn_layernorm", self._m(_u(self.attn[l].o_proj), z))

    def mlp_out(self, l: int, m: Tensor) -> Tensor:
        """Mid-layer stream (``hook_resid_mid``) -> what the MLP adds to the stream."""
        layer = self.layers[l]
        mo = self._m(_u(layer.mlp), self._m(_u(layer.post_attention_layernorm), m))
        return self._opt(layer, "post_mlp_layernorm", mo)

    def mlp_tail(self, l: int, m: Tensor) -> Tensor:
        """Mid-layer stream (``hook_resid_mid``) -> the layer's output stream."""
        return m + self.mlp_out(l, m)

    def after_attention(self, l: int, s: Tensor, z: Tensor) -> Tensor:
        """Stream ``[..., d]`` and attention output ``z [..., H·dh]`` -> next layer's stream."""
        return self.mlp_tail(l, s + self.attn_out(l, z))

    def logits(self, s: Tensor) -> Tensor:
        return self._m(self.lm_head, self._m(self.norm, s))

    def expand_kv(self, t: Tensor) -> Tensor:
        """``[..., Hkv, X, dh]`` on dim -3 -> ``[..., H, X, dh]`` (query head h uses kv head h // g)."""
        return t.repeat_interleave(self.g, dim=-3) if self.g > 1 else t


class _Clean:
    """Clean-run quantities per layer (``R`` has ``n_layers + 1`` entries; the last is final)."""

    def __init__(self) -> None:
        self.R: list[Tensor] = []
        self.M: list[Tensor] = []  # resid_mid [T, d]
        self.Q: list[Tensor] = []
        self.K: list[Tensor] = []
        self.V: list[Tensor] = []
        self.Z: list[Tensor] = []
        self.GZ: list[Tensor] = []
        self.GR: list[Tensor] = []  # ∂m/∂resid_post of each layer (only with stream_grads)
        self.LSE: list[Tensor] = []  # float64 log-sum-exp of each query's scores [H, T]
        self.metric = 0.0


def _fused(T: int) -> bool:
    """Whether a clean run over ``T`` positions uses the fused attention kernel (long inputs)."""
    from mechthink.models.fast_attention import MIN_SCORES

    return T * T >= (MIN_SCORES if _FUSED_FROM is None else _FUSED_FROM)


_FUSED_FROM: int | None = None  # tests lower it; None: fast_attention.MIN_SCORES queries x keys


def _lse_by_chunks(fn: _Functional, q: Tensor, k: Tensor) -> Tensor:
    """float64 log-sum-exp of each query's causal scores, ``[H, T]``, a block of queries at a time
    (``O(heads · chunk · T)`` memory, never ``[H, T, T]``)."""
    H, T = q.shape[0], q.shape[1]
    kx = fn.expand_kv(k).double().transpose(-1, -2)
    out = torch.empty(H, T, dtype=torch.float64, device=q.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, H * T))
    keys = torch.arange(T, device=q.device)
    for c0 in range(0, T, step):
        qi = torch.arange(c0, min(T, c0 + step), device=q.device)
        s64 = (q[:, qi].double() @ kx) * fn.scale
        out[:, qi] = s64.masked_fill(keys[None, None, :] > qi[None, :, None], float("-inf")).logsumexp(-1)
    return out


def _clean_run(fn: _Functional, row: Tensor, metric_last: Callable[[Tensor], Tensor],
               stream_grads: bool = False) -> tuple[_Clean, Tensor]:
    """Functional clean forward + backward; returns the clean quantities and the logits.

    ``stream_grads`` also keeps ``∂m/∂`` of each layer's output stream (``c.GR[l]``, resid_post
    of layer l, ``[T, d]``).

    Short inputs materialise each layer's ``[H, T, T]`` pattern and return the logits of every
    position. Long ones (``T² ≥`` :data:`mechthink.models.fast_attention.MIN_SCORES`) run the
    attention on the fused kernel (its backward recomputes the pattern blockwise), take the
    log-sum-exp by blocks of queries and unembed only the last 8 positions (the metric reads the
    last one; the other 7 let :func:`check_last_position_metric` catch a metric that reads
    elsewhere): memory linear in T."""
    import torch.nn.functional as F

    T = row.shape[1]
    fused = _fused(T)
    pos = torch.arange(T, device=fn.device)
    cos, sin = fn.rope(pos)
    causal = None if fused else torch.ones(T, T, dtype=torch.bool, device=fn.device).tril()
    c = _Clean()
    zs: list[Tensor] = []
    posts: list[Tensor] = []
    with torch.enable_grad():
        r = fn.embed(row).float()[0].detach().requires_grad_(True)
        for l in range(fn.n_layers):
            c.R.append(r.detach())
            q, k, v = fn.qkv(l, r[None], cos, sin)
            q, k, v = q[0], k[0], v[0].float()
            if fused:
                z = F.scaled_dot_product_attention(
                    q.float()[None], fn.expand_kv(k).float()[None], fn.expand_kv(v)[None], is_causal=True, scale=fn.scale
                )[0]
                c.LSE.append(_lse_by_chunks(fn, q.detach(), k.detach()))
            else:
                s = ((q @ fn.expand_kv(k).transpose(-1, -2)) * fn.scale).masked_fill(~causal, float("-inf"))
                a = s.softmax(-1)
                z = a @ fn.expand_kv(v)  # [H, T, dh]
                s64 = (q.detach().double() @ fn.expand_kv(k.detach()).double().transpose(-1, -2)) * fn.scale
                c.LSE.append(s64.masked_fill(~causal, float("-inf")).logsumexp(-1))
            zs.append(z)
            c.Q.append(q.detach())
            c.K.append(k.detach())
            c.V.append(v.detach())
            c.Z.append(z.detach())
            m_mid = r + fn.attn_out(l, z.transpose(0, 1).reshape(T, -1))
            c.M.append(m_mid.detach())
            r = fn.mlp_tail(l, m_mid)
            posts.append(r)
        c.R.append(r.detach())
        logits = fn.logits(r[-8:] if fused else r)
        m = metric_last(logits[None])
        c.metric = float(m.detach())
        grads = torch.autograd.grad(m, zs + (posts if stream_grads else []), allow_unused=True)
    clean = c.Z + (c.R[1:] if stream_grads else [])
    grads = [g.detach() if g is not None else torch.zeros_like(z) for g, z in zip(grads, clean)]
    c.GZ, c.GR = grads[: fn.n_layers], grads[fn.n_layers :]
    return c, logits.detach()


def _column_terms(fn: _Functional, c: _Clean, l: int, ps: Tensor, k_new: Tensor, v_new: Tensor) -> Tensor:
    """Σ_h Σ_{p<q<T-1} ∂m/∂z_l[q] · (z'_l[q] − z_l[q]) when only key/value column p changes.

    ``ps [n]`` positions, ``k_new``/``v_new [n, Hkv, dh]``; returns ``[n]``. Memory is
    O(heads · T · n): the clean attention is rebuilt for the n columns from the stored queries,
    keys and per-query log-sum-exp, never stored as ``[H, T, T]``. Only the queries after the
    first column of the block are visited (causality: the others see no changed column). The
    closed form runs in float32 log space (no overflow of e^Δs); its denominator is ≥ 1/2 wherever
    it is used, the entries where the clean weight exceeds :data:`_RECOMPUTE_ABOVE` being
    recomputed row-exactly in float64."""
    T = c.Q[l].shape[1]
    n = ps.numel()
    q0, q1 = int(ps.min()) + 1, T - 1  # queries q0..q1-1; the last position is handled exactly
    if q0 >= q1:
        return torch.zeros(n, device=ps.device)
    Q, Z, GZ = c.Q[l][:, q0:q1], c.Z[l][:, q0:q1], c.GZ[l][:, q0:q1]
    kn = fn.expand_kv(k_new.transpose(0, 1))  # [H, n, dh]
    vn = fn.expand_kv(v_new.transpose(0, 1))
    Kp = fn.expand_kv(c.K[l][:, ps])  # [H, n, dh]
    Vp = fn.expand_kv(c.V[l][:, ps])
    q_idx = torch.arange(q0, q1, device=ps.device)[:, None]
    before = (q_idx <= ps[None])[None]  # [1, q, n]: query q does not see column p (or is p)
    s_old = torch.einsum("hqd,hnd->hqn", Q, Kp) * fn.scale
    ds = torch.einsum("hqd,hnd->hqn", Q, kn - Kp) * fn.scale
    log_a = (s_old - c.LSE[l][:, q0:q1, None].float()).masked_fill_(before, float("-inf"))
    del s_old
    a = log_a.exp()  # clean weight of query q on column p
    x = log_a + ds  # log(a·e^Δs)
    log_d = torch.logaddexp(torch.log1p(-a.clamp(max=min(_RECOMPUTE_ABOVE, 1.0 - 1e-6))), x)  # log(1 − a + a·e^Δs)
    gz_z = (GZ * Z).sum(-1, keepdim=True)  # [H, q, 1]
    contrib = (x - log_d).exp_() * (torch.einsum("hqd,hnd->hqn", GZ, vn) - gz_z)
    contrib -= (log_a - log_d).exp_() * (torch.einsum("hqd,hnd->hqn", GZ, Vp) - gz_z)
    del x, log_d, log_a
    contrib = contrib.double().masked_fill_(before, 0.0)
    # Where column p holds most of q's attention, z − a·v_p cancels and the division by
    # 1 − a + a·e^Δs amplifies the rounding: recompute those entries' softmax rows exactly.
    sel = (a > _RECOMPUTE_ABOVE) & ~before
    if bool(sel.any()):
        Qx = c.Q[l].double()
        Kx, Vx = fn.expand_kv(c.K[l]).double(), fn.expand_kv(c.V[l]).double()
        j = torch.arange(T, device=ps.device)
        step = max(1, _CHUNK_ELEMENTS // max(1, T))  # rows·T per block of recomputed entries
        for h in sel.any(2).any(1).nonzero().flatten().tolist():
            r_all, n_all = sel[h].nonzero(as_tuple=True)
            for e0 in range(0, len(r_all), step):
                r_i, n_i = r_all[e0 : e0 + step], n_all[e0 : e0 + step]
                q_i = r_i + q0
                p_i, m = ps[n_i], torch.arange(len(n_i), device=ps.device)
                rows = ((Qx[h, q_i] @ Kx[h].T) * fn.scale).masked_fill(j[None] > q_i[:, None], float("-inf"))
                rows[m, p_i] += ds[h, r_i, n_i].double()
                a_new = rows.softmax(-1)
                z_new = a_new @ Vx[h] + a_new[m, p_i, None] * (vn[h, n_i] - Vp[h, n_i]).double()
                contrib[h, r_i, n_i] = (GZ[h, q_i - q0].double() * (z_new - Z[h, q_i - q0].double())).sum(-1)
    return contrib.sum((0, 1)).float()


def _patched_streams(fn: _Functional, c: _Clean, L: int, ps: Tensor, s: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Run the patched streams of positions ``ps`` (rows of ``s [n, d]``, resid_pre of layer L).

    Row i is position ``ps[i]``'s own stream, exact given the clean keys/values of the positions
    before it. Returns, per layer ``l ≥ L``, the new key and value of column p,
    ``([n, Hkv, dh], [n, Hkv, dh])``: p's effect reaches later positions only through them."""
    n = ps.numel()
    hi = int(ps.max()) + 1  # no row attends past the block's last position
    cos, sin = fn.rope(ps)
    cos, sin = cos[0][:, None], sin[0][:, None]  # [n, 1, rot]
    j = torch.arange(hi, device=ps.device)
    future = j[None] > ps[:, None]  # [n, hi]
    idx = ps.view(n, 1, 1, 1).expand(n, fn.Hkv, fn.g, 1)
    out = []
    for l in range(L, fn.n_layers):
        q, k, v = fn.qkv(l, s[:, None], cos, sin)
        q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0].float()  # [n, H|Hkv, dh]
        qg = q.view(n, fn.Hkv, fn.g, fn.dh)
        K, V = c.K[l][:, :hi], c.V[l][:, :hi]  # [Hkv, hi, dh]
        sc = torch.einsum("nkgd,ktd->nkgt", qg, K) * fn.scale
        own = torch.einsum("nkgd,nkd->nkg", qg, k)[..., None] * fn.scale
        sc = sc.scatter(-1, idx, own).masked_fill(future[:, None, None], float("-inf"))
        a = sc.softmax(-1)
        a_p = a.gather(-1, idx)  # [n, Hkv, g, 1]
        Vp = V[:, ps].transpose(0, 1)  # [n, Hkv, dh]
        z = torch.einsum("nkgt,ktd->nkgd", a, V) + a_p * (v - Vp)[:, :, None]
        out.append((k, v))
        s = fn.after_attention(l, s, z.reshape(n, -1))
    return out


def _last_row(
    fn: _Functional, c: _Clean, L: int, ps: Tensor, s_first: Tensor, cols: list[tuple[Tensor, Tensor]]
) -> Tensor:
    """The last position's stream from layer L with column p of every layer l ≥ L replaced (its own
    key/value recomputed); ``s_first`` are the patched resid_pre rows. Returns final streams ``[n, d]``."""
    n = ps.numel()
    T = c.Q[0].shape[1]
    t = T - 1
    is_last = ps == t
    s = torch.where(is_last[:, None], s_first, c.R[L][t].expand(n, -1))
    cos, sin = fn.rope(torch.tensor([t], device=ps.device))
    idx_p = ps.view(n, 1, 1, 1).expand(n, fn.Hkv, fn.g, 1)
    not_last = (~is_last).view(n, 1, 1, 1).float()
    for i, l in enumerate(range(L, fn.n_layers)):
        q, k, v = fn.qkv(l, s[:, None], cos, sin)
        q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0].float()
        qg = q.view(n, fn.Hkv, fn.g, fn.dh)
        K, V = c.K[l], c.V[l]
        kp, vp = cols[i]
        sc = torch.einsum("nkgd,ktd->nkgt", qg, K) * fn.scale
        s_own = torch.einsum("nkgd,nkd->nkg", qg, k)[..., None] * fn.scale
        s_col = torch.einsum("nkgd,nkd->nkg", qg, kp)[..., None] * fn.scale
        sc[..., t : t + 1] = s_own
        sc = sc.scatter(-1, idx_p, torch.where(is_last.view(n, 1, 1, 1), s_own, s_col))
        a = sc.softmax(-1)
        z = torch.einsum("nkgt,ktd->nkgd", a, V)
        z = z + a[..., t : t + 1] * (v - V[:, t])[:, :, None]
        Vp = V[:, ps].transpose(0, 1)
        z = z + not_last * a.gather(-1, idx_p) * (vp - Vp)[:, :, None]
        s = fn.after_attention(l, s, z.reshape(n, -1))
    return s


def check_last_position_metric(metric_rows: Callable[[Tensor], Tensor], logits: Tensor,
                               name: str = "estimator='qkfix'", fallback: str = "estimator='atp'") -> None:
    """Raise unless the metric gives the same value on the full logits and on the last position alone."""
    try:
        full = metric_rows(logits[None])
        last = metric_rows(logits[None, -1:])
        ok = torch.allclose(full, last, rtol=1e-5, atol=1e-5)
    except Exception:  # noqa: BLE001 - any failure means the metric indexes other positions
        ok = False
    if not ok:
        raise ValueError(
            f"{name} needs a metric that reads only the last position's logits with negative "
            f"indexing (e.g. logit_metric(-1, token)); use {fallback} for other metrics"
        )


def checked_clean_run(model: "ThinkingModel", fn: _Functional, row: Tensor, metric_rows: Callable[[Tensor], Tensor],
                      stream_grads: bool = False, name: str = "estimator='qkfix'",
                      fallback: str = "estimator='atp'") -> tuple[_Clean, float]:
    """:func:`_clean_run`, checked against the model's own forward (the last position's logits)
    and for a metric of the last position only; returns the clean quantities and the metric of
    the model's own forward. A mismatch raises instead of letting wrong scores through."""
    T = row.shape[1]

    def metric_last(lg: Tensor) -> Tensor:
        return metric_rows(lg).sum()

    from mechthink.models.fast_attention import fast_attention

    keep = {"logits_to_keep": 8} if _fused(T) and model.last_logits_kwargs() else {}
    with torch.no_grad(), fast_attention(model):
        ref_logits = model.bridge(row, **keep).float()
        metric_clean = float(metric_rows(ref_logits).sum())
        ref = ref_logits[0, -1]
    c, logits = _clean_run(fn, row, metric_last, stream_grads=stream_grads)
    scale = max(1.0, float(ref.abs().max()))
    tol = (1e-3 if fn.dtype == torch.float32 else 5e-2) * scale
    err = float((logits[-1] - ref).abs().max())
    if not err <= tol:
        raise RuntimeError(
            f"{name}: the functional forward of {fn.arch} disagrees with the model "
            f"(max |Δ logit| = {err:.3g} > {tol:.3g}); use {fallback}"
        )
    check_last_position_metric(metric_rows, logits, name, fallback)
    return c, metric_clean


def _start_rows(fn: _Functional, c: _Clean, node: str, L: int, base: Tensor, ps: Tensor, hs: Tensor) -> tuple[int, Tensor]:
    """The patched stream rows for nodes (L, ps[i][, hs[i]]) and the layer whose input they are."""
    if node == "resid_pre":
        return L, base[ps]
    if node == "resid_post":
        return L + 1, base[ps]
    if node == "mlp_out":
        return L + 1, c.M[L][ps] + base[ps]
    if node == "attn_out":
        return L + 1, fn.mlp_tail(L, c.R[L][ps] + base[ps])
    if node == "z":  # one head's attention output at p replaced, the other heads clean
        z = c.Z[L][:, ps].transpose(0, 1).clone()  # [n, H, dh]
        rows = torch.arange(len(ps), device=ps.device)
        z[rows, hs] = base[ps, hs]
        return L + 1, fn.mlp_tail(L, c.R[L][ps] + fn.attn_out(L, z.reshape(len(ps), -1)))
    raise ValueError(f"estimator='qkfix' has no rule for node type {node!r}")


def qkfix_scores(
    model: "ThinkingModel",
    row: Tensor,
    metric_rows: Callable[[Tensor], Tensor],
    jobs: Sequence[tuple[str, int, Tensor]],
) -> tuple[list[Tensor], float]:
    """QK-fixed scores per job ``(node_type, layer, baseline)``: ``[T]`` for resid_pre, resid_post,
    attn_out and mlp_out, ``[T, H]`` for z. The baseline has the hook's per-position shape
    (``[T, d]`` or ``[T, H, dh]``).

    ``metric_rows`` maps logits ``[batch, pos, vocab]`` to ``[batch]``. Also returns the metric
    of the model's own clean forward."""
    fn = _Functional(model)
    T = row.shape[1]
    c, metric_clean = checked_clean_run(model, fn, row, metric_rows)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, T * fn.H))
    out = []
    with torch.no_grad():
        for node, L, base in jobs:
            base = base.to(fn.device).float()
            heads = fn.H if node == "z" else 1
            n_rows = T * heads
            flat = torch.zeros(n_rows)
            for c0 in range(0, n_rows, chunk):
                idx = torch.arange(c0, min(n_rows, c0 + chunk), device=fn.device)
                ps, hs = idx // heads, idx % heads
                start, s0 = _start_rows(fn, c, node, L, base, ps, hs)
                cols = _patched_streams(fn, c, start, ps, s0)
                lin = torch.zeros(len(ps), device=fn.device)
                for i, (k, v) in enumerate(cols):
                    lin = lin + _column_terms(fn, c, start + i, ps, k, v)
                final = _last_row(fn, c, start, ps, s0, cols)
                exact = metric_rows(fn.logits(final)[:, None]) - c.metric
                flat[idx.cpu()] = (lin + exact.to(lin.device)).cpu().float()
            out.append(flat.reshape(T, heads) if node == "z" else flat)
    return out, metric_clean
