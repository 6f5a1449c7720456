"""AtP* style QK-fix estimators for resid_pre mean-ablation on tiny-thinker (float64 functional Llama).

Variants (score = metric(patched) - metric(clean), node (L,p): resid_pre_L[p] -> mean_L):
  atp   : plain AtP  g_resid_pre_L[p] . (mu_L - r_L[p])
  v1    : exact block-L attention (row p + column p), linear after:  g_mid_L . (dO_L + delta e_p)
  v2a   : exact column-p attention change in every layer l>=L, p's stream shifted by delta (skip only);
          linear in the effect on the other positions; p == T-1 exact stream
  v2b   : same but p's own stream computed exactly (causality: positions < p are unchanged, so the
          patched stream of p is exact given the clean K/V of earlier positions)
  v3    : v2b, but the last position's stream (the metric's) is also run exactly given the column-p
          changes at every layer (v3_scores); only intermediate positions p<q<T-1 stay linear.
Run: python experiments/atp_qkfix/run.py (all variants vs exact on six examples).
"""
import math
import time

import torch

torch.set_num_threads(1)
DT = torch.float64


class Fn:
    def __init__(self, model):
        hf = model.bridge.original_model
        sd = {k: v.detach().to(DT) for k, v in hf.state_dict().items()}
        self.nL = hf.config.num_hidden_layers
        self.H = hf.config.num_attention_heads
        self.dh = hf.config.head_dim
        self.eps = hf.config.rms_norm_eps
        assert hf.config.num_key_value_heads == self.H
        self.emb = sd["model.embed_tokens._original_component.weight"]
        g = lambda l, n: sd[f"model.layers.{l}.{n}._original_component.weight"]
        self.W = []
        for l in range(self.nL):
            self.W.append(dict(
                ln1=g(l, "ln1"), ln2=g(l, "ln2"),
                q=g(l, "attn.q"), k=g(l, "attn.k"), v=g(l, "attn.v"), o=g(l, "attn.o"),
                gate=g(l, "mlp.gate"), up=g(l, "mlp.in"), down=g(l, "mlp.out")))
        self.lnf = sd["model.norm._original_component.weight"] if "model.norm._original_component.weight" in sd else None
        self.U = sd["lm_head._original_component.weight"]
        self.Ub = sd["lm_head._original_component.bias"]
        theta = hf.config.rope_parameters["rope_theta"] if hasattr(hf.config, "rope_parameters") else hf.config.rope_theta
        self.inv = 1.0 / (theta ** (torch.arange(0, self.dh, 2, dtype=DT) / self.dh))

    def rope(self, T):
        f = torch.arange(T, dtype=DT)[:, None] * self.inv[None]
        e = torch.cat([f, f], -1)
        return e.cos(), e.sin()  # [T, dh]

    def rms(self, x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * w

    @staticmethod
    def rot(x, cos, sin):  # x [..., T, dh]
        h = x.shape[-1] // 2
        rh = torch.cat([-x[..., h:], x[..., :h]], -1)
        return x * cos + rh * sin

    def qkv(self, l, r, cos, sin):
        """r [..., T, d] -> q,k,v [..., H, T, dh] (q,k rotated with cos/sin [T, dh])."""
        W = self.W[l]
        x = self.rms(r, W["ln1"])
        sh = x.shape[:-1] + (self.H, self.dh)
        q = (x @ W["q"].T).reshape(sh).transpose(-2, -3)
        k = (x @ W["k"].T).reshape(sh).transpose(-2, -3)
        v = (x @ W["v"].T).reshape(sh).transpose(-2, -3)
        return self.rot(q, cos, sin), self.rot(k, cos, sin), v

    def mlp(self, l, m):
        W = self.W[l]
        x = self.rms(m, W["ln2"])
        return (torch.nn.functional.silu(x @ W["gate"].T) * (x @ W["up"].T)) @ W["down"].T

    def unembed(self, r):
        x = self.rms(r, self.lnf) if self.lnf is not None else self.rms(r, 1.0)
        return x @ self.U.T + self.Ub

    def forward(self, r, L0=0, keep=None):
        """r: resid_pre at layer L0, [B, T, d]; returns logits; keep: dict to store intermediates."""
        B, T, d = r.shape
        cos, sin = self.rope(T)
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        for l in range(L0, self.nL):
            if keep is not None:
                keep[("r", l)] = r
            q, k, v = self.qkv(l, r, cos, sin)
            s = q @ k.transpose(-1, -2) / math.sqrt(self.dh)
            s = s.masked_fill(~mask, float("-inf"))
            a = s.softmax(-1)
            z = a @ v  # [B,H,T,dh]
            if keep is not None:
                z.retain_grad() if z.requires_grad else None
                keep.update({("q", l): q, ("k", l): k, ("v", l): v, ("a", l): a, ("z", l): z})
            o = z.transpose(1, 2).reshape(B, T, d) @ self.W[l]["o"].T
            m = r + o
            if keep is not None:
                keep[("m", l)] = m
            r = m + self.mlp(l, m)
        if keep is not None:
            keep["final"] = r
        return self.unembed(r)


def spearman(a, b):
    a = torch.as_tensor(a).flatten().double(); b = torch.as_tensor(b).flatten().double()
    ra = a.argsort().argsort().double(); rb = b.argsort().argsort().double()
    ra -= ra.mean(); rb -= rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def embed(fn, ids):
    return fn.emb[ids][None]


def exact_scores(fn, ids, mu, tid, bs=256):
    """Exact resid_pre mean-patching scores [nL, T] with the functional model."""
    T = len(ids)
    keep = {}
    with torch.no_grad():
        base = fn.forward(embed(fn, ids), 0, keep)[0, -1, tid]
        out = torch.zeros(fn.nL, T, dtype=DT)
        for L in range(fn.nL):
            r = keep[("r", L)][0]
            R = r.expand(T, T, -1).clone()
            R[torch.arange(T), torch.arange(T)] = mu[L]
            for c in range(0, T, bs):
                out[L, c:c + bs] = fn.forward(R[c:c + bs], L)[:, -1, tid] - base
    return out


def clean_grads(fn, ids, tid):
    """One forward+backward: clean cache and gradients wrt r_l, m_l, z_l."""
    keep = {}
    r0 = embed(fn, ids).clone().requires_grad_(True)
    # make every r_l, m_l, z_l a leaf-ish node we can take grads of
    logits = fn.forward(r0, 0, keep)
    met = logits[0, -1, tid]
    names = [(t, l) for t in ("r", "m", "z") for l in range(fn.nL)]
    gs = torch.autograd.grad(met, [keep[n] for n in names])
    G = {n: g[0].detach() for n, g in zip(names, gs)}
    C = {k: (v[0].detach() if torch.is_tensor(v) else v) for k, v in keep.items()}
    return float(met.detach()), C, G


def stream_p(fn, C, L, s, cos, sin, exact=True):
    """Patched stream of every p at once (row p of s = patched resid_pre_L[p], [T, d]).

    Returns per layer l>=L: new rotated k_l[p], v_l[p] ([H, T(p), dh]), the stream s_l (resid_pre) and
    the row-p attention-output O'_l[p]; and final stream.  exact=False: s_l = r_l[p] + delta (skip only).
    """
    T = s.shape[0]
    delta = s - C[("r", L)]
    idx = torch.arange(T)
    mask = torch.ones(T, T, dtype=torch.bool).tril()  # [p, j] j<=p
    out = []
    for l in range(L, fn.nL):
        if not exact:
            s = C[("r", l)] + delta
        q, k, v = fn.qkv(l, s, cos, sin)  # [H, T(p), dh], position p's own rope
        K, V = C[("k", l)], C[("v", l)]  # [H, T, dh]
        sc = torch.einsum("hpd,hjd->hpj", q, K) / math.sqrt(fn.dh)
        sc[:, idx, idx] = (q * k).sum(-1) / math.sqrt(fn.dh)
        sc = sc.masked_fill(~mask, float("-inf"))
        a = sc.softmax(-1)  # [H, p, j]
        z = torch.einsum("hpj,hjd->hpd", a, V) + a[:, idx, idx][..., None] * (v - V)
        o = z.transpose(0, 1).reshape(T, -1) @ fn.W[l]["o"].T
        out.append(dict(k=k, v=v, s=s, o=o))
        m = s + o
        s = m + fn.mlp(l, m)
    return out, s


def column_term(fn, C, G, l, kn, vn):
    """sum_{q>p} gz_l[q] . (z'_q - z_q) when only key/value column p changes to kn[:,p], vn[:,p]. -> [T(p)]"""
    Q, K, V, A, Z = (C[(t, l)] for t in ("q", "k", "v", "a", "z"))  # [H,T,*]
    gz = G[("z", l)]  # [H, T, dh]
    T = Q.shape[1]
    ds = (torch.einsum("hqd,hpd->hqp", Q, kn) - torch.einsum("hqd,hpd->hqp", Q, K)) / math.sqrt(fn.dh)
    a = A  # a[h,q,p]
    e = ds.exp()
    denom = 1 - a + a * e
    gv_new = torch.einsum("hqd,hpd->hqp", gz, vn)
    gv_old = torch.einsum("hqd,hpd->hqp", gz, V)
    gzz = (gz * Z).sum(-1)[:, :, None]
    contrib = a * (e * gv_new - gv_old - (e - 1) * gzz) / denom  # [H,q,p]
    strict = torch.ones(T, T, dtype=torch.bool).tril(-1)  # q > p
    contrib = contrib.masked_fill(~strict[None], 0.0)
    return contrib.sum((0, 1))


def estimators(fn, ids, mu, tid):
    T = len(ids)
    cos, sin = fn.rope(T)
    t0 = time.perf_counter()
    m0, C, G = clean_grads(fn, ids, tid)
    t_grad = time.perf_counter() - t0
    res = {k: torch.zeros(fn.nL, T, dtype=DT) for k in ("atp", "v1", "v2a", "v2b")}
    times = {"atp": t_grad, "v1": t_grad, "v2a": t_grad, "v2b": t_grad}
    with torch.no_grad():
        for L in range(fn.nL):
            r = C[("r", L)]
            delta = mu[L][None] - r
            res["atp"][L] = (G[("r", L)] * delta).sum(-1)
            # v1
            t1 = time.perf_counter()
            st, _ = stream_p(fn, C, L, r + delta, cos, sin, exact=True)
            first = st[0]
            col = column_term(fn, C, G, L, first["k"], first["v"])
            rowp = (G[("m", L)] * (first["o"] - C_o(fn, C, L) + delta)).sum(-1)
            res["v1"][L] = col + rowp
            times["v1"] += time.perf_counter() - t1
            for key, ex in (("v2b", True), ("v2a", False)):
                t1 = time.perf_counter()
                st, fin = stream_p(fn, C, L, r + delta, cos, sin, exact=ex)
                tot = sum(column_term(fn, C, G, L + i, d["k"], d["v"]) for i, d in enumerate(st))
                if ex:
                    last_fin = fin[-1]
                else:
                    st2, fin2 = stream_p(fn, C, L, r + delta, cos, sin, exact=True)
                    last_fin = fin2[-1]
                tot[-1] = fn.unembed(last_fin)[tid] - m0
                res[key][L] = tot
                times[key] += time.perf_counter() - t1
    return m0, res, times, C, G


def C_o(fn, C, L):
    Z = C[("z", L)]  # [H,T,dh]
    return Z.transpose(0, 1).reshape(Z.shape[1], -1) @ fn.W[L]["o"].T


def last_row_exact(fn, C, L, st, cos, sin, tid, m0):
    """For each p (rows), run the LAST position's stream from layer L exactly, with only the key/value
    column p of each layer l>=L replaced by the patched-stream k'_l[p], v'_l[p]; other keys/values clean.
    Returns [T(p)] metric change (for p = T-1 this is the exact stream anyway)."""
    T = st[0]["s"].shape[0]
    t = T - 1
    s = C[("r", L)][t].expand(T, -1).clone()  # [p, d] last-position stream, one copy per p
    idx = torch.arange(T)
    s[t] = st[0]["s"][t]  # p == T-1: patched
    for i, l in enumerate(range(L, fn.nL)):
        q, k, v = fn.qkv(l, s[:, None, :], cos[t:t + 1], sin[t:t + 1])  # [p, H, 1, dh]
        q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]  # [p, H, dh]
        K = C[("k", l)].permute(1, 0, 2).expand(T, -1, -1, -1).clone()  # [p, j, H, dh]
        V = C[("v", l)].permute(1, 0, 2).expand(T, -1, -1, -1).clone()
        K[idx, idx] = st[i]["k"].permute(1, 0, 2)  # column p replaced
        V[idx, idx] = st[i]["v"].permute(1, 0, 2)
        K[t, t] = k[t]; V[t, t] = v[t]  # p==T-1: its own (patched) key is the row's key anyway
        sc = torch.einsum("phd,pjhd->phj", q, K) / math.sqrt(fn.dh)
        a = sc.softmax(-1)
        z = torch.einsum("phj,pjhd->phd", a, V)
        o = z.reshape(T, -1) @ fn.W[l]["o"].T
        m = s + o
        s = m + fn.mlp(l, m)
    return fn.unembed(s)[:, tid] - m0


