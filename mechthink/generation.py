"""The one decode loop: left-padded, KV-cached incremental decoding with per-row seeded sampling.

Every generation in mechthink runs through :func:`decode`: one left-padded prefill (attention
mask, position ids from the mask's cumulative sum), then one token per step on Hugging Face's
``DynamicCache``, greedy or temperature + nucleus (top-p) sampling (Holtzman et al. 2020). Row
``i`` of a call samples from its own ``torch.Generator`` seeded from ``(seed, index)``, so a
row's draw does not depend on the batch it runs in, and two calls with the same seed are paired
(they differ only where an intervention changes the logits). The loop only needs a forward
function, so it drives the TransformerBridge (:meth:`Decoder.for_model`; every active hook
applies) and a plain Hugging Face model (:meth:`Decoder.for_hf`) alike.

:func:`decode_from_cache` continues one prefix many times from its KV cache (a fork per batch, the
prefix is never re-read) with the same loop and the same per-row seeding.

:class:`StreamTracker` follows that token stream from inside the bridge's forward calls (the
interventions and steering hooks use it to know which column is a prompt token and which a
generated one); :func:`continue_prefixes` continues raw token prefixes.

This module depends on torch, einops and :mod:`mechthink.models.kvcache` only, so the model packages
(the organism's evaluator) can use it too.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
from collections import deque
from collections.abc import Callable, Iterator, Sequence
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechthink.models.fast_attention import fast_attention
from mechthink.models.kvcache import cache_from_kwargs, reserve_cache
from mechthink.models.native import native_blockers, native_forward, rows_can_be_dropped, steady_hooks
from mechthink.models.shared_prefix import (
    SharedPrefixCache,
    attending,
    config_supports_shared_prefix,
    supports_shared_prefix,
)

if TYPE_CHECKING:
    from mechthink.models.thinking_model import ThinkingModel

__all__ = [
    "Continuation",
    "Decoder",
    "ForwardFn",
    "SamplingConfig",
    "StreamTracker",
    "continue_greedy",
    "continue_prefixes",
    "decode",
    "decode_batches",
    "decode_from_cache",
    "fork_cache",
    "left_pad",
    "row_generator",
    "sample_token",
    "sample_tokens",
    "seed_for",
]

log = logging.getLogger(__name__)

#: ``forward(input_ids, attention_mask, position_ids, cache) -> (logits, cache)``; ``cache`` is
#: None on the prefill; ``attention_mask`` is None on a slot cache (``SharedPrefixCache(...,
#: slots=True)``, whose rows carry their own lengths; only decoders that ``shares_prefix`` get one).
ForwardFn = Callable[[Tensor, Tensor | None, Tensor, Any], tuple[Tensor, Any]]


# ============================================================================ configuration
@dataclass(frozen=True)
class SamplingConfig:
    """How tokens are chosen.

    Attributes:
        max_new_tokens: Generation budget per row.
        temperature: 0 for greedy decoding, else the softmax temperature.
        top_p: Nucleus threshold for sampling (1.0 = no truncation).
        seed: Sampling seed; row ``index``'s generator is seeded from ``(seed, index)``.
    """

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        if not (self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")


class Continuation(NamedTuple):
    """The new tokens of one row and why decoding stopped (``"eos"`` or ``"length"``)."""

    ids: list[int]
    finished: str


# ============================================================================ seeded sampling
def seed_for(seed: int, index: int) -> int:
    """A 63-bit seed from ``(seed, index)`` (FNV-1a over both), stable across runs and platforms."""
    h = 1469598103934665603
    for v in (int(seed), int(index)):
        for b in v.to_bytes(8, "little", signed=True):
            h = ((h ^ b) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def row_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator row ``index`` samples from (seeded with :func:`seed_for`)."""
    return torch.Generator().manual_seed(seed_for(seed, index))


def sample_token(
    logits: Float[Tensor, " d_vocab"], temperature: float, top_p: float, generator: torch.Generator
) -> int:
    """One token from ``logits`` by temperature + top-p sampling, drawing from ``generator``.

    The nucleus keeps the most likely tokens (ties in index order) until their mass reaches
    ``top_p`` (always the first); one uniform draw from ``generator`` picks from its CDF, so the
    draw is the same on any device.
    """
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    sorted_p, order = torch.sort(probs, descending=True, stable=True)
    if top_p < 1.0:
        cum = sorted_p.cumsum(-1)
        keep = (cum - sorted_p) < top_p
        keep[0] = True
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
    cdf = sorted_p.cumsum(-1)
    u = torch.rand((), generator=generator, dtype=torch.float64).to(cdf.device) * cdf[-1]
    k = int(torch.searchsorted(cdf, u.reshape(1), right=True).clamp(max=len(cdf) - 1))
    return int(order[k])


