"""Importing traces written by other engines: formats, tokenizer checks, provenance, stores, analyses."""

from __future__ import annotations

import json

import pytest

import mechthink as mt
from mechthink import traces
from mechthink.models.organism import problems_for
from mechthink.trace_import import TraceImportError

from conftest import SHARED

pytestmark = pytest.mark.usefixtures("one_thread")
TOK_DIR = SHARED / "data" / "tokenizers"


@pytest.fixture(scope="module")
def thinker():
    return mt.load_model("tiny-thinker")


@pytest.fixture(scope="module")
def generated(thinker):  # four greedy tiny-thinker traces, written to files by the tests
    return problems_for(thinker, 4, 7), traces.generate(thinker, problems_for(thinker, 4, 7), max_new_tokens=80)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _vllm(model, tr, **extra):
    """A vLLM offline RequestOutput as JSON (text detokenized without special tokens, as vLLM does)."""
    return {"prompt": tr.prompt, "prompt_token_ids": tr.prompt_ids, **extra,
            "outputs": [{"text": model.tokenizer.decode(tr.generated_ids, skip_special_tokens=True),
                         "token_ids": tr.generated_ids, "finish_reason": "stop" if tr.finished == "eos" else "length"}]}


def _same(a, b):
    assert (a.ids, a.prompt_ids, a.text, a.offsets) == (b.ids, b.prompt_ids, b.text, b.offsets)
    assert (a.think_start, a.think_end, a.thinking, a.answer_text, a.finished) == (
        b.think_start, b.think_end, b.thinking, b.answer_text, b.finished)


def test_vllm_output_gives_the_generated_traces(thinker, generated, tmp_path):
    qs, gen = generated
    f = _write(tmp_path / "vllm.jsonl", [_vllm(thinker, t, sampling_params={"temperature": 0.0, "max_tokens": 80})
                                         for t in reversed(gen)])
    got = traces.import_traces(thinker, f, questions=qs)
    for a, b, q in zip(gen, got, qs):
        _same(a, b)
        assert (b.id, b.gold, b.question) == (q.id, str(q.answer), q.question)
    prov = got[0].config["imported"]
    assert prov["engine"] == "vllm" and prov["line"] == 4 and prov["path"] == str(f.resolve())
    assert prov["sampling"] == {"temperature": 0.0, "max_tokens": 80} and len(prov["sha1"]) == 40
    assert got[0].config["thinking"] == "on" and got[0].fingerprint == ""
    in_file_order = traces.import_traces(thinker, f)
    assert [t.id for t in in_file_order] == ["line1", "line2", "line3", "line4"]
    assert in_file_order[0].question == gen[-1].question  # the question is read back out of the chat template


def test_text_only_formats(thinker, generated, tmp_path):
    """prompt/completion text, SGLang (question + output ids), OpenAI-style messages."""
    qs, gen = generated
    tr = gen[0]
    completion = thinker.tokenizer.decode(tr.generated_ids, skip_special_tokens=False)
    plain = {"id": "a", "prompt": tr.prompt, "completion": completion, "temperature": 0}
    sglang = {"question": tr.question, "text": thinker.tokenizer.decode(tr.generated_ids, skip_special_tokens=True),
              "output_ids": tr.generated_ids, "meta_info": {"id": "b", "finish_reason": {"type": "stop"}}}
    chat = {"messages": [{"role": "user", "content": tr.question}, {"role": "assistant", "content": completion}]}
    got = traces.import_traces(thinker, _write(tmp_path / "t.jsonl", [plain, sglang, chat]))
    _same(got[1], tr)
    assert all(t.ids == tr.ids for t in got)  # tiny-thinker's tokenizer re-tokenizes the text to the same ids
    assert [t.config["imported"]["engine"] for t in got] == ["plain", "sglang", "openai"]
    assert [t.id for t in got] == ["a", "b", "line3"] and got[0].config["imported"]["sampling"] == {"temperature": 0}


def test_store_keeps_one_import(thinker, generated, tmp_path):
    qs, gen = generated
    f = _write(tmp_path / "v.jsonl", [_vllm(thinker, t) for t in gen])
    store = tmp_path / "store.jsonl"
    first = traces.import_traces(thinker, f, questions=qs, store=store)
    again = traces.import_traces(thinker, f, questions=qs, store=store)
    stored = traces.read_store(store)
    assert [t.id for t in stored] == [q.id for q in qs] and [t.to_dict() for t in again] == [t.to_dict() for t in first]
    _write(f, [_vllm(thinker, t, sampling_params={"temperature": 0.6}) for t in gen])  # another request, same ids
    with pytest.raises(traces.TraceStoreError, match="was stored from"):
        traces.import_traces(thinker, f, questions=qs, store=store)