def column_term_q(fn, C, G, l, kn, vn):
    """Like column_term but returns [H, q, p] contributions (q>p), for excluding q = T-1."""
    Q, K, V, A, Z = (C[(t, l)] for t in ("q", "k", "v", "a", "z"))
    gz = G[("z", l)]
    T = Q.shape[1]
    ds = (torch.einsum("hqd,hpd->hqp", Q, kn) - torch.einsum("hqd,hpd->hqp", Q, K)) / math.sqrt(fn.dh)
    a = A; e = ds.exp(); denom = 1 - a + a * e
    contrib = a * (e * torch.einsum("hqd,hpd->hqp", gz, vn) - torch.einsum("hqd,hpd->hqp", gz, V)
                   - (e - 1) * (gz * Z).sum(-1)[:, :, None]) / denom
    strict = torch.ones(T, T, dtype=torch.bool).tril(-1)
    return contrib.masked_fill(~strict[None], 0.0)


def v3_scores(fn, ids, mu, tid, C=None, G=None, m0=None):
    """v3 = v2b with the last position's stream computed exactly (column-p changes only),
    intermediate positions p<q<T-1 linear."""
    T = len(ids)
    cos, sin = fn.rope(T)
    if C is None:
        m0, C, G = clean_grads(fn, ids, tid)
    out = torch.zeros(fn.nL, T, dtype=DT)
    with torch.no_grad():
        for L in range(fn.nL):
            st, fin = stream_p(fn, C, L, mu[L][None].expand(T, -1).clone(), cos, sin, exact=True)
            lin = sum(column_term_q(fn, C, G, L + i, d["k"], d["v"])[:, :T - 1].sum((0, 1)) for i, d in enumerate(st))
            out[L] = lin + last_row_exact(fn, C, L, st, cos, sin, tid, m0)
    return out
