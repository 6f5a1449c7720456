"""Tests of the tiny-thinker organism: generator ground truth, tokenizer, training smoke test, and
the planted behaviour of the shipped weights on held-out problems."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mechthink.models import organism
from mechthink.models.organism import (
    BACKTRACK_WORDS,
    MAX_TOTAL,
    SPECIAL_TOKENS,
    WEIGHTS_DIR,
    build_hf_tokenizer,
    held_out_examples,
    load_hf,
    prompt_text,
    sample_transcripts,
)
from mechthink.models.organism.evaluate import evaluate, parse_boxed


@pytest.fixture(scope="module")
def tok():
    return build_hf_tokenizer()


@pytest.fixture(scope="module")
def transcripts():
    return sample_transcripts(300, seed=7)


def _num(tok, ids):
    return int("".join(tok.convert_ids_to_tokens(ids)))


# ---------------------------------------------------------------- generator


def test_determinism():
    a = sample_transcripts(20, seed=3)
    b = sample_transcripts(20, seed=3)
    c = sample_transcripts(20, seed=4)
    assert [t.text for t in a] == [t.text for t in b]
    assert [t.input_ids for t in a] == [t.input_ids for t in b]
    assert [t.text for t in a] != [t.text for t in c]
    assert held_out_examples(10, seed=5) == held_out_examples(10, seed=5)


def test_format_and_problem_range(transcripts):
    for tr in transcripts:
        p = tr.problem
        assert 2 <= len(p.operands) <= 5 and all(0 <= x <= 9 for x in p.operands)
        assert all(0 <= r <= MAX_TOTAL for r in p.running_totals)
        assert tr.text.startswith(prompt_text(p.question))
        assert tr.text.endswith(
            f"So the answer is {tr.answer}.\n</think>\n\nThe final answer is "
            f"\\boxed{{{tr.answer}}}.<|end|>"
        )
        assert parse_boxed(tr.text) == tr.answer == p.answer


def test_ground_truth_positions(tok, transcripts):
    n_err = n_bt = 0
    for tr in transcripts:
        toks = tok.convert_ids_to_tokens(tr.input_ids)
        assert toks[0] == "<|bos|>"
        assert toks[tr.think_open_position] == "<think>"
        assert toks[tr.think_close_position] == "</think>"
        assert toks[tr.assistant_position] == "<|assistant|>"
        q0, q1 = tr.question_span
        assert tok.decode(tr.input_ids[q0:q1]) == tr.problem.question
        assert _num(tok, [tr.input_ids[i] for i in tr.boxed_answer_positions]) == tr.answer
        assert len(tr.answer_positions) >= 2
        for span in tr.answer_positions:
            assert tr.think_open_position < span[0] and span[-1] < tr.think_close_position
            assert _num(tok, [tr.input_ids[i] for i in span]) == tr.answer
        assert toks[tr.wrapup_position] == "So"
        for step, (op, rhs) in zip(tr.steps, zip(tr.problem.ops, tr.problem.operands[1:])):
            ids = tr.input_ids
            assert _num(tok, [ids[i] for i in step.lhs_positions]) == step.lhs
            assert toks[step.op_position] == " " + op == " " + step.op
            assert _num(tok, [ids[i] for i in step.rhs_positions]) == step.rhs == rhs
            assert _num(tok, [ids[i] for i in step.result_positions]) == step.written_result
            assert toks[step.period_position] == "."
            assert step.period_position == step.result_positions[-1] + 1
            assert step.is_error == (step.written_result != step.correct_result)
            nxt = toks[step.period_position + 1]
            if step.is_error:
                n_err += 1
                assert nxt in BACKTRACK_WORDS and step.backtrack_position == step.period_position + 1
                assert nxt == step.backtrack_word
                corr = step.correction
                assert _num(tok, [ids[i] for i in corr.result_positions]) == step.correct_result
                assert toks[corr.period_position + 1] == "\n"
            else:
                assert nxt == "\n" and step.backtrack_position is None
        bts = [s.backtrack_position for s in tr.steps if s.backtrack_position is not None]
        assert tr.backtrack_positions == bts
        n_bt += len(bts)
    assert n_err == n_bt > 20


def test_roundtrip_and_offsets(tok, transcripts):
    for tr in transcripts[:100]:
        enc = tok(tr.text, return_offsets_mapping=True)
        assert enc.input_ids == tr.input_ids  # the tokenizer adds no bos of its own
        assert tok.decode(enc.input_ids) == tr.text
        for i, (s, e) in zip(enc.input_ids, enc.offset_mapping):
            assert tok.decode([i]) == tr.text[s:e]
    assert tok.decode(tok("Hello, world! 12 + 7 = 19?").input_ids) == "Hello, world! 12 + 7 = 19?"


def test_single_tokens(tok):
    for t in SPECIAL_TOKENS:
        assert len(tok(t).input_ids) == 1
    for w in BACKTRACK_WORDS + (" So", " Therefore", "Wait", "So", "Therefore", "Hmm"):
        ids = tok(w).input_ids
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids) == [w]
    for d in range(10):
        assert len(tok(str(d)).input_ids) == 1
    assert tok.convert_ids_to_tokens(tok(" 13").input_ids) == [" ", "1", "3"]
    assert tok.eos_token == "<|end|>" and tok.bos_token == "<|bos|>" and tok.pad_token


def test_chat_template(tok, tmp_path):
    msgs = [{"role": "user", "content": "Compute 3 + 5."}]
    want = "<|bos|><|user|>\nCompute 3 + 5.\n<|assistant|>\n"
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == want
    tr = sample_transcripts(1, seed=0)[0]
    q = prompt_text(tr.problem.question)
    assistant = tr.text[len(q) - len("<think>\n") : -len("<|end|>")]
    full = [
        {"role": "user", "content": tr.problem.question},
        {"role": "assistant", "content": assistant},
    ]
    assert tok.apply_chat_template(full, tokenize=False) == tr.text
    tok.save_pretrained(tmp_path)
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    assert tok2.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == want
    assert tok2(tr.text).input_ids == tr.input_ids
    assert tok2.decode(tr.input_ids) == tr.text


def test_held_out_examples(tok):
    ex = held_out_examples(40, seed=11)
    assert len(ex) == 40 and sum(e.is_error for e in ex) == 20
    for e in ex:
        ids = e.input_ids
        toks = tok.convert_ids_to_tokens(ids)
        assert toks[0] == "<|bos|>" and toks[-1] == "." and "<think>" in toks
        assert e.period_position == len(ids) - 1
        written = _num(tok, [ids[i] for i in e.step_result_positions])
        assert written == e.written_result
        assert (written != e.correct_result) == e.is_error
        q0, q1 = e.question_span
        assert tok.decode(ids[q0:q1]).startswith("Compute ")
        nxt = tok.convert_ids_to_tokens([e.next_token_in_data])[0]
        assert (nxt in BACKTRACK_WORDS) == e.is_error
        assert e.text == tok.decode(ids)


# ---------------------------------------------------------------- training smoke test


def test_train_smoke(tmp_path):
    from mechthink.models.organism.train import TrainConfig, train

    cfg = TrainConfig(
        steps=3, batch_size=4, hidden_size=32, num_layers=1, num_heads=2,
        intermediate_size=64, warmup=1, pool_batches=2,
    )
    train(cfg, out=tmp_path, progress=False)
    model, tok = load_hf(weights_dir=tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    ids = torch.tensor([tok(prompt_text("Compute 1 + 2.")).input_ids])
    assert model(ids).logits.shape == (1, ids.shape[1], len(tok))
    # deterministic given the seed
    m2 = train(cfg, out=None, progress=False)
    for (n, p), (_, q) in zip(model.named_parameters(), m2.named_parameters()):
        assert torch.equal(p, q), n


# ---------------------------------------------------------------- shipped weights

needs_weights = pytest.mark.skipif(
    not (WEIGHTS_DIR / "model.safetensors").exists(), reason="tiny-thinker weights not shipped"
)


@needs_weights
def test_shipped_weights_load_offline():
    model = AutoModelForCausalLM.from_pretrained(WEIGHTS_DIR)
    tok = AutoTokenizer.from_pretrained(WEIGHTS_DIR)
    assert type(model).__name__ == "LlamaForCausalLM"
    n = sum(p.numel() for p in model.parameters())
    assert 2e5 < n < 2.5e6
    assert not model.config.tie_word_embeddings
    size = sum(f.stat().st_size for f in WEIGHTS_DIR.iterdir())
    assert size < 10 * 2**20
    assert tok.apply_chat_template(
        [{"role": "user", "content": "Compute 3 + 5."}], tokenize=False, add_generation_prompt=True
    ) == "<|bos|><|user|>\nCompute 3 + 5.\n<|assistant|>\n"
    assert organism.BACKTRACK_WORDS == (" Wait", " Hmm", " Alternatively")


@needs_weights
def test_planted_behaviour():
    torch.manual_seed(0)
    model, tok = load_hf()
    res = evaluate(model, tok, n_steps=200, n_problems=100, n_prefill=100, seed=1234)
    assert res.n_steps == 200 and res.n_prefill >= 90
    assert res.error_backtrack_rate >= 0.95, res
    assert res.correct_no_backtrack_rate >= 0.95, res
    assert res.greedy_accuracy >= 0.95, res
    assert res.prefill_recovery_rate >= 0.90, res



def test_minimal_pairs_align_token_for_token():
    import dataclasses

    from mechthink.models.organism import minimal_pair, minimal_pairs

    pairs = minimal_pairs(20)
    assert len(pairs) == 20
    for wrong, fixed in pairs:
        assert wrong.is_error and not fixed.is_error
        assert len(wrong.input_ids) == len(fixed.input_ids)
        diff = [i for i, (a, b) in enumerate(zip(wrong.input_ids, fixed.input_ids)) if a != b]
        assert diff and set(diff) <= set(wrong.step_result_positions)
        assert fixed.text.endswith(f"= {wrong.correct_result}.")
    ex = pairs[0][0]
    with pytest.raises(ValueError, match="differ in length"):
        minimal_pair(dataclasses.replace(ex, correct_result=100 + ex.correct_result))
    with pytest.raises(ValueError, match="is_error=True"):
        minimal_pair(pairs[0][1])
