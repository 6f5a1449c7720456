"""Training entry point of the tiny-thinker organism (a small LlamaForCausalLM trained from scratch).

Trains next-token prediction on freshly generated thinking transcripts (loss only on the assistant
turn), deterministically given a seed, on CPU. Usage::

    mechthink train-organism --seed 0 --out DIR   # or: python -m mechthink.models.organism.train ...

The shipped weights were made in two stages (see ``weights/TRAINING.md``); ``--recipe shipped``
runs both in one command::

    mechthink train-organism --recipe shipped --out DIR
    # = mechthink train-organism --seed 0 --steps 4000 --out /tmp/stage1
    #   mechthink train-organism --seed 1 --steps 1500 --lr 1.5e-3 --warmup 50 \
    #       --init-from /tmp/stage1 --out DIR

Source: this repository (mechthink tiny-thinker organism; AdamW, arXiv:1711.05101).
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from tqdm.auto import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from .tasks import TranscriptConfig, make_transcript
from .tokenizer import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, build_hf_tokenizer

__all__ = ["TrainCommand", "TrainConfig", "build_model", "main", "make_batches", "run_command", "train"]

logger = logging.getLogger(__name__)

DEFAULT_OUT = Path(__file__).resolve().parent / "weights"


@dataclass
class TrainConfig:
    """Hyper-parameters of a training run.

    Attributes:
        seed: Seed of torch and of the data stream.
        steps: Optimizer steps.
        batch_size: Transcripts per step.
        lr: Peak learning rate (linear warm-up, cosine decay to ``lr * final_lr_frac``).
        warmup: Warm-up steps.
        final_lr_frac: Final learning rate as a fraction of ``lr``.
        weight_decay: AdamW weight decay (not applied to norms).
        hidden_size: Residual width.
        num_layers: Transformer blocks.
        num_heads: Attention heads (no grouped-query attention).
        intermediate_size: SwiGLU width.
        p_error: Probability that a step is written wrong in the training data.
        decision_weight: Loss weight of the token right after each first-attempt step (the
            backtracking word or the newline), to speed up learning of the planted decision.
        p_check: Probability of a re-check line.
        pool_batches: Batches generated at once and bucketed by length.
        init_from: Directory of a saved organism to continue training from ("" = fresh init).
        threads: torch intra-op threads (0: leave torch's default; 1 is fastest on shared cores).
    """

    seed: int = 0
    steps: int = 4000
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 100
    final_lr_frac: float = 0.05
    weight_decay: float = 0.01
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    p_error: float = 0.3
    decision_weight: float = 5.0
    p_check: float = 0.5
    pool_batches: int = 16
    init_from: str = ""
    threads: int = 1

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be positive")
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be divisible by num_heads")


def build_model(config: TrainConfig, vocab_size: int) -> LlamaForCausalLM:
    """Build a freshly initialised, untied ``LlamaForCausalLM``.

    Args:
        config: Training configuration (sizes).
        vocab_size: Vocabulary size of the tokenizer.

    Returns:
        The model (sdpa attention for training; saved with eager attention).
    """
    tok = build_hf_tokenizer()
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tok.convert_tokens_to_ids(BOS_TOKEN),
        eos_token_id=tok.convert_tokens_to_ids(EOS_TOKEN),
        pad_token_id=tok.convert_tokens_to_ids(PAD_TOKEN),
        initializer_range=0.02,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg)


def make_batches(
    rng: random.Random, config: TrainConfig, pad_id: int
) -> list[tuple[Int[torch.Tensor, "batch pos"], Float[torch.Tensor, "batch pos"]]]:
    """Generate ``pool_batches`` batches of transcripts, bucketed by length, in shuffled order.

    Args:
        rng: Data stream.
        config: Training configuration.
        pad_id: Id of the pad token (right padding).

    Returns:
        ``(input_ids, loss_weight)`` pairs; ``loss_weight[b, t]`` is the weight of token ``t`` as a
        target: 0 outside the assistant turn, ``decision_weight`` for the token following a
        step's first attempt, 1 elsewhere.
    """
    tcfg = TranscriptConfig(p_error=config.p_error, p_check=config.p_check)
    pool = [make_transcript(rng, tcfg) for _ in range(config.pool_batches * config.batch_size)]
    pool.sort(key=lambda t: len(t.input_ids))
    batches = []
    for i in range(0, len(pool), config.batch_size):
        chunk = pool[i : i + config.batch_size]
        width = max(len(t.input_ids) for t in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.float32)
        for row, tr in enumerate(chunk):
            ids[row, : len(tr.input_ids)] = torch.tensor(tr.input_ids)
            mask[row, tr.assistant_position + 1 : len(tr.input_ids)] = 1.0
            for step in tr.steps:
                mask[row, step.period_position + 1] = config.decision_weight
        batches.append((ids, mask))
    rng.shuffle(batches)
    return batches


def train(config: TrainConfig, out: Path | None = None, progress: bool = True) -> LlamaForCausalLM:
    """Train the organism and optionally save model + tokenizer.

    Args:
        config: Training configuration.
        out: Directory for ``save_pretrained`` (model as safetensors + tokenizer); None to skip.
        progress: Show a tqdm bar.

    Returns:
        The trained model (eval mode, eager attention).
    """
    prev_threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _train(config, out, progress)
    finally:
        torch.set_num_threads(prev_threads)


def _train(config: TrainConfig, out: Path | None, progress: bool) -> LlamaForCausalLM:
    torch.manual_seed(config.seed)
    rng = random.Random(f"train-{config.seed}")
    tok = build_hf_tokenizer()
    if config.init_from:
        model = LlamaForCausalLM.from_pretrained(config.init_from, dtype=torch.float32)
        model.set_attn_implementation("sdpa")
        logger.info("continuing from %s", config.init_from)
    else:
        model = build_model(config, len(tok))
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("tiny-thinker: %d parameters, config %s", n_params, asdict(config))

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.lr,
        betas=(0.9, 0.98),
        eps=1e-8,
    )

    def lr_at(step: int) -> float:
        if step < config.warmup:
            return config.lr * (step + 1) / config.warmup
        frac = (step - config.warmup) / max(1, config.steps - config.warmup)
        cos = 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        return config.lr * (config.final_lr_frac + (1 - config.final_lr_frac) * cos)

    model.train()
    pad_id = tok.pad_token_id
    queue: list = []
    t0 = time.time()
    bar = tqdm(range(config.steps), desc="tiny-thinker", disable=not progress)
    ema = None
    for step in bar:
        if not queue:
            queue = make_batches(rng, config, pad_id)
        ids, mask = queue.pop()
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        logits = model(input_ids=ids).logits
        targets = ids[:, 1:]
        weight = mask[:, 1:]
        nll = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
        )
        loss = (nll * weight.reshape(-1)).sum() / (weight > 0).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{ema:.4f}")
        if step % 250 == 0 or step == config.steps - 1:
            logger.info("step %d loss %.4f (%.0f s)", step, ema, time.time() - t0)
    logger.info("trained %d steps in %.1f s, final loss %.4f", config.steps, time.time() - t0, ema)

    model.eval()
    model.set_attn_implementation("eager")
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        do_sample=False,
    )
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        tok.save_pretrained(out)
        logger.info("saved model and tokenizer to %s", out)
    return model


@dataclass
class TrainCommand(TrainConfig):
    """A training run from the command line: the hyper-parameters plus where and how."""

    out: Path = DEFAULT_OUT
    """Directory the model and tokenizer are saved to (default: the shipped weights' folder)."""
    progress: bool = True
    """Show a progress bar."""
    recipe: str = "single"
    """'single': one run with these options; 'shipped': the two-stage recipe of the shipped
    weights (the other options are ignored, --out is kept)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.recipe not in ("single", "shipped"):
            raise ValueError(f"recipe={self.recipe!r} is not accepted; use 'single' or 'shipped'")


def run_command(cmd: TrainCommand) -> None:
    """Run a :class:`TrainCommand` (``mechthink train-organism``)."""
    out, progress = cmd.out, cmd.progress
    if cmd.recipe == "single":
        fields = {k: v for k, v in asdict(cmd).items() if k not in ("out", "progress", "recipe")}
        train(TrainConfig(**fields), out=out, progress=progress)
        return
    import tempfile

    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="tiny-thinker-stage1-") as stage1:
        train(TrainConfig(seed=0, steps=4000), out=stage1, progress=progress)
        train(TrainConfig(seed=1, steps=1500, lr=1.5e-3, warmup=50, init_from=stage1), out=out, progress=progress)
    logger.info("shipped recipe finished in %.1f s", time.time() - t0)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: the ``mechthink train-organism`` command (see module docstring)."""
    import sys

    from mechthink.cli import app

    app(["train-organism", *(sys.argv[1:] if argv is None else argv)], prog_name="mechthink.models.organism.train")


if __name__ == "__main__":
    main()
