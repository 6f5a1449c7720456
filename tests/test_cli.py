"""The `mechthink` command."""

from __future__ import annotations

from typer.testing import CliRunner

from mechthink.cli import app

runner = CliRunner()


def test_models_lists_registry():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    for name in ("DeepSeek-R1-Distill-Llama-8B", "Qwen3-4B-Thinking-2507", "smollm2-135m", "tiny-thinker"):
        assert name in result.output


def test_reproduce_rejects_unknown_analysis():
    result = runner.invoke(app, ["reproduce", "--only", "no_such_analysis"])
    assert result.exit_code != 0
    assert "unknown analyses" in result.output


def test_one_subcommand_per_analysis_generated_from_config(tmp_path):
    from mechthink.cli import discover_analyses

    names = list(discover_analyses())
    help_text = runner.invoke(app, ["--help"]).output
    for name in names:
        assert name.replace("_", "-") in help_text
    result = runner.invoke(app, ["mi-peaks", "--n-samples", "3", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "mi_peaks" / "tiny-thinker.json").exists()


def test_doctor_all_green_here():
    result = runner.invoke(app, ["doctor", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    for line in ("transformers", "KV-cache self-check", "hooked forward vs HF", "steering leaves the model bit-identical",
                 "SmolLM2"):
        assert any(line in row and "✔" in row for row in result.output.splitlines()), (line, result.output)


def test_doctor_fails_with_the_fix_when_a_check_fails(monkeypatch):
    from mechthink.models import kvcache

    monkeypatch.setitem(kvcache.SUPPORTED_VERSIONS, "transformers", ">=9.0,<9.1")
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    monkeypatch.setattr(AttentionBridge, "_update_kv_cache", lambda self, k, v, **kw: (k, v))  # the 5.24 bug
    result = runner.invoke(app, ["doctor", "--device", "cpu"])
    assert result.exit_code == 1, result.output
    rows = result.output.splitlines()
    assert any("✘ transformers" in r and "fix:" in r for r in rows), result.output
    assert any("✘ KV-cache self-check" in r and "holds 0 positions" in r for r in rows), result.output