def _bad_files(model, tr):
    good = _vllm(model, tr)
    vocab = len(model.tokenizer)
    return {
        "empty": ("", "no traces"),
        "truncated": (json.dumps(good) + "\n" + json.dumps(good)[:40] + "\n", "line 2 is not valid JSON"),
        "not an object": ("[1, 2]\n", "line 1: expected a JSON object"),
        "no completion": (json.dumps({"prompt": tr.prompt}) + "\n", "line 1: no completion"),
        "no prompt": (json.dumps({"completion": "x"}) + "\n", "line 1: no prompt"),
        "ids outside vocab": (json.dumps({**good, "outputs": [{"text": "", "token_ids": [vocab + 5]}]}) + "\n",
                              "outside the"),
        "ids do not decode to text": (json.dumps({**good, "outputs": [{**good["outputs"][0], "text": "other"}]}) + "\n",
                                      "do not decode"),
        "another chat template": (json.dumps({"prompt": "<|im_start|>user\nHi<|im_end|>\n", "completion": "x"}) + "\n",
                                  "chat template"),
        "another model": (json.dumps({**good, "model": "Qwen3-8B"}) + "\n", "generated by model"),
        "ids as strings": (json.dumps({**good, "prompt_token_ids": ["1"]}) + "\n", "list of integer token ids"),
    }


@pytest.mark.parametrize("case", [
    "empty", "truncated", "not an object", "no completion", "no prompt", "ids outside vocab",
    "ids do not decode to text", "another chat template", "another model", "ids as strings"])
def test_bad_files_are_one_line_errors_naming_file_and_line(thinker, generated, tmp_path, case):
    text, needle = _bad_files(thinker, generated[1][0])[case]
    f = tmp_path / "bad.jsonl"
    f.write_text(text)
    with pytest.raises(TraceImportError) as err:
        traces.import_traces(thinker, f)
    msg = str(err.value)
    assert "\n" not in msg and str(f) in msg and needle in msg, msg


def test_missing_question_and_bad_engine(thinker, generated, tmp_path):
    qs, gen = generated
    f = _write(tmp_path / "v.jsonl", [_vllm(thinker, t) for t in gen[:2]])
    with pytest.raises(TraceImportError, match=f"no line answers question {qs[2].id!r}"):
        traces.import_traces(thinker, f, questions=qs)
    with pytest.raises(ValueError, match="engine='llama.cpp' is not accepted"):
        traces.import_traces(thinker, f, engine="llama.cpp")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        traces.import_traces(thinker, tmp_path / "none.jsonl")


def test_an_analysis_reads_imported_traces(thinker, generated, tmp_path, caplog):
    """early_exit with --traces (a file another engine wrote) gives the numbers of generating."""
    from analyses import early_exit

    kw = dict(n_samples=4, seed=7, max_new_tokens=80)
    qs = problems_for(thinker, 4, 7)
    gen = traces.generate(thinker, qs, max_new_tokens=80)
    f = _write(tmp_path / "v.jsonl", [_vllm(thinker, t) for t in gen])
    want = early_exit.main(early_exit.Config(out=tmp_path / "gen", **kw), loaded_model=thinker)
    got = early_exit.main(early_exit.Config(out=tmp_path / "imp", traces=str(f), **kw), loaded_model=thinker)
    assert got == want
    stores = list((tmp_path / "imp" / "early_exit").glob("*.traces-*.jsonl"))
    assert len(stores) == 1 and all(t.config["imported"]["path"] == str(f.resolve()) for t in traces.read_store(stores[0]))
    assert "temperature" not in caplog.text
    _write(f, [_vllm(thinker, t, sampling_params={"temperature": 0.6}) for t in gen])  # changed file: another store
    early_exit.main(early_exit.Config(out=tmp_path / "imp", traces=str(f), **kw), loaded_model=thinker)
    assert len(list((tmp_path / "imp" / "early_exit").glob("*.traces-*.jsonl"))) == 2
    assert "analyses greedy traces, but" in caplog.text and "temperature 0.6" in caplog.text


