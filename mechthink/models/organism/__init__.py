"""tiny-thinker: a small trained thinking-model organism with planted backtracking.

A 0.91M-parameter ``LlamaForCausalLM`` trained from scratch (``train.py``) on R1-format thinking
transcripts of multi-step arithmetic (``tasks.py``) in which wrongly written steps are followed by
a backtracking word and the redone step, so analyses can be checked against known ground truth.
Weights and tokenizer ship in ``weights/`` and load offline. Source: this repository.
"""

from __future__ import annotations

from pathlib import Path

from .tasks import (
    BACKTRACK_WORDS,
    HELD_OUT_SEED,
    MAX_TOTAL,
    ArithmeticProblem,
    StepExample,
    StepInfo,
    Transcript,
    TranscriptConfig,
    held_out_examples,
    make_transcript,
    minimal_pair,
    minimal_pairs,
    prompt_text,
    render_transcript,
    sample_problem,
    sample_transcripts,
)
from .tokenizer import (
    ASSISTANT_TOKEN,
    BOS_TOKEN,
    CHAT_TEMPLATE,
    EOS_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    THINK_CLOSE,
    THINK_OPEN,
    USER_TOKEN,
    build_hf_tokenizer,
)

__all__ = [
    "ASSISTANT_TOKEN",
    "BACKTRACK_WORDS",
    "BOS_TOKEN",
    "CHAT_TEMPLATE",
    "EOS_TOKEN",
    "EVENT_KINDS",
    "HELD_OUT_SEED",
    "MAX_TOTAL",
    "PAD_TOKEN",
    "GroundTruthHits",
    "ArithmeticProblem",
    "SPECIAL_TOKENS",
    "StepExample",
    "StepInfo",
    "THINK_CLOSE",
    "THINK_OPEN",
    "Transcript",
    "TranscriptConfig",
    "USER_TOKEN",
    "WEIGHTS_DIR",
    "build_hf_tokenizer",
    "answer_determining_step",
    "context_spans",
    "ground_truth_hits",
    "held_out_examples",
    "is_organism",
    "organism_problems",
    "problems_for",
    "step_examples",
    "token_events",
    "load_hf",
    "make_transcript",
    "minimal_pair",
    "minimal_pairs",
    "minimal_pairs_for",
    "prompt_text",
    "render_transcript",
    "sample_problem",
    "sample_transcripts",
]

from .examples import is_organism, minimal_pairs_for, organism_problems, problems_for, step_examples  # noqa: E402
from .events import EVENT_KINDS, token_events  # noqa: E402
from .scoring import GroundTruthHits, answer_determining_step, context_spans, ground_truth_hits  # noqa: E402

#: Directory of the shipped model (safetensors) and tokenizer files.
WEIGHTS_DIR: Path = Path(__file__).resolve().parent / "weights"


def load_hf(device: str = "cpu", weights_dir: str | Path | None = None):
    """Load the shipped tiny-thinker model and tokenizer with plain HF transformers (offline).

    Args:
        device: Torch device for the model.
        weights_dir: Directory to load from (default ``WEIGHTS_DIR``).

    Returns:
        ``(model, tokenizer)``: a ``LlamaForCausalLM`` in eval mode (float32, eager attention) and
        its fast tokenizer (left padding; the chat template writes ``<|bos|>``, the tokenizer
        itself adds none).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.to(device)
    model.eval()
    return model, tokenizer
