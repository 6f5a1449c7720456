"""Context aggregation: words, bins, word overlap, attention bins, receiver heads, HTML view."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile

import pytest
import torch

from mechthink import attribution as A
from mechthink import context as C
from mechthink.plotting.attribution import colored_tokens_html, save_colored_tokens

pytestmark = pytest.mark.usefixtures("one_thread")
ARCH = "LlamaForCausalLM"
TEXT = "Compute 3 + 5 - 2 + 7. First 3 + 5 = 8. Then 8 - 2 = 6. So 6 + 7 = 13. Wait, let me check"


@pytest.fixture(scope="module")
def model(tiny_loaded):
    return tiny_loaded(ARCH)[0]


def test_word_scores_sum_tokens(model):
    ids = model.to_tokens(TEXT)[0]
    scores = torch.arange(len(ids), dtype=torch.float32)
    ws = C.word_scores(model.tokenizer, ids, scores)
    assert ws.text.endswith(TEXT)
    # every token's score lands in exactly one word, or none when it is whitespace/special-only
    assert float(ws.scores.sum()) == pytest.approx(float(scores[ws.token_word >= 0].sum()))
    assert "Compute" in ws.words and "13" in ws.words and "." in ws.words and "Wait" in ws.words
    for j, (w, (a, b)) in enumerate(zip(ws.words, ws.spans)):
        assert ws.text[a:b] == w
    w_idx = ws.words.index("Compute")
    toks_of = (ws.token_word == w_idx).nonzero().flatten()
    assert float(ws.scores[w_idx]) == pytest.approx(float(scores[toks_of].sum()))
    assert len(ws.to_frame()) == len(ws.words)
    top = ws.top(3)
    assert all(w not in C.STOPWORDS and re.search(r"\w", w) for w, _ in top)
    assert ws.plot().axes


class _NoOffsets:
    """A tokenizer that decodes but cannot re-tokenize with offsets: forces the prefix-decoding path."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.calls = 0

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        raise NotImplementedError("no offsets mapping")


class _Counting(_NoOffsets):
    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.tokenizer(*args, **kwargs)


@pytest.mark.parametrize("text", [TEXT, "Héllo wörld — naïve café x², so  two  spaces\n\nend. But wait"])
def test_word_scores_fast_and_slow_paths_agree(model, text):
    """Offsets from the tokenizer (fast) and from decoding prefixes (slow, forced by a tokenizer
    without offsets) give the same words, token-to-word map and word scores, including byte
    pieces of multi-byte characters (none of their score may be lost)."""
    ids = model.to_tokens(text)[0]
    scores = torch.arange(1, len(ids) + 1, dtype=torch.float32)
    fast_tok, slow_tok = _Counting(model.tokenizer), _NoOffsets(model.tokenizer)
    fast = C.word_scores(fast_tok, ids, scores)
    slow = C.word_scores(slow_tok, ids, scores)
    _, fast_spans = C.token_char_spans(fast_tok, ids)
    assert fast_tok.calls == 2 and slow_tok.calls == 1  # each path really ran
    assert slow.text == fast.text and slow.words == fast.words
    assert slow.token_word.tolist() == fast.token_word.tolist()
    torch.testing.assert_close(slow.scores, fast.scores)
    if text.isascii():  # one character per byte: the spans themselves agree too
        assert C._prefix_spans(model.tokenizer, ids.tolist()) == fast_spans
    # every token that is not whitespace-only or special lands in a word
    for i, (a, b) in enumerate(fast_spans):
        if fast.text[a:b].strip() and int(ids[i]) not in model.tokenizer.all_special_ids:
            assert int(fast.token_word[i]) >= 0, (i, fast.text[a:b])


def test_words_of_punctuation():
    assert [w for w, _, _ in C.words_of("Hmm, it's 3+5=8... right?")] == ["Hmm", ",", "it's", "3", "+", "5", "=", "8", "...", "right", "?"]


def test_binned_importance():
    v = torch.zeros(30)
    v[2:5] = 1.0  # question
    v[26:30] = 3.0  # last thinking bin (26..29)
    b = C.binned_importance(v, question_span=(1, 6), thinking_span=(10, 30), n_bins=5)
    assert b.labels == ["question", "0-20%", "20-40%", "40-60%", "60-80%", "80-100%"]
    torch.testing.assert_close(b.values[0], torch.tensor([0.2, 0, 0, 0, 0, 1.0]))
    many = C.binned_importance([v, 2 * v + 1], [(1, 6), (1, 6)], [(10, 30), (10, 30)], n_bins=5)
    assert many.values.shape == (2, 6)
    torch.testing.assert_close(many.values[0], many.values[1])  # min-max removes affine changes
    torch.testing.assert_close(many.mean, many.values.mean(0))
    s = C.binned_importance(v, (1, 6), (10, 30), normalize="none", reduce="sum")
    assert float(s.values[0, 0]) == 3.0 and float(s.values[0, -1]) == 12.0
    assert len(many.to_frame()) == 12
    assert many.plot().axes
    with pytest.raises(ValueError):
        C.binned_importance(v, (1, 6), (10, 12), n_bins=5)


