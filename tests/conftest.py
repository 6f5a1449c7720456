"""Shared fixtures: tiny random HF models of the real architectures with locally saved tokenizers.

Nothing here downloads: tokenizers are trained on a small in-test corpus (byte-level BPE, like
Llama-3 / Qwen) and saved to a directory, models are built from configs with random weights.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
if not SHARED.exists():  # CI clones main with shared/ beside it
    SHARED = Path(os.environ.get("MECHTHINK_SHARED", Path.cwd().parent / "shared"))

# What bad-typed input raises: our own ValueError, or the runtime checker's error when tests run
# with `--jaxtyping-packages=mechthink,beartype.beartype` (DESIGN.md §3.1).
TYPE_ERRORS: tuple[type[Exception], ...] = (ValueError, TypeError)
try:
    from beartype.roar import BeartypeCallHintViolation
    from jaxtyping import TypeCheckError

    TYPE_ERRORS = (ValueError, TypeError, BeartypeCallHintViolation, TypeCheckError)
except ImportError:  # pragma: no cover
    pass

R1_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% else %}<｜Assistant｜>{{ m['content'] }}<｜end▁of▁sentence｜>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)
SPECIALS = [
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<pad>",
    "<think>",
    "</think>",
    "<|im_start|>",
    "<|im_end|>",
    "<｜User｜>",
    "<｜Assistant｜>",
]
CORPUS = [
    "Wait, let me check that again. Hmm, the answer is 12. Alternatively, we could add them.",
    "So the answer is 42. Therefore the final answer is \\boxed{42}. wait wait Wait Wait",
    "Compute 3 + 5 - 2 + 7. First 3 + 5 = 8. Then 8 - 2 = 6. So 6 + 7 = 13.",
    "The user asks a question about numbers. Let me think step by step about it.",
] * 20


def build_tokenizer(directory: Path, style: str = "r1", add_bos: bool = True):
    """A byte-level BPE tokenizer (vocab ~400) saved to ``directory`` and re-loaded from it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(CORPUS, trainer)
    bos = SPECIALS[0]
    if add_bos:
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tk.token_to_id(bos))]
        )
    else:
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=bos,
        eos_token="<｜end▁of▁sentence｜>" if style == "r1" else "<|im_end|>",
        pad_token="<pad>",
        additional_special_tokens=SPECIALS[3:],
    )
    fast.chat_template = R1_TEMPLATE if style == "r1" else CHATML_TEMPLATE
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


def build_model(arch: str, vocab_size: int, seed: int = 0):
    """A tiny random HF causal LM of a real architecture (eager attention, fp32)."""
    import transformers

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attn_implementation="eager",
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    if arch == "Qwen2ForCausalLM":
        cfg = transformers.Qwen2Config(**common)
    elif arch == "LlamaForCausalLM":
        cfg = transformers.LlamaConfig(**common)
    elif arch == "Qwen3ForCausalLM":
        cfg = transformers.Qwen3Config(head_dim=16, **common)
    elif arch == "Glm4ForCausalLM":  # the text decoder layout of GLM-4.1V (GLM-4-0414)
        cfg = transformers.Glm4Config(head_dim=16, partial_rotary_factor=0.5, **common)
    else:
        raise ValueError(arch)
    cfg.architectures = [arch]
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(cfg).eval()
    with torch.no_grad():  # random init has tiny norms; widen it so logits are not flat
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return model


ARCH_STYLE = {
    "Qwen2ForCausalLM": ("r1", True),  # like R1-Distill-Qwen: BOS added by the tokenizer
    "LlamaForCausalLM": ("r1", True),  # like R1-Distill-Llama
    "Qwen3ForCausalLM": ("chatml", False),  # like Qwen3: ChatML, no BOS
    "Glm4ForCausalLM": ("chatml", False),
}


@pytest.fixture(scope="module")
def one_thread():
    """Run a module on one torch thread (tiny models run far faster that way on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """``make(arch) -> (hf_model, tokenizer)`` cached per architecture (treat as read-only)."""
    cache: dict[str, tuple] = {}

    def make(arch: str):
        if arch not in cache:
            style, bos = ARCH_STYLE[arch]
            tok = build_tokenizer(tmp_path_factory.mktemp(f"tok-{arch}"), style=style, add_bos=bos)
            cache[arch] = (build_model(arch, len(tok)), tok)
        return cache[arch]

    return make


@pytest.fixture(scope="session")
def tiny_loaded(tiny_hf):
    """``make(arch) -> (ThinkingModel, reference_hf_model)``; the bridge gets its own copy."""
    import mechthink as mt

    cache: dict[str, tuple] = {}

    def make(arch: str):
        if arch not in cache:
            ref, tok = tiny_hf(arch)
            model = mt.load_model(f"tiny-random-{arch}", hf_model=copy.deepcopy(ref), tokenizer=tok, device="cpu")
            cache[arch] = (model, ref)
        return cache[arch]

    return make


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct through load_model, and its HF model loaded separately (fp32, eager)."""
    import mechthink as mt
    from mechthink.models.loading import smollm2_hf_dir
    from transformers import AutoModelForCausalLM

    model = mt.load_model("smollm2-135m", device="cpu")
    ref = AutoModelForCausalLM.from_pretrained(smollm2_hf_dir(), dtype=torch.float32, attn_implementation="eager").eval()
    return model, ref