def sample_tokens(
    logits: Float[Tensor, "row d_vocab"], temperature: float, top_p: float, generators: Sequence[torch.Generator]
) -> list[int]:
    """:func:`sample_token` of every row at once (row ``i`` draws from ``generators[i]``): the
    same tokens, the per-row work done as one batched softmax / sort / cumulative sum."""
    if logits.ndim != 2 or logits.shape[0] != len(generators):
        raise ValueError(f"sample_tokens: logits must be [rows, d_vocab] with one generator per row, got "
                         f"{tuple(logits.shape)} and {len(generators)} generators")
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    if top_p < 1.0:
        cum = sorted_p.cumsum(-1)
        keep = (cum - sorted_p) < top_p
        keep[:, 0] = True
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
    cdf = sorted_p.cumsum(-1)
    u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators]).to(cdf.device)
    k = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp(max=cdf.shape[-1] - 1)
    return order.gather(1, k)[:, 0].tolist()


# ============================================================================ models
def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Left-pad token lists into ``(input_ids, attention_mask)`` (CPU tensors)."""
    if not rows:
        raise ValueError("left_pad: rows must hold at least one token list")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor([int(t) for t in r], dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids, mask


def _parameters(fn: Any) -> set[str]:
    """Names of ``fn``'s parameters (empty where they cannot be read)."""
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def _keep_last(forward: Any) -> dict[str, Any]:
    """``{"logits_to_keep": 1}`` where ``forward`` takes it (the prefill then unembeds one position)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in _parameters(forward) else {}


def _never() -> bool:
    return False


@dataclass(frozen=True)
class Decoder:
    """What the decode loop needs from a model.

    Attributes:
        forward: A :data:`ForwardFn`.
        eos_ids: Tokens that end a row (kept in its output).
        pad_id: Token fed at padded columns and for finished rows (always masked).
        device: Where the inputs go.
        rows_droppable: Whether finished rows may leave the batch now (no hook could notice;
            :func:`mechthink.models.native.rows_can_be_dropped`); asked only by loops called
            with ``drop_finished=True``.
        shares_prefix: Whether ``forward`` can take a
            :class:`mechthink.models.shared_prefix.SharedPrefixCache` now (the rows of a fork
            attend to one copy of the prefix; :func:`decode_from_cache` asks).
    """

    forward: ForwardFn
    eos_ids: frozenset[int]
    pad_id: int
    device: torch.device
    rows_droppable: Callable[[], bool] = _never
    shares_prefix: Callable[[], bool] = _never

    @classmethod
    def for_model(cls, model: "ThinkingModel") -> "Decoder":
        """Decode through ``model.bridge`` (every hook active around the call applies)."""
        eos = set(model.eos_token_ids)
        pad = model.tokenizer.pad_token_id
        if pad is None:
            pad = next(iter(eos)) if eos else 0
        bridge, prefill_kw = model.bridge, model.last_logits_kwargs()

        def forward(x: Tensor, mask: Tensor | None, pos: Tensor, kv: Any) -> tuple[Tensor, Any]:
            # nothing hooked: the HF model's own forward (same weights, no wrappers), prefill and steps
            extra = prefill_kw if kv is None else {"past_key_values": kv}
            out = native_forward(bridge, x, attention_mask=mask, position_ids=pos, **extra)
            if out is not None:
                return out
            if kv is None:  # a hooked prefill: a long prompt runs on the fused kernel (no [pos, pos] scores)
                with fast_attention(model):
                    return bridge(x, return_type="logits_and_cache", attention_mask=mask, position_ids=pos, **prefill_kw)
            return bridge(x, return_type="logits_and_cache", attention_mask=mask, position_ids=pos, past_key_values=kv)

        def shares() -> bool:
            return config_supports_shared_prefix(bridge.original_model.config) and not native_blockers(bridge)

        return cls(forward, frozenset(eos), int(pad), model.device, lambda: rows_can_be_dropped(bridge), shares)

    @classmethod
    def for_hf(cls, hf_model: Any, tokenizer: Any) -> "Decoder":
        """Decode a plain Hugging Face causal LM (stops at ``tokenizer.eos_token_id``)."""
        prefill_kw = _keep_last(hf_model.forward)
        # transformers 5.24 takes and returns the cache as ``cache`` (``past_key_values`` before)
        name = "cache" if "cache" in _parameters(hf_model.forward) else "past_key_values"

        def forward(x: Tensor, mask: Tensor | None, pos: Tensor, kv: Any) -> tuple[Tensor, Any]:
            extra = prefill_kw if kv is None else {name: kv}
            shared = isinstance(kv, SharedPrefixCache)
            if shared:
                kv.check_mask(mask)
            with attending(hf_model, kv) if shared else contextlib.nullcontext():
                out = hf_model(input_ids=x, attention_mask=mask, position_ids=pos, use_cache=True, **extra)
            return out.logits, getattr(out, name)

        device = next(hf_model.parameters()).device
        return cls(forward, frozenset({int(tokenizer.eos_token_id)}), int(tokenizer.pad_token_id), device,
                   lambda: rows_can_be_dropped(hf_model), lambda: supports_shared_prefix(hf_model))


# ============================================================================ the loop
@torch.inference_mode()
def _decode_rows(
    decoder: Decoder, rows: list[list[int]], cfg: SamplingConfig, indices: Sequence[int], drop_finished: bool = False
) -> list[Continuation]:
    """Left-padded incremental decoding of one batch."""
    x, mask = left_pad(rows, decoder.pad_id)
    x, mask = x.to(decoder.device), mask.to(decoder.device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits, kv = decoder.forward(x, mask, pos, None)
    return _sample_loop(decoder, logits, kv, mask, pos[:, -1:], _generators(cfg, indices), cfg, drop_finished)


def _generators(cfg: SamplingConfig, indices: Sequence[int]) -> list[torch.Generator | None]:
    """Row ``i``'s generator for each index (None for greedy decoding)."""
    return [row_generator(cfg.seed, i) for i in indices] if cfg.temperature > 0 else [None] * len(indices)


