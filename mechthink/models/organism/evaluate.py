"""Behavioural checks of the tiny-thinker organism against its planted ground truth.

Three measurements on held-out problems: P(backtracking word) right after wrong vs correct steps,
greedy accuracy of the boxed final answer, and recovery after a prefilled wrong step. Plain HF
transformers, batched with left padding (:mod:`mechthink.generation`'s decode loop). Source:
this repository (mechthink tiny-thinker).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch
from jaxtyping import Float
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mechthink.generation import Decoder, SamplingConfig, decode, left_pad

from .tasks import BACKTRACK_WORDS, held_out_examples, prompt_text, sample_problem

__all__ = [
    "EvalResult",
    "backtrack_probabilities",
    "backtrack_token_ids",
    "evaluate",
    "greedy_generate",
    "left_pad",
    "parse_boxed",
]

_BOXED = re.compile(r"\\boxed\{(-?\d+)\}")


def parse_boxed(text: str) -> int | None:
    """The integer inside the last ``\\boxed{...}`` of ``text``, or None."""
    found = _BOXED.findall(text)
    return int(found[-1]) if found else None


def backtrack_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids of the single-token backtracking words (``BACKTRACK_WORDS``)."""
    return [tokenizer.convert_tokens_to_ids(w) for w in BACKTRACK_WORDS]


@torch.no_grad()
def backtrack_probabilities(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    seqs: list[list[int]],
    batch_size: int = 100,
) -> Float[torch.Tensor, " batch"]:
    """P(any backtracking word) as the next token after each sequence.

    Args:
        model: The causal LM.
        tokenizer: Its tokenizer.
        seqs: Token id lists (each from bos on).
        batch_size: Sequences per forward pass.

    Returns:
        One probability per sequence.
    """
    ids_bt = backtrack_token_ids(tokenizer)
    out = []
    for i in range(0, len(seqs), batch_size):
        ids, mask = left_pad(seqs[i : i + batch_size], tokenizer.pad_token_id)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
        out.append(logits.float().softmax(-1)[:, ids_bt].sum(-1))
    return torch.cat(out)


def greedy_generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    seqs: list[list[int]],
    max_new_tokens: int = 200,
    batch_size: int = 100,
) -> list[list[int]]:
    """Greedy continuations (new tokens only, up to and including eos) of token id lists.

    The decode loop is :func:`mechthink.generation.decode` on the plain HF model (left padding,
    KV cache), the same loop every mechthink generation uses.

    Args:
        model: The causal LM.
        tokenizer: Its tokenizer (pad and eos ids).
        seqs: Prompts as token id lists.
        max_new_tokens: Generation budget.
        batch_size: Prompts decoded together.

    Returns:
        The new token ids of each prompt, up to and including the first eos.
    """
    cfg = SamplingConfig(max_new_tokens=int(max_new_tokens))
    return [c.ids for c in decode(Decoder.for_hf(model, tokenizer), seqs, cfg, batch_size)]


@dataclass
class EvalResult:
    """The three behavioural metrics (fractions in [0, 1]).

    Attributes:
        error_backtrack_rate: Fraction of wrong steps with P(backtrack) > 0.5.
        correct_no_backtrack_rate: Fraction of correct steps with P(backtrack) < 0.5.
        greedy_accuracy: Fraction of problems whose greedy ``\\boxed{}`` answer is correct.
        prefill_recovery_rate: Fraction of prefilled wrong steps after which greedy decoding
            emits a backtracking word next and ends with the correct boxed answer.
        n_steps: Examples for the backtrack metrics.
        n_problems: Problems for the greedy metric.
        n_prefill: Examples for the recovery metric.
    """

    error_backtrack_rate: float
    correct_no_backtrack_rate: float
    greedy_accuracy: float
    prefill_recovery_rate: float
    n_steps: int
    n_problems: int
    n_prefill: int


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    n_steps: int = 200,
    n_problems: int = 100,
    n_prefill: int = 100,
    seed: int = 1234,
) -> EvalResult:
    """Measure the planted behaviour on held-out problems (streams disjoint from training's).

    Args:
        model: The organism (HF causal LM).
        tokenizer: Its tokenizer.
        n_steps: Held-out step examples (half wrong) for the backtracking probabilities.
        n_problems: Problems generated greedily from the user turn.
        n_prefill: Wrong-step prefixes continued greedily.
        seed: Seed of the held-out streams.

    Returns:
        The metrics.
    """
    model.eval()
    examples = held_out_examples(n_steps, seed=seed)
    probs = backtrack_probabilities(model, tokenizer, [e.input_ids for e in examples])
    is_err = torch.tensor([e.is_error for e in examples])
    err_rate = (probs[is_err] > 0.5).float().mean().item()
    ok_rate = (probs[~is_err] < 0.5).float().mean().item()

    rng = random.Random(f"greedy-eval-{seed}")
    problems = [sample_problem(rng) for _ in range(n_problems)]
    prompts = [tokenizer(prompt_text(p.question)).input_ids for p in problems]
    outs = greedy_generate(model, tokenizer, prompts)
    texts = [tokenizer.decode(o) for o in outs]
    acc = sum(parse_boxed(t) == p.answer for t, p in zip(texts, problems)) / max(1, n_problems)

    wrong = [e for e in held_out_examples(2 * n_prefill, seed=seed + 1) if e.is_error]
    outs = greedy_generate(model, tokenizer, [e.input_ids for e in wrong])
    bt = set(backtrack_token_ids(tokenizer))
    ok = [
        bool(o) and o[0] in bt and parse_boxed(tokenizer.decode(o)) == e.answer
        for o, e in zip(outs, wrong)
    ]
    rec = sum(ok) / max(1, len(ok))
    return EvalResult(err_rate, ok_rate, acc, rec, len(examples), n_problems, len(wrong))