def test_cli_import(thinker, generated, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import mechthink.cli as cli

    monkeypatch.setattr(mt, "load_model", lambda *a, **k: thinker)
    f = _write(tmp_path / "v.jsonl", [_vllm(thinker, t) for t in generated[1]])
    res = CliRunner().invoke(cli.app, ["import-traces", "--file", str(f), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    (store,) = (tmp_path / "o" / "imported").glob("tiny-thinker.traces-*.jsonl")
    assert len(traces.read_store(store)) == 4 and "imported 4 traces" in res.output
    f.write_text(f.read_text() + "{oops\n")
    res = CliRunner().invoke(cli.app, ["import-traces", "--file", str(f), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "line 5 is not valid JSON" in res.output, res.output
    assert len([x for x in res.output.splitlines() if x.strip()]) == 1


# ============================================================================ real tokenizers
FAMILIES = {"r1-distill-qwen": ("DeepSeek-R1-Distill-Qwen-1.5B", "Qwen2ForCausalLM", 152064, [151643]),
            "qwen3": ("Qwen3-0.6B", "Qwen3ForCausalLM", 151936, [151645, 151643])}


@pytest.fixture(scope="module")
def real():
    if not (TOK_DIR / "qwen3" / "tokenizer.json").exists():
        pytest.skip(f"no real tokenizers in {TOK_DIR}")
    from test_real_tokenizers import _tiny

    from mechthink.models.registry import list_models

    out = {}
    for fam, (_, arch, vocab, eos) in FAMILIES.items():
        name = next(s.name for s in list_models() if s.family == fam)
        out[fam] = mt.load_model(name, hf_model=_tiny(arch, vocab, eos), tokenizer=TOK_DIR / fam, device="cpu")
    return out


@pytest.mark.parametrize("fam", sorted(FAMILIES))
def test_real_tokenizers_round_trip(real, fam, tmp_path):
    model = real[fam]
    tok = model.tokenizer
    q = "Natalia sold clips to 48 of her friends in April, and then half as many in May. How many altogether?"
    prompt = model.prompt(q, thinking="on")
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]  # as the docs' vLLM snippet tokenizes it
    completion = "Okay, 48 / 2 = 24, and 48 + 24 = 72. Wait, let me check: yes, 72.\n</think>\n\nThe answer is \\boxed{72}."
    gen_ids = tok(completion, add_special_tokens=False)["input_ids"] + [model.eos_token_ids[0]]
    row = {"id": "natalia", "answer": "72", "prompt_token_ids": prompt_ids,
           "outputs": [{"text": tok.decode(gen_ids, skip_special_tokens=True), "token_ids": gen_ids, "finish_reason": "stop"}]}
    (tr,) = traces.import_traces(model, _write(tmp_path / "r.jsonl", [row]))
    assert tr.ids == model.to_token_lists([prompt])[0] + gen_ids and tr.question == q and tr.finished == "eos"
    assert tr.thinking.strip().startswith("Okay, 48") and tr.thinking.rstrip().endswith("72.") and tr.think_end is not None
    assert tr.answer_text.strip() == "The answer is \\boxed{72}." and traces.answer_instances(tr)
    plain = traces.import_traces(model, _write(tmp_path / "p.jsonl", [{"prompt": prompt, "completion": completion}]))[0]
    assert plain.ids == tr.ids[:-1] and plain.thinking == tr.thinking


def test_real_tokenizers_refuse_each_other(real, tmp_path):
    """Traces of Qwen3 imported for R1-Distill-Qwen (and back): the line and the expected tokenizer are named."""
    for src, dst in (("qwen3", "r1-distill-qwen"), ("r1-distill-qwen", "qwen3")):
        m = real[src]
        prompt = m.prompt("What is 2 + 3?", thinking="on")
        ids = m.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        gen = m.tokenizer("5.\n</think>\n\n5", add_special_tokens=False)["input_ids"]
        rows = [{"prompt": prompt, "prompt_token_ids": ids, "outputs": [{"text": "5.\n</think>\n\n5", "token_ids": gen}]},
                {"prompt": prompt, "completion": "5.\n</think>\n\n5"}]
        for k, row in enumerate(rows):
            f = _write(tmp_path / f"{src}-{k}.jsonl", [row])
            with pytest.raises(TraceImportError) as err:
                traces.import_traces(real[dst], f)
            msg = str(err.value)
            assert f"{f}: line 1" in msg and f"tokenizer of {real[dst].spec.name}" in msg and "\n" not in msg, msg


def test_double_bos_is_named(real, tmp_path):
    model = real["r1-distill-qwen"]
    prompt = model.prompt("What is 2 + 3?")
    ids = model.tokenizer(prompt)["input_ids"]  # add_special_tokens=True adds a second BOS to the template's
    assert ids[:2] == [model.bos_token_id] * 2
    f = _write(tmp_path / "b.jsonl", [{"prompt_token_ids": ids, "outputs": [{"text": "5", "token_ids": [20]}]}])
    with pytest.raises(TraceImportError, match="BOS twice"):
        traces.import_traces(model, f)

