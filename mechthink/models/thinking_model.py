"""`ThinkingModel`: a hooked port of a thinking model plus its thinking conventions.

A thin holder: the TransformerLens `TransformerBridge` (compatibility mode, HookedTransformer
hook names), the Hugging Face tokenizer, and the registry spec, with the helpers every
technique needs — building prompts with the chat template and an assistant prefix (the
thinking on/off technique of repeng PR #69), tokenizing without losing or doubling the BOS,
and the single-token ids of words such as " Wait". Analyses live in the technique modules,
never here.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Int

from mechthink.models.registry import ThinkingModelSpec

if TYPE_CHECKING:  # heavy imports, for type checkers only
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PreTrainedTokenizerBase

__all__ = ["ThinkingModel", "ThinkingMode"]

log = logging.getLogger(__name__)

ThinkingMode = Literal["on", "off", "default"]


@dataclass(eq=False)
class ThinkingModel:
    """A loaded thinking model. Build it with :func:`mechthink.load_model`.

    Attributes:
        bridge: The TransformerLens ``TransformerBridge`` in compatibility mode.
        tokenizer: The Hugging Face tokenizer (fast tokenizer with offsets where available).
        spec: The model's :class:`ThinkingModelSpec` (thinking conventions).
        prepend_bos: Whether a BOS token starts every sequence (what the tokenizer does by
            default when asked to add special tokens).
    """

    bridge: "TransformerBridge"
    tokenizer: "PreTrainedTokenizerBase"
    spec: ThinkingModelSpec
    prepend_bos: bool

    # ------------------------------------------------------------------ basic facts
    @property
    def cfg(self) -> Any:
        """The bridge's TransformerLens config."""
        return self.bridge.cfg

    @property
    def n_layers(self) -> int:
        return int(self.bridge.cfg.n_layers)

    @property
    def d_model(self) -> int:
        return int(self.bridge.cfg.d_model)

    @property
    def device(self) -> torch.device:
        return next(self.bridge.original_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.bridge.original_model.parameters()).dtype

    @property
    def steering_layers(self) -> range:
        """Default steering layers for the loaded depth (n_layers//3 .. 2*n_layers//3)."""
        return range(self.n_layers // 3, (2 * self.n_layers) // 3)

    @property
    def bos_token_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    @property
    def eos_token_ids(self) -> list[int]:
        """Token ids that end a generation (tokenizer eos plus the generation config's)."""
        ids: list[int] = []
        if self.tokenizer.eos_token_id is not None:
            ids.append(int(self.tokenizer.eos_token_id))
        gen_cfg = getattr(self.bridge.original_model, "generation_config", None)
        extra = getattr(gen_cfg, "eos_token_id", None)
        if isinstance(extra, int):
            extra = [extra]
        for i in extra or []:
            if int(i) not in ids:
                ids.append(int(i))
        return ids

    def fingerprint(self) -> str:
        """A short hash of the weights (name, shape, dtype and a strided sample of values of
        every parameter of the wrapped HF model): results record it, so a changed model is
        never mistaken for the one a stored result came from. Cheap even for large models."""
        cached = self.__dict__.get("_fingerprint")
        if cached is not None:
            return cached
        import hashlib

        h = hashlib.sha1(f"{self.spec.name}|{self.spec.architecture}".encode())
        with torch.no_grad():
            for name, p in sorted(self.bridge.original_model.named_parameters()):
                flat = p.detach().reshape(-1)
                step = max(1, flat.numel() // 4096)
                sample = flat[::step][:4096].float().cpu().numpy().tobytes()
                h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|".encode() + sample)
        self.__dict__["_fingerprint"] = fp = h.hexdigest()[:16]
        return fp

    def last_logits_kwargs(self) -> dict[str, Any]:
        """Forward kwargs that make the HF model unembed only the last position.

        ``{"logits_to_keep": 1}`` when the wrapped model's ``forward`` takes it (Llama, Qwen2/3,
        GLM-4, Mistral, ... in transformers >= 4.50), else ``{}``. Callers that only read
        ``logits[:, -1]`` (prefills, probe chunks) skip the vocabulary projection of every other
        position; hooks before the unembedding still see every position.
        """
        fwd = getattr(self.bridge.original_model, "forward", None)
        try:
            params = inspect.signature(fwd).parameters if fwd is not None else {}
        except (TypeError, ValueError):
            params = {}
        return {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def __repr__(self) -> str:
        return (
            f"ThinkingModel({self.spec.name!r}, arch={self.spec.architecture}, "
            f"n_layers={self.n_layers}, d_model={self.d_model}, device={self.device}, dtype={self.dtype})"
        )

    # ------------------------------------------------------------------ prompts
    def prompt(
        self,
        question: str,
        thinking: ThinkingMode = "on",
        assistant_prefix: str = "",
        system: str | None = None,
    ) -> str:
        """The chat-templated prompt for one user question, ending where the assistant writes.

        Args:
            question: The user message.
            thinking: ``"on"`` forces thinking by prefilling the think-open prefix (unless the
                template already opened it); ``"off"`` skips thinking with an empty think block
                (or the template's own switch, e.g. Qwen3's ``enable_thinking=False``);
                ``"default"`` leaves the template's generation prompt as it is.
            assistant_prefix: Text prefilled after that (e.g. ``"Wait, "``), the assistant-prefix
                technique of repeng PR #69.
            system: Optional system message.

        Returns:
            The prompt text, BOS included if the template writes it.
        """
        if thinking not in ("on", "off", "default"):
            raise ValueError(f"thinking={thinking!r} is not supported; use 'on', 'off' or 'default'")
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": "user", "content": question}
        ]
        template_kwargs: dict[str, object] = {}
        if thinking == "off" and self.spec.thinking_off_template_kwargs:
            template_kwargs.update(self.spec.thinking_off_template_kwargs)
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, **template_kwargs
            )
        else:
            log.warning("tokenizer of %s has no chat template; using a plain 'User/Assistant' prompt", self.spec.name)
            text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant: "
        if thinking == "on":
            text += self._remaining_prefix(text, self.spec.thinking_on_prefix)
        elif thinking == "off" and not template_kwargs:
            if self.spec.thinking_off_prefix is None:
                raise ValueError(f"{self.spec.name} has no way to switch thinking off; use thinking='on' or 'default'")
            text += self._remaining_prefix(text, self.spec.thinking_off_prefix)
        return text + assistant_prefix

    @staticmethod
    def _remaining_prefix(text: str, prefix: str) -> str:
        """The part of ``prefix`` not already written at the end of ``text``.

        Templates such as R1-Distill's end the generation prompt with ``<think>\\n``; prefilling
        ``<think>\\n`` again would open thinking twice.
        """
        for k in range(len(prefix), 0, -1):
            if text.endswith(prefix[:k]):
                return prefix[k:]
        return prefix

    # ------------------------------------------------------------------ tokens
    def to_tokens(self, text: str | Sequence[str], prepend_bos: bool | None = None) -> Int[torch.Tensor, "batch pos"]:
        """Tokenize text the way the model expects it, as a ``[batch, pos]`` tensor on its device.

        The BOS is added when the model uses one (``self.prepend_bos``) and the text does not
        already start with it (chat templates often write it), so it is never lost (the TL
        Qwen adapters strip it from strings) and never doubled. A list of texts must tokenize
        to equal lengths; use :meth:`to_token_lists` for ragged batches.
        """
        rows = self.to_token_lists([text] if isinstance(text, str) else list(text), prepend_bos)
        lengths = {len(r) for r in rows}
        if len(lengths) != 1:
            raise ValueError(
                f"texts tokenize to different lengths {sorted(lengths)}; use to_token_lists() and pad yourself"
            )
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def to_token_lists(self, texts: Sequence[str], prepend_bos: bool | None = None) -> list[list[int]]:
        """Token id lists for several texts (BOS handled as in :meth:`to_tokens`)."""
        use_bos = self.prepend_bos if prepend_bos is None else prepend_bos
        bos = self.tokenizer.bos_token_id
        rows = []
        for t in texts:
            ids = list(self.tokenizer(t, add_special_tokens=False)["input_ids"])
            if use_bos and bos is not None and (not ids or ids[0] != bos):
                ids = [int(bos)] + ids
            rows.append([int(i) for i in ids])
        return rows

    def to_str_tokens(self, tokens: Int[torch.Tensor, "pos"] | Sequence[int]) -> list[str]:
        """Each token id decoded on its own."""
        ids = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        return [self.tokenizer.decode([int(i)]) for i in ids]

    def to_string(self, tokens: Int[torch.Tensor, "pos"] | Sequence[int], skip_special_tokens: bool = False) -> str:
        """Decode token ids to text."""
        ids = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_variants(self, word: str) -> dict[str, int]:
        """Every single-token spelling of ``word``: with/without a leading space, lower/capitalised.

        Returns:
            A dict from the variant string to its token id (only variants that are one token
            and decode back to themselves).
        """
        core = word.strip()
        if not core:
            raise ValueError(f"token_variants: word {word!r} is empty; pass a non-empty word such as 'Wait'")
        forms = []
        for base in dict.fromkeys([core, core.lower(), core.capitalize(), core.upper()]):
            forms += [base, " " + base]
        if word not in forms:
            forms.insert(0, word)
        out: dict[str, int] = {}
        for form in forms:
            ids = self.tokenizer(form, add_special_tokens=False)["input_ids"]
            if len(ids) == 1 and self.tokenizer.decode(ids) == form:
                out[form] = int(ids[0])
        return out

    def token_ids(self, words: str | Sequence[str]) -> list[int]:
        """Ids of all single-token variants of each word (e.g. " Wait", "Wait", " wait").

        A word with no single-token spelling (R1's and Qwen3's "But wait" is two tokens) is
        dropped with a logged warning when other words of the list are single tokens — the ids
        serve next-token probabilities and suppression, where a multi-token word has no one id;
        use :meth:`token_sequences` to match such words as sequences.

        Raises:
            ValueError: if no word of the list has a single-token variant (one line naming the
                words and how they tokenize).
        """
        if isinstance(words, str):
            words = [words]
        out: dict[int, None] = {}
        missing: list[str] = []
        for w in words:
            variants = self.token_variants(w)
            if not variants:
                missing.append(w)
            out.update(dict.fromkeys(variants.values()))
        if missing:
            pieces = {
                w: self.tokenizer.convert_ids_to_tokens(self.tokenizer(" " + w.strip(), add_special_tokens=False)["input_ids"])
                for w in missing
            }
            if not out:
                shown = "; ".join(f"' {w.strip()}' -> {p}" for w, p in pieces.items())
                raise ValueError(
                    f"{', '.join(map(repr, missing))} is never a single token for {self.spec.name} ({shown}); "
                    "pass words that are single tokens, or match multi-token words with token_sequences()"
                )
            log.warning(
                "%s: %s never a single token; dropped from token_ids (match it with token_sequences())",
                self.spec.name, ", ".join(repr(w) for w in missing),
            )
        return list(out)

    def token_sequences(self, words: str | Sequence[str]) -> dict[str, list[list[int]]]:
        """For each word, the token-id sequences of its spellings (with/without a leading space,
        lower/capitalised), single- or multi-token, deduplicated; for matching words such as
        "But wait" that are never one token."""
        if isinstance(words, str):
            words = [words]
        out: dict[str, list[list[int]]] = {}
        for w in words:
            core = w.strip()
            if not core:
                raise ValueError(f"token_sequences: word {w!r} is empty; pass a non-empty word such as 'But wait'")
            seqs: dict[tuple[int, ...], None] = {}
            for base in dict.fromkeys([core, core.lower(), core[0].upper() + core[1:], core.upper()]):
                for form in (base, " " + base):
                    ids = tuple(int(i) for i in self.tokenizer(form, add_special_tokens=False)["input_ids"])
                    if ids and self.tokenizer.decode(list(ids)) == form:
                        seqs[ids] = None
            out[w] = [list(s) for s in seqs]
        return out

    def template_opens_think(self) -> bool:
        """Whether this tokenizer's chat template already ends its generation prompt with the
        think-open tag (R1-Distill's later hub revision, QwQ, Qwen3-Thinking-2507) — read from
        the template itself, since revisions of one model differ."""
        if not getattr(self.tokenizer, "chat_template", None):
            return False
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True
        )
        return text.rstrip().endswith(self.spec.think_open)

    # ------------------------------------------------------------------ forward
    @torch.inference_mode()
    def log_probs(self, tokens: Int[torch.Tensor, "batch pos"], **kwargs: Any) -> torch.Tensor:
        """Log-softmax of the bridge's logits for a token tensor (no gradients)."""
        return self.bridge(tokens.to(self.device), **kwargs).float().log_softmax(-1)
