"""Tokenizer of the tiny-thinker organism: a word-level vocabulary with per-character fallback.

Built from scratch with the HuggingFace ``tokenizers`` library (no download). The pre-tokenizer is
one regular expression that keeps a leading space attached to known words (" Wait", " So", ...)
and to single characters (" +", " ="), splits every digit into its own token and never attaches a
space to a digit (Qwen2 / R1-Distill-Qwen style: " 13" is " ", "1", "3"), so ``decode(encode(s)) ==
s`` for every ASCII string. Source: this repository (mechthink tiny-thinker organism).
"""

from __future__ import annotations

import functools
import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

__all__ = [
    "BOS_TOKEN",
    "CHAT_TEMPLATE",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "THINK_CLOSE",
    "THINK_OPEN",
    "UNK_TOKEN",
    "USER_TOKEN",
    "ASSISTANT_TOKEN",
    "WORDS",
    "build_hf_tokenizer",
    "build_raw_tokenizer",
]

BOS_TOKEN = "<|bos|>"
PAD_TOKEN = "<|pad|>"
UNK_TOKEN = "<|unk|>"
EOS_TOKEN = "<|end|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

#: Special tokens in id order (ids 0..7).
SPECIAL_TOKENS: tuple[str, ...] = (
    PAD_TOKEN,
    BOS_TOKEN,
    EOS_TOKEN,
    UNK_TOKEN,
    USER_TOKEN,
    ASSISTANT_TOKEN,
    THINK_OPEN,
    THINK_CLOSE,
)

#: Whole words that get their own token, each with and without a leading space.
WORDS: tuple[str, ...] = (
    "Alternatively",
    "Therefore",
    "Compute",
    "answer",
    "indeed",
    "final",
    "boxed",
    "check",
    "redo",
    "Wait",
    "wait",
    "that",
    "Hmm",
    "Let",
    "let",
    "Yes",
    "The",
    "the",
    "is",
    "me",
    "So",
    "so",
)

#: Jinja chat template: bos, then ``<|user|>\n{content}\n`` and ``<|assistant|>\n{content}<|end|>``.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' + message['content'] + '<|end|>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def _pattern() -> str:
    words = "|".join(sorted(WORDS, key=len, reverse=True))
    # known word (optionally space-prefixed) | digit | optional space + one other visible char
    # | any single whitespace char (a space before a digit or another space is its own token)
    return rf" ?(?:{words})\b|[0-9]| ?[^\s0-9]|\s"


def _vocab() -> dict[str, int]:
    tokens: list[str] = list(SPECIAL_TOKENS)
    tokens += [str(d) for d in range(10)]
    tokens += [" ", "\n", "\t", "\r"]
    for word in WORDS:
        tokens += [word, " " + word]
    for ch in string.printable:
        if ch in string.whitespace or ch in string.digits:
            continue
        tokens += [ch, " " + ch]
    vocab: dict[str, int] = {}
    for tok in tokens:
        if tok not in vocab:
            vocab[tok] = len(vocab)
    return vocab


@functools.lru_cache(maxsize=1)
def build_raw_tokenizer() -> Tokenizer:
    """Build the raw ``tokenizers.Tokenizer`` (deterministic; cached).

    Returns:
        The tokenizer. Special tokens are registered as added special tokens; no bos is added
        automatically (the chat template and the transcripts write ``<|bos|>`` explicitly).
    """
    tok = Tokenizer(models.WordLevel(vocab=_vocab(), unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(_pattern()), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def build_hf_tokenizer() -> PreTrainedTokenizerFast:
    """Wrap the raw tokenizer as a ``PreTrainedTokenizerFast`` with chat template and specials.

    Returns:
        A fast tokenizer with ``bos_token="<|bos|>"``, ``eos_token="<|end|>"``,
        ``pad_token="<|pad|>"`` (left padding) and the Jinja ``chat_template``. It does not add a
        bos by itself; the chat template does.
    """
    tok = PreTrainedTokenizerFast(
        tokenizer_object=build_raw_tokenizer(),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=[USER_TOKEN, ASSISTANT_TOKEN, THINK_OPEN, THINK_CLOSE],
        clean_up_tokenization_spaces=False,
        padding_side="left",
        model_max_length=512,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok
