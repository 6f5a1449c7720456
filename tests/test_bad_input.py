"""Bad input never gives a silent wrong result or a raw traceback.

Each case is called and must raise the expected mechthink error type with a one-line message
that names what was wrong; a case that returns normally fails the test (no silent results).
CLI cases must print one line on stderr and exit 2 before any model is loaded.
"""

from __future__ import annotations

import copy
import inspect
import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import mechthink as mt
from mechthink.config import ConfigError

from conftest import SHARED, build_model

pytestmark = pytest.mark.usefixtures("one_thread")


# ============================================================================ helpers
def _one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert msg.strip(), f"{type(exc).__name__} with an empty message"
    assert "\n" not in msg.strip(), f"message is not one line: {msg!r}"
    assert "Traceback" not in msg
    return msg


def _expect(fn: Callable[[], object], exc_type: type[BaseException] | tuple, *needles: str) -> None:
    try:
        result = fn()
    except exc_type as exc:
        msg = _one_line(exc)
        for n in needles:
            assert n.lower() in msg.lower(), f"{n!r} not in {msg!r}"
        return
    pytest.fail(f"returned silently: {result!r}")


@pytest.fixture(scope="module")
def thinker():
    return mt.load_model("tiny-thinker")


@pytest.fixture(scope="module")
def llama(tiny_hf):
    return tiny_hf("LlamaForCausalLM")


# ============================================================================ load_model
def _saved_model(tmp: Path, tiny, *, nan: bool = False) -> Path:
    ref, tok = tiny
    m = copy.deepcopy(ref)
    if nan:
        with torch.no_grad():
            m.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    m.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    return tmp


def _random_gguf(tmp: Path) -> Path:
    p = tmp / "random.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<I", 3) + bytes(range(256)) * 4)
    return p


LOAD_CASES = {
    # unwrapped: the tests' runtime type checker would answer first; users get mechthink's own error
    "int name": (lambda tmp, tiny: inspect.unwrap(mt.load_model)(123), TypeError, "name_or_path", "int"),
    "empty name": (lambda tmp, tiny: mt.load_model(""), ValueError, "empty"),
    "blank name": (lambda tmp, tiny: mt.load_model("   "), ValueError, "empty"),
    "unknown name": (lambda tmp, tiny: mt.load_model("tiny-thinkr"), KeyError, "did you mean"),
    "missing path": (lambda tmp, tiny: mt.load_model("./no/such/model"), FileNotFoundError, "no such file"),
    "missing gguf": (lambda tmp, tiny: mt.load_model("weights.gguf"), FileNotFoundError, "no such file"),
    "dir without config": (lambda tmp, tiny: mt.load_model(tmp), ValueError, "without config.json"),
    "plain file": (lambda tmp, tiny: (tmp / "w.bin").write_bytes(b"\0") and mt.load_model(tmp / "w.bin"), ValueError,
                   "neither"),
    "random gguf": (lambda tmp, tiny: mt.load_model(_random_gguf(tmp)), ValueError, "gguf"),
    "config, no weights": (lambda tmp, tiny: (tiny[0].config.save_pretrained(tmp), tiny[1].save_pretrained(tmp),
                                              mt.load_model(tmp)), ValueError, "weights"),
    "truncated safetensors": (lambda tmp, tiny: (_saved_model(tmp, tiny),
                                                 (tmp / "model.safetensors").write_bytes((tmp / "model.safetensors").read_bytes()[:5000]),
                                                 mt.load_model(tmp)), ValueError, "weights"),
    "random-byte safetensors": (lambda tmp, tiny: (_saved_model(tmp, tiny),
                                                   (tmp / "model.safetensors").write_bytes(bytes(range(256)) * 64),
                                                   mt.load_model(tmp)), ValueError, "weights"),
    "NaN weights": (lambda tmp, tiny: mt.load_model(_saved_model(tmp, tiny, nan=True)), ValueError, "NaN", "up_proj"),
    "NaN in-memory weights": (lambda tmp, tiny: mt.load_model(hf_model=_nan_copy(tiny[0]), tokenizer=tiny[1]), ValueError,
                              "NaN"),
    "hf_model without tokenizer": (lambda tmp, tiny: mt.load_model(hf_model=tiny[0]), ValueError, "tokenizer="),
    "hf_model not a model": (lambda tmp, tiny: mt.load_model(hf_model=object(), tokenizer=tiny[1]), TypeError, "hf_model"),
    "tokenizer of a smaller model": (lambda tmp, tiny: mt.load_model(hf_model=build_model("LlamaForCausalLM", 4000),
                                                                      tokenizer=_organism_tokenizer()),
                                     ValueError, "tokenizer has 234 tokens", "4000 embeddings"),
    "tokenizer of a larger model": (lambda tmp, tiny: mt.load_model(hf_model=copy.deepcopy(tiny[0]),
                                                                     tokenizer=SHARED / "data" / "tokenizers" / "qwen3"),
                                    ValueError, "tokenizer has", "embeddings"),
    "bad dtype": (lambda tmp, tiny: mt.load_model("tiny-thinker", dtype="int8"), ValueError, "dtype"),
    "bad device": (lambda tmp, tiny: mt.load_model("tiny-thinker", device="tpu:0"), ValueError, "device"),
    "cuda without cuda": (lambda tmp, tiny: mt.load_model("tiny-thinker", device="cuda") if not torch.cuda.is_available()
                          else (_ for _ in ()).throw(ValueError("cuda present: device skipped")), ValueError, "cuda"),
    "hub id offline": (lambda tmp, tiny: mt.load_model("no-such-org/no-such-model-xyz"), OSError, "not in the local"),
}


def _nan_copy(ref):
    m = copy.deepcopy(ref)
    with torch.no_grad():
        next(m.parameters()).view(-1)[0] = float("inf")
    return m


@pytest.mark.parametrize("case", sorted(LOAD_CASES))
def test_load_model_bad_input(case, tmp_path, llama, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if case == "tokenizer of a larger model" and not (SHARED / "data" / "tokenizers" / "qwen3" / "tokenizer.json").exists():
        pytest.skip(f"no real tokenizers in {SHARED / 'data' / 'tokenizers'}")
    fn, exc, *needles = LOAD_CASES[case]
    _expect(lambda: fn(tmp_path, llama), exc, *needles)


def test_context_window_is_enforced(thinker):
    from mechthink.models.guards import ContextLengthError

    limit = thinker.bridge.original_model.config.max_position_embeddings
    x = torch.full((1, limit + 1), 5)
    _expect(lambda: thinker.bridge(x), ContextLengthError, "context window", str(limit))
    _expect(lambda: thinker.bridge.run_with_cache(x), ContextLengthError, "context window")
    with torch.inference_mode():
        _, kv = thinker.bridge(x[:, :limit], return_type="logits_and_cache")
        _expect(lambda: thinker.bridge(x[:, :1], past_key_values=kv), ContextLengthError, f"{limit} cached")
        assert thinker.bridge(x[:, :limit]).shape[1] == limit  # the limit itself is fine


# ============================================================================ data files
def _write(tmp: Path, name: str, data: bytes) -> Path:
    p = tmp / name
    p.write_bytes(data)
    return p


DATA_CASES = {
    "gsm8k word answer": (lambda t: mt.data.load_gsm8k(path=_write(t, "g.jsonl", b'{"question": "q", "answer": "x\\n#### three"}\n')),
                          ValueError, "g.jsonl:1", "not a number"),
    "gsm8k no marker": (lambda t: mt.data.load_gsm8k(path=_write(t, "g.jsonl", b'{"question": "q", "answer": "12"}\n')),
                        ValueError, "g.jsonl:1", "####"),
    "gsm8k empty answer": (lambda t: mt.data.load_gsm8k(path=_write(t, "g.jsonl", b'{"question": "q", "answer": "x\\n#### "}\n')),
                           ValueError, "g.jsonl:1"),
    "latin-1 file": (lambda t: mt.data.load_gsm8k(path=_write(t, "g.jsonl", '{"question": "caf\u00e9", "answer": "#### 1"}\n'.encode("latin-1"))),
                     ValueError, "g.jsonl:1", "UTF-8"),
    "bad json line": (lambda t: mt.data.load_gsm8k(path=_write(t, "g.jsonl", b'{"question": "q", "answer": "#### 1"}\n{oops\n')),
                      ValueError, "g.jsonl:2", "invalid JSON"),
    "json list line": (lambda t: mt.data.read_jsonl(_write(t, "g.jsonl", b"[1, 2]\n")), ValueError, "g.jsonl:1", "object"),
    "missing file": (lambda t: mt.data.load_gsm8k(path=t / "nope.jsonl"), FileNotFoundError, "nope.jsonl"),
    "missing question": (lambda t: mt.data.load_gsm8k(path=_write(t, "g.jsonl", b'{"answer": "#### 1"}\n')), ValueError,
                         "g.jsonl:1", "question"),
    "bad split": (lambda t: mt.data.load_gsm8k(split="dev", path=t), ValueError, "split"),
    "negative n": (lambda t: mt.data.load_gsm8k(path=t, n=-1), ValueError, "n"),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_data_bad_input(case, tmp_path):
    fn, exc, *needles = DATA_CASES[case]
    _expect(lambda: fn(tmp_path), exc, *needles)


# ============================================================================ configs
def _config_cases() -> dict:
    import analyses

    cases = {}
    bad = {"n_samples": [0, -1], "max_new_tokens": [0], "n_points": [0], "n_exact": [-1], "model": [""],
           "coeffs": ["a,b"], "budgets": ["2,x", "-1"], "n_vector": [1], "shard": ["0/2", "3/2", "a/b"],
           "traces": ["/nonexistent/traces.jsonl"]}
    for name in analyses.REGISTRY:
        module = analyses.get(name)
        fields = {f.name for f in __import__("dataclasses").fields(module.Config)}
        for field, values in bad.items():
            if field in fields:
                for v in values:
                    cases[f"{name}.{field}={v!r}"] = (module.Config, field, v)
    return cases


CONFIG_CASES = _config_cases()


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_bad_values(case):
    cls, field, value = CONFIG_CASES[case]
    _expect(lambda: cls(**{field: value}), ConfigError, field)


# ============================================================================ CLI
CLI_CASES = {
    "n-samples 0": ["mi-peaks", "--n-samples", "0"],
    "n-samples -1": ["attribution", "--n-samples", "-1"],
    "n-points 0": ["confidence-curve", "--n-points", "0"],
    "reproduce n-samples 0": ["reproduce", "--n-samples", "0", "--only", "mi_peaks"],
    "out is a file": ["mi-peaks", "--out", "FILE"],
    "reproduce out is a file": ["reproduce", "--out", "FILE", "--only", "mi_peaks"],
    "unwritable out": ["mi-peaks", "--out", "/proc/mechthink-out"],
    "bad dtype": ["mi-peaks", "--dtype", "int8"],
    "reproduce bad dtype": ["reproduce", "--dtype", "int8", "--only", "mi_peaks"],
    "unknown model": ["reproduce", "--model", "no-such-model", "--only", "mi_peaks"],
    "bad coeffs": ["steering", "--coeffs", "a,b"],
    "bad shard": ["early-exit", "--shard", "3/2"],
    "shard refused": ["value-vectors", "--shard", "1/2"],
    "traces file missing": ["confidence-curve", "--traces", "/nonexistent/traces.jsonl"],
    "import file missing": ["import-traces", "--file", "/nonexistent/traces.jsonl"],
    "import bad engine": ["import-traces", "--file", "FILE", "--engine", "llama.cpp"],
    "import bad json": ["import-traces", "--file", "FILE"],
    "merge nothing": ["merge", "/nonexistent/out"],
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_user_errors_are_one_line_exit_2(case, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import mechthink.cli as cli

    loads = []
    monkeypatch.setattr(mt, "load_model", lambda *a, **k: loads.append(a) or (_ for _ in ()).throw(
        mt.UnknownModelError("unknown model 'no-such-model'")))
    f = tmp_path / "a-file"
    f.write_text("x")
    args = [str(f) if a == "FILE" else a for a in CLI_CASES[case]]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert not loads, f"{case}: the model was loaded before the options were checked"


def test_no_case_is_silent():
    assert len(LOAD_CASES) + len(DATA_CASES) + len(CONFIG_CASES) + len(CLI_CASES) + len(WORDS_CASES) + len(TECHNIQUE_CASES) >= 60


def _organism_tokenizer():
    from mechthink.models.organism import build_hf_tokenizer

    return build_hf_tokenizer()


# ============================================================================ technique inputs
def _words_file(tmp: Path, text: str) -> Path:
    p = tmp / "words.jsonl"
    p.write_text(text)
    return p


WORDS_CASES = {
    "bad json": ('{"word": "Wait", "freq": 3}\n{oops\n', "words.jsonl:2"),
    "missing word": ('{"freq": 3}\n', "no 'word'"),
    "non-numeric freq": ('{"word": "Wait", "freq": "many"}\n', "not a number"),
    "not an object": ('["Wait"]\n', "object"),
}


@pytest.mark.parametrize("case", sorted(WORDS_CASES))
def test_thinking_words_file_errors(case, tmp_path):
    from mechthink.interventions import load_thinking_words

    text, needle = WORDS_CASES[case]
    _expect(lambda: load_thinking_words(_words_file(tmp_path, text)), ValueError, needle)


def _vec(n_layers: int, d: int, fill: float = 0.1):
    from mechthink.steering import SteeringVector

    return SteeringVector(torch.full((n_layers, d), fill), list(range(n_layers)))


def _steer(model, vec, coeff=1.0):
    from mechthink.steering import steer

    with steer(model, vec, coeff=coeff):
        return model.bridge(model.to_tokens(model.prompt("Compute 1 + 2.")))


TECHNIQUE_CASES = {
    "NaN steering vector": (lambda m, t: _vec(4, 128, float("nan")), ValueError, "NaN"),
    "inf steering vector": (lambda m, t: _vec(4, 128, float("inf")), ValueError, "NaN/inf"),
    "steering vector of the wrong width": (lambda m, t: _steer(m, _vec(4, 64)), ValueError, "width 64", "d_model=128"),
    "NaN coefficient": (lambda m, t: _steer(m, _vec(4, 128), coeff=float("nan")), ValueError, "coeff"),
    "steering vector file not safetensors": (lambda m, t: __import__("mechthink").steering.SteeringVector.load(
        _write(t, "v.safetensors", b"\x00" * 64)), ValueError, "not a safetensors file"),
    "steering vector file missing": (lambda m, t: __import__("mechthink").steering.SteeringVector.load(t / "nope"),
                                     FileNotFoundError, "no such file"),
    "hsic with NaN": (lambda m, t: mt.mi.hsic(torch.tensor([1.0, float("nan"), 3.0]), torch.arange(3.0)), ValueError, "finite"),
    "paper hsic with NaN": (lambda m, t: mt.mi.hsic_mi_paper(torch.tensor([1.0, float("nan")]), torch.ones(2)), ValueError,
                            "finite"),
    "paper hsic sigma 0": (lambda m, t: mt.mi.hsic_mi_paper(torch.ones(3), torch.ones(3), sigma=0.0), ValueError, "sigma"),
    "trace store below a file": (lambda m, t: mt.traces.generate(m, ["Compute 1 + 1."], max_new_tokens=2,
                                                                   store=_write(t, "f", b"x") / "s.jsonl"),
                                 mt.traces.TraceStoreError, "below a regular file"),
    "generate batch_size 0": (lambda m, t: mt.traces.generate(m, ["Compute 1 + 1."], batch_size=0), ValueError, "batch_size"),
    "generate max_new_tokens 0": (lambda m, t: mt.traces.generate(m, ["Compute 1 + 1."], max_new_tokens=0), ValueError,
                                  "max_new_tokens"),
    "tuned lens file not safetensors": (lambda m, t: mt.lens.TunedLens.load(_write(t, "l.safetensors", b"\x00" * 64)),
                                        ValueError, "not a tuned lens"),
    "tuned lens of the wrong width": (lambda m, t: mt.lens.logit_lens(m, [[1, 2, 3]], [5],
                                                                     tuned=mt.lens.TunedLens.identity(4, 64)), ValueError,
                                      "width 64"),
    "tuned lens with NaN": (lambda m, t: mt.lens.TunedLens(torch.full((2, 4, 4), float("nan")), torch.zeros(2, 4)),
                            ValueError, "finite"),
    "generate one string": (lambda m, t: mt.traces.generate(m, "Compute 1 + 1."), TypeError, "one string"),
}


@pytest.mark.parametrize("case", sorted(TECHNIQUE_CASES))
def test_technique_bad_input(case, thinker, tmp_path):
    fn, exc, *needles = TECHNIQUE_CASES[case]
    _expect(lambda: fn(thinker, tmp_path), exc, *needles)
