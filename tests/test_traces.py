"""mechthink.traces: generation (batched = unbatched = HF generate), JSONL store with resume
after SIGKILL, and trace anatomy (steps, backtracking events, answer-reaching instances)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from mechthink import traces as T

ARCHS = ["LlamaForCausalLM", "Qwen3ForCausalLM"]


pytestmark = pytest.mark.usefixtures("one_thread")
QUESTIONS = ["Compute 3 + 5", "Wait, let me check that again. Hmm what is 12?", "So", "The user asks about numbers."]

COMPLETION = (
    "First 3 + 5 = 8. Then 18 - 2 = 16.\nWait, 180 is 18. Hmm 1.8 and 18; so 1,800 or 18"
    "</think>The final answer is \\boxed{18}."
)


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_greedy_equals_unbatched_and_hf_generate(tiny_loaded, arch):
    model, ref = tiny_loaded(arch)
    batched = T.generate(model, QUESTIONS, max_new_tokens=12, batch_size=4)
    single = T.generate(model, QUESTIONS, max_new_tokens=12, batch_size=1)
    assert [t.ids for t in batched] == [t.ids for t in single]
    for tr in single:
        assert tr.finished in ("eos", "length")
        assert tr.ids[: tr.n_prompt] == tr.prompt_ids
        pad = model.tokenizer.pad_token_id
        with torch.inference_mode():
            out = ref.generate(
                torch.tensor([tr.prompt_ids]), attention_mask=torch.ones(1, tr.n_prompt, dtype=torch.long),
                max_new_tokens=12, do_sample=False, eos_token_id=model.eos_token_ids, pad_token_id=pad,
            )
        assert out[0].tolist() == tr.ids


def test_sampling_is_seeded_per_question_not_per_batch(tiny_loaded):
    model, _ = tiny_loaded("LlamaForCausalLM")
    kw = dict(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    a = T.generate(model, QUESTIONS, batch_size=4, **kw)
    b = T.generate(model, QUESTIONS, batch_size=1, **kw)
    c = T.generate(model, QUESTIONS, batch_size=4, **{**kw, "seed": 8})
    assert [t.ids for t in a] == [t.ids for t in b]
    assert [t.ids for t in a] != [t.ids for t in c]
    assert a[0].config["temperature"] == 1.0 and a[0].config["seed"] == 7


def test_trace_offsets_and_roundtrip(tiny_loaded):
    model, _ = tiny_loaded("LlamaForCausalLM")
    tr = T.generate(model, QUESTIONS[:1], max_new_tokens=8)[0]
    assert tr.text == model.tokenizer.decode(tr.ids)
    assert len(tr.offsets) == len(tr.ids)
    assert "".join(tr.text[a:b] for a, b in tr.offsets) == tr.text
    assert T.Trace.from_dict(json.loads(json.dumps(tr.to_dict()))) == tr
    # thinking="on": the prompt ends with "<think>\n"; thinking starts right after the tag
    assert model.to_string(tr.ids[tr.think_start - 1 : tr.think_start]) == "<think>"
    assert tr.think_start < tr.n_prompt


def test_trace_from_text_boundaries(tiny_loaded):
    model, _ = tiny_loaded("Qwen3ForCausalLM")
    tr = T.trace_from_text(model, "what is 18?", COMPLETION, gold="18")
    assert tr.thinking.strip().startswith("First 3 + 5")
    assert tr.thinking.endswith("or 18")
    assert tr.answer_text == "The final answer is \\boxed{18}."
    assert model.to_string(tr.ids[tr.think_end : tr.think_end + 1]) == "</think>"
    assert model.to_string(tr.ids[tr.think_start :]).lstrip().startswith("First")


def test_split_steps(tiny_loaded):
    model, _ = tiny_loaded("LlamaForCausalLM")
    tr = T.trace_from_text(model, "q", COMPLETION)
    steps = T.split_steps(tr)
    assert [s.text for s in steps] == [
        "First 3 + 5 = 8.", "Then 18 - 2 = 16.", "Wait, 180 is 18.", "Hmm 1.8 and 18; so 1,800 or 18",
    ]
    for s in steps:
        assert tr.text[s.char_start : s.char_end] == s.text
        assert model.to_string(tr.ids[s.token_start : s.token_end]).strip() == s.text
    plain = T.split_steps("One. Two?\nThree")
    assert [(s.text, s.char_start) for s in plain] == [("One.", 0), ("Two?", 5), ("Three", 10)]


def test_backtracking_events(tiny_loaded):
    model, _ = tiny_loaded("LlamaForCausalLM")
    tr = T.trace_from_text(model, "q", COMPLETION)
    ev = T.backtracking_events(tr, model=model)
    assert [e.word for e in ev] == ["Wait", "Hmm"]
    for e in ev:
        assert model.to_string(tr.ids[e.position : e.position + 1]).strip() in e.word
        assert tr.text[e.char : e.char + len(e.word)] == e.word
    assert [e.word for e in T.backtracking_events(tr, words=["wait"], ignore_case=True)] == ["Wait"]


def test_answer_instances(tiny_loaded):
    model, _ = tiny_loaded("LlamaForCausalLM")
    tr = T.trace_from_text(model, "q", COMPLETION, gold="18")
    inst = T.answer_instances(tr)
    # "18 - 2 = 16." / "is 18." / "and 18;" / "or 18" (end of thinking); not 180, 1.8 or 1,800
    assert [i.matched for i in inst] == ["18"] * 4
    assert [i.next_word for i in inst] == ["Wait", "Hmm", "so", None]
    ends = [tr.text[i.char_end - 1] for i in inst]
    assert ends[:3] == [".", ".", ";"]
    for i in inst:
        assert tr.offsets[i.position][0] <= i.char_end - 1 < tr.offsets[i.position][1]
        assert tr.text[i.char_start : i.char_start + 2] == "18"
    big = T.answer_instances(tr, gold="1800")
    assert [i.matched for i in big] == ["1,800"]
    assert T.answer_instances(tr, gold="77") == []


def test_anatomy_errors(tiny_loaded):
    model, _ = tiny_loaded("Qwen3ForCausalLM")
    tr = T.trace_from_text(model, "q", "no tags here 18.", thinking="default")
    assert tr.think_start is None
    with pytest.raises(ValueError, match="no thinking"):
        T.answer_instances(tr, "18")
    with pytest.raises(ValueError, match="no thinking"):
        T.backtracking_events(tr)
    with pytest.raises(ValueError, match="no gold"):
        T.answer_instances(T.trace_from_text(model, "q", COMPLETION))
    assert T.split_steps(tr, region="completion")[0].text == "no tags here 18."


def test_store_torn_lines(tiny_loaded, tmp_path, caplog):
    model, _ = tiny_loaded("LlamaForCausalLM")
    store = tmp_path / "s.jsonl"
    full = T.generate(model, QUESTIONS, max_new_tokens=5, store=store)
    lines = store.read_text().splitlines(keepends=True)
    assert len(lines) == 4
    store.write_text("".join(lines[:2]) + lines[2][:40])  # torn last line
    with caplog.at_level("WARNING"):
        again = T.generate(model, QUESTIONS, max_new_tokens=5, store=store)
    assert "torn" in caplog.text
    assert store.read_text() == "".join(lines)
    assert [t.to_dict() for t in again] == [t.to_dict() for t in full]
    store.write_text(lines[0] + lines[1][:30] + "\n" + lines[2])  # torn line in the middle
    with pytest.raises(T.TraceStoreError, match=r"s\.jsonl: line 2"):
        T.read_store(store)


_CHILD = textwrap.dedent(
    """
    import sys, time, mechthink as mt
    from mechthink import traces as T
    if sys.argv[5] == "slow":  # give the parent time to kill us between appends
        _append = T._StoreWriter.append
        T._StoreWriter.append = lambda self, trace: (_append(self, trace), time.sleep(0.3))[0]
    model = mt.load_model(sys.argv[1], device="cpu")
    qs = [f"Compute {i} + {i + 3}. Wait, let me check." for i in range(int(sys.argv[3]))]
    T.generate(model, qs, max_new_tokens=int(sys.argv[4]), batch_size=2, store=sys.argv[2])
    """
)


def _child_setup(tiny_hf, tmp_path):
    """A saved tiny Llama, the child script and its environment (for the subprocess tests)."""
    ref, tok = tiny_hf("LlamaForCausalLM")
    mdir = tmp_path / "model"
    ref.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return mdir, script, env


def test_resume_after_sigkill(tiny_hf, tmp_path):
    mdir, script, env = _child_setup(tiny_hf, tmp_path)
    n_q, n_tok = "10", "24"
    killed = tmp_path / "killed.jsonl"
    proc = subprocess.Popen([sys.executable, str(script), str(mdir), str(killed), n_q, n_tok, "slow"], env=env)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if killed.exists() and killed.read_bytes().count(b"\n") >= 2:
                break
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    n_before = killed.read_bytes().count(b"\n")
    assert 2 <= n_before < int(n_q), "the child was not killed midway"
    with open(killed, "ab") as f:  # also simulate a write torn by the kill
        f.write(b'{"id": "q9", "quest')
    subprocess.run([sys.executable, str(script), str(mdir), str(killed), n_q, n_tok, "fast"], env=env, check=True)
    clean = tmp_path / "clean.jsonl"
    subprocess.run([sys.executable, str(script), str(mdir), str(clean), n_q, n_tok, "fast"], env=env, check=True)
    a, b = killed.read_text().splitlines(), clean.read_text().splitlines()
    assert len(a) == len(b) == int(n_q)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x == y, f"line {i + 1} differs"


def test_store_is_keyed_on_the_request(tiny_loaded, tiny_hf, tmp_path):
    model, _ = tiny_loaded("LlamaForCausalLM")
    store = tmp_path / "s.jsonl"
    first = T.generate(model, QUESTIONS[:2], max_new_tokens=3, store=store)
    assert [t.fingerprint for t in first] == [model.fingerprint()] * 2
    assert [t.to_dict() for t in T.generate(model, QUESTIONS[:2], max_new_tokens=3, store=store)] == [t.to_dict() for t in first]
    with pytest.raises(T.TraceStoreError, match="max_new_tokens"):
        T.generate(model, QUESTIONS[:2], max_new_tokens=64, store=store)  # a longer budget is not the stored one
    with pytest.raises(T.TraceStoreError, match="question="):
        T.generate(model, [{"id": "q0", "question": "something else"}], max_new_tokens=3, store=store)
    other, _ = tiny_loaded("Qwen2ForCausalLM")
    with pytest.raises(T.TraceStoreError, match="(model|weights)="):
        T.generate(other, QUESTIONS[:2], max_new_tokens=3, store=store)
    f = tmp_path / "plain-file"
    f.write_text("x")
    with pytest.raises(T.TraceStoreError, match="below a regular file"):
        T.generate(model, QUESTIONS[:1], max_new_tokens=3, store=f / "s.jsonl")


def test_concurrent_writers_never_duplicate_ids(tiny_hf, tmp_path):
    mdir, script, env = _child_setup(tiny_hf, tmp_path)
    store = tmp_path / "shared.jsonl"
    procs = [subprocess.Popen([sys.executable, str(script), str(mdir), str(store), "6", "6", "slow"], env=env) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=600) == 0
    ids = [json.loads(line)["id"] for line in store.read_text().splitlines()]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 6
