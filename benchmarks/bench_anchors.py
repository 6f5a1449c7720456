"""Thought-anchors resampling: forks of one prefill vs re-prefilling every rollout; adaptive stopping.

Measured in one run on tiny-thinker (1 torch thread by default):

  (a) ``mechthink.anchors.resampling_importance``: the trace is prefilled once, every prefix
      (before each sentence, and after the last) is a fork of that KV cache and ``N`` rollouts
      decode on it, the rollouts of all prefixes queued together on ``--batch`` slots
      (``generation.decode_from_prefixes``: all rows on one shared copy of the cache, each
      masked to its own prefix, ``models.shared_prefix``; a finished rollout's slot goes to the
      next queued one at once, which starts from its prefix's last logits: continuous
      batching); resampled sentences are compared with the original on a shared prefix too;
  (a0) forks as before the shared prefix: each prefix's rows on their own copies of it
      (``generation.fork_cache``), a prefix at a time, static batches;
  (b) the thought-anchors way: every rollout re-reads its prefix, on the same continuous
      batching as (a) (``generation._slot_loop``: the rollouts entering freed slots at a step
      re-read their prefixes in one left-padded forward, their keys / values go into their
      slots), and each resampled sentence's similarity re-reads prefix + sentence;
  (b1) (b) on static batches (``--batch`` left-padded rows at a time, finished rows leaving the
      batch once they are a quarter of it): what re-prefilling cost before continuous batching;

all on their fastest forwards here: the HF model's own (sdpa) wherever nothing is hooked (the
prefill, the similarity reads and every decode step of every way), the bridge otherwise;

on a ~``--tokens``-token trace and on an ordinary tiny-thinker trace (same seeds, same batch
size everywhere). Prints tokens processed (every position fed to the model, prefill padding
included) and wall time of each, the ratios to (a), whether the rollouts are token-identical and
the largest difference of the four importances (same seeds: expected 0). With full rollouts the token ratio is bounded by
``Σ_j N (p_j + L_j) / (T + Σ_j N L_j) ≈ 1 + mean(p) / mean(L)`` (prefix ``p_j``, rollout
length ``L_j``): about 2 when the sentences are spread evenly over a trace.

Adaptive stopping (:class:`mechthink.anchors.AdaptiveStopping`, default rule) is replayed on
full ``--adaptive-n`` runs of ``--adaptive-traces`` ordinary traces (exactly what a live adaptive
run draws, same seeds): rollouts saved and Spearman's rho of each importance against full N,
pooled over the sentences.

    python benchmarks/bench_anchors.py [--n 32] [--batch 32] [--tokens 300] [--adaptive-n 100] [--adaptive-traces 4]
"""

from __future__ import annotations

import argparse
import random
import time
import warnings

import torch


def _counter(model):
    """A forward pre-hook on the embedding counting every position fed to the model (marked
    row-independent, so the decode loop still drops finished rows under it)."""
    from mechthink.models.native import ROW_INDEPENDENT

    seen = {"tokens": 0}

    def pre(module, args, kwargs):
        ids = args[0] if args else kwargs.get("input_ids", kwargs.get("input"))
        if isinstance(ids, torch.Tensor) and not ids.is_floating_point():
            seen["tokens"] += ids.numel()

    setattr(pre, ROW_INDEPENDENT, True)
    return seen, model.bridge.embed.register_forward_pre_hook(pre, with_kwargs=True)


