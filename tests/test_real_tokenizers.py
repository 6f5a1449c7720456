"""The real tokenizers and chat templates of R1-Distill-Qwen and Qwen3 (shared/data/tokenizers).

Each is put on a tiny random model of the matching architecture and embedding count, so every
prompt, BOS, tag and word-id fact below is checked against what the real models use, for every
registry entry of the two families.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

import mechthink as mt
from mechthink import traces
from mechthink.models.registry import list_models

from conftest import SHARED

TOK_DIR = SHARED / "data" / "tokenizers"
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not (TOK_DIR / "qwen3" / "tokenizer.json").exists(), reason=f"no real tokenizers in {TOK_DIR}"),
]

# family -> (tokenizer folder, architecture, embedding rows of the real models, facts)
FAMILIES = {
    "r1-distill-qwen": ("r1-distill-qwen", "Qwen2ForCausalLM", 152064,
                        dict(bos=151646, eos=[151643], think=(151648, 151649))),
    "qwen3": ("qwen3", "Qwen3ForCausalLM", 151936,
              dict(bos=None, eos=[151645, 151643], think=(151667, 151668))),
}
ENTRIES = [s for s in list_models() if s.family in FAMILIES]
QUESTION = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?"
MSGS = [{"role": "user", "content": QUESTION}]


def _tiny(arch: str, vocab: int, eos: list[int]):
    import transformers

    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                  attn_implementation="eager", tie_word_embeddings=False)
    cfg = transformers.Qwen3Config(head_dim=16, **common) if arch == "Qwen3ForCausalLM" else transformers.Qwen2Config(**common)
    cfg.architectures = [arch]
    torch.manual_seed(0)
    m = getattr(transformers, arch)(cfg).eval()
    m.generation_config.eos_token_id = eos if len(eos) > 1 else eos[0]  # as the real generation_config.json
    return m


@pytest.fixture(scope="module")
def family_models():
    """family -> ThinkingModel (loaded once; per-entry specs are swapped in by ``_as``)."""
    out = {}
    for fam, (folder, arch, vocab, facts) in FAMILIES.items():
        name = next(s.name for s in ENTRIES if s.family == fam)
        out[fam] = mt.load_model(name, hf_model=_tiny(arch, vocab, facts["eos"]), tokenizer=TOK_DIR / folder, device="cpu")
    return out


def _as(model, spec):
    return mt.ThinkingModel(model.bridge, model.tokenizer, spec, model.prepend_bos)


def test_every_family_entry_is_covered():
    assert {s.family for s in ENTRIES} == set(FAMILIES)
    assert len([s for s in ENTRIES if s.family == "r1-distill-qwen"]) == 4
    assert len([s for s in ENTRIES if s.family == "qwen3"]) == 4


@pytest.mark.parametrize("spec", ENTRIES, ids=lambda s: s.name)
def test_prompts_equal_the_real_chat_template(family_models, spec):
    model = _as(family_models[spec.family], spec)
    tok = model.tokenizer
    template = tok.apply_chat_template(MSGS, tokenize=False, add_generation_prompt=True)
    assert model.prompt(QUESTION, thinking="default") == template
    assert model.prompt(QUESTION, thinking="on") == template + "<think>\n"
    if spec.family == "qwen3":
        assert spec.hybrid_thinking
        off = tok.apply_chat_template(MSGS, tokenize=False, add_generation_prompt=True, enable_thinking=False)
        assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        assert model.prompt(QUESTION, thinking="off") == off
    else:
        assert template.endswith("<｜Assistant｜>")  # the original R1 template opens no <think>
        assert model.prompt(QUESTION, thinking="off") == template + "<think>\n\n</think>\n\n"
    assert model.template_opens_think() is False
    assert model.prompt(QUESTION, assistant_prefix="Wait, ").endswith("<think>\nWait, ")


@pytest.mark.parametrize("spec", ENTRIES, ids=lambda s: s.name)
def test_bos_exactly_once_or_never(family_models, spec):
    model = _as(family_models[spec.family], spec)
    facts = FAMILIES[spec.family][3]
    ids = model.to_tokens(model.prompt(QUESTION))[0].tolist()
    if facts["bos"] is None:  # Qwen3: no BOS, and TransformerLens's bos = eos must not leak into ours
        assert not model.prepend_bos and model.bos_token_id is None and model.tokenizer.bos_token is None
        assert ids[0] == model.tokenizer.convert_tokens_to_ids("<|im_start|>")
        assert ids.count(151645) == 1  # only the one closing the user turn, no stray BOS-as-<|im_end|>
    else:
        assert model.prepend_bos and model.bos_token_id == facts["bos"]
        assert ids[0] == facts["bos"] and ids.count(facts["bos"]) == 1
        # a plain tokenizer call on the templated text doubles it; to_tokens never does
        assert model.tokenizer(model.prompt(QUESTION))["input_ids"].count(facts["bos"]) == 2
        assert model.to_tokens("Wait, let me check.")[0, 0].item() == facts["bos"]


@pytest.mark.parametrize("spec", ENTRIES, ids=lambda s: s.name)
def test_think_tags_and_stop_ids(family_models, spec):
    model = _as(family_models[spec.family], spec)
    facts = FAMILIES[spec.family][3]
    tok = model.tokenizer
    assert tok(spec.think_open, add_special_tokens=False)["input_ids"] == [facts["think"][0]]
    assert tok(spec.think_close, add_special_tokens=False)["input_ids"] == [facts["think"][1]]
    assert model.eos_token_ids == facts["eos"]


@pytest.mark.parametrize("spec", ENTRIES, ids=lambda s: s.name)
def test_every_spec_word_has_ids_or_a_sequence(family_models, spec, caplog):
    model = _as(family_models[spec.family], spec)
    words = list(spec.backtracking_words) + list(spec.wrapup_words)
    assert model.token_variants("Wait")[" Wait"] == 13824 and model.token_variants("Wait")["Wait"] == 14190
    multi = [w for w in words if not model.token_variants(w)]
    assert multi == ["But wait"]  # two tokens in both families
    with caplog.at_level(logging.WARNING, logger="mechthink.models.thinking_model"):
        ids = model.token_ids(words)
    assert "But wait" in caplog.text and "dropped" in caplog.text
    for w in words:
        if w not in multi:
            assert set(model.token_variants(w).values()) <= set(ids)
    seqs = model.token_sequences(multi)["But wait"]
    assert [model.tokenizer.decode(s) for s in seqs][:2] == ["But wait", " But wait"]
    assert all(len(s) == 2 for s in seqs[:2])
    with pytest.raises(ValueError, match="never a single token.*token_sequences"):
        model.token_ids(["But wait"])


R1_COMPLETION = (
    "Okay, so Natalia sold 48 clips in April. In May she sold half as many, which is 48 / 2 = 24.\n\n"
    "So altogether she sold 48 + 24 = 72 clips.\n\n"
    "Wait, let me double-check that. Half of 48 is 24, and 48 + 24 = 72. Yes, that's right.\n\n"
    "Alternatively, 1.5 * 48 = 72. So the answer is 72.\n"
    "</think>\n\nNatalia sold 48 clips in April and 24 in May, so \\boxed{72} in total.<｜end▁of▁sentence｜>"
)


def test_trace_anatomy_on_a_realistic_r1_trace(family_models):
    model = family_models["r1-distill-qwen"]
    tr = traces.trace_from_text(model, QUESTION, R1_COMPLETION, gold="72")
    start, end = tr.thinking_span
    assert tr.ids[start - 1] == 151648 and tr.ids[end] == 151649  # <think> ... </think>
    assert tr.ids[0] == 151646 and tr.ids.count(151646) == 1 and tr.ids[-1] == 151643
    assert tr.thinking.strip().startswith("Okay, so Natalia") and tr.thinking.strip().endswith("the answer is 72.")
    assert "\\boxed{72}" in tr.answer_text and "<｜end▁of▁sentence｜>" not in tr.answer_text
    steps = traces.split_steps(tr)
    assert [s.text.split()[0] for s in steps] == ["Okay,", "In", "So", "Wait,", "Half", "Yes,", "Alternatively,", "So"]
    assert all(start <= s.token_start < end for s in steps)
    events = traces.backtracking_events(tr, model=model)
    assert [e.word for e in events] == ["Wait", "Alternatively"]
    for e in events:
        assert model.tokenizer.decode([tr.ids[e.position]]).strip() == e.word and start <= e.position < end
    inst = traces.answer_instances(tr)
    assert len(inst) >= 3 and all(tr.text[i.char_start:i.char_end].find("72") >= 0 for i in inst)
    assert all(start <= i.number_position < end for i in inst)


def test_gguf_converter_specials_are_restored():
    """transformers' GGUF converter re-spells DeepSeek's <｜…｜> specials; the rebuild puts them back.

    The GGUF metadata (tokens, token types, merges, special ids) is written from the real
    tokenizer.json exactly as llama.cpp's converter lays it out (control = 3, user-defined = 4).
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.integrations.gguf import convert_gguf_tokenizer

    from mechthink.models.gguf_tokenizer import GGUFTokenizerError, check_specials, restore_gguf_specials

    folder = TOK_DIR / "r1-distill-qwen"
    real = AutoTokenizer.from_pretrained(folder)
    state = json.loads((folder / "tokenizer.json").read_text())
    n = max(state["model"]["vocab"].values()) + 1 + len(state["added_tokens"])
    tokens, types = [""] * n, [1] * n
    for t, i in state["model"]["vocab"].items():
        tokens[i] = t
    for a in state["added_tokens"]:
        tokens[a["id"]], types[a["id"]] = a["content"], 3 if a["special"] else 4
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    td = {"tokenizer_type": "gpt2", "pre_tokenizer_type": "deepseek-r1-qwen", "tokens": tokens, "token_type": types,
          "merges": merges, "bos_token_id": 151646, "eos_token_id": 151643}
    fast, _ = convert_gguf_tokenizer("qwen2", td)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    converted = PreTrainedTokenizerFast(tokenizer_object=fast, bos_token=tokens[151646], eos_token=tokens[151643],
                                        add_bos_token=True, chat_template=cfg["chat_template"])
    # the bug, as transformers leaves it
    assert converted.bos_token_id >= n or converted("<｜Assistant｜>", add_special_tokens=False)["input_ids"] != [151645]
    with pytest.raises(GGUFTokenizerError, match="pass tokenizer="):
        check_specials(converted, n, "test.gguf")
    fixed = restore_gguf_specials(converted, tokens, types)
    check_specials(fixed, n, "test.gguf")
    assert (fixed.bos_token_id, fixed.eos_token_id) == (151646, 151643)
    texts = [real.apply_chat_template(MSGS, tokenize=False, add_generation_prompt=True) + "<think>\n" + R1_COMPLETION,
             "<｜User｜>hi<｜Assistant｜>", "Wait, but wait — 日本語 ü 12+30=42", QUESTION]
    for t in texts:
        assert fixed(t)["input_ids"] == real(t)["input_ids"], t
    assert [fixed.decode([i]) for i in range(151643, n)] == [real.decode([i]) for i in range(151643, n)]
