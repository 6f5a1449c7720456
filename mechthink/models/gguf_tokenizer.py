"""Tokenizers from GGUF files, with the special tokens the file declares restored exactly.

transformers' GGUF tokenizer converter rebuilds a byte-level BPE vocabulary by re-spelling every
token outside the byte alphabet in that alphabet, and skips control tokens that use other
characters as "llama.cpp mislabels". DeepSeek's specials (``<｜begin▁of▁sentence｜>``,
``<｜User｜>``, ``<｜Assistant｜>`` …) are such tokens: after conversion the BOS/EOS strings are not
in the vocabulary any more, get appended as new tokens (ids 152065/152066 on a 152064-token
model) and ``<｜Assistant｜>`` tokenizes into five pieces. :func:`restore_gguf_specials` puts
every control / user-defined token of the file back at its own id under its own spelling, as
the model's ``tokenizer.json`` has it; :func:`check_specials` refuses a tokenizer whose special
tokens fall outside the model's vocabulary or do not encode to one token.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["GGUFTokenizerError", "check_specials", "load_gguf_tokenizer", "restore_gguf_specials"]

log = logging.getLogger(__name__)

#: llama.cpp token types (gguf ``tokenizer.ggml.token_type``).
_CONTROL, _USER_DEFINED = 3, 4


class GGUFTokenizerError(ValueError):
    """A GGUF file's tokenizer cannot be rebuilt faithfully."""


def restore_gguf_specials(tokenizer: Any, tokens: Sequence[str], token_types: Sequence[int]) -> Any:
    """A copy of a converted GGUF tokenizer with the file's special tokens restored.

    For every token the file marks as control (3) or user-defined (4) that the converted
    tokenizer does not encode as itself at its own id, the re-spelled vocabulary entry is
    replaced by the token as written in the file, any wrongly numbered added token of that
    spelling is dropped, and the token is added back at its id (special for control tokens, as
    the model's own ``tokenizer.json`` marks them). The post-processor's BOS/EOS ids follow.

    Args:
        tokenizer: The ``PreTrainedTokenizerFast`` transformers built from the GGUF file.
        tokens: ``tokenizer.ggml.tokens`` of the file (its spelling of every id).
        token_types: ``tokenizer.ggml.token_type`` of the file.

    Returns:
        A new ``PreTrainedTokenizerFast`` (the input is left untouched).
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if len(tokens) != len(token_types):
        raise GGUFTokenizerError(
            f"GGUF tokenizer: {len(tokens)} tokens but {len(token_types)} token types; the file is damaged"
        )
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab: dict[str, int] = state["model"]["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    added = state.get("added_tokens") or []
    added_by_id = {a["id"]: a for a in added}
    wanted = [(i, tokens[i], int(token_types[i])) for i in range(len(tokens)) if int(token_types[i]) in (_CONTROL, _USER_DEFINED)]
    fixed = []
    for i, raw, kind in wanted:
        current = added_by_id.get(i)
        if current is not None and current["content"] == raw:
            continue
        if by_id.get(i) == raw and kind == _USER_DEFINED and any(a["content"] == raw for a in added):
            continue
        respelled = by_id.get(i)
        if respelled is not None and respelled != raw:
            del vocab[respelled]
        vocab[raw] = i
        by_id[i] = raw
        added = [a for a in added if a["content"] != raw and a["id"] != i]
        added.append(
            {"id": i, "content": raw, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": kind == _CONTROL}
        )
        added_by_id = {a["id"]: a for a in added}
        fixed.append(raw)
    n = len(tokens)
    extra = [a for a in added if a["id"] >= n]
    if extra:  # tokens the converter appended beyond the file's vocabulary (the mangled specials)
        added = [a for a in added if a["id"] < n]
        for a in extra:
            if vocab.get(a["content"]) == a["id"]:
                del vocab[a["content"]]
    state["added_tokens"] = sorted(added, key=lambda a: a["id"])
    ids_of = {a["content"]: a["id"] for a in state["added_tokens"]}
    post = state.get("post_processor")
    for proc in ([post] if post and post.get("type") != "Sequence" else (post or {}).get("processors", [])):
        for name, entry in (proc.get("special_tokens") or {}).items():
            if name in ids_of:
                entry["ids"] = [ids_of[name]]
    backend = Tokenizer.from_str(json.dumps(state))
    init = dict(tokenizer.init_kwargs)
    for key in ("tokenizer_object", "tokenizer_file", "gguf_file", "name_or_path", "added_tokens_decoder"):
        init.pop(key, None)
    specials = {k: str(getattr(tokenizer, k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")
                if getattr(tokenizer, k, None) is not None}
    init.update(specials)
    init["chat_template"] = getattr(tokenizer, "chat_template", None)
    out = PreTrainedTokenizerFast(tokenizer_object=backend, **init)
    if fixed:
        log.info("GGUF tokenizer: restored %d special tokens (%s ...)", len(fixed), ", ".join(fixed[:3]))
    return out


def check_specials(tokenizer: Any, vocab_size: int, where: str) -> None:
    """Refuse a tokenizer whose BOS/EOS/PAD lie outside ``vocab_size`` or split into pieces."""
    for name in ("bos_token", "eos_token", "pad_token"):
        text = getattr(tokenizer, name, None)
        if text is None:
            continue
        tid = tokenizer.convert_tokens_to_ids(str(text))
        pieces = tokenizer(str(text), add_special_tokens=False)["input_ids"]
        if tid is None or not 0 <= int(tid) < vocab_size or pieces != [tid]:
            raise GGUFTokenizerError(
                f"{where}: the tokenizer rebuilt from the GGUF file maps {name} {str(text)!r} to id {tid} "
                f"(pieces {pieces}; the model has {vocab_size} embeddings), so prompts would be wrong; "
                "pass tokenizer= (the model's own tokenizer or its directory)"
            )


def load_gguf_tokenizer(gguf_path: str | Path) -> Any:
    """The tokenizer of a GGUF file, specials restored and checked (see module docstring)."""
    from transformers import AutoTokenizer
    from transformers.integrations.gguf import read_gguf_metadata

    path = Path(gguf_path)
    try:
        meta, _ = read_gguf_metadata(str(path), ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"))
    except Exception as exc:  # a random, truncated or non-GGUF file
        raise GGUFTokenizerError(
            f"{path} is not a readable GGUF file ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}); "
            "pass a complete .gguf file"
        ) from None
    if "tokenizer.ggml.tokens" not in meta:
        raise GGUFTokenizerError(f"GGUF file {path} carries no tokenizer (no tokenizer.ggml.tokens); pass tokenizer= "
                                 "(a tokenizer or its directory)")
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:  # transformers raises many types for missing tokenizer metadata
        raise GGUFTokenizerError(
            f"GGUF file {path}: no usable tokenizer could be built from it "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "pass tokenizer= (a tokenizer or its directory)"
        ) from None
    tokens, types = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.token_type")
    if isinstance(tokens, list) and isinstance(types, list):
        tok = restore_gguf_specials(tok, tokens, types)
        check_specials(tok, len(tokens), f"GGUF file {path}")
    return tok