def _sample_loop(
    decoder: Decoder,
    logits: Float[Tensor, "batch logit_pos d_vocab"],
    kv: Any,
    mask: Int[Tensor, "batch pos"],
    last_pos: Int[Tensor, "batch 1"],
    gens: Sequence[torch.Generator | None],
    cfg: SamplingConfig,
    drop_finished: bool = False,
) -> list[Continuation]:
    """The steps after a prefill: sample from ``logits[:, -1]``, feed the tokens back on ``kv``.

    With ``drop_finished`` (and ``decoder.rows_droppable()`` true), finished rows leave the batch
    (``kv.batch_select_indices``) once they are a quarter of it, instead of being fed padding to
    the end: the other rows' tokens are the same (each row has its own generator), only fewer
    positions are fed.
    """
    n = int(mask.shape[0])
    # steps write into spare room of the cache instead of concatenating (same values, no O(T) copy per step)
    reserve_cache(kv, max(0, cfg.max_new_tokens - 1))
    out: list[list[int]] = [[] for _ in range(n)]
    reason: list[str | None] = [None] * n
    rows = list(range(n))  # the row of ``out`` each batch position decodes
    with steady_hooks():  # the bridge's hooks scanned once per loop, not once per step, while none changes
        return _steps(decoder, logits, kv, mask, last_pos, gens, cfg, drop_finished, out, reason, rows)


def _steps(decoder: Decoder, logits: Tensor, kv: Any, mask: Tensor, last_pos: Tensor, gens: Sequence[torch.Generator | None],
           cfg: SamplingConfig, drop_finished: bool, out: list[list[int]], reason: list[str | None], rows: list[int]
           ) -> list[Continuation]:
    """The body of :func:`_sample_loop`."""
    device, eos, pad = decoder.device, decoder.eos_ids, decoder.pad_id
    for step in range(cfg.max_new_tokens):
        nxt = [pad] * len(rows)
        last = logits[:, -1].float()
        live = [j for j, i in enumerate(rows) if reason[i] is None]
        for j, t in zip(live, _pick(last[live], [gens[rows[j]] for j in live], cfg)):
            nxt[j] = t
        for j in live:
            i, t = rows[j], nxt[j]
            out[i].append(t)
            if t in eos:
                reason[i] = "eos"
        if all(r is not None for r in reason) or step == cfg.max_new_tokens - 1:
            break
        # finished rows leave once they are a quarter of the batch: each drop copies the KV
        # cache, so the copies add up to a few caches' worth whatever the batch size
        keep = [j for j, i in enumerate(rows) if reason[i] is None] if drop_finished else []
        if drop_finished and len(rows) - len(keep) >= max(1, len(rows) // 4) and decoder.rows_droppable():
            sel = torch.tensor(keep, dtype=torch.long, device=device)
            kv.batch_select_indices(sel)
            mask, last_pos = mask[sel], last_pos[sel]
            nxt, rows = [nxt[j] for j in keep], [rows[j] for j in keep]
        mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=torch.long, device=device)], dim=1)
        last_pos = last_pos + 1
        logits, kv = decoder.forward(torch.tensor(nxt, dtype=torch.long, device=device)[:, None], mask, last_pos, kv)
    return [Continuation(o, r or "length") for o, r in zip(out, reason)]


