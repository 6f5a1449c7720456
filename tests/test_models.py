"""Hooked ports: load_model on tiny random models of each architecture, BOS handling, bad input."""

from __future__ import annotations

import copy

import pytest
import torch

import mechthink as mt
from mechthink.models.loading import parse_dtype

from conftest import TYPE_ERRORS

ARCHS = ["Qwen2ForCausalLM", "LlamaForCausalLM", "Qwen3ForCausalLM", "Glm4ForCausalLM"]
QUESTIONS = [
    "Compute 3 + 5 - 2 + 7.",
    "Let me think step by step about numbers.",
    "So the answer is 42. Wait, let me check.",
]


def _prompts(model):
    out = [model.prompt(q, thinking="on") for q in QUESTIONS]
    out.append(model.prompt(QUESTIONS[0], thinking="off"))
    out.append(model.prompt(QUESTIONS[0], thinking="on") + "3 + 5 = 8. Wait, hmm.\n</think>\n\nThe final answer is \\boxed{13}")
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_port_matches_hf_log_softmax(tiny_loaded, arch):
    model, ref = tiny_loaded(arch)
    assert model.n_layers == 3 and model.d_model == 64
    for text in _prompts(model):
        assert "<think>" in text
        tokens = model.to_tokens(text)
        with torch.no_grad():
            expected = ref(tokens).logits.log_softmax(-1)
        got = model.log_probs(tokens)
        assert (got - expected).abs().max().item() < 1e-4, text


