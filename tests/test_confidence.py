"""mechthink.confidence: forked-KV answer probes against full recomputation, early exit, curves."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from mechthink import confidence as C
from mechthink import traces as T

COMPLETION = (
    "First 3 + 5 = 8. Then 18 - 2 = 16.\nWait, 180 is 18. Hmm 1.8 and 18; so 1,800 or 18"
    "</think>The final answer is \\boxed{18}."
)
CHOICES = {"18": ["18", " 18", "eighteen"], "wait": [" Wait", "Hmm, let me check"]}


pytestmark = pytest.mark.usefixtures("one_thread")


@torch.inference_mode()
def _reference(model, ids, positions, choices, suffix):
    """Independent reference: each prefix + suffix + choice sequence run from scratch."""
    suf = model.tokenizer(suffix, add_special_tokens=False)["input_ids"]
    out = torch.empty(len(positions), len(choices), dtype=torch.float64)
    for i, p in enumerate(positions):
        for j, strings in enumerate(choices.values()):
            seqs = []
            for s in strings:
                t = model.tokenizer(s, add_special_tokens=False)["input_ids"]
                if t not in seqs:
                    seqs.append(t)
            vals = []
            for s in seqs:
                x = list(ids[: p + 1]) + suf + s
                lp = model.bridge(torch.tensor([x])).double().log_softmax(-1)[0]
                start = len(x) - len(s)
                vals.append(sum(float(lp[start - 1 + k, s[k]]) for k in range(len(s))))
            out[i, j] = torch.logsumexp(torch.tensor(vals, dtype=torch.float64), 0)
    return out


@torch.inference_mode()
def _greedy_reference(model, ids, p, suffix, n):
    x = list(ids[: p + 1]) + model.tokenizer(suffix, add_special_tokens=False)["input_ids"]
    out = []
    for _ in range(n):
        t = int(model.bridge(torch.tensor([x]))[0, -1].argmax())
        if t in model.eos_token_ids:
            break
        out.append(t)
        x.append(t)
    return model.to_string(out)


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_forked_probe_equals_full_recomputation(tiny_loaded, arch):
    model, _ = tiny_loaded(arch)
    tr = T.trace_from_text(model, "what is 18?", COMPLETION, gold="18")
    positions = [tr.n_prompt - 1, 40, tr.n_prompt + 3, 25, 40, len(tr.ids) - 1]
    res = C.answer_probe(model, tr.ids, positions, CHOICES, greedy_tokens=4)
    ref = _reference(model, tr.ids, positions, CHOICES, model.spec.answer_suffix)
    assert res.positions == positions and res.choice_names == ["18", "wait"]
    assert (res.logprobs.double() - ref).abs().max() <= 1e-4
    assert torch.allclose(res.mass.double(), ref.exp().sum(-1), rtol=1e-3, atol=1e-9)
    assert res.greedy is not None
    for p, g in zip(positions[:2], res.greedy[:2]):
        assert g == _greedy_reference(model, tr.ids, p, model.spec.answer_suffix, 4)
    # a tensor input, an empty suffix and two single-token choices (the log-ratio use)
    res2 = C.answer_probe(model, torch.tensor(tr.ids), [30, 10], {"yes": [" Yes"], "no": [" No"]}, suffix="")
    ref2 = _reference(model, tr.ids, [30, 10], {"yes": [" Yes"], "no": [" No"]}, "")
    assert (res2.logprobs.double() - ref2).abs().max() <= 1e-4
    assert torch.allclose(res2.log_ratio.double(), ref2[:, 0] - ref2[:, 1], atol=1e-4)


def test_probe_result_outputs(tiny_loaded):
    model, _ = tiny_loaded("LlamaForCausalLM")
    tr = T.trace_from_text(model, "q", COMPLETION)
    res = C.answer_probe(model, tr, [12, 20], CHOICES)
    df = res.to_frame()
    assert list(df["position"]) == [12, 20]
    assert {"logp_18", "logp_wait", "mean_logit_18", "mass", "log_ratio"} <= set(df.columns)
    d = json.loads(res.to_json())
    assert d["choice_names"] == ["18", "wait"] and len(d["logprobs"]) == 2
    fig = res.plot()
    assert fig.axes


def test_probe_errors(tiny_loaded):
    model, _ = tiny_loaded("LlamaForCausalLM")
    ids = model.to_token_lists(["Compute 3 + 5 = 8."])[0]
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        C.answer_probe(model, ids, [2], {"a": [""], "b": [" No"]})
    with pytest.raises(ValueError, match="outside the sequence"):
        C.answer_probe(model, ids, [len(ids)], {"a": [" Yes"]})
    with pytest.raises(ValueError, match="positions is empty"):
        C.answer_probe(model, ids, [], {"a": [" Yes"]})
    with pytest.raises(ValueError, match="choices is empty"):
        C.answer_probe(model, ids, [1], {})
    with pytest.raises(ValueError, match="two choices"):
        C.answer_probe(model, ids, [1], {"a": [" Yes"]}).log_ratio


def test_early_exit(tiny_loaded):
    model, _ = tiny_loaded("Qwen2ForCausalLM")
    tr = T.trace_from_text(model, "q", COMPLETION, gold="18")
    res = C.early_exit(model, tr, max_answer_tokens=3)
    inst = T.answer_instances(tr)
    assert all(isinstance(r, C.EarlyExitRow) for r in res.rows)
    assert [r.position for r in res.rows] == [i.position for i in inst]
    assert [r.next_word for r in res.rows] == ["Wait", "Hmm", "so", None]
    # the gold is scored as a whole answer, closed by "}" (the suffix ends in \boxed{)
    ref = _reference(model, tr.ids, [i.position for i in inst], {"gold": ["18}"]}, model.spec.answer_suffix)
    got = torch.tensor([r.logprob for r in res.rows], dtype=torch.float64)
    assert (got - ref[:, 0]).abs().max() <= 1e-4
    for r in res.rows:
        assert r.correct == (r.greedy == "18")
        assert r.greedy == _greedy_reference(model, tr.ids, r.position, model.spec.answer_suffix, 3).split("}")[0].strip()
    df = res.to_frame()
    assert list(df.columns) == ["trace_id", "instance", "position", "next_word", "logprob", "prob", "mean_logit",
                                "greedy", "correct"]
    assert json.loads(res.to_json())["rows"][0]["position"] == inst[0].position
    assert res.plot().axes
    summary = C.early_exit_summary([res, res])
    table = summary.to_frame()
    assert list(table["instance"]) == [1, 2, 3, 4] and list(table["n"]) == [2] * 4
    assert summary.n_traces == 2 and summary.n_traces_with_instances == 2
    assert table["mean_logprob"].tolist() == pytest.approx(got.tolist())
    assert [r.accuracy for r in summary.by_instance] == [float(r.correct) for r in res.rows]
    assert [r.instance for r in C.early_exit_summary([res], max_instances=2).by_instance] == [1, 2]
    assert summary.numbers()["by_instance"] == table.to_dict(orient="records")
    assert summary.plot(model_name="m").axes
    none = C.early_exit(model, tr, gold="77")
    assert none.rows == [] and none.to_frame().empty
    empty = C.early_exit_summary([none])
    assert empty.to_frame().empty and empty.n_traces == 1 and empty.n_traces_with_instances == 0
    with pytest.raises(ValueError, match="max_instances"):
        C.early_exit_summary([res], max_instances=0)
    assert C.gold_variants("1250") == ["1250", "1,250"]


def test_early_exit_summary_by_hand():
    def row(k, lp, logit, ok):
        return C.EarlyExitRow(k, 10 * k, None, lp, math.exp(lp), logit, "1", ok)

    a = C.EarlyExitResult("a", "1", "", [row(0, -1.0, 10.0, False), row(1, -0.5, 14.0, True)], None)
    b = C.EarlyExitResult("b", "1", "", [row(0, -3.0, 6.0, True)], None)
    s = C.early_exit_summary([a, b, C.EarlyExitResult("c", "1", "", [], None)])
    assert (s.n_traces, s.n_traces_with_instances) == (3, 2)
    first, second = s.by_instance
    assert (first.instance, first.n, first.accuracy) == (1, 2, 0.5)
    assert first.mean_logprob == pytest.approx(-2.0) and first.mean_logit == pytest.approx(8.0)
    assert first.mean_prob == pytest.approx((math.exp(-1) + math.exp(-3)) / 2)
    assert (second.instance, second.n, second.accuracy, second.mean_logit) == (2, 1, 1.0, 14.0)


def test_gold_candidates():
    assert C.gold_candidates("6") == sorted(str(v) for v in range(0, 17))
    assert C.gold_candidates("25", radius=2) == ["23", "24", "25", "26", "27"]
    assert C.gold_candidates("2.5", radius=1) == ["1", "2", "2.5", "3"]
    assert C.gold_candidates("x^2") == ["x^2"]
    with pytest.raises(ValueError, match="radius"):
        C.gold_candidates("3", radius=-1)


def test_confidence_curve(tiny_loaded):
    model, _ = tiny_loaded("LlamaForCausalLM")
    tr = T.trace_from_text(model, "q", COMPLETION)
    res = C.confidence_curve(model, tr, {"yes": [" Yes"], "no": [" No"]}, n_points=5)
    start, end = tr.thinking_span
    assert res.positions[0] == start and res.positions[-1] == end - 1 and len(res.positions) == 5
    assert res.marks == {"think_start": tr.think_start, "think_end": tr.think_end}
    every = C.confidence_curve(model, tr, {"yes": [" Yes"], "no": [" No"]}, every=10)
    assert every.positions == list(range(start, end, 10))


def test_smollm2_forked_probe_equals_recomputation(smollm2):
    model, _ = smollm2
    text = "Tom has 3 apples and buys 5 more. 3 + 5 = 8. Wait, he gave 1 away, so 7. Is 7 right?"
    ids = model.to_token_lists([text])[0]
    positions = [5, 18, len(ids) - 1]
    choices = {"yes": [" Yes", " yes"], "no": [" No", " no"], "8": [" 8", " eight apples"]}
    res = C.answer_probe(model, ids, positions, choices, suffix=" Answer:")
    ref = _reference(model, ids, positions, choices, " Answer:")
    assert (res.logprobs.double() - ref).abs().max() <= 1e-4


def test_gold_confidence_curves(tiny_loaded):
    model, _ = tiny_loaded("LlamaForCausalLM")
    tr = T.trace_from_text(model, "q", COMPLETION, gold="18")
    trs = [tr, dataclasses.replace(tr, id="closed-off", think_start=None)]  # no thinking: skipped
    res = C.gold_confidence_curves(model, trs, n_points=3, radius=1)
    assert len(res.curves) == len(res.rows) == 1 and res.golds == ["18"]
    ref = C.confidence_curve(model, trs[0], {c: [c + "}"] for c in ["17", "18", "19"]}, n_points=3)
    assert res.curves[0].choice_names == ["17", "18", "19"]
    assert torch.equal(res.curves[0].logprobs, ref.logprobs)
    (row,) = res.rows
    assert row.logp_gold_first == float(ref.logprobs[0, 1]) and row.logp_gold_last == float(ref.logprobs[-1, 1])
    assert row.mass_min == float(ref.mass.min()) and row.think_closed == (trs[0].think_end is not None)
    numbers = res.numbers()
    assert numbers["n_traces"] == 1 and numbers["mean_mass_on_candidates"] == pytest.approx(float(ref.mass.mean()))
    assert numbers["traces"][0]["id"] == trs[0].id
    assert list(res.to_frame().columns) == ["id", "gold", "think_closed", "logp_gold_first", "logp_gold_last",
                                            "mass_mean", "mass_min"]
    assert res.plot(model_name="m").axes
    assert json.loads(res.to_json())["rows"][0]["gold"] == "18"
    with pytest.raises(ValueError, match="golds"):
        C.gold_confidence_curves(model, trs, golds=["1"])