def test_binned_importance_from_result(model):
    ids = model.to_tokens(TEXT)[0]
    r = A.attribution_patching(model, ids, A.logit_metric(-1, model.token_ids("Wait")), "zero", nodes=("resid_pre",))
    b = C.binned_importance(r, (1, 5), (5, len(ids) - 1))
    assert b.values.shape == (1, 6) and float(b.values.min()) >= 0 and float(b.values.max()) <= 1


def test_top_word_overlap():
    words = ["the", "check", "apples", ",", "answer", "sum", "is"]
    scores = [9.0, 5.0, 4.0, 8.0, 3.0, 1.0, 7.0]
    out = C.top_word_overlap(words, scores, "Let me CHECK the sum again: 3 apples", k=3, horizon=100)
    assert [w for w, _ in out.top_words] == ["check", "apples", "answer"]
    assert out.hits == [True, True, False] and out.overlap == pytest.approx(2 / 3)
    short = C.top_word_overlap(words, scores, "Let me CHECK the sum again: 3 apples", k=3, horizon=3)
    assert short.hits == [True, False, False]
    assert list(out.to_frame().columns) == ["word", "score", "in_future"]


def test_binned_attention(model):
    ids = model.to_tokens(TEXT)[0]
    T = len(ids)
    heads = [(0, 0), (2, 3)]
    out = C.binned_attention(model, ids, heads, question_span=(1, 6), thinking_span=(6, T - 1), n_bins=5)
    assert out.values.shape == (2, 6)
    # regions cover 1..T-2 exactly, so after dropping first/last and renormalising rows sum to 1
    torch.testing.assert_close(out.values.sum(1), torch.ones(2))
    _, cache = model.bridge.run_with_cache(ids.unsqueeze(0), names_filter=["blocks.2.attn.hook_pattern"])
    a = cache["blocks.2.attn.hook_pattern"][0, 3, -1].clone()
    a[0] = 0
    a[-1] = 0
    a = a / a.sum()
    torch.testing.assert_close(out.values[1, 0], a[1:6].sum())
    assert len(out.to_frame()) == 12 and out.plot().axes
    # several sequences: per-sequence spans, values = the mean of the single-sequence results
    ids2 = model.to_tokens(TEXT[:60])[0]
    spans_q, spans_t = [(1, 6), (1, 4)], [(6, T - 1), (4, len(ids2) - 1)]
    many = C.binned_attention(model, [ids, ids2.tolist()], heads, spans_q, spans_t, n_bins=5)
    two = C.binned_attention(model, ids2, heads, (1, 4), (4, len(ids2) - 1), n_bins=5)
    torch.testing.assert_close(many.values, torch.stack([out.values, two.values]).mean(0))
    assert many.n_samples == 2 and out.n_samples == 1
    with pytest.raises(ValueError, match="2 samples but 1 question spans"):
        C.binned_attention(model, [ids, ids2], heads, [(1, 6)], spans_t)


def test_future_word_overlap(model):
    """= continue_greedy + word_scores + top_word_overlap per sequence."""
    from mechthink.interventions import continue_greedy

    seqs = [model.to_tokens(TEXT)[0].tolist(), model.to_tokens(TEXT[:50])[0].tolist()]
    imps = [torch.linspace(0, 1, len(s)) for s in seqs]
    out = C.future_word_overlap(model, seqs, imps, max_new_tokens=12, k=4, horizon=20)
    futures = continue_greedy(model, seqs, 12)
    for s, imp, fut, got in zip(seqs, imps, futures, out.overlaps):
        want = C.top_word_overlap(C.word_scores(model.tokenizer, s, imp), None, model.to_string(fut), k=4, horizon=20)
        assert got == want
    assert out.continuations == [model.to_string(f) for f in futures]
    assert out.mean == pytest.approx(sum(o.overlap for o in out.overlaps) / 2, nan_ok=True)
    assert set(out.to_frame()["sample"]) <= {0, 1} and out.plot().axes and out.overlaps[0].plot().axes
    with pytest.raises(ValueError, match="2 sequences but 1 importance"):
        C.future_word_overlap(model, seqs, imps[:1])