@pytest.mark.parametrize("arch", ARCHS)
def test_last_logits_only_forward_matches_full(tiny_loaded, arch):
    model, _ = tiny_loaded(arch)
    keep = model.last_logits_kwargs()
    assert keep == {"logits_to_keep": 1}  # every supported architecture takes it in transformers 5
    tokens = model.to_tokens(_prompts(model)[-1])
    with torch.no_grad():
        full = model.bridge(tokens)
        last = model.bridge(tokens, **keep)
    assert last.shape == (1, 1, full.shape[-1])
    assert (last[0, -1] - full[0, -1]).abs().max().item() < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_hook_names_are_hookedtransformer_names(tiny_loaded, arch):
    model, _ = tiny_loaded(arch)
    tokens = model.to_tokens(model.prompt(QUESTIONS[0]))
    names = [f"blocks.{L}.{h}" for L in range(model.n_layers) for h in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out")]
    _, cache = model.bridge.run_with_cache(tokens, names_filter=lambda n: n in names)
    for n in names:
        assert cache[n].shape == (1, tokens.shape[1], model.d_model)
    # the residual stream adds up: resid_pre[L+1] = resid_pre[L] + attn_out[L] + mlp_out[L]
    for L in range(model.n_layers - 1):
        total = cache[f"blocks.{L}.hook_resid_pre"] + cache[f"blocks.{L}.hook_attn_out"] + cache[f"blocks.{L}.hook_mlp_out"]
        assert torch.allclose(total, cache[f"blocks.{L + 1}.hook_resid_pre"], atol=1e-4)


def test_qwen_port_keeps_bos(tiny_loaded, tiny_hf):
    model, ref = tiny_loaded("Qwen2ForCausalLM")
    _, tok = tiny_hf("Qwen2ForCausalLM")
    bos = tok.bos_token_id
    text = model.prompt("Compute 3 + 5.", thinking="on")
    assert model.prepend_bos
    tokens = model.to_tokens(text)
    assert tokens[0, 0].item() == bos and (tokens[0] == bos).sum().item() == 1  # kept, not doubled
    # same ids as the tokenizer itself produces for the templated chat
    chat_ids = tok.apply_chat_template([{"role": "user", "content": "Compute 3 + 5."}], add_generation_prompt=True)
    chat_ids = chat_ids["input_ids"] if hasattr(chat_ids, "keys") else chat_ids
    assert tokens[0].tolist()[: len(chat_ids)] == list(chat_ids)
    # text without BOS gets one, as the tokenizer would add it; the bridge's own to_tokens(str)
    # on the Qwen adapter (default_prepend_bos=False) drops it — the hazard we avoid
    plain = model.to_tokens("Wait, let me check.")
    assert plain[0].tolist() == tok("Wait, let me check.")["input_ids"]
    assert model.bridge.to_tokens("Wait, let me check.")[0, 0].item() != bos
    with torch.no_grad():
        assert (model.log_probs(tokens) - ref(tokens).logits.log_softmax(-1)).abs().max() < 1e-4


def test_qwen3_has_no_bos_and_hybrid_thinking(tiny_loaded):
    model, _ = tiny_loaded("Qwen3ForCausalLM")
    assert not model.prepend_bos
    spec = mt.get_spec("Qwen/Qwen3-4B")
    model_q3 = mt.ThinkingModel(model.bridge, model.tokenizer, spec, model.prepend_bos)
    off = model_q3.prompt("Hi", thinking="off")
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    on = model_q3.prompt("Hi", thinking="on")
    assert on.endswith("<|im_start|>assistant\n<think>\n")
    assert model_q3.prompt("Hi", thinking="default").endswith("<|im_start|>assistant\n")
    assert model_q3.prompt("Hi", assistant_prefix="Wait, ").endswith("<think>\nWait, ")


def test_prompt_never_opens_thinking_twice(tiny_loaded):
    model, _ = tiny_loaded("LlamaForCausalLM")  # R1-style template already ends in "<think>\n"
    on = model.prompt("Hi", thinking="on")
    assert on.endswith("<｜Assistant｜><think>\n") and on.count("<think>") == 1
    off = model.prompt("Hi", thinking="off")
    assert off.endswith("<｜Assistant｜><think>\n\n</think>\n\n") and off.count("<think>") == 1
    with pytest.raises(TYPE_ERRORS):  # ValueError, or beartype's violation when checking is on
        model.prompt("Hi", thinking="maybe")


def test_token_ids_variants_and_errors(tiny_loaded):
    model, _ = tiny_loaded("LlamaForCausalLM")
    variants = model.token_variants("Wait")
    assert " Wait" in variants and "Wait" in variants and " wait" in variants
    ids = model.token_ids(["Wait", "So"])
    assert set(variants.values()) <= set(ids)
    for i in ids:
        assert len(model.tokenizer.decode([i]).strip()) > 0
    with pytest.raises(ValueError, match="never a single token"):
        model.token_ids(["Supercalifragilistic"])


def test_load_from_local_directory(tiny_hf, tmp_path):
    ref, tok = tiny_hf("Qwen3ForCausalLM")
    ref.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model = mt.load_model(tmp_path, device="cpu")
    assert model.spec.source == "local" and model.spec.architecture == "Qwen3ForCausalLM"
    tokens = model.to_tokens(model.prompt("Compute 3 + 5."))
    with torch.no_grad():
        assert (model.log_probs(tokens) - ref(tokens).logits.log_softmax(-1)).abs().max() < 1e-4


def test_in_memory_tokenizer_without_directory(tiny_hf):
    from transformers import PreTrainedTokenizerFast

    ref, tok = tiny_hf("LlamaForCausalLM")
    mem_tok = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, bos_token=tok.bos_token, eos_token=tok.eos_token)
    model = mt.load_model(hf_model=copy.deepcopy(ref), tokenizer=mem_tok, device="cpu")
    assert model.tokenizer.name_or_path and model.n_layers == 3


def test_unknown_name_lists_close_matches():
    with pytest.raises(mt.UnknownModelError, match="did you mean 'tiny-thinker'"):
        mt.load_model("tiny-thinkr")
    with pytest.raises(KeyError, match="Registered:"):
        mt.get_spec("no-such-model")


def test_path_that_is_not_a_model(tmp_path):
    with pytest.raises(ValueError, match="without config.json"):
        mt.load_model(tmp_path)
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0")
    with pytest.raises(ValueError, match="neither an HF model directory nor a .gguf"):
        mt.load_model(f)


def test_unsupported_architecture(tmp_path):
    import transformers

    cfg = transformers.GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    cfg.architectures = ["MadeUpForCausalLM"]
    cfg.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not supported by TransformerLens"):
        mt.load_model(tmp_path)