@torch.inference_mode()
def _reread_states(model, rows):
    """Last-block output at the last token of each row, one right-padded forward from scratch
    (the same forward as the resampler's own similarity read)."""
    width = max(len(r) for r in rows)
    x = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros_like(x)
    for i, r in enumerate(rows):
        x[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    from mechthink.anchors import _forward_reading_last_block

    # the forward the resampler's own similarity read uses (the HF model's when nothing else is hooked)
    _, _, h = _forward_reading_last_block(model, x, True, attention_mask=mask, **model.last_logits_kwargs())
    ends = torch.tensor([len(r) - 1 for r in rows])
    return h[torch.arange(len(rows)), ends].float()


def _copied_forks(fn):
    """``fn()`` with the forks' rows each on a copy of the prefix (``generation.fork_cache``, as
    before the shared prefix), for the decode steps and the similarity reads: what the
    shared-prefix attention saves."""
    import mechthink.anchors as A
    import mechthink.generation as G

    keep = G.config_supports_shared_prefix
    G.config_supports_shared_prefix = A.config_supports_shared_prefix = lambda config: False  # decode steps, similarity reads
    try:
        return fn()
    finally:
        G.config_supports_shared_prefix = A.config_supports_shared_prefix = keep


@torch.inference_mode()  # as the library's decode loop (else the bridge would run, recording gradients)
def reprefill_importance(model, trace, sents, n, batch, max_new_tokens, temperature, top_p, seed):
    """The thought-anchors way: each rollout re-reads its prefix; similarities re-read prefix + sentence."""
    from mechthink import anchors as A
    from mechthink import generation as G

    points = [s.token_start for s in sents] + [sents[-1].token_end]
    dec = G.Decoder.for_model(model)  # the HF model's own forward for the prefill and steps
    # every prefix's rows in one queue, ``batch`` at a time (left-padded, as decode() pads), each
    # row on its own generator: batches hold several prefixes' rows as the resampler's do
    queue = [(p, k) for p in points for k in range(n)]
    cfg = G.SamplingConfig(max_new_tokens, temperature, top_p, 0)
    done = []
    for c0 in range(0, len(queue), batch):
        part = queue[c0 : c0 + batch]
        x, mask = G.left_pad([trace.ids[:p] for p, _ in part], dec.pad_id)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, kv = dec.forward(x, mask, pos, None)
        gens = [G.row_generator(G.seed_for(seed, p), k) for p, k in part]
        done += G._sample_loop(dec, logits, kv, mask, pos[:, -1:], gens, cfg, drop_finished=True)
    return _assemble(model, trace, sents, points, n, done)


@torch.inference_mode()
def reprefill_continuous(model, trace, sents, n, batch, max_new_tokens, temperature, top_p, seed):
    """(b) with the continuous batching (a) has: the same slot loop (``generation._slot_loop``),
    but no shared prefix is read: the rollouts entering freed slots at a step re-read their
    prefixes first (one left-padded forward of just those rows, the HF model's own), and each
    row's keys / values of its prefix are put into its slot. Similarities as in (b)."""
    from mechthink import generation as G
    from mechthink.models.native import native_forward

    points = [s.token_start for s in sents] + [sents[-1].token_end]
    dec = G.Decoder.for_model(model)
    queue = [(p, k) for p in points for k in range(n)]
    cfg = G.SamplingConfig(max_new_tokens, temperature, top_p, 0)
    gens = [G.row_generator(G.seed_for(seed, p), k) for p, k in queue]
    _, shapes = native_forward(model.bridge, torch.tensor([trace.ids[:1]]))  # the slots' layout; never read

    def start(rows):
        x, mask = G.left_pad([trace.ids[: queue[r][0]] for r in rows], dec.pad_id)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, kv = dec.forward(x, mask, pos, None)
        w = x.shape[1]
        owns = [[(la.keys[i, :, w - queue[r][0]:], la.values[i, :, w - queue[r][0]:]) for la in kv.layers]
                for i, r in enumerate(rows)]
        return logits[:, -1].float(), [0] * len(rows), owns

    done = G._slot_loop(dec, shapes, len(queue), start, gens, cfg, batch, room=max(points) + max_new_tokens)
    return _assemble(model, trace, sents, points, n, done)


def _assemble(model, trace, sents, points, n, done):
    """Importances of (b)'s rollouts: similarities re-read prefix + resampled sentence."""
    from mechthink import anchors as A

    originals = _reread_states(model, [trace.ids[: s.token_end] for s in sents])
    rollouts = []
    for j, p in enumerate(points):
        conts = done[j * n : (j + 1) * n]
        firsts = [A.first_sentence(model, c.ids) for c in conts]
        sims = [float("nan")] * n
        if j < len(sents):
            orig = list(trace.ids[sents[j].token_start : sents[j].token_end])
            sims = [1.0 if list(c.ids[:k]) == orig else 0.0 for c, (_, k) in zip(conts, firsts)]
            todo = [r for r, (_, k) in enumerate(firsts) if k > 0 and sims[r] < 1.0]
            if todo:
                states = _reread_states(model, [list(trace.ids[:p]) + list(conts[r].ids[: firsts[r][1]]) for r in todo])
                cos = torch.nn.functional.cosine_similarity(states, originals[j][None], dim=-1).tolist()
                for r, v in zip(todo, cos):
                    sims[r] = v
        rollouts.append([A.Rollout(j, r, tuple(c.ids), A.rollout_answer(model.to_string(c.ids), c.finished),
                                   firsts[r][0], sims[r], c.finished) for r, c in enumerate(conts)])
    return A.importance_from_rollouts(sents, points, rollouts, str(trace.gold), n)


def _long_transcript(tokens: int):
    from mechthink.models.organism import TranscriptConfig, make_transcript

    for k in range(6, 40):
        tr = make_transcript(random.Random(f"bench-{k}"), TranscriptConfig(min_operands=k, max_operands=k, p_error=0.25))
        if len(tr.input_ids) >= tokens:
            return tr
    raise SystemExit(f"no transcript reaches {tokens} tokens")


def compare(model, trace, sents, label, args) -> None:
    from mechthink import anchors as A

    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    ways = (
        ("a: forks of one prefill", lambda: A.resampling_importance(model, trace, sents, n_rollouts=args.n,
                                                                    batch_size=args.batch, **kw)),
        ("a0: forks, copied, static", lambda: _copied_forks(lambda: A.resampling_importance(
            model, trace, sents, n_rollouts=args.n, batch_size=args.batch, **kw))),
        ("b: re-prefill every rollout", lambda: reprefill_continuous(model, trace, sents, args.n, args.batch, **kw)),
        ("b1: re-prefill, static batches", lambda: reprefill_importance(model, trace, sents, args.n, args.batch, **kw)),
    )
    runs = {}
    for name, fn in ways:
        if name.split(":")[0] not in args.ways.split(","):
            continue
        seen, handle = _counter(model)
        t0 = time.perf_counter()
        try:
            res = fn()
        finally:
            handle.remove()
        runs[name] = (res, seen["tokens"], time.perf_counter() - t0)
    got = {name.split(":")[0]: v for name, v in runs.items()}
    a, ta, sa = got["a"]
    lengths = [len(r.ids) for rs in a.rollouts for r in rs]
    print(f"\n{label}: {len(trace.ids)} tokens, {len(sents)} sentences, {len(a.points)} prefixes x {args.n} rollouts "
          f"(mean rollout {sum(lengths) / len(lengths):.0f} tokens, mean prefix {sum(a.points) / len(a.points):.0f})")
    for name, (_, tok, sec) in runs.items():
        print(f"  {name:30s} {tok:>10,d} tokens  {sec:8.2f} s")
    what = {"b": "re-prefilling, same continuous batching", "b1": "re-prefilling on static batches",
            "a0": "forks on a copy of the prefix per row, static batches"}
    for key, text in what.items():
        if key in got:
            x, tx, sx = got[key]
            same = [[r.ids for r in rs] for rs in a.rollouts] == [[r.ids for r in rs] for rs in x.rollouts]
            diff = max(float((a.metric(m) - x.metric(m)).abs().max()) for m in A.ResamplingImportance.METRICS)
            print(f"  {key}/a ({text}): tokens {tx / ta:.2f}x   wall time {sx / sa:.2f}x   rollouts identical: {same}   "
                  f"max |importance difference| = {diff:.2g}")


def adaptive(model, args) -> None:
    from mechthink import anchors as A
    from mechthink.models.organism import sample_transcripts
    from mechthink.stats import spearman

    full, again = [], []
    t0 = time.perf_counter()
    for k, tr in enumerate(sample_transcripts(args.adaptive_traces, seed="bench-adaptive")):
        o = A.organism_sentences(model, tr, id=f"a{k}")
        kw = dict(n_rollouts=args.adaptive_n, batch_size=args.batch, max_new_tokens=args.max_new_tokens,
                  temperature=args.temperature, top_p=args.top_p)
        full.append(A.resampling_importance(model, o.trace, o.sentences, seed=args.seed, **kw))
        again.append(A.resampling_importance(model, o.trace, o.sentences, seed=args.seed + 1, **kw))
    total = sum(r.rollouts_drawn for r in full)
    print(f"\nadaptive stopping on {len(full)} traces, {sum(len(r.sentences) for r in full)} sentences, "
          f"N = {args.adaptive_n} ({time.perf_counter() - t0:.0f} s for two full runs); Spearman rho pooled over sentences")
    metrics = A.ResamplingImportance.METRICS
    print(f"  {'rule':44s} {'fewer':>6s} " + " ".join(f"{m:>24s}" for m in metrics))

    def cat(rs, m):
        return torch.cat([r.metric(m) for r in rs])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a constant importance gives NaN
        print(f"  {'full N, other seed (the noise floor)':44s} {'':>6s} "
              + " ".join(f"{spearman(cat(again, m), cat(full, m)):>24.3f}" for m in metrics))
        for tol in [float(t) for t in args.tolerances.split(",")]:
            rule = A.AdaptiveStopping(tolerance=tol)
            replay = [A.replay_adaptive(r, rule) for r in full]
            fewer = 1 - sum(r.rollouts_drawn for r in replay) / total
            print(f"  {f'tolerance={tol}, min={rule.min_rollouts}, round={rule.round_size}':44s} {fewer:>6.1%} "
                  + " ".join(f"{spearman(cat(replay, m), cat(full, m)):>24.3f}" for m in metrics))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32, help="rollouts per prefix for the fork vs re-prefill comparison (0 = skip)")
    ap.add_argument("--batch", type=int, default=32, help="rollouts decoded together")
    ap.add_argument("--tokens", type=int, default=300, help="length of the long trace")
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--adaptive-n", type=int, default=100, help="full N for the adaptive-stopping replay (0 = skip)")
    ap.add_argument("--adaptive-traces", type=int, default=4)
    ap.add_argument("--tolerances", default="0.1,0.08,0.07,0.06,0.05,0.03", help="adaptive tolerances replayed")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = leave as is)")
    ap.add_argument("--model", default="tiny-thinker", help="tiny-thinker (organism traces) or a registry model "
                    "(its own greedy GSM8K traces; no adaptive replay)")
    ap.add_argument("--ways", default="a,a0,b,b1", help="which ways to run (a is always needed)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import mechthink as mt
    from mechthink.models.organism import sample_transcripts

    from mechthink import anchors as A
    from mechthink.models.organism import is_organism

    model = mt.load_model(args.model)
    if args.n and is_organism(model):
        o = A.organism_sentences(model, _long_transcript(args.tokens), id="long")
        compare(model, o.trace, o.sentences, f"~{args.tokens}-token trace", args)
        ordinary = next(t for t in sample_transcripts(20, seed="bench") if any(s.is_error for s in t.steps))
        o = A.organism_sentences(model, ordinary, id="ordinary")
        compare(model, o.trace, o.sentences, "ordinary trace", args)
    elif args.n:  # a real model: the longest of a few greedy GSM8K traces of up to --tokens new tokens
        t = max(A.anchor_traces(model, 4, max_new_tokens=args.tokens), key=lambda t: len(t.trace.ids))
        compare(model, t.trace, t.sentences, f"{args.model} GSM8K trace", args)
    if args.adaptive_n and is_organism(model):
        adaptive(model, args)


if __name__ == "__main__":
    main()