def test_receiver_heads(model):
    ids = model.to_tokens(TEXT)[0]
    r = C.receiver_heads(model, ids, proximity_ignore=2)
    assert r.kurtosis.shape == (model.n_layers, model.cfg.n_heads)
    assert torch.isfinite(r.kurtosis).all()
    assert len(r.top(3)) == 3 and len(r.to_frame()) == model.n_layers * model.cfg.n_heads
    # manual check of one head's vertical scores (token units)
    _, cache = model.bridge.run_with_cache(ids.unsqueeze(0), names_filter=["blocks.1.attn.hook_pattern"])
    p = cache["blocks.1.attn.hook_pattern"][0, 2]
    j = 3
    torch.testing.assert_close(r.vertical[1, 2, j], p[j + 2 :, j].mean())
    # sentence units
    sents = [(0, 8), (8, 15), (15, 22), (22, 29), (29, len(ids))]
    rs = C.receiver_heads(model, ids, units=sents, proximity_ignore=1, skip_first=False)
    assert rs.vertical.shape[-1] == 5 and torch.isfinite(rs.kurtosis).all()
    # every layer, head and key unit against the block matrix of the whole exact pattern
    _, full = model.bridge.run_with_cache(ids.unsqueeze(0), names_filter=lambda n: n.endswith("hook_pattern"))
    a = torch.zeros(5, len(ids))
    for u, (s0, e0) in enumerate(sents):
        a[u, s0:e0] = 1.0 / (e0 - s0)
    keep = (torch.arange(5)[:, None] >= torch.arange(5)[None, :] + 1).float()
    for L in range(model.n_layers):
        blocks = torch.einsum("ui,hij,vj->huv", a, full[f"blocks.{L}.attn.hook_pattern"][0].float(), a)
        want = (blocks * keep).sum(1) / keep.sum(0).clamp_min(1)
        ok = keep.sum(0) > 0
        torch.testing.assert_close(rs.vertical[L][:, ok], want[:, ok], atol=1e-6, rtol=1e-5)
    assert r.plot().axes and "kurtosis" in r.to_json()


def test_colored_tokens_html_self_contained(tmp_path):
    toks = ["<bos>", "Wait", ",", " let", " me", " zebraword"]
    vals = torch.tensor([0.0, 1.0, -0.5, 0.2, 0.1, 0.9])
    html = colored_tokens_html(toks, vals, title="importance")
    assert html.startswith("<!DOCTYPE html>")
    assert "CircuitsVis" in html and len(html) > 500_000  # the JS bundle is inlined
    assert "zebraword" in html
    assert not re.search(r"<script[^>]*\bsrc\s*=\s*[\"']?https?:", html, re.I)
    assert "unpkg.com" not in html and "cdn.jsdelivr" not in html
    path = save_colored_tokens(tmp_path / "t.html", toks, vals)
    assert path.read_text(encoding="utf-8").count("zebraword") >= 1

    chromium = shutil.which("chromium") or (shutil.which("/usr/bin/chromium"))
    if chromium is None:
        pytest.skip("chromium not installed: headless DOM render check skipped (static checks passed)")
    dom = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--proxy-server=127.0.0.1:9",
         "--virtual-time-budget=5000", "--dump-dom", path.as_uri()],
        capture_output=True, text=True, timeout=60,
    ).stdout
    assert "zebraword" in dom[dom.find("class=\"colored-tokens\""):] and "background-color" in dom  # rendered, not only in the script


def test_token_view_cannot_run_injected_script(tmp_path):
    """Hostile tokens render as visible text in headless Chromium (network off); none executes."""
    toks = ["<think>", "</script><script>document.title='PWNED'</script>", "<img/src=x/onerror=document.title='PWNED'>",
            "<img src=x onerror=\"document.title='PWNED'\">", " zebraword", "a&b"]
    path = save_colored_tokens(tmp_path / "hostile.html", toks, torch.linspace(0, 1, len(toks)), title="hostile")
    assert "</script><script>document" not in path.read_text(encoding="utf-8")
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium not installed: headless DOM render check skipped (static checks passed)")
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--no-first-run", "--proxy-server=127.0.0.1:9",
             "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={profile}",
             "--virtual-time-budget=8000", "--dump-dom", path.as_uri()],
            capture_output=True, text=True, timeout=90,
        ).stdout
    assert dom.split("<title>")[1].split("</title>")[0] == "hostile"  # the payload would set it to PWNED
    rendered = dom[dom.find('class="colored-tokens"'):]
    assert 'class="colored-tokens"' in dom, "the view did not render"
    assert "&lt;think&gt;" in rendered and "zebraword" in rendered  # special tokens shown as text
    assert "<img" not in rendered and "<script" not in rendered