def test_gguf_without_tokenizer(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "no_tokenizer.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(32)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="carries no tokenizer"):
        mt.load_model(path)


def test_bad_dtype_and_device():
    with pytest.raises(ValueError, match="not supported; use one of"):
        parse_dtype("int8")
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype(torch.float16) is torch.float16
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            mt.load_model("tiny-thinker", device="cuda")
    with pytest.raises(ValueError, match="needs tokenizer="):
        mt.load_model(hf_model=object())


def test_bf16_port_runs(tiny_hf):
    ref, tok = tiny_hf("LlamaForCausalLM")
    model = mt.load_model(hf_model=copy.deepcopy(ref), tokenizer=tok, device="cpu", dtype="bf16")
    assert model.dtype == torch.bfloat16
    tokens = model.to_tokens(model.prompt("Compute 3 + 5."))
    with torch.no_grad():
        expected = ref(tokens).logits.log_softmax(-1)
    # bf16 keeps ~3 significant digits; the port must still agree on the distribution
    assert (model.log_probs(tokens) - expected).abs().max() < 0.5
    assert (model.log_probs(tokens).argmax(-1) == expected.argmax(-1)).float().mean() > 0.9


# ============================================================================ device_map
@pytest.mark.parametrize("device_map", ["auto", {"": "cpu"}, {"model.embed_tokens": "cpu", "model.layers": "cpu",
                                                              "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}])
def test_device_map_passes_through(tiny_hf, tmp_path, device_map):
    """On a CPU-only machine accelerate keeps every module on the CPU: the same numbers as device="cpu"
    (the split over several GPUs is not exercised here; see docs/scale.md)."""
    ref, tok = tiny_hf("Qwen3ForCausalLM")
    ref.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    split = mt.load_model(tmp_path, device_map=device_map)
    plain = mt.load_model(tmp_path, device="cpu")
    tokens = plain.to_tokens(plain.prompt("Compute 3 + 5."))
    with torch.no_grad():
        assert torch.equal(split.log_probs(tokens), plain.log_probs(tokens))
    assert split.device.type == "cpu"


@pytest.mark.parametrize("kwargs, needle", [
    (dict(device="cpu", device_map="auto"), "exclusive"),
    (dict(device_map="everywhere"), "device_map='everywhere' is not accepted"),
    (dict(device_map={}), "is not accepted"),
    (dict(max_memory={0: "1GiB"}), "only applies with device_map"),
])
def test_device_map_bad_input(kwargs, needle):
    with pytest.raises(ValueError) as err:
        mt.load_model("tiny-thinker", **kwargs)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_device_map_with_hf_model_is_refused(tiny_hf):
    ref, tok = tiny_hf("LlamaForCausalLM")
    with pytest.raises(ValueError, match="dispatch hf_model yourself"):
        mt.load_model(hf_model=copy.deepcopy(ref), tokenizer=tok, device_map="auto")


def test_dispatched_hf_model_is_kept_in_place(tiny_hf):
    """The dispatched branch (a model with ``hf_device_map``) on CPU: not moved, booted with
    ``device=None`` so TransformerLens reads the map; offloaded maps refuse compatibility mode."""
    ref, tok = tiny_hf("LlamaForCausalLM")
    plain = mt.load_model(hf_model=copy.deepcopy(ref), tokenizer=tok, device="cpu", compatibility_mode=False)
    hf = copy.deepcopy(ref)
    hf.hf_device_map = {"": "cpu"}  # as accelerate records a dispatch
    split = mt.load_model(hf_model=hf, tokenizer=tok, compatibility_mode=False)
    assert split.bridge.original_model is hf and split.bridge.cfg.n_devices == 1
    tokens = plain.to_tokens(plain.prompt("Compute 3 + 5."))
    with torch.no_grad():
        assert torch.equal(split.log_probs(tokens), plain.log_probs(tokens))
    hf2 = copy.deepcopy(ref)
    hf2.hf_device_map = {"": "cpu"}
    with pytest.raises(ValueError, match="cannot fold weights for compatibility mode") as err:
        mt.load_model(hf_model=hf2, tokenizer=tok)
    assert "\n" not in str(err.value)