def decode_batches(
    decoder: Decoder,
    rows: Sequence[Sequence[int]],
    cfg: SamplingConfig,
    batch_size: int,
    indices: Sequence[int] | None = None,
    drop_finished: bool = False,
) -> Iterator[tuple[list[int], list[Continuation]]]:
    """Decode ``rows`` ``batch_size`` at a time, yielding ``(indices of the batch, continuations)``.

    Args:
        decoder: The model to decode.
        rows: Prompts as token id lists.
        cfg: Budget and sampling.
        batch_size: Rows decoded together.
        indices: The index each row's generator is seeded with (default ``0..len(rows)-1``).
        drop_finished: Finished rows leave the batch where no hook could notice (same tokens,
            fewer positions fed; see :func:`_sample_loop`).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    idx = list(range(len(rows))) if indices is None else [int(i) for i in indices]
    if len(idx) != len(rows):
        raise ValueError(f"indices: {len(idx)} given for {len(rows)} rows")
    cleaned = [[int(t) for t in r] for r in rows]
    for k in range(0, len(cleaned), batch_size):
        yield idx[k : k + batch_size], _decode_rows(decoder, cleaned[k : k + batch_size], cfg, idx[k : k + batch_size],
                                                    drop_finished)


def decode(
    decoder: Decoder,
    rows: Sequence[Sequence[int]],
    cfg: SamplingConfig,
    batch_size: int = 32,
    indices: Sequence[int] | None = None,
    drop_finished: bool = False,
) -> list[Continuation]:
    """Continuations of every row of ``rows`` (see :func:`decode_batches`), in order."""
    return [c for _, batch in decode_batches(decoder, rows, cfg, batch_size, indices, drop_finished) for c in batch]


def fork_cache(cache: Any, n_rows: int, length: int | None = None) -> Any:
    """A copy of a batch-1 KV cache cut to its first ``length`` positions, repeated ``n_rows`` times.

    The copy is ``copy.deepcopy`` + ``crop`` + ``batch_repeat_interleave`` (Hugging Face's
    ``DynamicCache`` API); ``cache`` itself is left as it was.
    """
    if isinstance(n_rows, bool) or not isinstance(n_rows, int) or n_rows < 1:
        raise ValueError(f"n_rows must be a positive int, got {n_rows!r}")
    have = int(cache.get_seq_length())
    if length is not None and not 1 <= length <= have:
        raise ValueError(f"length={length!r} is outside the cache's 1..{have} positions")
    fork = copy.deepcopy(cache)
    if length is not None and length < have:
        fork.crop(int(length) - have)  # transformers 5.x crops by a negative count
    if n_rows > 1:
        fork.batch_repeat_interleave(n_rows)
    return fork


@torch.inference_mode()
def decode_from_cache(
    decoder: Decoder,
    cache: Any,
    last_logits: Float[Tensor, " d_vocab"],
    cfg: SamplingConfig,
    indices: Sequence[int],
    batch_size: int = 32,
    length: int | None = None,
    drop_finished: bool = False,
    share_prefix: bool | None = None,
) -> list[Continuation]:
    """Continue one cached prefix once per index, without re-reading the prefix.

    ``cache`` holds the prefix (batch 1; only its first ``length`` positions are used, default
    all) and ``last_logits`` are the logits at the prefix's last position. Each batch of
    ``batch_size`` rows decodes on its own :func:`fork_cache` of it with the loop of
    :func:`decode`, row ``indices[i]`` sampling from its generator seeded with
    ``(cfg.seed, indices[i])``: the continuations are those :func:`decode` gives for
    ``[prefix] * len(indices)`` with the same ``indices`` (same tokens, up to the float
    differences of a cached vs a fresh prefill), whatever the batch size.

    Args:
        decoder: The model to decode (``Decoder.for_model`` for the bridge).
        cache: The prefix's KV cache (batch 1), left unchanged.
        last_logits: Logits at the prefix's last position.
        cfg: Budget and sampling.
        indices: One index per continuation (seeds its generator).
        batch_size: Rows decoded together.
        length: Prefix length to continue from (a cache of a longer sequence is cut).
        drop_finished: Finished rows leave the batch where no hook could notice (same tokens,
            fewer positions fed; see :func:`_sample_loop`); on a shared prefix the next index
            takes a finished row's place at once (continuous batching, :func:`_slot_loop`).
        share_prefix: The rows of a batch attend to one copy of the prefix
            (:class:`mechthink.models.shared_prefix.SharedPrefixCache`: no per-row copy of it in
            memory, one read of it per step for all rows) instead of each to its own
            :func:`fork_cache` copy. Default: where ``decoder.shares_prefix()`` (the HF model's
            own forward, nothing hooked, full attention); ``True`` where it cannot is an error.
            Same attention either way, to float rounding.

    Returns:
        One :class:`Continuation` per index, in order.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    idx = [int(i) for i in indices]
    if not idx:
        raise ValueError("indices must hold at least one index")
    if last_logits.ndim != 1:
        raise ValueError(f"last_logits must be 1-d (one position's logits), got shape {tuple(last_logits.shape)}")
    n_pos = int(cache.get_seq_length()) if length is None else int(length)
    can = decoder.shares_prefix()
    if share_prefix and not can:
        raise ValueError("share_prefix=True: this decoder cannot attend to a shared prefix now (a hook is attached, "
                         "or the model has sliding-window / soft-capped attention); pass share_prefix=None or False")
    share = can if share_prefix is None else bool(share_prefix)
    if share and drop_finished and decoder.rows_droppable():  # a finished row's slot goes to the next index at once
        first = last_logits.to(decoder.device).float()

        def start(rows: list[int]) -> tuple[Tensor, list[int], None]:
            return einops.repeat(first, "v -> k v", k=len(rows)), [n_pos] * len(rows), None

        return _slot_loop(decoder, cache, len(idx), start, _generators(cfg, idx), cfg, batch_size)
    out: list[Continuation] = []
    for k in range(0, len(idx), batch_size):
        rows = idx[k : k + batch_size]
        n = len(rows)
        kv = (SharedPrefixCache(cache, n, n_pos, room=min(max(cfg.max_new_tokens, 1), 256)) if share
              else fork_cache(cache, n, n_pos))
        mask = torch.ones((n, n_pos), dtype=torch.long, device=decoder.device)
        last_pos = torch.full((n, 1), n_pos - 1, dtype=torch.long, device=decoder.device)
        logits = einops.repeat(last_logits.to(decoder.device), "v -> n 1 v", n=n)
        out += _sample_loop(decoder, logits, kv, mask, last_pos, _generators(cfg, rows), cfg, drop_finished)
    return out


@torch.inference_mode()
def decode_from_prefixes(
    decoder: Decoder,
    cache: Any,
    last_logits: Sequence[Tensor],
    lengths: Sequence[int],
    seeds: Sequence[int],
    indices: Sequence[int],
    cfg: SamplingConfig,
    batch_size: int = 32,
    drop_finished: bool = False,
) -> list[Continuation]:
    """Rows continuing different prefixes of one cached sequence, decoded together.

    Row ``r`` continues the first ``lengths[r]`` positions of ``cache`` (batch 1) from
    ``last_logits[r]`` (the logits at its prefix's last position), sampling from the generator
    seeded with ``(seeds[r], indices[r])``: its continuation is the one
    :func:`decode_from_cache` gives for that prefix, seed (``cfg`` with ``seed=seeds[r]``) and
    index (same tokens up to float rounding), whatever the other rows of its batch. Where
    ``decoder.shares_prefix()``, rows of different prefixes share a batch of ``batch_size`` on
    one :class:`mechthink.models.shared_prefix.SharedPrefixCache` (each row masked to its own
    prefix length): a batch is filled whatever the rows per prefix, so there are fewer decode
    steps; with ``drop_finished`` (and no hook that could notice), the next queued row takes a
    finished row's place at once (continuous batching, :func:`_slot_loop`: every step feeds
    ``batch_size`` rows until the queue runs out). Otherwise the rows are decoded a prefix at a
    time on forks (:func:`decode_from_cache`).

    Args:
        decoder: The model to decode.
        cache: The cached sequence (batch 1), left unchanged.
        last_logits: One ``[d_vocab]`` tensor per row.
        lengths: One prefix length per row (1 .. the cache's length).
        seeds: One sampling seed per row (``cfg.seed`` is ignored).
        indices: One generator index per row.
        cfg: Budget and sampling (temperature, top-p, max new tokens).
        batch_size: Rows decoded together.
        drop_finished: As in :func:`decode_from_cache`.

    Returns:
        One :class:`Continuation` per row, in order.
    """
    n = len(lengths)
    if not n or not len(last_logits) == len(seeds) == len(indices) == n:
        raise ValueError(f"decode_from_prefixes: give one logits row, length, seed and index per row "
                         f"(got {len(last_logits)}, {n}, {len(seeds)}, {len(indices)}; at least one row)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    have = int(cache.get_seq_length())
    if not all(1 <= int(p) <= have for p in lengths):
        raise ValueError(f"decode_from_prefixes: a length is outside the cache's 1..{have} positions")
    out: list[Continuation | None] = [None] * n
    if not decoder.shares_prefix():  # a prefix (and seed) at a time, on forks
        groups: dict[tuple[int, int], list[int]] = {}
        for r in range(n):
            groups.setdefault((int(lengths[r]), int(seeds[r])), []).append(r)
        for (p, sd), rows in groups.items():
            run = dataclasses.replace(cfg, seed=sd)
            same = all(torch.equal(last_logits[r], last_logits[rows[0]]) for r in rows)
            parts = [rows] if same else [[r] for r in rows]  # one prefix, one set of last logits
            for part in parts:
                conts = decode_from_cache(decoder, cache, last_logits[part[0]], run, [indices[r] for r in part], batch_size,
                                          p, drop_finished, share_prefix=False)
                for r, c in zip(part, conts):
                    out[r] = c
        return [c for c in out if c is not None]
    gens_all = [row_generator(int(seeds[r]), int(indices[r])) if cfg.temperature > 0 else None for r in range(n)]
    if drop_finished and decoder.rows_droppable():  # a finished row's slot goes to the next row at once
        def start(rows: list[int]) -> tuple[Tensor, list[int], None]:  # a fork: the prefix's last logits, nothing read
            return torch.stack([last_logits[r] for r in rows]), [int(lengths[r]) for r in rows], None

        return _slot_loop(decoder, cache, n, start, gens_all, cfg, batch_size)
    for k in range(0, n, batch_size):
        rows = list(range(k, min(n, k + batch_size)))
        lens = [int(lengths[r]) for r in rows]
        width = max(lens)
        kv = SharedPrefixCache(cache, len(rows), lens, room=min(max(cfg.max_new_tokens, 1), 256))
        mask = (torch.arange(width)[None, :] < torch.tensor(lens)[:, None]).long().to(decoder.device)
        last_pos = torch.tensor(lens, dtype=torch.long, device=decoder.device)[:, None] - 1
        logits = torch.stack([last_logits[r].to(decoder.device) for r in rows])[:, None]
        gens = [gens_all[r] for r in rows]
        for r, c in zip(rows, _sample_loop(decoder, logits, kv, mask, last_pos, gens, cfg, drop_finished)):
            out[r] = c
    return [c for c in out if c is not None]


def _pick(last: Float[Tensor, "row d_vocab"], gens: Sequence[torch.Generator | None], cfg: SamplingConfig) -> list[int]:
    """The next token of each row: greedy where its generator is None, else :func:`sample_tokens`."""
    nxt = [0] * len(gens)
    greedy = [j for j, g in enumerate(gens) if g is None]
    sampled = [j for j, g in enumerate(gens) if g is not None]
    if greedy:
        for j, t in zip(greedy, last[greedy].argmax(-1).tolist()):
            nxt[j] = t
    if sampled:
        for j, t in zip(sampled, sample_tokens(last[sampled], cfg.temperature, cfg.top_p, [gens[j] for j in sampled])):
            nxt[j] = t
    return nxt


#: ``start(rows) -> (first logits [k, d_vocab], prefix lengths, own positions or None)`` of rows
#: entering a slot loop: the logits their first token is sampled from, how much of the shared
#: prefix each reads, and per row the ``[(keys, values)]`` per layer of positions read apart.
SlotStart = Callable[[list[int]], tuple[Tensor, list[int], "list[list[tuple[Tensor, Tensor]]] | None"]]


@torch.inference_mode()
def _slot_loop(
    decoder: Decoder,
    cache: Any,
    n: int,
    start: SlotStart,
    gens: Sequence[torch.Generator | None],
    cfg: SamplingConfig,
    batch_size: int,
    room: int | None = None,
) -> list[Continuation]:
    """Continuous batching of ``n`` rows on ``batch_size`` slots of one shared prefix.

    A :class:`SharedPrefixCache` built with ``slots=True`` on ``cache``: each row reads its own
    length of the shared prefix and its own positions; when a row finishes (EOS or
    ``cfg.max_new_tokens``), the next queued rows take the freed slots at once (``start`` says
    what they read: for a fork, a prefix length and that prefix's last logits, nothing re-read),
    so every step feeds a full batch until the queue is empty, instead of a batch thinning out
    until its longest row ends. Row ``r`` samples from ``gens[r]`` with the logits of its own
    sequence: its tokens are those of :func:`_sample_loop` (to float rounding of the logits),
    whatever the other rows. Slots left empty at the end read nothing and leave once they are a
    quarter. ``room``: own positions each slot holds before its buffers grow (default
    ``min(max_new_tokens - 1, 256)``).
    """
    device, eos = decoder.device, decoder.eos_ids
    queue = deque(range(n))
    k0 = min(batch_size, n)
    # room for up to 256 own positions to start with (a long budget grows only if a row uses it)
    kv = SharedPrefixCache(cache, k0, [0] * k0, room=room or min(max(cfg.max_new_tokens - 1, 1), 256), slots=True)
    slot_row: list[int | None] = [None] * k0
    pending = torch.zeros((k0, 0))
    out: list[list[int]] = [[] for _ in range(n)]
    reason: list[str | None] = [None] * n

    def fill(free: list[int]) -> list[int]:
        """Queued rows into the ``free`` slots (the rest read nothing); the slots filled."""
        nonlocal pending
        take = [queue.popleft() for _ in range(min(len(free), len(queue)))]
        if take:
            logits, prefixes, owns = start(take)
            if pending.shape[-1] != logits.shape[-1]:
                pending = logits.new_zeros((len(slot_row), logits.shape[-1])).float()
            for i, (j, r) in enumerate(zip(free, take)):
                slot_row[j] = r
                kv.start_row(j, prefixes[i], owns[i] if owns is not None else None)
                pending[j] = logits[i].to(device)
        for j in free[len(take):]:
            slot_row[j] = None
            kv.start_row(j, 0)  # an empty slot reads nothing (fed padding until it leaves)
        return free[: len(take)]

    with steady_hooks():
        todo = fill(list(range(k0)))
        while True:
            feed = [decoder.pad_id] * len(slot_row)
            while todo:  # sample; the slots of finished rows take the next rows, which sample too
                done = []
                for j, t in zip(todo, _pick(pending[todo], [gens[slot_row[j]] for j in todo], cfg)):  # type: ignore[index]
                    r = slot_row[j]
                    out[r].append(t)  # type: ignore[index]
                    if t in eos:
                        reason[r] = "eos"  # type: ignore[index]
                    elif len(out[r]) >= cfg.max_new_tokens:  # type: ignore[index]
                        reason[r] = "length"  # type: ignore[index]
                    if reason[r] is None:  # type: ignore[index]
                        feed[j] = t
                    else:
                        done.append(j)
                todo = fill(done) if done else []
            live = [j for j, r in enumerate(slot_row) if r is not None]
            if not live:
                break
            if len(slot_row) - len(live) >= max(1, len(slot_row) // 4):  # only once the queue is empty
                sel = torch.tensor(live, dtype=torch.long, device=device)
                kv.batch_select_indices(sel)
                slot_row, feed = [slot_row[j] for j in live], [feed[j] for j in live]
            kv.prepare()
            logits, kv = decoder.forward(torch.tensor(feed, dtype=torch.long, device=device)[:, None], None,
                                         kv.positions()[:, None], kv)
            kv.advance()
            pending = logits[:, -1].float()
            todo = [j for j, r in enumerate(slot_row) if r is not None]
    return [Continuation(o, r or "length") for o, r in zip(out, reason)]


def continue_prefixes(
    model: "ThinkingModel",
    rows: Sequence[Sequence[int]],
    max_new_tokens: int = 64,
    temperature: float | int = 0.0,
    top_p: float | int = 1.0,
    seed: int = 0,
    batch_size: int = 32,
) -> list[list[int]]:
    """Continuations of token prefixes through the bridge (new ids only).

    Any interventions active around the call apply. ``temperature=0`` is greedy; otherwise row
    ``i`` samples with its own generator seeded from ``(seed, i)``, so a row's draw does not
    depend on the batch and two calls with the same seed differ only where an intervention
    changes the logits.
    """
    cfg = SamplingConfig(int(max_new_tokens), float(temperature), float(top_p), int(seed))
    return [c.ids for c in decode(Decoder.for_model(model), rows, cfg, batch_size)]


def continue_greedy(
    model: "ThinkingModel", rows: Sequence[Sequence[int]], max_new_tokens: int = 64, batch_size: int = 32
) -> list[list[int]]:
    """Greedy continuations of token prefixes: :func:`continue_prefixes` with ``temperature=0``."""
    return continue_prefixes(model, rows, max_new_tokens, batch_size=batch_size)


# ============================================================================ tracking the stream
class StreamTracker:
    """Follows the token stream through the bridge's forward calls.

    Mechanism: a forward pre-hook on the embedding module records each call's input ids, and one
    on block 0 reads the KV-cache length before the call. A call on an empty cache starts a new
    stream (its last position is the last prompt token); a call on a non-empty cache continues
    it (the inputs are the tokens generated so far, fed back one step at a time). Per batch row
    the tracker keeps all ids seen and the absolute column at which ``think_close`` was
    completed (``None`` while thinking).

    Attributes:
        past: Cache length before the current call.
        width: Number of positions in the current call.
        prompt_end: Absolute column of the last prompt token of the current stream.
        history: Ids seen per row (left padding included).
        closed_at: Column of the last token of ``think_close`` per row, or None.
    """

    def __init__(self, model: "ThinkingModel") -> None:
        self.model = model
        tok = model.tokenizer
        self.close_ids = [int(i) for i in tok(model.spec.think_close, add_special_tokens=False)["input_ids"]]
        self.open_ids = [int(i) for i in tok(model.spec.think_open, add_special_tokens=False)["input_ids"]]
        self.past = 0
        self.width = 0
        self.prompt_end = 0
        self.new_stream = True
        self.history: list[list[int]] = []
        self.closed_at: list[int | None] = []
        self.prompt_len: list[int] = []
        self._pending: Tensor | None = None
        self._handles: list[Any] = []

    # ------------------------------------------------------------ hooks
    def _on_embed(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = args[0] if args else kwargs.get("input_ids", kwargs.get("input"))
        if not isinstance(ids, Tensor) or ids.is_floating_point():
            return
        self._pending = ids.detach().cpu()

    def _on_block0(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kv = cache_from_kwargs(kwargs)
        past = int(kv.get_seq_length()) if kv is not None and hasattr(kv, "get_seq_length") else 0
        hidden = args[0] if args else kwargs.get("hidden_states")
        width = int(hidden.shape[1]) if isinstance(hidden, Tensor) else 0
        ids, self._pending = self._pending, None
        self.update(ids, past, width)

    def update(self, ids: Int[Tensor, "batch pos"] | None, past: int, width: int) -> None:
        """Record one forward call (``ids``: ``[batch, width]`` or None)."""
        self.past, self.width = past, width
        self.new_stream = past == 0
        rows = [r.tolist() for r in ids] if ids is not None else None
        if self.new_stream:
            self.prompt_end = width - 1
            self.history = rows if rows is not None else []
            self.prompt_len = [len(r) for r in self.history]
            self.closed_at = [self._find_close(h, 0) for h in self.history]
            return
        if rows is None:
            return
        if len(rows) != len(self.history):  # a forked / re-batched cache
            if len(self.history) == 1:
                self.history = [list(self.history[0]) for _ in rows]
                self.closed_at = self.closed_at * len(rows)
                self.prompt_len = self.prompt_len * len(rows)
            else:
                log.debug("StreamTracker: batch changed %d -> %d; restarting row state", len(self.history), len(rows))
                self.history = [[] for _ in rows]
                self.closed_at = [None] * len(rows)
                self.prompt_len = [0] * len(rows)
        for i, r in enumerate(rows):
            if len(self.history[i]) > past:  # the cache was rewound (crop) and this call redoes columns
                del self.history[i][past:]
                c = self.closed_at[i]
                if c is not None and c >= past:
                    self.closed_at[i] = None
            start = len(self.history[i])
            self.history[i].extend(r)
            if self.closed_at[i] is None:
                self.closed_at[i] = self._find_close(self.history[i], max(0, start - len(self.close_ids) + 1))

    def _find_close(self, h: list[int], start: int) -> int | None:
        """Column of the last token of the first think_close after the last think_open (from start)."""
        n = len(self.close_ids)
        if n == 0:
            return None
        last_open = _last_index(h, self.open_ids)
        lo = max(start, (last_open + 1) if last_open is not None else 0)
        for j in range(lo, len(h) - n + 1):
            if h[j : j + n] == self.close_ids:
                return j + n - 1
        return None

    # ------------------------------------------------------------ queries
    def columns(self) -> range:
        """Absolute columns of the current call's positions."""
        return range(self.past, self.past + self.width)

    def n_generated(self, row: int) -> int:
        """Tokens generated and fed back so far in ``row`` (the current call's inputs included)."""
        if row >= len(self.history):
            return 0
        return max(0, len(self.history[row]) - self.prompt_len[row])

    def is_closed(self, row: int, column: int) -> bool:
        """Whether ``think_close`` has been completed at or before ``column`` in ``row``."""
        if row >= len(self.closed_at):
            return False
        c = self.closed_at[row]
        return c is not None and c <= column

    @contextlib.contextmanager
    def attached(self) -> Iterator["StreamTracker"]:
        """Register the tracker's module hooks for the duration of the block."""
        bridge = self.model.bridge
        try:
            self._handles.append(bridge.embed.register_forward_pre_hook(self._on_embed, with_kwargs=True))
            self._handles.append(bridge.blocks[0].register_forward_pre_hook(self._on_block0, with_kwargs=True))
            yield self
        finally:
            while self._handles:
                self._handles.pop().remove()


def _last_index(h: list[int], sub: list[int]) -> int | None:
    n = len(sub)
    if n == 0:
        return None
    for j in range(len(h) - n, -1, -1):
        if h[j : j + n] == sub:
            return j + n - 1
    return None
